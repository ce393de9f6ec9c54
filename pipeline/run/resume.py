"""Resume an interrupted run chunk by chunk: what was finished, and whether it may be continued.

A store being written holds a hidden folder ``.fcnpipe/`` beside its arrays:

* ``run.json``: the run's fingerprint (what the bytes depend on: the input file, the model, the
  config's keys that change a pixel; :func:`fingerprint`) and its torch threads, written
  atomically before any chunk;
* ``done/<task>``: one empty file per finished task, created only after every chunk the task
  wrote is on disk (each written to a temporary file renamed over the chunk, then fsynced), so a
  marker never stands for a chunk that a kill, even SIGKILL or a power cut, could have lost. On
  threads the fsyncs and the marker are done by a background thread (:data:`MARK_BEHIND`) while
  the workers go on; the run waits for it before it completes the store.

``--resume`` compares the fingerprint, skips the tasks that have a marker and runs the rest; the
coarser pyramid levels (a sixteenth of the pixels) are always made again from level 1. The tasks
are deterministic (fixed tiling, fixed torch threads), so the result is byte-identical to an
uninterrupted run. The folder is removed when the store is marked complete.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import RunConfig, byte_neutral
from pipeline.errors import ConfigError, OutputError
from pipeline.source.tiff import SourceInfo
from pipeline.store.arrays import STORE_FORMAT, is_empty_folder, is_store
from pipeline.store.ome import read_record
from pipeline.tiling import Tile

STATE_DIR = ".fcnpipe"
_STATE = "run.json"
_DONE = "done"


def task_id(group: Sequence[Tile]) -> str:
    """The name of a task: the row and column of its first tile, stable across runs of one plan.

    >>> task_id([Tile(row=2, col=0, core=(1024, 1536, 0, 512), window=(1023, 1537, 0, 513))])
    'r2c0'
    """
    return f"r{group[0].row}c{group[0].col}"


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(store: str, state: dict[str, Any]) -> None:
    """Write the fingerprint atomically (temporary file, fsync, rename) and clear old markers."""
    folder = os.path.join(store, STATE_DIR)
    os.makedirs(os.path.join(folder, _DONE), exist_ok=True)
    temporary = os.path.join(folder, f"{_STATE}.partial")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(state, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, os.path.join(folder, _STATE))
    _fsync_path(folder, directory=True)


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
                _fsync_path(path)
        folder = os.path.join(store, STATE_DIR, _DONE)
        os.makedirs(folder, exist_ok=True)
        marker = os.path.join(folder, task)
        os.close(os.open(marker, os.O_CREAT | os.O_WRONLY, 0o644))
    except OSError as err:
        raise OutputError(f"{store}: cannot record finished task {task} ({err.strerror or err})") from err


class _MarkBehind:
    """Marks finished tasks from a background thread, so that a worker does not wait for its
    fsyncs (0.3 ms a file, ten files a task) with its core idle. A task that finished but whose
    marker was not written yet when the process died is simply computed again by ``--resume``.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, str, list[str]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: OutputError | None = None
        self._lock = threading.Lock()

    def submit(self, store: str, task: str, written: Iterable[str]) -> None:
        """Queue ``mark_done(store, task, written)``; raise the error an earlier marker met, if any."""
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="fcnpipe-mark-done", daemon=True)
                self._thread.start()
        self._queue.put((store, task, list(written)))

    def _loop(self) -> None:
        while True:
            store, task, written = self._queue.get()
            try:
                mark_done(store, task, written)
            except OutputError as err:
                with self._lock:
                    self._error = self._error or err
            finally:
                self._queue.task_done()

    def wait(self, raise_error: bool = True) -> None:
        """Return once every queued marker is written; raise the first error one met, if asked
        (else forget it: it belonged to a run that already failed)."""
        self._queue.join()
        with self._lock:
            error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


MARK_BEHIND = _MarkBehind()
"""This process's background marker writer (runs on threads; Dask workers mark as they go)."""


def done_tasks(store: str) -> set[str]:
    """Names of the tasks that finished in earlier, interrupted runs of ``store``."""
    try:
        return set(os.listdir(os.path.join(store, STATE_DIR, _DONE)))
    except FileNotFoundError:
        return set()


def clear_state(store: str) -> None:
    """Remove ``.fcnpipe/``: the store is complete and holds only what viewers expect."""
    shutil.rmtree(os.path.join(store, STATE_DIR), ignore_errors=True)


def remove_partial_files(store: str) -> int:
    """Delete the temporary ``*.partial`` files a killed zarr write leaves behind; return how many."""
    removed = 0
    for folder, _, files in os.walk(store):
        for name in files:
            if name.endswith(".partial"):
                os.unlink(os.path.join(folder, name))
                removed += 1
    return removed


