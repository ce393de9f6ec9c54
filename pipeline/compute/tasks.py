"""Dask glue: one fused task per group of tiles (read with halo -> predict -> crop -> write).

Each task carries only small, picklable values (a :class:`Job` and a list of tiles): paths and
windows, never an open file or a model. The worker loads the network once and keeps it
(:func:`predictor_for`), opens the TIFF once per thread and the Zarr arrays once per process, and
returns a few numbers, so nothing proportional to the image ever lives in the graph or in the
scheduler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import dask
import numpy as np

from pipeline.compute import state
from pipeline.compute.job import Job, TaskFailure, TaskStats, task_id
from pipeline.errors import FcnpipeError
from pipeline.model.predictor import Predictor, argmax_channels
from pipeline.source.resample import read_resampled
from pipeline.store.arrays import ShardWriter, chunk_files, reduce_cores, write_reduced, write_stored
from pipeline.store.layout import NODATA_LABEL, UINT8_SCALE, OutputRef, nodata_value, quantize
from pipeline.store.safety import mark_done
from pipeline.tiling import Tile, batched, blocks, blocks_2x2, split_core, union_window

if TYPE_CHECKING:
    from pipeline.compute.engine import Engine


def normalize(
    window: np.ndarray, scale: float, mean: Sequence[float] | None, std: Sequence[float] | None
) -> np.ndarray:
    """``(C, Y, X)`` raw pixels -> float32 network input: ``x / scale``, then ``(x - mean) / std``.

    The result keeps the window's memory order: interleaved (``YXC``) pixels give the channels-last
    layout the network runs in, so the forward pass makes no copy of its own.
    """
    x: np.ndarray = np.multiply(window, np.float32(1.0 / scale), dtype=np.float32)  # one pass: cast and scale
    if mean is not None:
        x -= np.asarray(mean, dtype=np.float32)[:, None, None]
    if std is not None:
        x /= np.asarray(std, dtype=np.float32)[:, None, None]
    return x


def pad_to_stride(image: np.ndarray, stride: int) -> np.ndarray:
    """Zero-pad ``(C, Y, X)`` at the bottom and right to multiples of ``stride``.

    The one way fcnpipe pads, for tiles and for a whole image alike: windows start on multiples
    of the stride, so a window that reaches the image's end is padded exactly like the image.

    >>> pad_to_stride(np.ones((1, 3, 5), np.float32), 4).shape
    (1, 4, 8)
    """
    _, height, width = image.shape
    pad_y, pad_x = -height % stride, -width % stride
    if not pad_y and not pad_x:
        return image
    return np.pad(image, ((0, 0), (0, pad_y), (0, pad_x)))


Windows = dict[tuple[int, int, int], list[tuple[Tile, np.ndarray]]]
"""Network inputs ``(C, Y, X)`` of tiles (or of the pieces of tiles, :attr:`Job.forward_tile`), in
groups of one shape and at most ``job.forward_batch`` windows, keyed by ``(Y, X, index)``: each
group is one forward pass."""


def read_windows(job: Job, tiles: Sequence[Tile]) -> tuple[Windows, np.ndarray | None, tuple[int, int]]:
    """The normalised, stride-padded windows of ``tiles``; where the source has data; the origin.

    The union of the windows is read once (neighbouring windows share file tiles), then each
    window is normalised on its own, straight into the network's input. The validity mask covers
    the union, whose top-left corner is the returned origin ``(y, x)``.
    """
    uy0, uy1, ux0, ux1 = union_window(tiles)
    oy, ox = job.origin
    raw, valid = read_resampled(job.source, (uy0 + oy, uy1 + oy, ux0 + ox, ux1 + ox), job.resampling, job.source_shape)
    by_shape: dict[tuple[int, int], list[tuple[Tile, np.ndarray]]] = {}
    for tile in tiles:
        for piece in split_core(tile, job.forward_tile, job.halo) if job.forward_tile else (tile,):
            wy0, wy1, wx0, wx1 = piece.window
            pixels = normalize(raw[:, wy0 - uy0 : wy1 - uy0, wx0 - ux0 : wx1 - ux0], job.scale, job.mean, job.std)
            window = pad_to_stride(pixels, job.stride)
            by_shape.setdefault(window.shape[1:], []).append((piece, window))
    size = job.forward_batch
    windows: Windows = {
        (height, width, i // size): pairs[i : i + size]
        for (height, width), pairs in by_shape.items()
        for i in range(0, len(pairs), size)
    }
    return windows, valid, (uy0, ux0)


def predict_tiles(
    predictor: Predictor, windows: Windows, tiles: Sequence[Tile], dtype: str
) -> list[tuple[Tile, np.ndarray, np.ndarray]]:
    """Every forward pass of ``windows`` (:func:`read_windows` of ``tiles``); each tile with its
    core's probabilities as stored (``(K, y, x)`` in ``dtype``, :func:`pipeline.store.arrays.quantize`)
    and their argmax (uint8 ``(y, x)``, taken from the full-precision probabilities).

    On a GPU each forward pass quantises and argmaxes there (:meth:`Predictor.stored`), so that
    only the stored bytes come back; these are per pixel, so cropping and gathering afterwards gives
    the same values. On a CPU the pieces of a cut tile are gathered into one float array and
    quantised and argmaxed once in numpy: done piece by piece, their dozen small passes cost more
    than the copy (16 pieces of 128 px: 0.50 against 0.31 ms a tile; 4 of 256 px: 0.38 against 0.33 ms).
    """
    on_device = predictor.device.type != "cpu"
    parts: dict[tuple[int, int], list[tuple[Tile, np.ndarray, np.ndarray | None]]] = {}
    for pairs in windows.values():
        inputs = [window for _, window in pairs]
        batch = inputs[0][None] if len(inputs) == 1 else np.stack(inputs)  # one: no copy
        values, labels = predictor.stored(batch, dtype, UINT8_SCALE) if on_device else (predictor(batch), None)
        for index, (piece, _) in enumerate(pairs):
            cy0, cy1, cx0, cx1 = piece.crop
            label = None if labels is None else labels[index, cy0:cy1, cx0:cx1]
            parts.setdefault((piece.row, piece.col), []).append((piece, values[index, :, cy0:cy1, cx0:cx1], label))
    done = []
    for tile in tiles:
        pieces = parts[(tile.row, tile.col)]
        _, gathered, label = pieces[0]  # a whole tile: its core, no copy
        if len(pieces) > 1:
            y0, y1, x0, x1 = tile.core
            gathered = np.empty((gathered.shape[0], y1 - y0, x1 - x0), gathered.dtype)
            label = None if label is None else np.empty((y1 - y0, x1 - x0), np.uint8)
            for piece, part, part_labels in pieces:
                py0, py1, px0, px1 = piece.core
                gathered[:, py0 - y0 : py1 - y0, px0 - x0 : px1 - x0] = part
                if label is not None and part_labels is not None:
                    label[py0 - y0 : py1 - y0, px0 - x0 : px1 - x0] = part_labels
        if label is None:  # float probabilities from a CPU pass
            done.append((tile, quantize(gathered, dtype), argmax_channels(gathered[None])[0]))
        else:
            done.append((tile, gathered, label))
    return done


def stage_seconds(results: Sequence[Any]) -> dict[str, float]:
    """``{"read", "predict", "write"}`` seconds summed over the :class:`TaskStats` in ``results``."""
    stats = [r for r in results if isinstance(r, TaskStats)]
    return {
        "read": sum(s.read_s for s in stats),
        "predict": sum(s.predict_s for s in stats),
        "write": sum(s.write_s for s in stats),
    }


def chunks_written(results: Sequence[Any]) -> int:
    """Level-0 chunks written, summed over the :class:`TaskStats` in ``results``."""
    return sum(r.chunks for r in results if isinstance(r, TaskStats))


def nodata_pixels(results: Sequence[Any]) -> int:
    """Pixels written as no data, summed over the :class:`TaskStats` in ``results``."""
    return sum(r.nodata_pixels for r in results if isinstance(r, TaskStats))


def class_pixels(results: Sequence[Any], classes: int) -> list[int]:
    """Pixels written with label 0 ... ``classes - 1``, summed over the :class:`TaskStats` in ``results``."""
    total = [0] * classes
    for result in results:
        if isinstance(result, TaskStats):
            for label, count in enumerate(result.class_pixels[:classes]):
                total[label] += count
    return total


def process_tiles(job: Job, tiles: Sequence[Tile], block: Sequence[Tile] = (), name: str | None = None) -> TaskStats:
    """Read, predict, crop and write ``tiles``; return the pixels written and the time per stage.

    ``block``: with ``job.level1``, the whole 2 x 2 block the tiles belong to (a masked tile of it is
    left at the fill value). ``name``: record the task as finished once its chunks are on disk. In a
    sharded store the tiles are those of one shard (:func:`task_groups`): they are computed 2 x 2 at a
    time, as a level-1 task's are, and written chunk by chunk into that one shard, whole.
    """
    predictor = state.predictor_for(job)
    task_started = time.perf_counter()
    tally = _Tally()
    written: list[str] = []
    if job.output.shard:
        with ShardWriter(job.output, 0, tiles[0].core) as shard:
            for part in blocks_2x2(tiles):
                for tile, stored, core_labels in _computed(job, predictor, part, tally):
                    shard.write(tile.core, stored, core_labels)
        written = shard.paths
    else:
        done: list[tuple[Tile, np.ndarray, np.ndarray]] = []
        for tile, stored, core_labels in _computed(job, predictor, tiles, tally):
            write_stored(job.output, 0, tile.core, stored, core_labels)
            if name is not None:
                written += chunk_files(job.output, 0, tile.core)
            if job.level1:
                done.append((tile, stored, core_labels))
        if job.level1:
            core = write_level1(job.output, block or tiles, done)
            if name is not None:
                written += chunk_files(job.output, 1, core)
    if name is not None:
        (state.MARK_BEHIND.submit if job.mark_behind else mark_done)(job.output.path, name, written)
    total_s = time.perf_counter() - task_started
    return TaskStats(
        token=job.output.token,
        pixels=sum(t.core_pixels for t in tiles),
        chunks=len(tiles),
        read_s=tally.read_s,
        predict_s=tally.predict_s,
        write_s=total_s - tally.read_s - tally.predict_s,
        nodata_pixels=tally.nodata,
        class_pixels=tuple(int(n) for n in np.trim_zeros(tally.counts[:NODATA_LABEL], "b")),
    )


@dataclass
class _Tally:
    """What a task's tiles took and held: seconds reading and predicting, no-data pixels, pixels per label."""

    read_s: float = 0.0
    predict_s: float = 0.0
    nodata: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(NODATA_LABEL + 1, np.int64))


