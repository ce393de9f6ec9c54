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

A store in object storage (``s3://``) has no rename and no ``flock``; instead:

* **One writer**: a lease object beside the store (``OUT.zarr.lock``), created with a conditional
  PUT (``If-None-Match: *``), so that of two writers starting at once exactly one creates it. It
  names its holder (host, pid) and an expiry :data:`LEASE_SECONDS` ahead, renewed every
  :data:`RENEW_SECONDS` by a conditional PUT on its own ETag (``If-Match``) while the run holds it,
  and deleted when the run ends. A lease that has expired (its holder stopped renewing: killed, or
  cut off), or whose holder is a process of this host that no longer runs, is taken over by a
  conditional PUT on its ETag, so that of two takers one wins. The guarantee holds on a server that
  honours conditional writes (AWS S3 since 2024, MinIO, moto) and with host clocks that agree to
  within a fraction of :data:`LEASE_SECONDS`; a run that finds its lease taken (it stopped renewing
  it for longer than that) fails instead of marking the store complete.
* **A creation**: the new store is built in a local folder, then its objects are PUT under a
  ``.fcnpipe/creating`` marker, put first and deleted last, so that a store whose creation was
  killed is started again, never resumed or taken as complete (:func:`staged_store`).
* **Markers**: each is PUT after the PUTs of its task's chunks have returned (an object is durable
  once its PUT has returned).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline import files, remote
from pipeline.errors import OutputError
from pipeline.files import fsync_path

# --- one writer -----------------------------------------------------------------------------------


def lock_path(store: str) -> str:
    """``OUT.zarr.lock`` beside the store, named after its resolved path (or its URL)."""
    return files.normalized(store).rstrip(os.sep) + ".lock"


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
    if files.is_remote(store):
        files.check_writable(store)
    with _lease(store, path) if files.is_remote(store) else _flock(store, path):
        with _held_lock:
            _held[path] = 1
        try:
            yield
        finally:
            with _held_lock:
                del _held[path]


@contextmanager
def _flock(store: str, path: str) -> Iterator[None]:
    """Hold the ``flock`` of the lock file ``path`` of ``store`` while the block runs."""
    folder = os.path.dirname(path)
    made = not os.path.isdir(folder)
    if made:  # the store's folder: needed for the store anyway
        try:
            os.makedirs(folder)
        except OSError as err:
            raise OutputError(f"{store}: cannot create its folder {folder} ({err.strerror or err})") from err
    fd = _acquire(store, path)
    try:
        yield
    finally:
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


LEASE_SECONDS = 120.0
"""How long a lease in object storage holds without being renewed."""

RENEW_SECONDS = 20.0


class LeaseLost(OutputError):
    """Another writer took the store's lease while this run held it (it had stopped renewing it)."""


_lost: set[str] = set()
"""Lease objects this process held and found taken."""


def check_lease(store: str) -> None:
    """Raise :class:`LeaseLost` if the lease of ``store`` (in object storage) was taken from this process."""
    if lock_path(store) in _lost:
        raise LeaseLost(
            f"{remote.redact(store)}: another fcnpipe process took over this store while this run was writing "
            f"it (this run stopped renewing its lease for over {LEASE_SECONDS:.0f} s); it is not marked complete"
        )


def _lease_body(expires: float) -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "expires": expires}).encode()


