"""The plan of a run: everything that is quick and can fail early, decided before anything is written.

:func:`prepare` opens the TIFF, loads the model, checks that they fit, measures the network's
tiling (stride, receptive radius, exact halo), chooses the grid, the tiles, the forward passes,
the threads and the chunks worth computing, and checks an existing store against the run's
fingerprint. The :class:`RunPlan` it returns is frozen: what is shown to the user is what runs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pipeline import files, remote
from pipeline.compute.blend import Blend, check_blend
from pipeline.compute.engine import THREADS, Engine
from pipeline.compute.job import Job, task_id
from pipeline.compute.tasks import task_groups
from pipeline.config import RunConfig, TilingConfig
from pipeline.errors import ConfigError, ModelError, SourceError, option, warn
from pipeline.model.checkpoint import load_model
from pipeline.model.network import LoadedModel, with_classes
from pipeline.model.predictor import FORWARD_BYTES, activation_bytes_per_pixel, check_precision, select_device
from pipeline.model.receptive import measure_tiling
from pipeline.run.resume import Resume, check_resume, check_target, fingerprint, resumed_threads
from pipeline.source.mask import ChunkMask, foreground_mask
from pipeline.source.resample import Grid, bbox_window, choose_grid, window_grid
from pipeline.source.tiff import SourceInfo, open_source
from pipeline.store.layout import OutputRef, check_store_path
from pipeline.store.pyramid import level_shapes
from pipeline.tiling import Tile, forward_size, plan_tiles, round_up


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """What a run will do, complete before it is shown and never changed after."""

    config: RunConfig
    output_path: str
    """The store, resolved (symlinks followed): one store, one lock, through any path to it."""
    source: SourceInfo
    """The level read."""
    model: LoadedModel
    grid: Grid
    """The grid the network sees: the level read, resampled to the model's resolution if needed."""
    tiles: tuple[Tile, ...]
    levels: tuple[tuple[int, int], ...]
    """``(Y, X)`` of each output pyramid level."""
    stride: int
    """The network's total downsampling factor: tiles start on multiples of it."""
    radius: int
    """The network's receptive radius in pixels, measured from the model."""
    exact_halo: int
    """The least halo that makes tiling exact (:func:`pipeline.model.receptive.measure_halo`)."""
    halo: int
    """Context read around each core: the exact halo, or the one asked for."""
    blend: Blend | None
    """Blending of windows read with a halo below the exact one; None: plain tiling."""
    forward_tile: int
    """Side of the pieces each tile's core is cut into, one forward pass each; 0: whole tiles."""
    mask: ChunkMask | None
    """Which chunks have foreground; None: all of them."""
    workers: int
    torch_threads: int
    device: str
    engine: Engine
    """Where the tasks run (:func:`pipeline.compute.engine.open_engine`)."""
    fingerprint: dict[str, Any]
    """What the output's bytes depend on, stored in the output and compared by ``--resume``."""
    resume: Resume | None
    """What ``--resume`` found at the output path; None: a new store."""
    notes: tuple[str, ...] = ()
    setup_s: float = 0.0

    @property
    def forward_batch(self) -> int:
        """Tiles per forward pass: as configured, else 1 on a CPU and 4 on a GPU."""
        return self.config.tiling.forward_batch or (1 if self.device in ("cpu", "auto") else 4)

    @property
    def gpu(self) -> bool:
        """Tasks need a GPU worker (the Dask resource GPU=1) on a Dask cluster."""
        return self.engine.distributed and self.device.startswith("cuda")

    def kept(self, tile: Tile) -> bool:
        """Whether ``tile`` has foreground (is computed at all)."""
        return self.mask is None or self.mask.kept(tile.row, tile.col)

    @property
    def shard(self) -> int:
        """Chunks per shard side (``output.shard``); 0: no shards."""
        return self.config.output.shard or 0

    @property
    def level1(self) -> bool:
        """Level-0 tasks also write the level-1 chunk of their 2 x 2 block. Not in a sharded store:
        a level-1 shard holds the chunks of four level-0 tasks' shards, so it is made afterwards, whole,
        with the levels below it."""
        return len(self.levels) > 1 and self.blend is None and not self.shard

    def groups(self) -> list[list[Tile]]:
        """The tiles of each task, as :func:`pipeline.compute.tasks.build_tasks` groups them."""
        return task_groups(self.tiles, self.level1, self.config.tiling.batch, self.shard)

    @cached_property
    def pending(self) -> tuple[Tile, ...]:
        """The tiles this run computes: those with foreground, less those an earlier run finished.

        Blended windows overlap, so a resumed blended run computes every tile again.
        """
        if self.resume is not None and self.resume.complete:
            return ()
        done = self.resume.done if self.resume is not None and self.blend is None else frozenset()
        return tuple(t for group in self.groups() if task_id(group) not in done for t in group if self.kept(t))

    # One vocabulary for the chunks of a run: every chunk is background (no foreground: neither
    # computed nor stored), resumed (finished by an earlier run) or computed by this one.

    @property
    def chunks(self) -> int:
        return len(self.tiles)

    @cached_property
    def chunks_background(self) -> int:
        return sum(not self.kept(tile) for tile in self.tiles)

    @property
    def chunks_to_compute(self) -> int:
        return len(self.pending)

    @property
    def chunks_resumed(self) -> int:
        return self.chunks - self.chunks_background - self.chunks_to_compute

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
        return sum(tile.core_pixels for tile in self.pending) / 1e6

    def job(self, out_path: str, token: str) -> Job:
        """What every task needs besides its tiles; ``token`` names the store (``out_path``) it writes."""
        cfg, spec = self.config, self.model.spec
        norm = spec.normalization
        return Job(
            source=dataclasses.replace(self.source.ref, cache_tiles=True),  # tasks read in tile order
            resampling=self.grid.resampling,
            source_shape=self.source.shape[1:],
            origin=self.grid.origin,
            output=OutputRef(
                out_path, cfg.output.dtype, token=token, shard=self.shard, storage=cfg.output.storage_options
            ),
            model_path=os.path.abspath(self.model.path),
            model_sha256=self.model.sha256,
            model_factory=cfg.model.factory,
            device=self.device,
            stride=self.stride,
            precision=cfg.compute.precision,
            tta=cfg.model.tta == "flips",
            level1=self.level1,
            mark_behind=not self.engine.distributed,
            forward_batch=self.forward_batch,
            forward_tile=self.forward_tile,
            halo=self.halo,
            torch_threads=self.torch_threads,
            scale=norm.scale_for(self.source.dtype),
            mean=cfg.model.mean or norm.mean,
            std=cfg.model.std or norm.std,
        )


