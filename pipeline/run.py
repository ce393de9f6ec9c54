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
from pipeline.source import SourceInfo, open_source
from pipeline.tiling import Tile, halo_overhead, plan_tiles


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

    @property
    def ome_version(self) -> str:
        return self.config.output.format.removeprefix("ome-zarr-")

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
            f"receptive radius {self.radius} px, stride {self.stride})",
            f"tiles   {len(self.tiles)} of {cfg.tiling.tile} px + {self.halo} px halo "
            f"({halo_overhead(self.tiles):.1%} extra reads), {cfg.tiling.batch} per task",
            f"compute {self.device}, {self.workers} workers x {self.torch_threads} torch threads",
            f"output  {cfg.output.path}: {self.output_shape} {cfg.output.dtype} + uint8 labels, "
            f"{cfg.output.format}, {len(self.levels)} levels",
            self._spatial_line(),
        ]

    def _spatial_line(self) -> str:
        source = self.source
        if source.mpp is not None:
            return f"scale   {source.mpp:g} micrometres per pixel"
        if source.crs is not None:
            size = source.pixel_size or (float("nan"), float("nan"))
            return f"scale   {source.crs}, {size[0]:g} x {size[1]:g} CRS units per pixel; OME scale in pixels"
        return "scale   the input records no pixel size: the output's scale is in pixels"


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
    model = load_model(config.model.path, config.model.factory)
    model.spec = with_classes(model.spec, config.model.class_names, config.model.class_colors)
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
    halo = halo_for(radius, stride)
    _, height, width = source.shape
    tiles = plan_tiles(height, width, config.tiling.tile, halo, stride)
    setup_s = time.perf_counter() - started
    levels = level_shapes(height, width)
    return RunPlan(config, source, model, halo, radius, stride, tiles, workers, threads, str(device), setup_s, levels)


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
        spatial=_spatial_record(plan.source),
    )
    write_start(out_path, record)
    norm = spec.normalization
    job = Job(
        source=plan.source.ref,
        output=OutputRef(out_path, cfg.output.dtype, token=uuid.uuid4().hex),
        model_path=os.path.abspath(plan.model.path),
        model_sha256=plan.model.sha256,
        model_factory=cfg.model.factory,
        device=plan.device,
        stride=plan.stride,
        precision=cfg.compute.precision,
        tta=cfg.model.tta == "flips",
        torch_threads=plan.torch_threads,
        scale=norm.scale_for(plan.source.dtype),
        mean=cfg.model.mean or norm.mean,
        std=cfg.model.std or norm.std,
    )
    set_torch_threads(plan.torch_threads)  # also for a model already adopted by an earlier run
    adopt_model(job, plan.model.module)  # threads share it; other processes load their own once
    compute_started = time.perf_counter()
    compute_tasks(build_tasks(job, plan.tiles, cfg.tiling.batch), plan.workers, on_progress)
    compute_s = time.perf_counter() - compute_started
    for level, (height, width) in enumerate(plan.levels[1:], start=1):
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
    levels, mpp, dtype = len(plan.levels), plan.source.mpp, plan.config.output.dtype
    name = os.path.basename(plan.source.path)
    update_attributes(path, "", ome_image(version, name, levels, names, colors, mpp, dtype))
    update_attributes(path, "labels", ome_labels_group(version, ["argmax"]))
    update_attributes(path, LABEL_GROUP, ome_label_image(version, levels, names, colors, mpp, NODATA_LABEL))
    georef = plan.source.georeference
    if georef is None or georef.transform is None:
        return
    _, height, width = plan.source.shape
    xs, ys = pixel_centres(georef.transform, height, width)
    for group, array, dims in (("", PROBABILITIES, ["c", "y", "x"]), (LABEL_GROUP, LABELS, ["y", "x"])):
        write_georeference_arrays(path, group, xs, ys, grid_mapping(georef.crs, georef.transform))
        attributes: dict[str, object] = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"}
        if georef.crs:
            attributes["_CRS"] = crs_attribute(georef.crs)
        if version == "0.4":
            attributes["_ARRAY_DIMENSIONS"] = dims
        update_attributes(path, array, attributes)


def _spatial_record(source: SourceInfo) -> dict[str, object]:
    georef = source.georeference
    return {
        "mpp": source.mpp,
        "crs": None if georef is None else georef.crs,
        "transform": None if georef is None or georef.transform is None else list(georef.transform),
        "pixel_is_point": None if georef is None else georef.pixel_is_point,
    }


def run_pipeline(config: RunConfig, on_progress: Callable[[int], None] | None = None) -> RunResult:
    """The main job: ``execute(prepare(config))``."""
    return execute(prepare(config), on_progress)
