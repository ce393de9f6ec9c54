"""Where tasks run: this process's threads, or Dask distributed (local processes, a scheduler, a job queue).

An :class:`Engine` runs a list of delayed tasks and returns their results in order, calling
``on_done(result)`` as each finishes (the progress bar). :func:`open_engine` opens the one the
config asks for, as a context manager:

* ``threads``: Dask's local threaded scheduler, no set-up; the model is shared by the threads;
* ``processes``: a ``distributed.LocalCluster`` of ``compute.workers`` processes;
* ``tcp://host:port`` / ``tls://host:port``: an existing scheduler (``dask scheduler`` + ``dask worker``
  started by you), joined with the certificates of ``compute.tls_ca_file`` for ``tls://``;
* ``slurm`` / ``pbs`` / ``sge``: a dask-jobqueue cluster of batch jobs
  (:func:`pipeline.compute.cluster.job_queue_cluster`),
  scaled between ``cluster.minimum_jobs`` and ``cluster.maximum_jobs`` with the work left;
  ``local-jobs`` runs the same job script as local processes, to try a cluster config on one machine.

On a Dask cluster the model file is sent to each worker once (:class:`pipeline.compute.worker.ModelPlugin`,
which also reaches workers that join later) and kept loaded there; tasks carry only paths and windows. Every
worker runs the same number of torch threads, so that any worker computes the same bytes for a
chunk, and a worker that dies has its tasks recomputed elsewhere by the scheduler with the same
result. CUDA tasks ask for the worker resource ``GPU=1``: a GPU runs one model at a time.

The clusters started here are closed to others (:mod:`pipeline.compute.cluster`): TLS with the
run's own certificates, and the dashboard on loopback.

The thread split matters on a CPU: Dask threads that each run a forward pass with all cores' worth
of torch threads oversubscribe the machine and run slower than either alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import dask.threaded

from pipeline.config import JOB_QUEUES, ClusterConfig, ComputeConfig
from pipeline.errors import ClusterError, FcnpipeError

if TYPE_CHECKING:
    from pipeline.compute.job import Job

log = logging.getLogger("fcnpipe")


def available_cores() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_plan(cores: int, workers: int | None, torch_threads: int | None, device_type: str) -> tuple[int, int]:
    """``(dask workers, torch threads per forward pass)`` with ``workers * torch_threads <= cores``.

    On the CPU two workers let one task read and decode while another computes; on a GPU the
    device does the arithmetic, so two workers keep it fed and one torch thread each is enough.

    >>> thread_plan(2, None, None, "cpu"), thread_plan(16, None, None, "cpu"), thread_plan(16, 4, None, "cpu")
    ((2, 1), (2, 8), (4, 4))
    """
    if device_type != "cpu":
        return (workers or 2, torch_threads or 1)
    if workers is None:
        workers = max(1, min(2, cores // (torch_threads or 1)))
    if torch_threads is None:
        torch_threads = max(1, cores // workers)
    return workers, torch_threads


OnDone = Callable[[Any], None]


def threads_text(workers: int, torch_threads: int) -> str:
    """``N worker threads, M torch threads each``, in words that agree.

    >>> threads_text(2, 1), threads_text(1, 4)
    ('2 worker threads, 1 torch thread each', '1 worker thread, 4 torch threads each')
    """
    worker = "thread" if workers == 1 else "threads"
    torch = "thread" if torch_threads == 1 else "threads"
    return f"{workers} worker {worker}, {torch_threads} torch {torch} each"


class Engine:
    """Runs delayed tasks: Dask's threaded scheduler in this process (this base class)."""

    name = "threads"
    distributed = False
    dashboard: str | None = None

    def plan_threads(self, workers: int | None, torch_threads: int | None, device_type: str) -> tuple[int, int]:
        """``(tasks at once, torch threads per forward pass)`` for this engine."""
        return thread_plan(available_cores(), workers, torch_threads, device_type)

    def describe(self, workers: int, torch_threads: int) -> str:
        return f"{threads_text(workers, torch_threads)}, in this process"

    def share_model(self, job: Job, module: Any) -> None:
        """Make ``module`` the network of ``job`` wherever its tasks run."""
        from pipeline.compute.state import adopt_model  # loads torch: not for a cluster's client alone

        adopt_model(job, module)

    def run(self, tasks: Sequence[Any], workers: int, on_done: OnDone | None = None, gpu: bool = False) -> list[Any]:
        """Compute ``tasks``; ``on_done(result)`` after each; the results in order."""
        from dask.callbacks import Callback

        class _Progress(Callback):  # type: ignore[misc]
            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
                if on_done is not None:
                    on_done(result)

        with _Progress():  # the function, not "threads": the name made dask import distributed (0.16 s)
            # optimize_graph=False: culling each task's own layer costs O(tasks²) (1.3 ms a task at 10,000)
            return list(dask.compute(*tasks, scheduler=dask.threaded.get, num_workers=workers, optimize_graph=False))


