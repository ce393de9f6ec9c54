"""One function that wires the steps: source -> tiling -> model -> predict -> output -> metadata.

:func:`prepare` does everything that is quick and can fail early (open the TIFF, load the model,
check that they fit, plan the tiles and threads) and returns a :class:`RunPlan` that can be shown
to the user; :func:`execute` does the long part. :func:`run_pipeline` is both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.compute.blend import Blend, check_blend, predict_blended
from pipeline.compute.engine import THREADS, Engine
from pipeline.compute.tasks import (
    Job,
    build_reduce_tasks,
    build_tasks,
    compute_results,
    compute_tasks,
    nodata_pixels,
    stage_seconds,
    task_groups,
)
from pipeline.config import RunConfig, TilingConfig
from pipeline.errors import ConfigError, ModelError, SourceError, warn
from pipeline.model.checkpoint import load_model
from pipeline.model.network import (
    FORWARD_BYTES,
    LoadedModel,
    activation_bytes_per_pixel,
    select_device,
    set_torch_threads,
    with_classes,
)
from pipeline.model.receptive import measure_tiling
from pipeline.run.estimate import peak_rss_mib
from pipeline.run.resume import (
    MARK_BEHIND,
    Resume,
    check_resume,
    check_target,
    clear_state,
    fingerprint,
    remove_partial_files,
    resumed_threads,
    task_id,
    write_state,
)
from pipeline.source.mask import ChunkMask, foreground_mask
from pipeline.source.resample import Grid, choose_grid
from pipeline.source.tiff import SourceInfo, open_source
from pipeline.store.arrays import (
    LABEL_GROUP,
    LABELS,
    NODATA_LABEL,
    PROBABILITIES,
    OutputRef,
    check_store_path,
    create_store,
    remove_leftovers,
    staged_store,
    update_attributes,
    write_georeference_arrays,
)
from pipeline.store.lock import store_lock
from pipeline.store.ome import (
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
from pipeline.store.pyramid import level_shapes
from pipeline.tiling import Tile, forward_size, halo_overhead, plan_tiles, round_up

log = logging.getLogger("fcnpipe")


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
    mask: ChunkMask | None = None
    """Which chunks have foreground; None: all of them."""
    fingerprint: dict[str, Any] | None = None
    """What the output's bytes depend on, stored in the output and compared by ``--resume``."""
    resume: Resume | None = None
    """Set when resuming an existing store; None: a new store."""
    notes: tuple[str, ...] = ()
    engine: Engine = THREADS
    """Where the tasks run (:func:`pipeline.compute.engine.open_engine`)."""
    forward_tile: int = 0
    """Side of the pieces each tile's core is cut into, one forward pass each; 0: whole tiles."""
    exact_halo: int = 0
    """The smallest halo that makes tiling exact (:func:`pipeline.model.receptive.measure_halo`)."""

    @property
    def forward_batch(self) -> int:
        """Tiles per forward pass: as configured, else 1 on a CPU and 4 on a GPU."""
        return self.config.tiling.forward_batch or (1 if self.device in ("cpu", "auto") else 4)

    @property
    def gpu(self) -> bool:
        """Tasks need a GPU worker (the Dask resource GPU=1) on a Dask cluster."""
        return self.engine.distributed and self.device.startswith("cuda")

    def kept(self, tile: Tile) -> bool:
        return self.mask is None or self.mask.kept(tile.row, tile.col)

    @property
    def tiles_masked(self) -> int:
        return sum(not self.kept(tile) for tile in self.tiles)

    def pending(self) -> list[Tile]:
        """The tiles this run computes: those with foreground, less those an earlier run finished.

        Blended windows overlap, so a resumed blended run computes every tile again.
        """
        if self.resume is not None and self.resume.complete:
            return []
        done = self.resume.done if self.resume is not None and self.blend is None else frozenset()
        return [tile for group in self.groups() if task_id(group) not in done for tile in group if self.kept(tile)]

    @property
    def tiles_to_compute(self) -> int:
        return len(self.pending())

    @property
    def tiles_done(self) -> int:
        """Tiles (with foreground) finished by the earlier runs of a resumed store."""
        if self.resume is not None and self.resume.complete:
            return len(self.tiles) - self.tiles_masked
        return len(self.tiles) - self.tiles_masked - self.tiles_to_compute

    @property
    def level1(self) -> bool:
        """Level-0 tasks also write the level-1 chunk of their 2 x 2 block."""
        return len(self.levels) > 1 and self.blend is None

    def groups(self) -> list[list[Tile]]:
        """The tiles of each task, as :func:`pipeline.compute.tasks.build_tasks` groups them."""
        return task_groups(self.tiles, self.level1, self.config.tiling.batch)

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

    @property
    def megapixels_to_compute(self) -> float:
        return sum(tile.core_pixels for tile in self.pending()) / 1e6

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
            f"({halo_overhead(self.tiles):.1%} extra reads), {self.forward_batch} per forward pass"
            + self._pieces()
            + self._approximation(),
            f"compute {self.device}, {self.engine.describe(self.workers, self.torch_threads)}",
            f"output  {cfg.output.path}: {self.output_shape} {cfg.output.dtype} + uint8 labels, "
            f"{cfg.output.format}, {len(self.levels)} levels",
            self._spatial_line(),
            self._mask_line(),
            *([] if self.resume is None else [self._resume_line()]),
            *self.notes,
        ]

    def _mask_line(self) -> str:
        if self.mask is None:
            return f"mask    none: all {len(self.tiles)} chunks computed"
        skipped = self.tiles_masked
        return (
            f"mask    {self.mask.method}: {skipped} of {len(self.tiles)} chunks have no foreground and are "
            f"skipped ({skipped / max(1, len(self.tiles)):.0%})"
        )

    def _resume_line(self) -> str:
        assert self.resume is not None
        if self.resume.complete:
            return "resume  the store is already complete: nothing to do"
        if self.resume.restart:
            return "resume  the store was interrupted before its first chunk: starting it again"
        return f"resume  {self.tiles_done} chunks were written by earlier runs; {self.tiles_to_compute} to compute"

    def _pieces(self) -> str:
        if not self.forward_tile:
            return ""
        parts = -(-self.config.tiling.tile // self.forward_tile)
        return f", each in {parts} x {parts} passes of {self.forward_tile} px"

    def _approximation(self) -> str:
        exact = self.exact_halo
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
    status: str = "done"
    """``done``, or ``already complete`` (a resumed store with nothing left to do)."""
    tiles: int = 0
    tiles_computed: int = 0
    tiles_masked: int = 0
    """Chunks without foreground, not computed."""
    tiles_resumed: int = 0
    """Chunks written by earlier, interrupted runs."""
    nodata_pixels: int = 0
    """Pixels of the computed chunks that hold no data (alpha 0, GDAL_NODATA, non-finite values)."""
    peak_rss_mib: float = 0.0

    @property
    def skipped_fraction(self) -> float:
        return self.tiles_masked / self.tiles if self.tiles else 0.0


def prepare(config: RunConfig, engine: Engine = THREADS) -> RunPlan:
    """Open, load, check and plan; fail here, in seconds, on anything a run would fail on later.

    ``engine`` is where the tasks will run: on a Dask cluster the device is chosen by each worker
    (``auto``) or must exist there (``cuda``), not here.
    """
    started = time.perf_counter()
    if config.input.path is None:
        raise ConfigError("No input given: pass an INPUT path (or input.path in the config)")
    if config.model.path is None:
        raise ConfigError("No model given: pass --model PATH (or model.path in the config)")
    if config.output.path is None:
        raise ConfigError("No output given: pass -o PATH (or output.path in the config)")
    check_store_path(config.output.path)
    if not config.output.resume:
        check_target(os.path.realpath(config.output.path), config.output.overwrite)
    inp = config.input
    opened = open_source(config.input.path, inp.series, inp.level or 0)
    model = load_model(config.model.path, config.model.factory)
    model.spec = with_classes(model.spec, config.model.class_names, config.model.class_colors)
    explicit = inp.mpp is not None or inp.gsd is not None
    grid = choose_grid(
        opened, inp.level is not None, inp.mpp or (None if explicit else model.spec.mpp),
        inp.gsd or (None if explicit else model.spec.gsd), explicit, inp.resolution_tolerance,
    )  # fmt: skip
    source = grid.source
    _check_fit(config, source, model)
    device = config.compute.device if engine.distributed else str(select_device(config.compute.device))
    device_type = device.split(":")[0] if device != "auto" else "cpu"
    if config.compute.precision != "float32" and device_type != "cuda":
        raise ConfigError(
            f"compute.precision {config.compute.precision} needs a CUDA device, but this run uses {device}: "
            "half precision on a CPU is many times slower; use float32"
        )
    workers, threads = engine.plan_threads(config.compute.workers, config.compute.torch_threads, device_type)
    stride, radius, exact_halo = measure_tiling(model.module, model.spec.in_channels, model.path)
    halo, blend = exact_halo, None
    if config.tiling.halo is not None:
        halo = round_up(config.tiling.halo, stride)
        if config.tiling.blend != "none" and halo < exact_halo:  # at or above it, plain tiling is exact
            blend = check_blend(config.tiling.tile, halo, stride, config.tiling.blend)
    height, width = grid.shape
    tiles = plan_tiles(height, width, config.tiling.tile, halo, stride)
    forward_tile = forward_tile_for(config.tiling, model, halo, stride, device_type, blended=blend is not None)
    mask = foreground_mask(config.mask.mode, source, grid.shape, config.tiling.tile, config.mask.threshold)
    if mask is not None and not mask.keep.any():
        warn(
            f"{source.path}: the mask finds no foreground in any of its {mask.keep.size} chunks ({mask.method}): "
            "nothing will be computed and the store will hold no data; pass --mask none to compute every chunk"
            + (", or a lower --mask-threshold" if mask.method.startswith(("tissue", "fluorescence")) else "")
        )
    levels = level_shapes(height, width)
    prints = fingerprint(config, source, model.sha256)
    resume: Resume | None = None
    notes: list[str] = []
    if config.output.resume:
        resume = check_resume(config.output.path, prints)
        threads, notes = resumed_threads(config.output.path, threads, notes)
    setup_s = time.perf_counter() - started
    return RunPlan(
        config, source, model, halo, radius, stride, tiles, workers, threads, device, setup_s, levels, grid, blend,
        mask, prints, resume, tuple(notes), engine, forward_tile, exact_halo,
    )  # fmt: skip


def forward_tile_for(
    tiling: TilingConfig, model: LoadedModel, halo: int, stride: int, device_type: str, blended: bool
) -> int:
    """The side of the pieces each tile is predicted in (0: whole tiles): ``tiling.forward_tile``,
    else on a CPU the largest divisor of the tile whose passes allocate at most
    :data:`pipeline.model.network.FORWARD_BYTES` a tensor (:func:`pipeline.tiling.forward_size`), so
    that their activations stay in the cache, and glibc reuses their memory instead of mapping
    and zeroing it again for every pass."""
    if blended:  # blending weights whole windows; TilingConfig refuses forward_tile with it
        return 0
    if tiling.forward_tile is not None:
        if tiling.forward_tile % stride:
            raise ConfigError(
                f"tiling.forward_tile {tiling.forward_tile} is not a multiple of the network's stride {stride}; "
                f"use {round_up(tiling.forward_tile, stride)}"
            )
        return tiling.forward_tile if tiling.forward_tile < tiling.tile else 0
    if device_type != "cpu":
        return 0
    per_pixel = activation_bytes_per_pixel(model.module, model.spec.in_channels, stride)
    if per_pixel is None:
        return 0
    side = forward_size(tiling.tile, halo, stride, per_pixel * (tiling.forward_batch or 1), FORWARD_BYTES)
    return side if side < tiling.tile else 0


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
    trained = model.spec.input_dtype
    if trained is not None and trained != str(source.dtype) and not config.model.allow_other_dtype:
        raise ModelError(
            f"{source.path}: has {source.dtype} pixels but the model {model.path} was trained on {trained}: its "
            "values would mean something else to it; convert the image, or pass --allow-other-dtype to run anyway"
        )
    georef = source.georeference
    if georef is not None and georef.transform is not None and not georef.north_up:
        raise SourceError(
            f"{source.path}: its GeoTIFF transform is rotated or sheared {georef.transform}; "
            "only north-up (or south-up) rasters are supported: warp it first, e.g. gdalwarp"
        )


def execute(plan: RunPlan, on_progress: Callable[[int], None] | None = None) -> RunResult:
    """Create (or resume) the store, run every task, build the pyramid, mark complete.

    ``on_progress(pixels)`` follows the level-0 tasks. The store is locked against a second writer
    for the whole run.
    """
    with Writing(plan) as writing:
        if writing.result is not None:
            return writing.result
        writing.compute(on_progress)
        return writing.finish()


class Writing:
    """A run between its start and its completion mark; a context manager holding the store's lock.

    Entering locks the store and creates it, or checks it again under the lock and resumes it;
    :attr:`result` is already set if there is nothing to do. Then the level-0 tasks run, either
    through :meth:`compute` or, for a batch that computes several stores' tasks together, through
    :meth:`tasks`; :meth:`finish` makes the pyramid and marks the store complete.
    """

    def __init__(self, plan: RunPlan) -> None:
        assert plan.config.output.path is not None  # checked by prepare()
        self.plan = plan
        self.path = os.path.realpath(plan.config.output.path)  # one store, one lock, through any symlink
        self.result: RunResult | None = None
        self.record: dict[str, Any] = {}
        self.job = make_job(plan, self.path, uuid.uuid4().hex)
        self._lock = store_lock(self.path)
        self._started = 0.0
        self._compute_s = 0.0
        self._locked = False
        self.stages: dict[str, float] = {}
        """Seconds per stage summed over the level-0 tasks (see :class:`pipeline.compute.tasks.TaskStats`)."""
        self.nodata_pixels = 0
        """Pixels written as no data by this run's level-0 tasks (plain tiling; blended runs count none)."""

    def __enter__(self) -> Writing:
        self._started = time.perf_counter()
        self._lock.__enter__()
        self._locked = True
        try:
            self._open()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Release the lock; the store stays as it is (complete, or for ``--resume``). Idempotent."""
        if self._locked:
            self._locked = False
            self._lock.__exit__(None, None, None)

    def _open(self) -> None:
        plan = self.plan
        MARK_BEHIND.wait(raise_error=False)  # an earlier run's last markers, before this store is touched
        remove_leftovers(self.path)  # what runs killed while creating or replacing it left beside it
        if plan.config.output.resume:
            assert plan.fingerprint is not None
            plan.resume = check_resume(self.path, plan.fingerprint)
        resume = plan.resume
        if resume is not None and resume.complete:
            log.info("%s: already complete", self.path)
            self.result = _result(plan, self.path, 0.0, resume.record or {}, "already complete")
        elif resume is None or resume.restart:
            self.record = _create(plan, self.path, self.job.output.token)
        else:
            removed = remove_partial_files(self.path)
            log.info("%s: resuming, %d tasks done, %d partial files removed", self.path, len(resume.done), removed)
            self.record = {**(resume.record or {}), "resumed": int((resume.record or {}).get("resumed", 0)) + 1}
        set_torch_threads(plan.torch_threads)  # also for a model already adopted by an earlier run
        plan.engine.share_model(self.job, plan.model.module)  # threads share it; Dask workers get it once

    def tasks(self, guarded: bool = False) -> list[Any]:
        """The delayed level-0 tasks left to run (plain tiling only; see :meth:`compute`)."""
        plan = self.plan
        done = plan.resume.done if plan.resume is not None else frozenset()
        return build_tasks(self.job, plan.tiles, plan.config.tiling.batch, plan.kept, done, guarded=guarded)

    def compute(self, on_progress: Callable[[int], None] | None = None) -> None:
        """Run the level-0 tasks left on this machine's threads (or the active Dask client)."""
        plan = self.plan
        started = time.perf_counter()
        if plan.blend is None:
            results = compute_results(self.tasks(), plan.workers, on_progress, plan.engine, plan.gpu)
            self.stages = stage_seconds(results)
            self.nodata_pixels = nodata_pixels(results)
        else:  # blended tiles overlap: a resumed blended run computes every tile again
            kept = [tile for tile in plan.tiles if plan.kept(tile)]
            predict_blended(
                self.job, kept, plan.model.spec.num_classes, plan.grid.shape, plan.blend, plan.config.tiling.batch,
                plan.workers, on_progress, plan.engine,
            )  # fmt: skip
        self._compute_s += time.perf_counter() - started

    def finish(self, compute_s: float | None = None) -> RunResult:
        """Make pyramid levels 2, 3, ... (level 1 came with level 0) and mark the store complete."""
        plan, cfg = self.plan, self.plan.config
        started = time.perf_counter()
        MARK_BEHIND.wait()  # no marker may land after the store is marked complete
        first = 2 if self.job.level1 else 1
        if len(plan.levels) > first:
            log.info("%s: level 0 done; making pyramid levels %d-%d", self.path, first, len(plan.levels) - 1)
        for level, (height, width) in enumerate(plan.levels[first:], start=first):
            tiles = plan_tiles(height, width, cfg.tiling.tile, halo=0)
            compute_tasks(
                build_reduce_tasks(self.job.output, level, tiles, cfg.tiling.batch), plan.workers, None, plan.engine
            )
        pyramid_s = time.perf_counter() - started
        total_s = plan.setup_s + time.perf_counter() - self._started
        compute = self._compute_s if compute_s is None else compute_s
        timings: dict[str, Any] = {"setup": plan.setup_s, "compute": compute, "pyramid": pyramid_s, "total": total_s}
        timings = {k: round(v, 3) for k, v in timings.items()}
        if self.stages:
            timings["stages"] = {k: round(v, 3) for k, v in self.stages.items()}
        if plan.engine.distributed:  # a worker that died mid-write left zarr's temporary file behind
            remove_partial_files(self.path)
        final = mark_complete(self.path, self.record, timings)
        clear_state(self.path)
        log.info("%s: complete in %.1f s", self.path, total_s)
        return _result(plan, self.path, total_s, final, "done", self.nodata_pixels)


def _create(plan: RunPlan, out_path: str, token: str) -> dict[str, Any]:
    """A new store (``token``: its :attr:`pipeline.store.arrays.OutputRef.token`): arrays, viewer metadata,
    the start record, then the resume state."""
    cfg, spec = plan.config, plan.model.spec
    with staged_store(out_path, token) as staging:  # whole, or not at all: a kill here leaves no half store
        create_store(
            staging, spec.num_classes, plan.levels, cfg.tiling.tile, cfg.output.dtype, False,
            zarr_format=2 if plan.ome_version == "0.4" else 3, token=token, final_path=out_path,
        )  # fmt: skip
        write_viewer_metadata(staging, plan)
        record = _start_record(plan)
        write_start(staging, record)
        write_state(staging, {"fingerprint": plan.fingerprint, "torch_threads": plan.torch_threads})
    return record


def _start_record(plan: RunPlan) -> dict[str, Any]:
    """The ``fcnpipe`` attribute a new store starts with (``complete: false``)."""
    cfg, spec = plan.config, plan.model.spec
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
    record["torch_threads"] = plan.torch_threads
    record["fingerprint"] = plan.fingerprint
    record["mask"] = None if plan.mask is None else {"method": plan.mask.method, "chunks_skipped": plan.tiles_masked}
    return record


def make_job(plan: RunPlan, out_path: str, token: str) -> Job:
    """What every task of ``plan`` needs besides its tiles; ``token`` names this run's store."""
    cfg, spec = plan.config, plan.model.spec
    norm = spec.normalization
    return Job(
        source=dataclasses.replace(plan.source.ref, cache_tiles=True),  # tasks read in tile order
        resampling=plan.grid.resampling,
        source_shape=plan.source.shape[1:],
        output=OutputRef(out_path, cfg.output.dtype, token=token),
        model_path=os.path.abspath(plan.model.path),
        model_sha256=plan.model.sha256,
        model_factory=cfg.model.factory,
        device=plan.device,
        stride=plan.stride,
        precision=cfg.compute.precision,
        tta=cfg.model.tta == "flips",
        level1=plan.level1,
        mark_behind=not plan.engine.distributed,
        forward_batch=plan.forward_batch,
        forward_tile=plan.forward_tile,
        halo=plan.halo,
        torch_threads=plan.torch_threads,
        scale=norm.scale_for(plan.source.dtype),
        mean=cfg.model.mean or norm.mean,
        std=cfg.model.std or norm.std,
    )


def _result(
    plan: RunPlan, out_path: str, seconds: float, record: dict[str, Any], status: str, nodata: int = 0
) -> RunResult:
    return RunResult(
        out_path, plan.output_shape, plan.megapixels, seconds, record, status=status,
        tiles=len(plan.tiles), tiles_computed=plan.tiles_to_compute, tiles_masked=plan.tiles_masked,
        tiles_resumed=plan.tiles_done, nodata_pixels=nodata, peak_rss_mib=peak_rss_mib(),
    )  # fmt: skip


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
