"""One writer per output store: an advisory lock held for the whole run.

The lock is ``flock`` on a file beside the store (``OUT.zarr.lock``), not inside it, because
``--overwrite`` deletes the store. The kernel releases it when the process ends in any way,
SIGKILL included, so a killed run never leaves a stale lock behind; the file is removed when the
run ends. Another process that opened the file before it was removed would lock a deleted file,
so after locking, the lock is checked to still be the file at that path, and retried if not.

The store is named by its resolved path (symlinks followed), so two writers that reach one store
through different paths meet at one lock. A process that holds a store's lock may take it again
(``fcnpipe run`` takes it before planning, so that a second writer is refused at once, and the
run that follows takes it again): it is released when the outermost block ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.errors import OutputError


def lock_path(store: str) -> str:
    """``OUT.zarr.lock`` beside the store, named after its resolved path."""
    return os.path.realpath(store).rstrip(os.sep) + ".lock"


_held: dict[str, int] = {}
"""Lock files this process holds, and how many blocks hold each."""
_held_lock = threading.Lock()


@contextmanager
def store_lock(store: str) -> Iterator[None]:
    """Hold the lock of ``store`` while the block runs; refuse if another process holds it."""
    path = lock_path(store)
    with _held_lock:
        again = path in _held
        if again:
            _held[path] += 1
    if again:
        try:
            yield
        finally:
            with _held_lock:
                _held[path] -= 1
        return
    folder = os.path.dirname(path)
    made = not os.path.isdir(folder)
    if made:  # the store's folder: needed for the store anyway
        try:
            os.makedirs(folder)
        except OSError as err:
            raise OutputError(f"{store}: cannot create its folder {folder} ({err.strerror or err})") from err
    fd = _acquire(store, path)
    with _held_lock:
        _held[path] = 1
    try:
        yield
    finally:
        with _held_lock:
            del _held[path]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # closing releases the lock
        if made:  # a run that wrote nothing there leaves no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _acquire(store: str, path: str) -> int:
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"{store}: cannot create the lock file {path} ({err.strerror or err})") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"{store}: another fcnpipe process (pid {holder}) is writing to it; "
                f"wait for it to finish, or stop it first (lock: {path})"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)  # the holder removed the file between our open and our lock: try again
    raise OutputError(f"{store}: could not take the lock {path}")
