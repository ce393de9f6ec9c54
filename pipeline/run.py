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

from pipeline.blend import Blend, check_blend, predict_blended
from pipeline.checkpoint import load_model
from pipeline.cluster import available_cores, thread_plan
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, ModelError, SourceError
from pipeline.metadata import (
    crs_attribute,
    grid_mapping,
    mark_complete,
    ome_image,
    ome_label_image,
    ome_labels_group,
    pixel_centres,
    provenance,
    write_start,
)
from pipeline.model import LoadedModel, select_device, set_torch_threads, with_classes
from pipeline.output import (
    LABEL_GROUP,
    LABELS,
    NODATA_LABEL,
    PROBABILITIES,
    OutputRef,
    check_target,
    create_store,
    update_attributes,
    write_georeference_arrays,
)
from pipeline.predict import Job, adopt_model, build_reduce_tasks, build_tasks, compute_tasks
from pipeline.pyramid import level_shapes
from pipeline.receptive import halo_for, measure_receptive_radius, measure_stride
from pipeline.resample import Grid, choose_grid
from pipeline.source import SourceInfo, open_source
from pipeline.tiling import Tile, halo_overhead, plan_tiles, round_up


@dataclass
class RunPlan:
    config: RunConfig
    source: SourceInfo
    model: LoadedModel
    halo: int
    """Context read around each core: the receptive radius rounded up to the stride."""
    radius: int
    """The network's receptive radius in pixels, measured from the model."""
    stride: int
    """The network's total downsampling factor: tiles start on multiples of it."""
    tiles: list[Tile]
    workers: int
    torch_threads: int
    device: str
    setup_s: float
    levels: list[tuple[int, int]]
    """``(Y, X)`` of each output pyramid level."""
    grid: Grid
    """The grid the network sees: the level read, resampled to the model's resolution if needed."""
    blend: Blend | None = None
    """Blending of windows read with a halo below the exact one; None: plain tiling."""

    @property
    def ome_version(self) -> str:
        return self.config.output.format.removeprefix("ome-zarr-")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.model.spec.num_classes, *self.grid.shape)

    @property
    def megapixels(self) -> float:
        height, width = self.grid.shape
        return height * width / 1e6

    def describe(self) -> list[str]:
        """The plan as lines a person reads before a long run."""
        c, y, x = self.source.shape
        cfg = self.config
        return [
            f"input   {self.source.path} level {self.source.ref.level}: {y} x {x} px, {c} channels, "
            f"{self.source.dtype} ({self.megapixels:.1f} Mpx)",
            f"model   {self.model.path} ({self.model.spec.architecture}, {self.model.spec.num_classes} classes, "
            f"receptive radius {self.radius} px, stride {self.stride})",
            f"tiles   {len(self.tiles)} of {cfg.tiling.tile} px + {self.halo} px halo "
            f"({halo_overhead(self.tiles):.1%} extra reads), {cfg.tiling.batch} per task" + self._approximation(),
            f"compute {self.device}, {self.workers} workers x {self.torch_threads} torch threads",
            f"output  {cfg.output.path}: {self.output_shape} {cfg.output.dtype} + uint8 labels, "
            f"{cfg.output.format}, {len(self.levels)} levels",
            self._spatial_line(),
        ]

    def _approximation(self) -> str:
        exact = halo_for(self.radius, self.stride)
        if self.halo >= exact:
            return ""
        blending = "no" if self.blend is None else self.blend.mode
        return f"; below the exact {exact} px halo: approximate, {blending} blending"

    def _spatial_line(self) -> str:
        grid = self.grid
        resampled = "" if grid.resampling is None else f", resampled from level {grid.source.ref.level}"
        note = "" if grid.note is None else f" ({grid.note})"
        if grid.mpp is not None:
            return f"scale   {grid.mpp:g} micrometres per pixel{resampled}{note}"
        georef = grid.georeference
        if georef is not None and georef.crs is not None:
            size = georef.pixel_size or (float("nan"), float("nan"))
            units = f"{size[0]:g} x {size[1]:g} CRS units per pixel"
            return f"scale   {georef.crs}, {units}{resampled}; OME scale in pixels{note}"
        return f"scale   the input records no pixel size: the output's scale is in pixels{note}"


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
    inp = config.input
    opened = open_source(config.input.path, inp.series, inp.level or 0)
    model = load_model(config.model.path, config.model.factory)
    model.spec = with_classes(model.spec, config.model.class_names, config.model.class_colors)
    explicit = inp.mpp is not None or inp.gsd is not None
    grid = choose_grid(
        opened, inp.level is not None, inp.mpp or (None if explicit else model.spec.mpp),
        inp.gsd or (None if explicit else model.spec.gsd), explicit,
    )  # fmt: skip
    source = grid.source
    _check_fit(config, source, model)
    device = select_device(config.compute.device)
    if config.compute.precision != "float32" and device.type != "cuda":
        raise ConfigError(
            f"compute.precision {config.compute.precision} needs a CUDA device, but this run uses {device.type}: "
            "half precision on a CPU is many times slower; use float32"
        )
    workers, threads = thread_plan(available_cores(), config.compute.workers, config.compute.torch_threads, device.type)
    stride = measure_stride(model.module, model.spec.in_channels)
    radius = measure_receptive_radius(model.module, model.spec.in_channels, stride)
    exact_halo = halo_for(radius, stride)
    halo, blend = exact_halo, None
    if config.tiling.halo is not None:
        halo = round_up(config.tiling.halo, stride)
        if config.tiling.blend != "none" and halo < exact_halo:  # at or above it, plain tiling is exact
            blend = check_blend(config.tiling.tile, halo, stride, config.tiling.blend)
    height, width = grid.shape
    tiles = plan_tiles(height, width, config.tiling.tile, halo, stride)
    setup_s = time.perf_counter() - started
    levels = level_shapes(height, width)
    return RunPlan(
        config, source, model, halo, radius, stride, tiles, workers, threads, str(device), setup_s, levels, grid, blend
    )