@contextmanager
def _lease(store: str, path: str) -> Iterator[None]:
    """Hold the lease object ``path`` of ``store`` while the block runs (see the module's notes)."""
    fs, key = remote.filesystem(path, files.options_for(path))
    shown = remote.redact(store)
    try:
        fs.pipe_file(key, _lease_body(time.time() + LEASE_SECONDS), mode="create")
    except FileExistsError:
        _take_over(fs, key, shown, remote.redact(path))
    except Exception as err:
        reason = remote.short_reason(err)
        raise OutputError(f"{shown}: cannot create its lease {remote.redact(path)} ({reason})") from err
    _lost.discard(path)
    stop, etag = threading.Event(), _etag(fs, key)  # ours: just written, and unexpired
    renewer = threading.Thread(target=_renew, args=(fs, key, etag, path, stop), name="fcnpipe-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        if path not in _lost:
            with contextlib.suppress(Exception):
                fs.rm_file(key)


def _etag(fs: Any, key: str) -> str:
    fs.invalidate_cache(key)
    return str(fs.info(key)["ETag"])


def _take_over(fs: Any, key: str, shown: str, lease: str) -> None:
    """Take the lease at ``key`` if its holder is gone; refuse, naming it, otherwise."""
    try:
        etag, held = _etag(fs, key), json.loads(fs.cat_file(key))
    except FileNotFoundError:  # released between our create and our look: try once more
        try:
            fs.pipe_file(key, _lease_body(time.time() + LEASE_SECONDS), mode="create")
            return
        except FileExistsError:
            raise OutputError(f"{shown}: another fcnpipe process is starting to write it (lease {lease})") from None
    except (ValueError, TypeError):
        held = {}
    host, pid, expires = held.get("host"), held.get("pid"), float(held.get("expires", 0) or 0)
    gone = time.time() > expires or (host == socket.gethostname() and isinstance(pid, int) and not _alive(pid))
    if gone:
        try:
            fs.pipe_file(key, _lease_body(time.time() + LEASE_SECONDS), IfMatch=etag)
            return
        except OSError:  # another writer took it first
            pass
    left = max(0.0, expires - time.time())
    raise OutputError(
        f"{shown}: another fcnpipe process (pid {pid} on {host}) is writing to it; wait for it to finish, "
        f"or stop it first (its lease {lease} expires in {left:.0f} s unless renewed)"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _renew(fs: Any, key: str, etag: str, path: str, stop: threading.Event) -> None:
    """Renew the lease every :data:`RENEW_SECONDS` on its own ETag until ``stop``; a lease that
    another writer took is recorded in :data:`_lost` (:func:`check_lease`)."""
    while not stop.wait(RENEW_SECONDS):
        try:
            fs.pipe_file(key, _lease_body(time.time() + LEASE_SECONDS), IfMatch=etag)
            etag = _etag(fs, key)
        except FileNotFoundError:
            _lost.add(path)
            return
        except Exception as err:  # a network hiccup: tried again at the next renewal, well before it expires
            if "precondition" in str(err).lower() or getattr(err, "errno", None) == 22:
                _lost.add(path)
                return


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
    if files.is_remote(path):
        yield from _uploaded_whole(path)
        return
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


def _uploaded_whole(path: str) -> Iterator[str]:
    """A store in object storage: built in a local folder, then uploaded in one concurrent batch
    (an old store there deleted first) under the ``creating`` marker, put first and deleted last."""
    with tempfile.TemporaryDirectory(prefix="fcnpipe-create-") as folder:
        staging = os.path.join(folder, "store.zarr")
        yield staging
        files.remove_tree(path)
        marker = files.join(path, STATE_DIR, CREATING_MARKER)
        files.put(marker, b"")
        files.upload_tree(staging, path)
        files.delete(marker)


def being_created(path: str) -> bool:
    """Whether the store at ``path`` (in object storage) is one whose creation has not finished."""
    return files.is_remote(path) and CREATING_MARKER in files.names(files.join(path, STATE_DIR))


def remove_leftovers(path: str) -> int:
    """Remove the hidden folders that runs killed while creating or replacing ``path`` left beside
    it; return how many. Only for a process that holds the store's lock."""
    if files.is_remote(path):
        return 0  # created in place: no folders beside it
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

CREATING_MARKER = "creating"


def write_state(store: str, state: dict[str, Any]) -> None:
    """Write the fingerprint atomically (temporary file, fsync, rename) and clear old markers."""
    folder = files.join(store, STATE_DIR)
    if not files.is_remote(store):
        os.makedirs(os.path.join(folder, _DONE), exist_ok=True)
    files.put(files.join(folder, _STATE), json.dumps(state, indent=1, sort_keys=True), durable=True)


def read_state(store: str) -> dict[str, Any] | None:
    """The fingerprint of an unfinished store, or None if it has none (or it cannot be read)."""
    try:
        data = files.get(files.join(store, STATE_DIR, _STATE))
        value = None if data is None else json.loads(data)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def mark_done(store: str, task: str, written: Iterable[str]) -> None:
    """Record ``task`` as finished, once the chunk files in ``written`` are flushed to disk."""
    if files.is_remote(store):  # each chunk's PUT has returned: it is durable
        files.put(files.join(store, STATE_DIR, _DONE, task), b"")
        return
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
    return set(files.names(files.join(store, STATE_DIR, _DONE)))


def clear_state(store: str) -> None:
    """Remove ``.fcnpipe/``: the store is complete and holds only what viewers expect."""
    files.remove_tree(files.join(store, STATE_DIR))
