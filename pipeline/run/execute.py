"""The long part of a run: create (or resume) the store, run its tasks, make its pyramid, count its
class areas, mark it complete.

:class:`StoreWriter` is a store between its start and its completion mark, and the one way to
write one: ``fcnpipe run`` uses it through :func:`execute`, ``fcnpipe batch`` directly, so that the
level-0 tasks of several stores can be computed together. :func:`run_pipeline` is
``execute(prepare(config))``.

The class areas come from the level-0 tasks, which count the labels they write
(:attr:`pipeline.compute.job.TaskStats.class_pixels`); the chunks of tasks that earlier,
interrupted runs finished are counted from disk, so a resumed store has the counts of an
uninterrupted one. Blended runs write level 0 in merge tasks that do not count: they are counted
from disk, chunk by chunk, once level 0 is done.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from pipeline import remote
from pipeline.compute import state
from pipeline.compute.blend import predict_blended
from pipeline.compute.job import task_id
from pipeline.compute.tasks import (
    build_reduce_tasks,
    build_tasks,
    chunks_written,
    class_pixels,
    compute_results,
    compute_tasks,
    nodata_pixels,
    stage_seconds,
)
from pipeline.config import RunConfig
from pipeline.errors import OutputError, option
from pipeline.files import remove_partial_files
from pipeline.model.predictor import set_torch_threads
from pipeline.run.estimate import peak_rss_mib
from pipeline.run.plan import RunPlan, prepare
from pipeline.run.resume import Resume, check_resume
from pipeline.source.resample import Grid
from pipeline.store.arrays import create_store
from pipeline.store.ome import write_gis_metadata, write_viewer_metadata
from pipeline.store.reading import class_stats, count_labels, open_store, pixel_area, store_stats
from pipeline.store.record import StoreRecord, write_record
from pipeline.store.safety import (
    check_lease,
    clear_state,
    remove_leftovers,
    staged_store,
    store_lock,
    write_state,
)
from pipeline.tiling import plan_tiles

log = logging.getLogger("fcnpipe")


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """What a run did, in the plan's vocabulary of chunks (see :class:`pipeline.run.plan.RunPlan`)."""

    output_path: str
    shape: tuple[int, int, int]
    megapixels: float
    seconds: float
    record: StoreRecord
    status: str = "done"
    """``done``, or ``already complete`` (a store with nothing left to do)."""
    chunks: int = 0
    chunks_computed: int = 0
    """Chunks the tasks of this run wrote."""
    chunks_background: int = 0
    """Chunks without foreground: neither computed nor stored."""
    chunks_resumed: int = 0
    """Chunks written by earlier, interrupted runs."""
    nodata_pixels: int = 0
    """Pixels of the computed chunks that hold no data (alpha 0, GDAL_NODATA, non-finite values)."""
    peak_rss_mib: float = 0.0
    stats: dict[str, Any] | None = None
    """Pixels and areas per class (:func:`pipeline.store.reading.class_stats`)."""

    @property
    def background_fraction(self) -> float:
        return self.chunks_background / self.chunks if self.chunks else 0.0


def execute(plan: RunPlan, on_progress: Callable[[int], None] | None = None) -> RunResult:
    """Create (or resume) the store, run every task, build the pyramid, mark complete.

    ``on_progress(pixels)`` follows the level-0 tasks. The store is locked against a second writer
    for the whole run.
    """
    with StoreWriter(plan) as writer:
        if writer.result is not None:
            return writer.result
        writer.compute(on_progress)
        return writer.finish()


def run_pipeline(config: RunConfig, on_progress: Callable[[int], None] | None = None) -> RunResult:
    """The main job: ``execute(prepare(config))``."""
    return execute(prepare(config), on_progress)