def _check_fit(config: RunConfig, source: SourceInfo, model: LoadedModel) -> None:
    """The input fits the model (channels, normalisation) and its georeference can be kept."""
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
    georef = source.georeference
    if georef is not None and georef.transform is not None and not georef.north_up:
        raise SourceError(
            f"{source.path}: its GeoTIFF transform is rotated or sheared {georef.transform}; "
            "only north-up (or south-up) rasters are supported: warp it first, e.g. gdalwarp"
        )


def execute(plan: RunPlan, on_progress: Callable[[int], None] | None = None) -> RunResult:
    """Create the store, run every task, build the pyramid, mark complete; ``on_progress(pixels)``."""
    cfg = plan.config
    assert cfg.output.path is not None  # checked by prepare()
    out_path = os.path.abspath(cfg.output.path)
    started = time.perf_counter()
    spec = plan.model.spec
    create_store(
        out_path, spec.num_classes, plan.levels, cfg.tiling.tile, cfg.output.dtype, cfg.output.overwrite,
        zarr_format=2 if plan.ome_version == "0.4" else 3,
    )  # fmt: skip
    write_viewer_metadata(out_path, plan)
    record = provenance(
        config=cfg.to_dict(),
        input_path=os.path.abspath(plan.source.path),
        input_size=plan.source.file_size,
        input_shape=plan.source.shape,
        model_sha256=plan.model.sha256,
        model={**spec.to_dict(), "receptive_radius": plan.radius, "stride": plan.stride},
        tile=cfg.tiling.tile,
        halo=plan.halo,
        spatial=_spatial_record(plan.grid),
    )
    write_start(out_path, record)
    norm = spec.normalization
    job = Job(
        source=plan.source.ref,
        resampling=plan.grid.resampling,
        source_shape=plan.source.shape[1:],
        output=OutputRef(out_path, cfg.output.dtype, token=uuid.uuid4().hex),
        model_path=os.path.abspath(plan.model.path),
        model_sha256=plan.model.sha256,
        model_factory=cfg.model.factory,
        device=plan.device,
        stride=plan.stride,
        precision=cfg.compute.precision,
        tta=cfg.model.tta == "flips",
        level1=len(plan.levels) > 1 and plan.blend is None,
        torch_threads=plan.torch_threads,
        scale=norm.scale_for(plan.source.dtype),
        mean=cfg.model.mean or norm.mean,
        std=cfg.model.std or norm.std,
    )
    set_torch_threads(plan.torch_threads)  # also for a model already adopted by an earlier run
    adopt_model(job, plan.model.module)  # threads share it; other processes load their own once
    compute_started = time.perf_counter()
    if plan.blend is None:
        compute_tasks(build_tasks(job, plan.tiles, cfg.tiling.batch), plan.workers, on_progress)
    else:
        predict_blended(
            job, plan.tiles, spec.num_classes, plan.grid.shape, plan.blend, cfg.tiling.batch, plan.workers, on_progress
        )
    compute_s = time.perf_counter() - compute_started
    first = 2 if job.level1 else 1  # level 1 was written by the level-0 tasks
    for level, (height, width) in enumerate(plan.levels[first:], start=first):
        tiles = plan_tiles(height, width, cfg.tiling.tile, halo=0)
        compute_tasks(build_reduce_tasks(job.output, level, tiles, cfg.tiling.batch), plan.workers)
    pyramid_s = time.perf_counter() - compute_started - compute_s
    total_s = plan.setup_s + time.perf_counter() - started
    timings = {"setup": plan.setup_s, "compute": compute_s, "pyramid": pyramid_s, "total": total_s}
    final = mark_complete(out_path, record, {k: round(v, 3) for k, v in timings.items()})
    return RunResult(out_path, plan.output_shape, plan.megapixels, total_s, final)


