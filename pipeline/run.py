"""One function that wires the steps: source -> tiling -> model -> predict -> output -> metadata.

:func:`prepare` does everything that is quick and can fail early (open the TIFF, load the model,
check that they fit, plan the tiles and threads) and returns a :class:`RunPlan` that can be shown
to the user; :func:`execute` does the long part. :func:`run_pipeline` is both.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.cluster import available_cores, thread_plan
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, ModelError
from pipeline.metadata import mark_complete, provenance, write_start
from pipeline.model import LoadedModel, load_model, receptive_radius, select_device, set_torch_threads
from pipeline.output import OutputRef, check_target, create_store
from pipeline.predict import Job, adopt_model, build_tasks, compute_tasks
from pipeline.source import SourceInfo, open_source
from pipeline.tiling import Tile, halo_overhead, plan_tiles


@dataclass
class RunPlan:
    config: RunConfig
    source: SourceInfo
    model: LoadedModel
    halo: int
    tiles: list[Tile]
    workers: int
    torch_threads: int
    device: str
    setup_s: float

    @property
    def output_shape(self) -> tuple[int, int, int]:
        _, height, width = self.source.shape
        return (self.model.spec.num_classes, height, width)

    @property
    def megapixels(self) -> float:
        _, height, width = self.source.shape
        return height * width / 1e6

    def describe(self) -> list[str]:
        """The plan as lines a person reads before a long run."""
        c, y, x = self.source.shape
        cfg = self.config
        return [
            f"input   {self.source.path} level {self.source.ref.level}: {y} x {x} px, {c} channels, "
            f"{self.source.dtype} ({self.megapixels:.1f} Mpx)",
            f"model   {self.model.path} ({self.model.spec.architecture}, {self.model.spec.num_classes} classes, "
            f"receptive radius {self.halo} px)",
            f"tiles   {len(self.tiles)} of {cfg.tiling.tile} px + {self.halo} px halo "
            f"({halo_overhead(self.tiles):.1%} extra reads), {cfg.tiling.batch} per task",
            f"compute {self.device}, {self.workers} workers x {self.torch_threads} torch threads",
            f"output  {cfg.output.path}: {self.output_shape} {cfg.output.dtype} + uint8 labels",
        ]


@dataclass(frozen=True)
class RunResult:
    output_path: str
    shape: tuple[int, int, int]
    megapixels: float
    seconds: float
    record: dict[str, Any]


def prepare(config: RunConfig) -> RunPlan:
    """Open, load, check and plan; fail here, in seconds, on anything a run would fail on later."""
    started = time.perf_counter()
    if config.input.path is None:
        raise ConfigError("No input given: pass an INPUT path (or input.path in the config)")
    if config.model.path is None:
        raise ConfigError("No model given: pass --model PATH (or model.path in the config)")
    if config.output.path is None:
        raise ConfigError("No output given: pass -o PATH (or output.path in the config)")
    check_target(config.output.path, config.output.overwrite)
    source = open_source(config.input.path, config.input.series, config.input.level)
    model = load_model(config.model.path)
    channels = source.shape[0]
    if channels != model.spec.in_channels:
        dropped = " after dropping its alpha band" if source.alpha_dropped else ""
        raise ModelError(
            f"{source.path}: has {channels} channels{dropped} but the model {model.path} "
            f"expects {model.spec.in_channels}"
        )
    for name, values in (("model.mean", config.model.mean), ("model.std", config.model.std)):
        if values is not None and len(values) != channels:
            raise ConfigError(f"{name} has {len(values)} values but the input has {channels} channels")
    device = select_device(config.compute.device)
    workers, threads = thread_plan(available_cores(), config.compute.workers, config.compute.torch_threads, device.type)
    halo = receptive_radius(model.module)
    _, height, width = source.shape
    tiles = plan_tiles(height, width, config.tiling.tile, halo)
    return RunPlan(config, source, model, halo, tiles, workers, threads, str(device), time.perf_counter() - started)


def execute(plan: RunPlan, on_progress: Callable[[int], None] | None = None) -> RunResult:
    """Create the store, run every task, and mark the store complete; ``on_progress(pixels)``."""
    cfg = plan.config
    assert cfg.output.path is not None  # checked by prepare()
    out_path = os.path.abspath(cfg.output.path)
    started = time.perf_counter()
    create_store(out_path, plan.output_shape, cfg.tiling.tile, cfg.output.dtype, cfg.output.overwrite)
    spec = plan.model.spec
    record = provenance(
        config=cfg.to_dict(),
        input_path=os.path.abspath(plan.source.path),
        input_size=plan.source.file_size,
        input_shape=plan.source.shape,
        model_sha256=plan.model.sha256,
        model=spec.to_dict(),
        tile=cfg.tiling.tile,
        halo=plan.halo,
    )
    write_start(out_path, record)
    norm = spec.normalization
    job = Job(
        source=plan.source.ref,
        output=OutputRef(out_path, cfg.output.dtype, token=uuid.uuid4().hex),
        model_path=os.path.abspath(plan.model.path),
        model_sha256=plan.model.sha256,
        device=plan.device,
        torch_threads=plan.torch_threads,
        scale=norm.scale_for(plan.source.dtype),
        mean=cfg.model.mean or norm.mean,
        std=cfg.model.std or norm.std,
    )
    set_torch_threads(plan.torch_threads)  # also for a model already adopted by an earlier run
    adopt_model(job, plan.model.module)  # threads share it; other processes load their own once
    tasks = build_tasks(job, plan.tiles, cfg.tiling.batch)
    compute_started = time.perf_counter()
    compute_tasks(tasks, plan.workers, on_progress)
    compute_s = time.perf_counter() - compute_started
    total_s = plan.setup_s + time.perf_counter() - started
    timings = {"setup": round(plan.setup_s, 3), "compute": round(compute_s, 3), "total": round(total_s, 3)}
    final = mark_complete(out_path, record, timings)
    return RunResult(out_path, plan.output_shape, plan.megapixels, total_s, final)


def run_pipeline(config: RunConfig, on_progress: Callable[[int], None] | None = None) -> RunResult:
    """The main job: ``execute(prepare(config))``."""
    return execute(prepare(config), on_progress)
