"""What keeps a store safe: one writer at a time, a creation that is whole or absent, and markers of
the tasks whose chunks are on disk.

* **One writer**: an advisory ``flock`` on a file beside the store (``OUT.zarr.lock``), not inside it,
  because ``--overwrite`` deletes the store. The kernel releases it when the process ends in any
  way, SIGKILL included, so a killed run never leaves a stale lock behind; the file is removed
  when the run ends. Another process that opened the file before it was removed would lock a
  deleted file, so after locking, the lock is checked to still be the file at that path, and
  retried if not. The store is named by its resolved path (symlinks followed), so two writers
  that reach one store through different paths meet at one lock. A process that holds a store's
  lock may take it again (``fcnpipe run`` takes it before planning, so that a second writer is
  refused at once, and the run that follows takes it again).
* **A whole creation**: a new store is built in a hidden folder beside its path and renamed into
  place (:func:`staged_store`), so a kill or a full disk at any moment of the creation leaves
  either what was there before or the whole new store.
* **Markers**: ``.fcnpipe/run.json`` holds the run's fingerprint and torch threads, written
  atomically before any chunk; ``.fcnpipe/done/<task>`` is created only after every chunk the
  task wrote is flushed to disk (:func:`mark_done`), so a marker never stands for a chunk that a
  kill, even SIGKILL or a power cut, could have lost. The folder is removed when the store is
  marked complete (:func:`clear_state`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.errors import OutputError
from pipeline.files import atomic_write, fsync_path

# --- one writer -----------------------------------------------------------------------------------


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


# --- a creation that is whole or absent -----------------------------------------------------------

CREATING, REMOVING = ".creating-", ".removing-"
"""Infixes of the hidden folders beside a store: one being built, an old one being deleted."""


def _beside_hidden(path: str, infix: str, token: str) -> str:
    folder, name = os.path.split(os.path.normpath(path))
    return os.path.join(folder, f".{name}{infix}{token}")


@contextmanager
def staged_store(path: str, token: str) -> Iterator[str]:
    """A folder to build a new store in, which replaces ``path`` whole when the block ends.

    A store never exists half-made at ``path``: it is built in a hidden folder beside it, then
    renamed into place (an existing store at ``path`` is first renamed aside, then deleted), so a
    kill or a full disk at any moment of the creation leaves either what was there before or the
    whole new store; the hidden folders a kill leaves behind are removed by the next run
    (:func:`remove_leftovers`). On an error the staging folder is removed.
    """
    staging = _beside_hidden(path, CREATING, token)
    try:
        try:
            yield staging
            if os.path.lexists(path):
                old = _beside_hidden(path, REMOVING, token)
                os.rename(path, old)
                os.rename(staging, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(staging, path)
        except OSError as err:
            raise OutputError(f"{path}: cannot create the output store ({err.strerror or err})") from err
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def remove_leftovers(path: str) -> int:
    """Remove the hidden folders that runs killed while creating or replacing ``path`` left beside
    it; return how many. Only for a process that holds the store's lock."""
    folder, name = os.path.split(os.path.normpath(path))
    removed = 0
    for entry in os.listdir(folder or "."):
        if entry.startswith((f".{name}{CREATING}", f".{name}{REMOVING}")):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
            removed += 1
    return removed


# --- markers of finished tasks --------------------------------------------------------------------

STATE_DIR = ".fcnpipe"

_STATE = "run.json"

_DONE = "done"


def write_state(store: str, state: dict[str, Any]) -> None:
    """Write the fingerprint atomically (temporary file, fsync, rename) and clear old markers."""
    folder = os.path.join(store, STATE_DIR)
    os.makedirs(os.path.join(folder, _DONE), exist_ok=True)
    atomic_write(os.path.join(folder, _STATE), json.dumps(state, indent=1, sort_keys=True), durable=True)


def read_state(store: str) -> dict[str, Any] | None:
    """The fingerprint of an unfinished store, or None if it has none (or it cannot be read)."""
    try:
        with open(os.path.join(store, STATE_DIR, _STATE), encoding="utf-8") as file:
            value = json.load(file)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def mark_done(store: str, task: str, written: Iterable[str]) -> None:
    """Record ``task`` as finished, once the chunk files in ``written`` are flushed to disk."""
    try:
        for path in written:
            if os.path.exists(path):  # zarr stores no file for a chunk that is all fill value
                fsync_path(path)
        folder = os.path.join(store, STATE_DIR, _DONE)
        os.makedirs(folder, exist_ok=True)
        marker = os.path.join(folder, task)
        os.close(os.open(marker, os.O_CREAT | os.O_WRONLY, 0o644))
    except OSError as err:
        raise OutputError(f"{store}: cannot record finished task {task} ({err.strerror or err})") from err


def done_tasks(store: str) -> set[str]:
    """Names of the tasks that finished in earlier, interrupted runs of ``store``."""
    try:
        return set(os.listdir(os.path.join(store, STATE_DIR, _DONE)))
    except FileNotFoundError:
        return set()


def clear_state(store: str) -> None:
    """Remove ``.fcnpipe/``: the store is complete and holds only what viewers expect."""
    shutil.rmtree(os.path.join(store, STATE_DIR), ignore_errors=True)