THREADS = Engine()
_LOST = ("FutureCancelledError", "CancelledError", "CommClosedError", "StreamClosedError")
"""What a client raises when its scheduler, or a worker it talks to through it, goes away."""
RETRIES = 5


class DistributedEngine(Engine):
    """Runs tasks on a ``distributed.Client``'s cluster."""

    distributed = True

    def __init__(self, client: Any, name: str, torch_threads: int | None = None, dashboard: str | None = None) -> None:
        self.client = client
        self.name = name
        self.dashboard = dashboard or client.dashboard_link
        """Where the dashboard is, and how to reach it (:func:`pipeline.compute.cluster.dashboard_text`)."""
        self.torch_threads = torch_threads
        """Torch threads fixed by the cluster's shape (job queues: one core per Dask thread), or None:
        measured from the workers connected when the run is planned."""

    def _workers(self) -> dict[str, Any]:
        workers: dict[str, Any] = self.client.scheduler_info(n_workers=-1)["workers"]
        return workers

    def plan_threads(self, workers: int | None, torch_threads: int | None, device_type: str) -> tuple[int, int]:
        """The cluster's Dask threads, and torch threads filling each host's cores (the same
        number everywhere, so that every worker computes the same bytes)."""
        info = self._workers()
        torch_threads = torch_threads or self.torch_threads
        if not info:
            return (workers or 1, torch_threads or 1)
        threads = sum(w["nthreads"] for w in info.values())
        if torch_threads is None and device_type == "cpu":
            cores = self._retrying(lambda: self.client.run(available_cores, on_error="ignore"), "count cores")
            per_host: dict[str, int] = {}
            for worker in info.values():
                per_host[worker["host"]] = per_host.get(worker["host"], 0) + worker["nthreads"]
            fits = [cores[a] // per_host[w["host"]] for a, w in info.items() if a in cores]
            torch_threads = max(1, min(fits)) if fits else 1  # no answer: every worker went away meanwhile
        return threads, torch_threads or 1

    def describe(self, workers: int, torch_threads: int) -> str:
        count = len(self._workers())
        if self.torch_threads is not None:  # a job queue: workers come and go
            each = "thread" if torch_threads == 1 else "threads"
            return f"Dask {self.name}, {torch_threads} torch {each} per task; dashboard {self.dashboard}"
        processes = "worker" if count == 1 else "workers"
        threads = threads_text(workers, torch_threads)
        return f"Dask {self.name}: {count} {processes}, {threads}; dashboard {self.dashboard}"

    def share_model(self, job: Job, module: Any) -> None:
        with open(job.model_path, "rb") as file:
            data = file.read()
        name = f"fcnpipe-model-{job.model_sha256[:16]}-{job.device}-{job.precision}-{job.tta}-{job.torch_threads}"
        from pipeline.compute.worker import ModelPlugin

        plugin = ModelPlugin(job, data)
        self._retrying(lambda: self.client.register_plugin(plugin, name=name), "install the model on the workers")

    def _retrying(self, call: Callable[[], Any], what: str) -> Any:
        """``call()``, again after a worker died under it (its connection closed mid-call).

        The scheduler keeps a worker plugin once it is registered and gives it to every worker that
        joins, so registering again reaches the workers that are left; a run needs only one.
        """
        for attempt in range(RETRIES):
            try:
                return call()
            except Exception as err:
                if type(err).__name__ not in _LOST and not isinstance(err, OSError):
                    raise
                if self.client.status != "running" or attempt == RETRIES - 1:
                    raise ClusterError(
                        f"lost the Dask scheduler {self.name} while trying to {what} ({type(err).__name__}); "
                        "run the same command again (with --resume if the store was started)"
                    ) from err
                log.info("a worker went away while trying to %s (%s); trying again", what, type(err).__name__)
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def run(self, tasks: Sequence[Any], workers: int, on_done: OnDone | None = None, gpu: bool = False) -> list[Any]:
        from distributed import as_completed

        futures = self.client.compute(list(tasks), resources={"GPU": 1} if gpu else None)
        order = {future.key: i for i, future in enumerate(futures)}
        results: list[Any] = [None] * len(futures)
        try:
            for future in as_completed(futures):
                results[order[future.key]] = future.result()  # a task's error is raised here, once
                if on_done is not None:
                    on_done(results[order[future.key]])
        except FcnpipeError:
            raise
        except Exception as err:
            if self.client.status == "running" and type(err).__name__ not in _LOST:
                raise
            raise ClusterError(
                f"lost the Dask scheduler {self.name} ({type(err).__name__}); the output is left incomplete: "
                "run the same command again with --resume"
            ) from err
        return results


@contextlib.contextmanager
def open_engine(compute: ComputeConfig, cluster: ClusterConfig) -> Iterator[Engine]:
    """The engine ``compute.scheduler`` names, started for the block and stopped after it.

    A cluster started here speaks TLS (:func:`pipeline.compute.cluster.cluster_security`) unless
    ``compute.tls`` is false, and its dashboard listens on ``compute.dashboard_address`` (loopback).
    """
    kind = compute.scheduler
    if kind == "threads":
        yield THREADS
        return
    from distributed import Client

    from pipeline.compute.cluster import (
        client_security,
        cluster_security,
        forget_credentials,
        job_queue_cluster,
        local_cluster,
    )

    for name in ["distributed", *logging.root.manager.loggerDict]:  # its errors reach the user as one line
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with contextlib.ExitStack() as stack:
        if kind not in ("processes", *JOB_QUEUES):
            try:
                client = stack.enter_context(Client(kind, timeout="30s", security=client_security(compute, kind)))
            except OSError as err:
                raise ClusterError(f"compute.scheduler {kind}: cannot reach the Dask scheduler ({err})") from err
            yield DistributedEngine(client, kind)
            return
        security = cluster_security(compute)
        tls = "TLS" if security is not None else "no TLS"
        if kind == "processes":
            workers = compute.workers or thread_plan(available_cores(), None, compute.torch_threads, "cpu")[0]
            made = stack.enter_context(local_cluster(workers, security, compute.dashboard_address))
            client = stack.enter_context(Client(made))
            client.wait_for_workers(workers)
            yield DistributedEngine(client, f"processes ({tls})", dashboard=_dashboard(client, compute))
            return
        made = job_queue_cluster(kind, cluster, security, compute.dashboard_address)
        stack.callback(forget_credentials, made)  # after the cluster has stopped
        stack.enter_context(made)
        made.adapt(minimum_jobs=cluster.minimum_jobs, maximum_jobs=cluster.maximum_jobs)
        client = stack.enter_context(Client(made))
        log.info("%s: jobs are submitted as tasks queue up; each runs:\n%s", kind, made.job_script())
        jobs = f"{cluster.minimum_jobs}-{cluster.maximum_jobs} jobs of {cluster.cores} cores, {tls}"
        dashboard = _dashboard(client, compute)
        yield DistributedEngine(client, f"{kind} ({jobs})", torch_threads=1, dashboard=dashboard)  # a core a thread


def _dashboard(client: Any, compute: ComputeConfig) -> str:
    from pipeline.compute.cluster import dashboard_port, dashboard_text

    return dashboard_text(dashboard_port(client), compute.dashboard_address, client.scheduler.address)