def prepare(config: RunConfig, engine: Engine = THREADS) -> RunPlan:
    """Open, load, check and plan; fail here, in seconds, on anything a run would fail on later.

    ``engine`` is where the tasks will run: on a Dask cluster the device is chosen by each worker
    (``auto``) or must exist there (``cuda``), not here.
    """
    started = time.perf_counter()
    inp, out = config.input, config.output
    image, model_path, store = inp.path, config.model.path, out.path
    if image is None or model_path is None or store is None:
        missing = [
            k for k, v in (("input.path", image), ("model.path", model_path), ("output.path", store)) if v is None
        ]
        raise ConfigError(f"No {', '.join(missing)} given: a run needs an input, a model and an output")
    files.check_writable(store)
    check_store_path(store)
    output_path = files.normalized(store)
    files.register(output_path, out.storage_options)  # before anything looks at the store
    if not out.resume:
        check_target(output_path, out.overwrite)
    remote.configure(inp.storage_options)  # every input this run opens, and its tasks' reads
    opened = open_source(image, inp.series, inp.level or 0)
    model = load_model(model_path, config.model.factory)
    model = dataclasses.replace(
        model, spec=with_classes(model.spec, config.model.class_names, config.model.class_colors)
    )
    grid = _grid(config, opened, model)
    source = grid.source
    _check_fit(config, source, model)
    device = config.compute.device if engine.distributed else str(select_device(config.compute.device))
    device_type = device.split(":")[0] if device != "auto" else "cpu"
    check_precision(config.compute.precision, device_type)
    workers, threads = engine.plan_threads(config.compute.workers, config.compute.torch_threads, device_type)
    stride, radius, exact_halo = measure_tiling(model.module, model.spec.in_channels, model.path)
    halo, blend = exact_halo, None
    if config.tiling.halo is not None:
        halo = round_up(config.tiling.halo, stride)
        if config.tiling.blend != "none" and halo < exact_halo:  # at or above it, plain tiling is exact
            blend = check_blend(config.tiling.tile, halo, stride, config.tiling.blend)
    if blend is not None and out.shard:
        raise ConfigError(
            "output.shard cannot be used with tiling.blend: blended windows overlap, so no task writes a whole shard"
        )
    if inp.window is not None or inp.bbox is not None:
        if blend is not None:
            raise ConfigError("a window run reads exact halos; blending (tiling.blend) is for whole images")
        grid = window_grid(grid, inp.window or bbox_window(grid, inp.bbox or (0, 0, 0, 0), stride), stride)
    tiles = plan_tiles(*grid.shape, config.tiling.tile, halo, stride, bounds=grid.bounds)
    mask = foreground_mask(
        config.mask.kind,
        source,
        grid.full_shape or grid.shape,
        config.tiling.tile,
        image=config.mask.image,
        threshold=config.mask.threshold,
        window=None if grid.full_shape is None else (*grid.origin, *grid.shape),
    )
    if mask is not None and not mask.keep.any():
        _warn_nothing_to_compute(source, mask)
    prints = fingerprint(config, source, model.sha256)
    resume: Resume | None = None
    notes: tuple[str, ...] = ()
    if out.resume:
        resume = check_resume(output_path, prints)
        threads, notes = resumed_threads(output_path, threads)
    return RunPlan(
        config=config,
        output_path=output_path,
        source=source,
        model=model,
        grid=grid,
        tiles=tuple(tiles),
        levels=tuple(level_shapes(*grid.shape)),
        stride=stride,
        radius=radius,
        exact_halo=exact_halo,
        halo=halo,
        blend=blend,
        forward_tile=forward_tile_for(config.tiling, model, halo, stride, device_type, blend is not None),
        mask=mask,
        workers=workers,
        torch_threads=threads,
        device=device,
        engine=engine,
        fingerprint=prints,
        resume=resume,
        notes=notes,
        setup_s=time.perf_counter() - started,
    )