def write_viewer_metadata(path: str, plan: RunPlan) -> None:
    """OME-NGFF attributes for viewers, and the georeference for GIS on the level-0 arrays."""
    spec, version = plan.model.spec, plan.ome_version
    names, colors = list(spec.class_names), list(spec.class_colors)
    levels, mpp, dtype = len(plan.levels), plan.grid.mpp, plan.config.output.dtype
    name = os.path.basename(plan.source.path)
    update_attributes(path, "", ome_image(version, name, levels, names, colors, mpp, dtype))
    update_attributes(path, "labels", ome_labels_group(version, ["argmax"]))
    update_attributes(path, LABEL_GROUP, ome_label_image(version, levels, names, colors, mpp, NODATA_LABEL))
    georef = plan.grid.georeference
    if georef is None or georef.transform is None:
        return
    height, width = plan.grid.shape
    xs, ys = pixel_centres(georef.transform, height, width)
    for group, array, dims in (("", PROBABILITIES, ["c", "y", "x"]), (LABEL_GROUP, LABELS, ["y", "x"])):
        write_georeference_arrays(path, group, xs, ys, grid_mapping(georef.crs, georef.transform))
        attributes: dict[str, object] = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"}
        if georef.crs:
            attributes["_CRS"] = crs_attribute(georef.crs)
        if version == "0.4":
            attributes["_ARRAY_DIMENSIONS"] = dims
        update_attributes(path, array, attributes)


def _spatial_record(grid: Grid) -> dict[str, object]:
    georef = grid.georeference
    resampling = grid.resampling
    return {
        "mpp": grid.mpp,
        "crs": None if georef is None else georef.crs,
        "transform": None if georef is None or georef.transform is None else list(georef.transform),
        "pixel_is_point": None if georef is None else georef.pixel_is_point,
        "level_read": grid.source.ref.level,
        "resampling": None if resampling is None else [resampling.factor_y, resampling.factor_x],
    }


def run_pipeline(config: RunConfig, on_progress: Callable[[int], None] | None = None) -> RunResult:
    """The main job: ``execute(prepare(config))``."""
    return execute(prepare(config), on_progress)
