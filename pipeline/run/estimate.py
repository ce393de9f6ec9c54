"""What a run will cost, measured on this machine before it starts: time, memory, disk.

:func:`estimate` runs one real task's work on a sample of the image (a 2 x 2 block of tiles near
its centre that has foreground): it reads the windows, runs the network, quantises and compresses
the result exactly as the run will, but writes nothing. From the seconds per tile it gives an ETA
for the tiles left to compute; from the memory that one task took on top of the loaded model
(the peak resident set, reset just before, see :func:`reset_peak_rss`) the peak a run with
``workers`` such tasks at once will reach; from the compressed bytes per chunk the size on disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.compute.tasks import predict_tiles, read_windows
from pipeline.model.predictor import Predictor, select_device, set_torch_threads
from pipeline.run.plan import RunPlan
from pipeline.store.arrays import encoded_size
from pipeline.tiling import Tile, blocks_2x2

PYRAMID_FACTOR = 4 / 3
"""Pixels of all pyramid levels over those of level 0: 1 + 1/4 + 1/16 + ..."""


@dataclass(frozen=True)
class Estimate:
    tiles_sampled: int
    read_s: float
    """Seconds per tile of reading and decoding its window (halo included)."""
    forward_s: float
    """Seconds per tile of the network, softmax, argmax and quantising."""
    encode_s: float
    """Seconds per tile of quantising and compressing its chunks."""
    eta_s: float
    """Expected wall time of the tiles left to compute, with ``workers`` tasks at once."""
    peak_rss_mib: float
    output_bytes: int
    """Expected size of the store on disk, pyramid included."""

    @property
    def tile_s(self) -> float:
        return self.read_s + self.forward_s + self.encode_s


def estimate(plan: RunPlan) -> Estimate:
    """Time one task's worth of tiles of ``plan`` and scale it to the whole run; writes nothing."""
    sample = _sample(plan)
    job = plan.job("", "estimate")
    set_torch_threads(plan.torch_threads)
    predictor = Predictor(plan.model.module, select_device(plan.device), job.precision, job.tta, plan.model.path)
    before = reset_peak_rss()
    started = time.perf_counter()
    windows, _, _ = read_windows(job, sample)
    read_s = time.perf_counter() - started
    first = next(iter(windows.values()))[0][1]
    predictor(first[None])  # the first pass of a network pays one-off costs (allocations, kernels)
    started = time.perf_counter()
    cores = predict_tiles(predictor, windows, sample, job.output.dtype)
    forward_s = time.perf_counter() - started
    started = time.perf_counter()
    size = sum(encoded_size(stored, labels) for _, stored, labels in cores)
    encode_s = time.perf_counter() - started
    task_mib = max(0.0, peak_rss_mib() - before)
    n = len(sample)
    per_tile = (read_s + forward_s + encode_s) / n
    kept = plan.chunks - plan.chunks_background
    return Estimate(
        tiles_sampled=n,
        read_s=read_s / n,
        forward_s=forward_s / n,
        encode_s=encode_s / n,
        eta_s=per_tile * plan.chunks_to_compute / plan.workers,
        peak_rss_mib=before + plan.workers * task_mib,
        output_bytes=int(size / n * kept * PYRAMID_FACTOR),
    )


def _sample(plan: RunPlan) -> list[Tile]:
    """The foreground tiles of the task nearest the image centre (any task if none has foreground)."""
    height, width = plan.grid.shape
    groups = [[tile for tile in group if plan.kept(tile)] for group in plan.groups()]
    groups = [group for group in groups if group] or plan.groups()

    def distance(group: list[Tile]) -> float:
        y0, y1, x0, x1 = group[0].core
        return float(((y0 + y1) / 2 - height / 2) ** 2 + ((x0 + x1) / 2 - width / 2) ** 2)

    nearest = min(groups, key=distance)
    return next(blocks_2x2(nearest)) if plan.shard else nearest  # a shard's task computes 2 x 2 tiles at a time


def reset_peak_rss() -> float:
    """Reset this process's peak resident set (Linux ``clear_refs``) and return the current one, MiB.

    Where that is not possible the peak is not reset, and the estimate is a lower bound.
    """
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        pass
    return _status_mib("VmRSS") or peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set of this process since start or the last :func:`reset_peak_rss`, MiB."""
    value = _status_mib("VmHWM")
    if value:
        return value
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(field: str) -> float:
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