def differences(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """What differs between two fingerprints, as ``key: before -> now`` lines.

    >>> differences({"model": {"sha256": "ab"}, "tile": 512}, {"model": {"sha256": "cd"}, "tile": 512})
    ['model.sha256: ab -> cd']
    """
    lines = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        name = f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            lines.extend(differences(old, new, f"{name}."))
        elif old != new:
            lines.append(f"{name}: {_short(old)} -> {_short(new)}")
    return lines


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Resume:
    """What ``--resume`` found at the output path."""

    done: frozenset[str]
    """Tasks finished by earlier runs."""
    complete: bool = False
    """The store is already complete: nothing to do."""
    restart: bool = False
    """The store was interrupted before its first task: it is created again."""
    record: dict[str, Any] | None = None
    """The store's ``fcnpipe`` attribute, kept (with its start time) for the completion mark."""


def fingerprint(config: RunConfig, source: SourceInfo, model_sha256: str) -> dict[str, Any]:
    """What the output's bytes depend on, as plain JSON values: the store format, the input file (name
    and size), the model (sha256) and every config key not declared byte-neutral
    (:data:`pipeline.config.BYTE_NEUTRAL`), so that a new key is compared unless declared neutral."""
    return fingerprint_of(config.to_dict(), os.path.basename(source.path), source.file_size, model_sha256)


def fingerprint_of(values: dict[str, Any], input_name: str, input_size: int, model_sha256: str) -> dict[str, Any]:
    """:func:`fingerprint` of a config as :meth:`pipeline.config.RunConfig.to_dict` gives it.

    >>> config = {"input": {"path": "/a/s.svs", "level": None}, "compute": {"workers": 2, "device": "cpu"}}
    >>> fingerprint_of(config, "s.svs", 10, "ab")["compute"], fingerprint_of(config, "s.svs", 10, "ab")["input"]
    ({'device': 'cpu'}, {'level': None, 'name': 's.svs', 'size_bytes': 10})
    """
    value: dict[str, Any] = {"store_format": STORE_FORMAT}
    for section, keys in values.items():
        if byte_neutral(section):
            continue
        value[section] = {key: v for key, v in keys.items() if not byte_neutral(f"{section}.{key}")}
    value.setdefault("input", {}).update(name=input_name, size_bytes=input_size)
    value.setdefault("model", {})["sha256"] = model_sha256
    loaded: dict[str, Any] = json.loads(json.dumps(value))
    return loaded


def check_target(path: str, overwrite: bool) -> None:
    """Refuse an existing output without ``overwrite``, saying what it is and what to pass; and
    anything but a Zarr store (or an empty folder) even with it."""
    if not os.path.lexists(path) or is_empty_folder(path):
        return
    if overwrite:
        if not is_store(path):
            raise OutputError(f"{path}: exists and is not a Zarr store; refusing to delete it")
        return
    if not is_store(path):
        raise OutputError(f"{path}: already exists and is not a Zarr store; choose another output path")
    record = read_record(path)
    if record is not None and record.get("complete"):
        raise OutputError(f"{path}: already exists and is complete; pass --overwrite to compute it again")
    if record is None and read_state(path) is None and not _begun(path):
        raise OutputError(f"{path}: already exists and is not an fcnpipe output; choose another output path")
    raise OutputError(
        f"{path}: already exists and is incomplete (an interrupted run); pass --resume to continue it, "
        "or --overwrite to start again"
    )


_METADATA_ONLY = {".zgroup", ".zattrs", "zarr.json", ".zmetadata"}


def _begun(path: str) -> bool:
    """A Zarr group that holds nothing but its own metadata: an fcnpipe store whose creation an
    earlier fcnpipe did not finish (nothing of it can be lost by starting it again)."""
    return set(os.listdir(path)) <= _METADATA_ONLY


def check_resume(path: str, fingerprint: dict[str, Any]) -> Resume | None:
    """What ``--resume`` finds at ``path``; None if there is nothing there (a new store is made).

    Refuses a store, complete or not, made from another input, model or config, saying what
    differs, and anything that is not an fcnpipe output. An empty folder, or a group that holds
    nothing but its own metadata (a creation killed before this fcnpipe made it atomic), is started
    again.
    """
    if not os.path.lexists(path) or is_empty_folder(path):
        return None
    if not is_store(path):
        raise OutputError(f"{path}: exists and is not a Zarr store; cannot resume it")
    record = read_record(path)
    if record is not None and record.get("complete"):
        _check_same(path, record.get("fingerprint"), fingerprint, complete=True)
        return Resume(frozenset(), complete=True, record=record)
    state = read_state(path)
    if state is None:
        if record is None and not _begun(path):
            raise OutputError(f"{path}: is not an fcnpipe output (no fcnpipe record); pass --overwrite to replace it")
        return Resume(frozenset(), restart=True)
    _check_same(path, state.get("fingerprint"), fingerprint, complete=False)
    return Resume(frozenset(done_tasks(path)), record=record)


def _check_same(path: str, before: Any, now: dict[str, Any], complete: bool) -> None:
    """Refuse a store whose fingerprint is not ``now``, saying what differs and what to do."""
    what = "is complete but was made" if complete else "cannot resume: it was started"
    again = "to compute it again" if complete else "instead of --resume to start again"
    if not isinstance(before, dict):
        raise ConfigError(
            f"{path}: {what} by an fcnpipe that kept no fingerprint, so it cannot be checked against this "
            f"input, model and config; pass --overwrite {again}"
        )
    changed = differences(before, now)
    if changed:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ConfigError(
            f"{path}: {what} with a different input, model or config ({shown}); "
            f"rerun with the same ones, or pass --overwrite {again}"
        )


def resumed_threads(path: str, threads: int, notes: list[str]) -> tuple[int, list[str]]:
    """The torch threads of the interrupted run: the same count gives the same bytes."""
    state = read_state(path) or {}
    before = state.get("torch_threads")
    if isinstance(before, int) and before != threads:
        notes.append(f"threads {before} torch threads per forward pass, as in the interrupted run (same bytes)")
        return before, notes
    return threads, notes
