"""Blended tiling: a halo smaller than the receptive radius, overlapping predictions averaged.

When the exact halo is too expensive (a receptive radius of hundreds of pixels), each tile is read
with a chosen ``halo`` ``N`` instead, its window ``core + N`` (clipped to the image) is predicted
once, and every output pixel is the weighted mean of the windows that cover it::

    p(y, x) = sum_t w_t(y, x) p_t(y, x) / sum_t w_t(y, x)

so the weights sum to one everywhere, image edges and corners included. ``w_t = w1(y) * w2(x)``
is laid over the tile's *nominal* window ``[core0 - N, core0 + tile + N)`` (the same profile for
every tile, so neighbours' weights cross at their shared core boundary):

* it is 0 on the outer ``N // 2`` pixels of each side that faces a neighbour. Those pixels see the
  window's zero padding instead of the neighbour's pixels, so they are its worst predictions;
  leaving them out measured better than tapering over the whole window, and makes blending exact
  again once ``N // 2`` reaches the exact halo (:func:`pipeline.model.receptive.measure_halo`);
* inside that, a taper that falls to (nearly, :data:`FLOOR`) zero at its edges, so that no step
  in weight leaves a seam: ``gaussian``, ``exp(-u**2 / 2 sigma**2)`` with ``sigma`` an eighth of
  the taper's width, lowered by its value at the edge; ``cosine``, ``0.5 + 0.5 cos(2 pi u / width)``
  (``u``: offset from the centre);
* a side on the image border is flat (1) from the window's centre to the border: a prediction
  there misses no context (the whole-image pass pads there too), so it is not down-weighted;
* ``none``: the indicator of the core, which is plain tiling with halo ``N``, to compare with.

Weights are positive on the whole core, so every pixel's sum is positive, except where the source
has no data: weight 0 there in every window, and the merge writes no data.

Blending pays only when ``N`` is below the exact halo: at or above it, plain tiling is exact and
blending mixes in pixels near the windows' edges (U-Net below, ``N = 48``, tile 128: max error 4e-4
gaussian, 8e-4 cosine, 0 plain). Below it, measured against the whole-image pass on random
images with seeded untrained networks (``tests/test_blend.py`` prints the U-Net rows), blending
lowers the maximum error by 5-40 % and the mean error by 4-30 %, and shrinks the seam (the mean
jump of the error across core boundaries: U-Net by 15-50 %, FCN-8s to the level elsewhere)::

    max / mean |p - whole image|     none              gaussian          cosine
    U-Net (exact halo 48), tile 64
      N = 8                          0.094 / 0.0069    0.088 / 0.0066    0.089 / 0.0066
      N = 16                         0.055 / 0.0030    0.043 / 0.0027    0.041 / 0.0027
      N = 32                         0.010 / 0.00034   0.008 / 0.00024   0.008 / 0.00032
    FCN-8s (exact halo 64), tile 128
      N = 32                         0.065 / 0.0025    0.041 / 0.0021    0.038 / 0.0022
      seam jump                      0.029             0.0013            0.0008

Two phases keep "no two tasks write one chunk" and compute each window once:

1. one task per row group of tiles predicts the windows and writes ``w * p`` and ``w`` (where
   ``w > 0``, :func:`weight_box`) into one of four temporary arrays chosen by the tile's parity
   ``(row % 2, col % 2)``: ``_blend/{row % 2}{col % 2}/{sum,weight}`` in the output store. Windows of
   one parity are at least ``tile - 2N`` apart, and the arrays' chunk (:func:`blend_chunk`)
   divides ``tile`` and puts a chunk boundary in every such gap, so no two share a chunk;
2. one task per row group of cores adds the four arrays over each core (whole chunks: the chunk
   divides the tile), divides, takes the argmax and writes the core with
   :func:`pipeline.store.arrays.write_core`. Then :func:`remove_blend_arrays` deletes ``_blend``.

The temporary arrays hold about ``((tile + N) / tile) ** 2`` times the output's float32 bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.compute import state
from pipeline.compute.engine import Engine
from pipeline.compute.job import Job, TaskStats
from pipeline.compute.tasks import compute_results, compute_tasks, delayed_call, read_windows
from pipeline.errors import ConfigError
from pipeline.parse import parse_choice, parse_int
from pipeline.store.arrays import (
    PARITIES,
    blend_arrays,
    create_blend_arrays,
    remove_blend_arrays,
    write_blend,
    write_core,
)
from pipeline.tiling import Box, Tile, batched

BLEND_MODES = ("none", "gaussian", "cosine")

FLOOR = 1e-6
"""Smallest weight inside a window: every covered pixel has a positive sum of weights."""


@dataclass(frozen=True, slots=True)
class Blend:
    """How windows are blended: validated by :func:`check_blend`, small and picklable."""

    tile: int
    """Core size in pixels, as in :func:`pipeline.tiling.plan_tiles`."""
    halo: int
    """Pixels read around each core; a multiple of the stride, at most ``tile / 2``."""
    mode: str
    """One of :data:`BLEND_MODES`."""

    @property
    def chunk(self) -> int:
        return blend_chunk(self.tile, self.halo)


def check_blend(tile: int, halo: int, stride: int, mode: str) -> Blend:
    """Validate a blended tiling and return it; ConfigError saying what to use instead.

    >>> check_blend(512, 64, 32, "cosine")
    Blend(tile=512, halo=64, mode='cosine')
    """
    parse_int(tile, "tile size", minimum=1)
    parse_int(stride, "network stride", minimum=1)
    parse_choice(mode, "blend mode", BLEND_MODES)
    parse_int(halo, "halo", minimum=0)
    if tile % stride:
        raise ConfigError(
            f"Tile size {tile} is not a multiple of the network's stride {stride}; use {-(-tile // stride) * stride}."
        )
    if halo % stride:
        low, high = halo // stride * stride, -(-halo // stride) * stride
        raise ConfigError(
            f"The halo {halo} is not a multiple of the network's stride {stride}: windows must start on "
            f"multiples of it; use {low} or {high}."
        )
    if tile % 2:
        raise ConfigError(
            f"Expected an even tile size for blending: its temporary chunks are half a tile. Got {tile} instead; "
            f"use {tile + stride}."
        )
    if 2 * halo > tile:
        raise ConfigError(
            f"The halo {halo} is more than half the tile size {tile}: windows two tiles apart would overlap; "
            f"use a halo of at most {tile // 2 // stride * stride} or a tile of at least {2 * halo}."
        )
    return Blend(tile, halo, mode)


def blend_chunk(tile: int, halo: int) -> int:
    """Side of the temporary arrays' square chunks: half the (even) tile, or the tile for no halo.

    Dividing the tile makes every core whole chunks, so phase 2 reads each chunk once. Half a tile
    puts a chunk boundary between any two windows of one parity: window ``r`` ends at
    ``(r + 1) * tile + halo``, at or before ``(r + 1.5) * tile``, where window ``r + 2``, starting at
    ``(r + 2) * tile - halo``, at the earliest begins.

    >>> blend_chunk(512, 64), blend_chunk(512, 256), blend_chunk(96, 0)
    (256, 256, 96)
    """
    return tile // 2 if halo else tile


def window_weights(t: Tile, image_shape: tuple[int, int], blend: Blend) -> tuple[np.ndarray, np.ndarray]:
    """The weights of tile ``t``'s window: ``(w1y, w2x)`` float32, ``w = w1y[:, None] * w2x[None, :]``.

    ``w1y`` has ``t.window_shape[0]`` values, ``w2x`` ``t.window_shape[1]``, each in ``[0, 1]`` and at
    least :data:`FLOOR` on the core (``none``: 1 on the core, 0 elsewhere).
    """
    height, width = image_shape
    y0, _, x0, _ = t.core
    wy0, wy1, wx0, wx1 = t.window
    return (_axis_weights(y0, wy0, wy1, height, blend), _axis_weights(x0, wx0, wx1, width, blend))


def _axis_weights(core0: int, start: int, stop: int, length: int, blend: Blend) -> np.ndarray:
    """Weights over ``[start, stop)`` of the window of the core starting at ``core0``, on one axis."""
    nominal = core0 - blend.halo
    size = blend.tile + 2 * blend.halo
    margin = blend.halo // 2
    profile = np.zeros(size, np.float32)
    if blend.mode == "none":
        profile[blend.halo : blend.halo + blend.tile] = 1.0
    else:
        profile[margin : size - margin] = _profile(size - 2 * margin, blend.mode)
        if start == 0:  # the image border: no neighbour to hand over to, and no halo that misses context
            profile[: size // 2] = 1.0
        if stop == length:
            profile[size // 2 :] = 1.0
    weights: np.ndarray = profile[start - nominal : stop - nominal]
    return weights


def weight_box(t: Tile, image_shape: tuple[int, int], blend: Blend) -> Box:
    """The part of ``t``'s window where its weight is not 0: what phase 1 writes, ``(y0, y1, x0, x1)``.

    >>> from pipeline.tiling import plan_tiles
    >>> [weight_box(t, (40, 40), Blend(16, 8, "cosine")) for t in plan_tiles(40, 40, 16, 8)[:2]]
    [(0, 20, 0, 20), (0, 20, 12, 40)]
    """
    w1y, w2x = window_weights(t, image_shape, blend)
    wy0, _, wx0, _ = t.window
    ys, xs = np.flatnonzero(w1y), np.flatnonzero(w2x)
    return (wy0 + int(ys[0]), wy0 + int(ys[-1]) + 1, wx0 + int(xs[0]), wx0 + int(xs[-1]) + 1)


def _profile(size: int, mode: str) -> np.ndarray:
    """``size`` weights, symmetric, about 1 at the centre, falling to about 0 (at least FLOOR) at the edges."""
    u = (np.arange(size) + 0.5) / size - 0.5  # pixel centres, in (-1/2, 1/2) of the window
    if mode == "gaussian":
        sigma = 1 / 8
        edge = np.exp(-0.5 * (0.5 / sigma) ** 2)
        weights = (np.exp(-0.5 * (u / sigma) ** 2) - edge) / (1 - edge)
    else:
        weights = 0.5 + 0.5 * np.cos(2 * np.pi * u)
    floored: np.ndarray = np.maximum(weights, FLOOR).astype(np.float32)
    return floored


def parity(t: Tile) -> str:
    """The temporary arrays tile ``t`` writes to: ``"00"``, ``"01"``, ``"10"`` or ``"11"``."""
    return f"{t.row % 2}{t.col % 2}"


def blend_tiles(job: Job, tiles: Sequence[Tile], image_shape: tuple[int, int], blend: Blend) -> int:
    """Phase 1: predict the windows of ``tiles``; write ``w * p`` and ``w`` into their parity's arrays.

    The union of the windows is read once; windows of equal padded shape share a forward pass.
    ``w`` is 0 where the source has no data. Returns the number of core pixels, for progress.
    """
    predictor = state.predictor_for(job)
    windows, valid, (uy0, ux0) = read_windows(job, tiles)
    arrays = blend_arrays(job.output.path)
    for pairs in windows.values():
        probs = predictor(np.stack([window for _, window in pairs]))
        for (t, _), prob in zip(pairs, probs, strict=True):
            w1y, w2x = window_weights(t, image_shape, blend)
            wy0, _, wx0, _ = t.window
            y0, y1, x0, x1 = box = weight_box(t, image_shape, blend)
            weight = w1y[y0 - wy0 : y1 - wy0, None] * w2x[None, x0 - wx0 : x1 - wx0]
            if valid is not None:
                weight *= valid[y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0]
            weighted = prob[:, y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] * weight
            write_blend(arrays[parity(t)], box, weighted, weight, job.output.path)
    return sum(t.core_pixels for t in tiles)


def merge_tiles(job: Job, tiles: Sequence[Tile]) -> TaskStats:
    """Phase 2: each core's blended probabilities and their argmax, written to the output.

    Pixels whose weights sum to 0 have no data (:func:`pipeline.store.arrays.nodata_value`, label
    :data:`pipeline.store.arrays.NODATA_LABEL`). Returns the pixels and chunks written.
    """
    started = time.perf_counter()
    arrays = blend_arrays(job.output.path)
    classes = arrays[PARITIES[0]][0].shape[0]
    for t in tiles:
        y0, y1, x0, x1 = t.core
        weighted = np.zeros((classes, y1 - y0, x1 - x0), np.float64)
        total = np.zeros((y1 - y0, x1 - x0), np.float64)
        for sums, weights in arrays.values():
            weighted += sums[:, y0:y1, x0:x1]
            total += weights[y0:y1, x0:x1]
        empty = total == 0
        probs = (weighted / np.where(empty, 1.0, total)).astype(np.float32)
        labels = probs.argmax(axis=0).astype(np.uint8)
        write_core(job.output, t.core, probs, labels, empty if empty.any() else None)
    return TaskStats(
        token=job.output.token,
        pixels=sum(t.core_pixels for t in tiles),
        chunks=len(tiles),
        read_s=0.0,
        predict_s=0.0,
        write_s=time.perf_counter() - started,
    )


def build_blend_tasks(
    job: Job, tiles: Sequence[Tile], image_shape: tuple[int, int], blend: Blend, batch: int
) -> list[Any]:
    """Phase 1 as one delayed task per group of at most ``batch`` neighbouring tiles of a row."""
    return [delayed_call(blend_tiles, job, group, image_shape, blend) for group in batched(tiles, batch)]


def build_merge_tasks(job: Job, tiles: Sequence[Tile], batch: int) -> list[Any]:
    """Phase 2 as one delayed task per group of at most ``batch`` neighbouring cores of a row."""
    return [delayed_call(merge_tiles, job, group) for group in batched(tiles, batch)]


def predict_blended(
    job: Job,
    tiles: Sequence[Tile],
    *,
    classes: int,
    image_shape: tuple[int, int],
    blend: Blend,
    batch: int,
    workers: int,
    engine: Engine,
    on_progress: Callable[[int], None] | None = None,
) -> list[TaskStats]:
    """Both phases on ``tiles`` (planned with ``halo=blend.halo``), then the temporary arrays removed.

    ``on_progress(pixels)`` follows phase 1, the forward passes. Returns what the merge tasks wrote. The
    temporary arrays are removed on failure too: they are up to twice the output's size.
    """
    create_blend_arrays(job.output.path, classes, image_shape, blend.chunk)
    try:
        compute_tasks(
            build_blend_tasks(job, tiles, image_shape, blend, batch), engine, workers=workers, on_done=on_progress
        )
        return compute_results(build_merge_tasks(job, tiles, batch), engine, workers=workers)
    finally:
        remove_blend_arrays(job.output.path)