def _grid(config: RunConfig, opened: SourceInfo, model: LoadedModel) -> Grid:
    """The grid the network sees: the level asked for, or the one the resolution asks for."""
    inp = config.input
    explicit = inp.mpp is not None or inp.gsd is not None
    return choose_grid(
        opened,
        level_chosen=inp.level is not None,
        mpp=inp.mpp or (None if explicit else model.spec.mpp),
        gsd=inp.gsd or (None if explicit else model.spec.gsd),
        explicit=explicit,
        tolerance=inp.resolution_tolerance,
    )


def _warn_nothing_to_compute(source: SourceInfo, mask: ChunkMask) -> None:
    lower = mask.method.startswith(("tissue", "fluorescence"))
    warn(
        f"{source.path}: the mask finds no foreground in any of its {mask.keep.size} chunks ({mask.method}): "
        f"nothing will be computed and the store will hold no data; {option('mask.mode', 'none')} to compute every "
        "chunk" + (f", or a lower {option('mask.threshold', 'T')}" if lower else "")
    )


def forward_tile_for(
    tiling: TilingConfig, model: LoadedModel, halo: int, stride: int, device_type: str, blended: bool
) -> int:
    """The side of the pieces each tile is predicted in (0: whole tiles): ``tiling.forward_tile``,
    else on a CPU the largest divisor of the tile whose passes allocate at most
    :data:`pipeline.model.predictor.FORWARD_BYTES` a tensor (:func:`pipeline.tiling.forward_size`), so
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
            f"values would mean something else to it; convert the image, or {option('model.allow_other_dtype')} "
            "to run anyway"
        )
    georef = source.georeference
    if georef is not None and georef.transform is not None and not georef.north_up:
        raise SourceError(
            f"{source.path}: its GeoTIFF transform is rotated or sheared {georef.transform}; "
            "only north-up (or south-up) rasters are supported: warp it first, e.g. gdalwarp"
        )
