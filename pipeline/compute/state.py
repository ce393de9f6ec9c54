"""What a process keeps between the tasks it runs: every piece of per-process compute state.

* the networks, loaded once per process (or adopted from the process that planned the run) and
  kept for every later task of their job (:func:`predictor_for`, :func:`adopt_model`);
* the stores a guarded task failed for, whose other tasks are then not started (:func:`failed`);
* the background writer of finished-task markers (:data:`MARK_BEHIND`).

The other per-process caches are the readers' own and are cleared with them by :func:`reset`:
the decoded TIFF tiles and open files (:mod:`pipeline.source.pixels`) and the store's array handles
(:mod:`pipeline.store.arrays`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from typing import Any

from pipeline.compute.job import Job
from pipeline.errors import OutputError
from pipeline.model.checkpoint import load_model
from pipeline.model.predictor import Predictor, select_device, set_torch_threads
from pipeline.source.pixels import clear_reader_caches
from pipeline.store.arrays import clear_handles
from pipeline.store.safety import mark_done

_predictors: dict[tuple[object, ...], Predictor] = {}

_predictors_lock = threading.Lock()


def predictor_for(job: Job) -> Predictor:
    """The worker's network for ``job``, loaded on first use and kept for every later task."""
    with _predictors_lock:
        if _key(job) not in _predictors:
            set_torch_threads(job.torch_threads)
            loaded = load_model(job.model_path, job.model_factory)
            device = select_device(job.device)
            _predictors[_key(job)] = Predictor(loaded.module, device, job.precision, job.tta, job.model_path)
        return _predictors[_key(job)]


def _key(job: Job) -> tuple[object, ...]:
    return (job.model_path, job.model_sha256, job.device, job.precision, job.tta)


def adopt_model(job: Job, module: Any) -> None:
    """Use an already loaded ``module`` for ``job`` in this process, instead of loading it again."""
    with _predictors_lock:
        if _key(job) not in _predictors:
            set_torch_threads(job.torch_threads)
            device = select_device(job.device)
            _predictors[_key(job)] = Predictor(module, device, job.precision, job.tta, job.model_path)


_failed: set[str] = set()
"""Tokens of the stores a guarded task failed for in this process."""
_failed_lock = threading.Lock()


def fail(token: str) -> None:
    """Remember that a task of the store ``token`` failed: its other tasks are not started."""
    with _failed_lock:
        _failed.add(token)


def failed(token: str) -> bool:
    with _failed_lock:
        return token in _failed


def forget(token: str) -> None:
    """The store ``token`` is done with (finished or failed): forget it."""
    with _failed_lock:
        _failed.discard(token)


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


def reset() -> None:
    """Forget every network, failure and cached reader of this process (markers still queued are
    written first)."""
    MARK_BEHIND.wait(raise_error=False)
    with _predictors_lock:
        _predictors.clear()
    with _failed_lock:
        _failed.clear()
    clear_reader_caches()
    clear_handles()