def _computed(
    job: Job, predictor: Predictor, tiles: Sequence[Tile], tally: _Tally
) -> Iterator[tuple[Tile, np.ndarray, np.ndarray]]:
    """Each of ``tiles`` with its core's probabilities as stored and its labels, no data written in
    where the source has none; counted in ``tally``."""
    started = time.perf_counter()
    windows, valid, (uy0, ux0) = read_windows(job, tiles)
    tally.read_s += time.perf_counter() - started
    started = time.perf_counter()
    cores = predict_tiles(predictor, windows, tiles, job.output.dtype)
    tally.predict_s += time.perf_counter() - started
    for tile, stored, core_labels in cores:
        if valid is not None:
            y0, y1, x0, x1 = tile.core
            empty = ~valid[y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0]
            stored[:, empty] = nodata_value(stored.dtype)
            core_labels[empty] = NODATA_LABEL
            tally.nodata += int(np.count_nonzero(empty))
        tally.counts += np.bincount(core_labels.ravel(), minlength=NODATA_LABEL + 1)  # 0.2 ms a 512² core
        yield tile, stored, core_labels


def write_level1(
    out: OutputRef, block: Sequence[Tile], done: Sequence[tuple[Tile, np.ndarray, np.ndarray]]
) -> tuple[int, int, int, int]:
    """Write the level-1 chunk of a 2 x 2 ``block`` of level-0 cores from the values stored for
    the tiles in ``done``; the others hold no data. Returns the level-1 core written."""
    y0, x0 = min(t.core[0] for t in block), min(t.core[2] for t in block)
    y1, x1 = max(t.core[1] for t in block), max(t.core[3] for t in block)
    dtype = done[0][1].dtype
    probs = np.full((done[0][1].shape[0], y1 - y0, x1 - x0), nodata_value(dtype), dtype)
    labels = np.full((y1 - y0, x1 - x0), NODATA_LABEL, np.uint8)
    for tile, core_probs, core_labels in done:
        cy0, cy1, cx0, cx1 = tile.core
        probs[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = core_probs
        labels[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = core_labels
    core = (y0 // 2, (y1 + 1) // 2, x0 // 2, (x1 + 1) // 2)
    write_reduced(out, 1, core, probs, labels)
    return core


def build_tasks(
    job: Job,
    tiles: Sequence[Tile],
    batch: int,
    keep: Callable[[Tile], bool] | None = None,
    done: Collection[str] = (),
    guarded: bool = False,
) -> list[Any]:
    """One delayed task per 2 x 2 block of tiles (``job.level1``), else per ``batch`` tiles of a row.

    Tiles for which ``keep`` is false are not computed (their chunks keep the fill value); a task
    whose name (:func:`pipeline.run.resume.task_id`) is in ``done`` finished in an earlier run.
    ``guarded``: a failing task returns a :class:`TaskFailure` instead of raising (see there).
    """
    run = process_guarded if guarded else process_tiles
    todo = []
    for group in task_groups(tiles, job.level1, batch, job.output.shard):
        name = task_id(group)
        kept = group if keep is None else [tile for tile in group if keep(tile)]
        if name not in done and kept:
            todo.append((group, kept, name))
    # Dask runs independent tasks in reverse order of their keys (random ones by default): name
    # them so that they run in the order of task_groups.
    return [
        delayed_call(run, job, kept, group if job.level1 else (), name, key=f"fcnpipe-{job.output.token}-{rank:09d}")
        for rank, (group, kept, name) in zip(range(len(todo) - 1, -1, -1), todo, strict=True)
    ]


def delayed_call(func: Callable[..., Any], *args: Any, key: str | None = None) -> Any:
    """``dask.delayed(func)(*args)``, named ``key`` if given, without dask searching ``args`` for
    collections: there are none, and searching every tile and the job cost 0.4 ms a task (0.4 s
    of a 32768² run's 1024 tasks); bound into a partial, 0.02 ms."""
    call = dask.delayed(partial(func, *args), pure=False)
    return call() if key is None else call(dask_key_name=key)


def task_groups(tiles: Sequence[Tile], level1: bool, batch: int, shard: int = 0) -> list[list[Tile]]:
    """The tiles of each level-0 task, in the order they run: in a store sharded in ``shard x shard``
    chunks the tiles of each shard, row-major (one writer a shard); else 2 x 2 blocks in
    :func:`band_order` (``level1``), else ``batch`` tiles of a row, row by row."""
    if shard:
        return list(blocks(tiles, shard))
    return band_order(list(blocks_2x2(tiles))) if level1 else list(batched(tiles, batch))


BAND = 4
"""Rows of 2 x 2 blocks per band in :func:`band_order`."""


def band_order(blocks: Sequence[list[Tile]]) -> list[list[Tile]]:
    """Blocks in bands of :data:`BAND` block rows, each band column by column.

    Neighbouring windows share the file tiles under their halo. In this order the tiles a task
    needs were mostly decoded by the tasks just before it, above or to its left, and are still in
    the small decoded-tile cache (:data:`pipeline.source.pixels.TILE_CACHE`); row by row, the tiles
    shared with the row above were decoded a whole image width ago.

    >>> from pipeline.tiling import plan_tiles
    >>> blocks = list(blocks_2x2(plan_tiles(16, 8, 2, 1)))  # 4 block rows, 2 block columns
    >>> [(b[0].row // 2, b[0].col // 2) for b in band_order(blocks)][:5]
    [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1)]
    """

    def place(block: list[Tile]) -> tuple[int, int, int]:
        row, col = block[0].row // 2, block[0].col // 2
        return (row // BAND, col, row)

    return sorted(blocks, key=place)


def process_guarded(job: Job, tiles: Sequence[Tile], block: Sequence[Tile] = (), name: str | None = None) -> Any:
    """:func:`process_tiles`, returning a :class:`TaskFailure` instead of raising."""
    if state.failed(job.output.token):
        return TaskFailure(job.output.token, "")
    try:
        return process_tiles(job, tiles, block, name)
    except Exception as err:  # reported per store by the caller, in one line
        state.fail(job.output.token)
        text = str(err) if isinstance(err, FcnpipeError) else f"{type(err).__name__}: {err}"
        return TaskFailure(job.output.token, " ".join(text.split()))


def build_reduce_tasks(out: OutputRef, level: int, tiles: Sequence[Tile], batch: int) -> list[Any]:
    """Tasks that make pyramid ``level`` chunk by chunk from the level above (cores of ``tiles``):
    ``batch`` chunks of a row each, or in a sharded store the chunks of one whole shard each."""

    def reduce(group: list[Tile]) -> int:
        return reduce_cores(out, level, [tile.core for tile in group])

    groups = blocks(tiles, out.shard) if out.shard else batched(tiles, batch)
    return [delayed_call(reduce, group) for group in groups]


def compute_tasks(
    tasks: Sequence[Any], engine: Engine, *, workers: int, on_done: Callable[[int], None] | None = None
) -> int:
    """:func:`compute_results`, returning the total number of pixels written."""
    return sum(pixels_of(result) for result in compute_results(tasks, engine, workers=workers, on_done=on_done))


def pixels_of(result: Any) -> int:
    """Pixels a task wrote: its int result, or its :class:`TaskStats`'s (0 for a failure)."""
    if isinstance(result, TaskStats):
        return result.pixels
    return result if isinstance(result, int) else 0


def compute_results(
    tasks: Sequence[Any],
    engine: Engine,
    *,
    workers: int,
    on_done: Callable[[int], None] | None = None,
    gpu: bool = False,
) -> list[Any]:
    """Run ``tasks`` with ``engine`` (``workers`` tasks at once on threads); ``on_done(pixels)``
    after each; return what each returned, in order. ``gpu``: each task needs the worker resource GPU=1."""

    def done(result: Any) -> None:
        if on_done is not None and pixels_of(result):
            on_done(pixels_of(result))

    return engine.run(tasks, workers, done, gpu)