class StoreWriter:
    """A store between its start and its completion mark; a context manager holding its lock.

    Entering locks the store and creates it (whole: :func:`pipeline.store.safety.staged_store`) or
    resumes it; :attr:`result` is already set if there is nothing to do. Then the level-0 tasks run,
    through :meth:`compute` or, for a batch that computes several stores' tasks together, through
    :meth:`tasks`; :meth:`finish` makes the pyramid and marks the store complete. Leaving writes the
    markers of the tasks that finished, whatever happened, then releases the lock.
    """

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self.path = plan.output_path
        self.result: RunResult | None = None
        self.job = plan.job(self.path, uuid.uuid4().hex)
        self.stages: dict[str, float] = {}
        """Seconds per stage summed over the level-0 tasks (see :class:`pipeline.compute.job.TaskStats`)."""
        self.nodata_pixels = 0
        self.chunks_written = 0
        """Level-0 chunks the tasks of this run say they wrote."""
        """Pixels written as no data by this run's level-0 tasks (plain tiling; blended runs count none)."""
        self.class_pixels = [0] * plan.model.spec.num_classes
        """Pixels per class of the labels this run's level-0 tasks wrote (plain tiling)."""
        self._record: StoreRecord | None = None
        self._started = 0.0
        self._compute_s = 0.0
        self._held = ExitStack()

    def __enter__(self) -> StoreWriter:
        self._started = time.perf_counter()
        self._held.enter_context(store_lock(self.path))
        try:
            self._open()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Write the markers still queued, then release the lock; the store stays as it is (complete,
        or for ``--resume``). Idempotent."""
        state.MARK_BEHIND.wait(raise_error=False)
        self._held.close()

    def _open(self) -> None:
        plan = self.plan
        state.MARK_BEHIND.wait(raise_error=False)  # an earlier run's last markers, before this store is touched
        remove_leftovers(self.path)  # what runs killed while creating or replacing it left beside it
        resume = plan.resume
        if plan.config.output.resume and not _same(check_resume(self.path, plan.fingerprint), resume):
            raise OutputError(f"{self.path}: changed since the run was planned (another run?); plan it again")
        if resume is not None and resume.complete and resume.record is not None:
            log.info("%s: already complete", self.path)
            self.result = self._result(0.0, resume.record, "already complete")
        elif resume is None or resume.restart:
            self._record = self._create()
        else:
            removed = remove_partial_files(self.path)
            log.info("%s: resuming, %d tasks done, %d partial files removed", self.path, len(resume.done), removed)
            self._record = None if resume.record is None else resume.record.resumed_again()
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
        remote.FETCHED.reset()
        if plan.blend is None:
            results = compute_results(
                self.tasks(), plan.engine, workers=plan.workers, on_done=on_progress, gpu=plan.gpu
            )
            self.took(results)
        else:  # blended tiles overlap: a resumed blended run computes every tile again
            self.chunks_written += chunks_written(
                predict_blended(
                    self.job,
                    [tile for tile in plan.tiles if plan.kept(tile)],
                    classes=plan.model.spec.num_classes,
                    image_shape=plan.grid.shape,
                    blend=plan.blend,
                    batch=plan.config.tiling.batch,
                    workers=plan.workers,
                    engine=plan.engine,
                    on_progress=on_progress,
                )
            )
        self._compute_s += time.perf_counter() - started

    def took(self, results: list[Any]) -> None:
        """Count what this store's level-0 tasks returned (their :class:`TaskStats`)."""
        token = self.job.output.token
        mine = [result for result in results if getattr(result, "token", token) == token]
        self.stages = stage_seconds(mine)
        self.nodata_pixels = nodata_pixels(mine)
        self.chunks_written += chunks_written(mine)
        found = class_pixels(mine, len(self.class_pixels))
        self.class_pixels = [a + b for a, b in zip(self.class_pixels, found, strict=True)]

    def finish(self, compute_s: float | None = None) -> RunResult:
        """Make pyramid levels 2, 3, ... (level 1 came with level 0) and mark the store complete.

        ``compute_s``: the level-0 compute time to record, when the tasks ran with other stores'.
        """
        plan, cfg = self.plan, self.plan.config
        if self._record is None:
            raise OutputError(
                f"{self.path}: has no fcnpipe record to complete; {option('output.overwrite')} to start again"
            )
        started = time.perf_counter()
        state.MARK_BEHIND.wait()  # no marker may land after the store is marked complete
        first = 2 if self.job.level1 else 1
        if len(plan.levels) > first:
            log.info("%s: level 0 done; making pyramid levels %d-%d", self.path, first, len(plan.levels) - 1)
        for level, (height, width) in enumerate(plan.levels[first:], start=first):
            cores = plan_tiles(height, width, cfg.tiling.tile, halo=0)
            tasks = build_reduce_tasks(self.job.output, level, cores, cfg.tiling.batch)
            compute_tasks(tasks, plan.engine, workers=plan.workers)
        pyramid_s = time.perf_counter() - started
        total_s = plan.setup_s + time.perf_counter() - self._started
        compute = self._compute_s if compute_s is None else compute_s
        timings: dict[str, Any] = {"setup": plan.setup_s, "compute": compute, "pyramid": pyramid_s, "total": total_s}
        timings = {k: round(v, 3) for k, v in timings.items()}
        if self.stages:
            timings["stages"] = {k: round(v, 3) for k, v in self.stages.items()}
        if plan.engine.distributed:  # a worker that died mid-write left zarr's temporary file behind
            remove_partial_files(self.path)
        final = self._record.completed(timings, self.stats())
        check_lease(self.path)  # in object storage: no other writer took the store meanwhile
        write_record(self.path, final)
        clear_state(self.path)
        if remote.is_url(plan.source.path) and not plan.engine.distributed:  # workers count their own
            fetched, size = remote.FETCHED, plan.source.file_size
            log.info(
                "%s: read %.1f MiB of the input over the network in %d requests (%.2f x its %.1f MiB)",
                remote.redact(plan.source.path),
                *(fetched.bytes / 2**20, fetched.requests, fetched.bytes / max(size, 1), size / 2**20),
            )
        log.info("%s: complete in %.1f s", self.path, total_s)
        state.forget(self.job.output.token)
        return self._result(total_s, final, "done")

    def stats(self) -> dict[str, Any]:
        """The class areas of the store, whose level 0 is done: this run's tasks' counts, plus the
        chunks of the tasks earlier runs finished read from disk (all of them for a blended run)."""
        plan = self.plan
        names = list(plan.model.spec.class_names)
        with warnings.catch_warnings():  # zarr does not know the resume state's folder
            warnings.simplefilter("ignore", UserWarning)
            labels = open_store(self.path, complete=False).labels[0]
        if plan.blend is not None:
            counts = count_labels(labels, len(names))
        else:
            done = plan.resume.done if plan.resume is not None else frozenset()
            groups = [g for g in plan.groups() if task_id(g) in done]
            boxes = [tile.core for group in groups for tile in group if plan.kept(tile)]
            before = count_labels(labels, len(names), boxes) if boxes else [0] * len(names)
            counts = [a + b for a, b in zip(self.class_pixels, before, strict=True)]
        height, width = plan.grid.shape
        georef = plan.grid.georeference
        transform = None if georef is None else georef.transform
        crs = None if georef is None else georef.crs
        area, unit = pixel_area(plan.grid.mpp, transform, crs, plan.source.crs_units)
        return class_stats(counts, names, height * width, area, unit)

    def _create(self) -> StoreRecord:
        """A new store: arrays, viewer and GIS metadata, the start record, then the resume state."""
        plan, cfg, spec = self.plan, self.plan.config, self.plan.model.spec
        token = self.job.output.token
        with staged_store(self.path, token) as staging:  # whole, or not at all: a kill here leaves no half store
            create_store(
                staging,
                spec.num_classes,
                plan.levels,
                cfg.tiling.tile,
                cfg.output.dtype,
                overwrite=False,
                zarr_format=2 if plan.ome_version == "0.4" else 3,
                token=token,
                final_path=self.path,
                shard=plan.shard,
            )
            write_viewer_metadata(
                staging,
                version=plan.ome_version,
                name=os.path.basename(plan.source.path),
                levels=len(plan.levels),
                class_names=list(spec.class_names),
                class_colors=list(spec.class_colors),
                mpp=plan.grid.mpp,
                dtype=cfg.output.dtype,
            )
            georef = plan.grid.georeference
            if georef is not None and georef.transform is not None:
                write_gis_metadata(
                    staging, version=plan.ome_version, crs=georef.crs, transform=georef.transform, shape=plan.grid.shape
                )
            record = start_record(plan)
            write_record(staging, record)
            write_state(staging, {"fingerprint": plan.fingerprint, "torch_threads": plan.torch_threads})
        return record

    def _result(self, seconds: float, record: StoreRecord, status: str) -> RunResult:
        plan = self.plan
        stats = record.stats  # a complete store of an earlier fcnpipe: counted now, from disk
        if stats is None and record.complete:
            stats = store_stats(open_store(self.path, complete=True), plan.source.crs_units)
        return RunResult(
            output_path=self.path,
            shape=plan.output_shape,
            megapixels=plan.megapixels,
            seconds=seconds,
            record=record,
            status=status,
            chunks=plan.chunks,
            chunks_computed=self.chunks_written,
            chunks_background=plan.chunks_background,
            chunks_resumed=plan.chunks_resumed,
            nodata_pixels=self.nodata_pixels,
            peak_rss_mib=peak_rss_mib(),
            stats=stats,
        )


