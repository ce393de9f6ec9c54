"""Dask distributed over loopback: a real scheduler and real workers give the local run's bytes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.compute.cluster import job_queue_cluster
from pipeline.config import load_config
from pipeline.store.safety import STATE_DIR
from tests.conftest import slide_and_model
from tests.test_resume import FIXED, assert_same_bytes, fcnpipe

pytestmark = pytest.mark.slow  # real processes, seconds each; the quick loop is -m 'not slow'


class Cluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, stopped at the end."""

    def __init__(self, folder: Path, workers: int) -> None:
        self.file = folder / "scheduler.json"
        self.scheduler = self._start("dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard")
        deadline = time.monotonic() + 60
        while not self.file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.address = json.loads(self.file.read_text())["address"]
        self.folders = [folder / f"worker{i}" for i in range(workers)]
        self.workers = [self._start_worker(local) for local in self.folders]
        self.wait_for(workers)

    def _start(self, program: str, *args: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", f"distributed.cli.{program}", "--scheduler-file", str(self.file), *args]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _start_worker(self, local: Path) -> subprocess.Popen[bytes]:
        flags = ["--nthreads", "1", "--no-nanny", "--host", "127.0.0.1", "--no-dashboard"]
        return self._start("dask_worker", *flags, "--local-directory", str(local))

    def replace(self, index: int) -> None:
        """Start a new worker in place of worker ``index`` (killed), and wait until it has joined."""
        self.folders[index] = self.folders[index].with_name(f"{self.folders[index].name}-again")
        self.workers[index] = self._start_worker(self.folders[index])
        self.wait_for(len(self.workers))

    def wait_for(self, workers: int) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(workers, timeout=60)

    def stop(self) -> None:
        for process in [*self.workers, self.scheduler]:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A 4096^2 synthetic slide, a reference FCN, and the store of a local (threads) run of them."""
    folder = tmp_path_factory.mktemp("distributed")
    image, model = slide_and_model(folder, seed=5)
    local = folder / "local.zarr"
    done = fcnpipe("run", image, "-m", model, "-o", local, *FIXED)
    assert done.returncode == 0, done.stderr
    return image, model, local


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path, workers=2)
    yield running
    running.stop()


def test_run_and_batch_on_a_scheduler_give_the_local_bytes(
    slide: tuple[Path, Path, Path], cluster: Cluster, tmp_path: Path
) -> None:
    image, model, local = slide
    store = tmp_path / "remote.zarr"
    done = fcnpipe("run", image, "-m", model, "-o", store, *FIXED, "--scheduler", cluster.address)
    assert done.returncode == 0, done.stderr
    assert f"Dask {cluster.address}: 2 workers, 2 worker threads, 1 torch thread each" in done.stderr
    assert_same_bytes(local, store)
    outdir = tmp_path / "batch"
    batch = fcnpipe("batch", image, "-m", model, "-o", outdir, *FIXED, "--scheduler", cluster.address)
    assert batch.returncode == 0, batch.stderr
    assert_same_bytes(local, outdir / "slide.zarr")


def start_run(image: Path, model: Path, store: Path, address: str) -> tuple[subprocess.Popen[str], int]:
    """``fcnpipe run`` on ``address`` in the background, once it has finished 5 tasks; and how many."""
    args = ["run", image, "-m", model, "-o", store, *FIXED, "--scheduler", address]
    run = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], stderr=subprocess.PIPE, text=True)
    markers = store / STATE_DIR / "done"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not markers.exists() or len(os.listdir(markers)) < 5):
        time.sleep(0.02)
    return run, len(os.listdir(markers))


def test_job_scripts_for_slurm_and_pbs_come_from_the_config(tmp_path: Path) -> None:
    config = load_config(
        overrides={
            "cluster": {
                "queue": "gpu",
                "account": "pathology",
                "cores": 8,
                "memory": "64GB",
                "walltime": "10:00:00",
                "gpus": 1,
                "job_script_prologue": ["module load cuda/12", "source ~/fcnpipe/.venv/bin/activate"],
                "job_extra_directives": ["--constraint=a100"],
                "log_directory": str(tmp_path / "logs"),
            }
        }
    )
    with job_queue_cluster("slurm", config.cluster) as slurm:
        script = slurm.job_script()
    for line in (
        "#SBATCH -p gpu",
        "#SBATCH -A pathology",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH -t 10:00:00",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --constraint=a100",
        "module load cuda/12",
        "source ~/fcnpipe/.venv/bin/activate",
    ):
        assert line in script, line
    assert "--nthreads 8" in script and "--resources GPU=1" in script and "--mem=60G" in script
    assert script.index("module load cuda/12") < script.index("distributed.cli.dask_worker")
    cpu = load_config(overrides={"cluster": {"queue": "workq", "cores": 16, "processes": 4, "memory": "64GB"}})
    with job_queue_cluster("pbs", cpu.cluster) as pbs:
        script = pbs.job_script()
    assert "#PBS -q workq" in script and "#PBS -l select=1:ncpus=16:mem=60GB" in script
    assert "--nthreads 4" in script and "--nworkers 4" in script and "GPU" not in script


def test_the_job_queue_path_runs_with_local_jobs(slide: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The job script, adaptive scaling and the model plugin, with the jobs run as local processes."""
    image, model, local = slide
    config = tmp_path / "jobs.yaml"
    cluster = f"  cores: 1\n  memory: 2GB\n  maximum_jobs: 2\n  credentials_directory: {tmp_path / 'credentials'}\n"
    config.write_text(f"compute:\n  scheduler: local-jobs\ncluster:\n{cluster}")
    store = tmp_path / "jobs.zarr"
    done = fcnpipe("run", image, "-m", model, "-o", store, *FIXED, "-c", config)
    assert done.returncode == 0, done.stderr
    assert "Dask local-jobs" in done.stderr and "TLS" in done.stderr
    assert not list((tmp_path / "credentials").iterdir())  # the run's own certificates, gone with it
    assert_same_bytes(local, store)


def test_a_lost_scheduler_leaves_a_store_that_resume_completes(
    slide: tuple[Path, Path, Path], cluster: Cluster, tmp_path: Path
) -> None:
    image, model, local = slide
    store = tmp_path / "remote.zarr"
    run, _ = start_run(image, model, store, cluster.address)
    cluster.scheduler.send_signal(signal.SIGKILL)
    started = time.monotonic()
    _, stderr = run.communicate(timeout=300)
    print(f"the run ended {time.monotonic() - started:.1f} s after the scheduler was killed")
    assert run.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("fcnpipe:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    resumed = fcnpipe("run", image, "-m", model, "-o", store, *FIXED, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_bytes(local, store)


def _moment(moment: str, cluster: Cluster, store: Path, seed: int) -> Callable[[], int | None]:
    """When to kill: a function that answers the worker to kill once ``moment`` has come, else None."""
    log, markers = store.with_suffix(".log"), store / STATE_DIR / "done"
    victim = seed % 2

    def logged(text: str) -> int | None:
        return victim if log.exists() and text in log.read_text() else None

    def installing() -> int | None:  # the worker whose plugin is writing the model file
        return next((i for i, folder in enumerate(cluster.folders) if any(folder.rglob("fcnpipe-model-*"))), None)

    def computing() -> int | None:
        return victim if markers.exists() and len(os.listdir(markers)) >= 3 + seed % 25 else None

    triggers: dict[str, Callable[[], int | None]] = {
        "start": lambda: victim,
        "planned": lambda: logged("dashboard"),  # the plan's compute line: connected, nothing installed yet
        "installing": installing,
        "computing": computing,
        "pyramid": lambda: logged("making pyramid levels"),
    }
    return triggers[moment]


@pytest.fixture(scope="module")
def pyramid_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A 2560^2 synthetic slide (three pyramid levels: the smallest whose run has a pyramid pass),
    a reference FCN, and the store of a local run of them."""
    folder = tmp_path_factory.mktemp("pyramid")
    image, model = slide_and_model(folder, seed=6, size=2560)
    local = folder / "local.zarr"
    done = fcnpipe("run", image, "-m", model, "-o", local, *FIXED)
    assert done.returncode == 0, done.stderr
    return image, model, local


def test_a_worker_killed_at_any_moment_of_the_run_leaves_the_local_bytes(
    pyramid_slide: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """SIGKILL of one of two workers at each moment of a run, start-up included: while the model is
    installed on the workers (a fresh scheduler), as the run starts, once its plan is printed,
    mid-compute, during the pyramid; a new worker replaces it for the next run. Each run completes
    with the bytes of a local run."""
    image, model, local = pyramid_slide
    rng = random.Random(23)
    survived = []
    cluster = Cluster(tmp_path, workers=2)
    try:
        for moment in ("installing", "start", "planned", "computing", "pyramid"):
            store = tmp_path / f"{moment}.zarr"
            args = ["run", image, "-m", model, "-o", store, *FIXED, "--scheduler", cluster.address]
            run = subprocess.Popen(
                [sys.executable, "-m", "pipeline", *map(str, args)], stderr=subprocess.PIPE, text=True
            )
            trigger = _moment(moment, cluster, store, rng.randrange(1000))
            deadline, victim = time.monotonic() + 120, None
            while victim is None and time.monotonic() < deadline and run.poll() is None:
                victim = trigger()
                time.sleep(0.002)
            if victim is not None:
                cluster.workers[victim].send_signal(signal.SIGKILL)
            _, stderr = run.communicate(timeout=300)
            assert run.returncode == 0, f"worker killed at {moment}: {stderr}"
            assert_same_bytes(local, store)
            assert not list(store.rglob("*.partial"))
            if victim is not None and cluster.workers[victim].wait() == -signal.SIGKILL:
                survived.append(moment)
                cluster.replace(victim)
    finally:
        cluster.stop()
    print(f"killed a worker at: {', '.join(survived)} (each run complete, with the local bytes)")
    assert survived == ["installing", "start", "planned", "computing", "pyramid"]