def _same(found: Resume | None, planned: Resume | None) -> bool:
    """Whether what is at the store now is what the plan found there (the markers may have grown
    only if another process wrote, which the lock prevents; the record's start stays)."""
    if found is None or planned is None:
        return found is None and planned is None
    return (found.complete, found.restart, found.done) == (planned.complete, planned.restart, planned.done)


def start_record(plan: RunPlan) -> StoreRecord:
    """The record a new store starts with (``complete: false``)."""
    cfg, spec = plan.config, plan.model.spec
    return StoreRecord(
        config=cfg.to_dict(),
        input={
            "path": _shown_path(plan.source.path),
            "size_bytes": plan.source.file_size,
            "shape_cyx": list(plan.source.shape),
        },
        model={"sha256": plan.model.sha256, **spec.to_dict(), "receptive_radius": plan.radius, "stride": plan.stride},
        tile=cfg.tiling.tile,
        halo=plan.halo,
        spatial=_spatial(plan.grid),
        torch_threads=plan.torch_threads,
        fingerprint=plan.fingerprint,
        mask=None if plan.mask is None else {"method": plan.mask.method, "chunks_skipped": plan.chunks_background},
    )


def _shown_path(path: str) -> str:
    """The input as the record names it: a URL without its credentials, a file by its absolute path."""
    return remote.redact(path) if remote.is_url(path) else os.path.abspath(path)


def _spatial(grid: Grid) -> dict[str, Any]:
    georef = grid.georeference
    resampling = grid.resampling
    return {
        "mpp": grid.mpp,
        "crs": None if georef is None else georef.crs,
        "transform": None if georef is None or georef.transform is None else list(georef.transform),
        "pixel_is_point": None if georef is None else georef.pixel_is_point,
        "level_read": grid.source.ref.level,
        "level0_shape": list(grid.source.levels[0].shape) if grid.source.levels else None,
        "resampling": None if resampling is None else [resampling.factor_y, resampling.factor_x],
        **({} if grid.full_shape is None else {"window": [*grid.origin[::-1], *grid.shape[::-1]]}),
    }
