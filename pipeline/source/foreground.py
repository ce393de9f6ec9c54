"""Foreground pixels, and the chunks they keep: pure functions of arrays, for :mod:`pipeline.source.mask`.

Tissue on glass is saturated (:func:`tissue_pixels`), fluorescence on a dark background is bright
(:func:`fluorescence_pixels`), both above Otsu's threshold clamped into a range found on real slides
unless the user gives one. :func:`chunk_mask_from_pixels` turns foreground pixels of a low-resolution
level into chunks to compute, erring towards computing; :func:`mask_level` chooses that level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.parse import parse_int

MAX_PIXELS = 4096 * 4096
"""Largest low-resolution level read for a mask (16 Mpx: 48 MB of RGB, about 2 s to decode and threshold)."""
MIN_PIXELS_PER_CHUNK = 4
"""Low-resolution pixels per chunk side below which a finer level is preferred, if there is one."""
SATURATION_CLAMP = (0.04, 0.15)
"""Bounds on an automatic (Otsu) saturation threshold; see :func:`tissue_pixels`."""
_BINS = 256


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of ``values`` in [0, 1] on a 256-bin histogram: ``values > t`` is the upper class.

    Otsu picks the split that maximises the variance between the two classes. When several splits
    tie (an empty gap between two modes), the middle one is taken, so the threshold lies midway
    between the modes rather than hugging one. Constant input returns the upper edge of its bin
    (nothing lies above it).

    >>> otsu_threshold(np.array([0.1] * 5 + [0.9] * 5))
    0.5
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        raise ValueError("Expected at least one value to threshold. Got an empty array.")
    bins = np.clip((flat * _BINS).astype(np.int64), 0, _BINS - 1)
    p = np.bincount(bins, minlength=_BINS) / flat.size
    centres = (np.arange(_BINS) + 0.5) / _BINS
    w0 = np.cumsum(p)[:-1]  # weight of the lower class when it holds bins 0..k
    w1 = 1.0 - w0
    mean0_times_w0 = np.cumsum(p * centres)[:-1]
    total_mean = float((p * centres).sum())
    valid = (w0 > 1e-12) & (w1 > 1e-12)
    if not valid.any():
        return float(bins[0] + 1) / _BINS
    between = np.zeros_like(w0)
    between[valid] = (total_mean * w0[valid] - mean0_times_w0[valid]) ** 2 / (w0[valid] * w1[valid])
    ties = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(ties[len(ties) // 2] + 1) / _BINS


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of a ``(3, Y, X)`` array of any dtype, as ``(Y, X)`` float32.

    Saturation is a ratio, so the dtype's range (uint8, uint16, floats in [0, 1]) does not matter.
    Black (``max == 0``) is 0; negative samples, which no colour image has, are clipped into [0, 1].

    >>> saturation(np.array([[[255, 255, 128]], [[255, 0, 128]], [[255, 0, 128]]], np.uint8)).tolist()
    [[0.0, 1.0, 0.0]]
    """
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise ValueError(f"Expected a (3, Y, X) RGB array. Got shape {rgb.shape}.")
    high = rgb.max(axis=0).astype(np.float32)  # max/min in the input dtype first: a third of the float memory
    low = rgb.min(axis=0).astype(np.float32)
    out = np.zeros(high.shape, np.float32)
    np.divide(high - low, high, out=out, where=high > 0)
    return np.clip(out, 0.0, 1.0, out=out)


def tissue_pixels(rgb: np.ndarray, threshold: float | None) -> tuple[np.ndarray, float]:
    """Tissue in a ``(3, Y, X)`` RGB image: ``(Y, X)`` bool ``saturation > t``, and ``t``.

    ``t`` is ``threshold`` when given, else Otsu's threshold of the saturation clamped into
    ``[0.04, 0.15]``. Otsu always splits the image in two, even when it holds one class: on an
    all-white slide it would split sensor noise (saturation ~0.01) and call half the glass tissue,
    and on a slide filled with tissue it would split pale from dark stain and drop the pale half.
    Background glass stays below ~0.04 (a grey of 245 with a 10-level colour cast) and stained
    tissue above ~0.15 (pale eosin), so the clamp keeps an all-white image all background and an
    all-tissue image all tissue while leaving a real two-class split where Otsu puts it.
    """
    sat = saturation(rgb)
    if threshold is None:
        low, high = SATURATION_CLAMP
        threshold = float(np.clip(otsu_threshold(sat), low, high))
    return sat > threshold, float(threshold)


def chunk_mask_from_pixels(
    fg: np.ndarray,
    grid_shape: tuple[int, int],
    tile: int,
    margin: int = 1,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """``(rows, cols)`` bool: the chunks of a ``grid_shape`` grid in which ``fg`` has a foreground pixel.

    With ``window`` = ``(row, col, height, width)``, the chunks of that window of the grid (a window
    run), which start at its corner.

    ``fg`` is a ``(fy, fx)`` foreground image of any size covering the same extent as the grid. Chunk
    rows ``[y0, y1)`` map to ``fg`` rows ``[floor(y0 * fy / H), ceil(y1 * fy / H))`` (columns likewise),
    widened by ``margin`` ``fg`` pixels on each side: a low-resolution pixel that straddles a chunk
    edge, or a thin structure only partly inside a chunk, then still keeps that chunk. Each chunk is
    one look-up in a summed-area table, so a 200 x 200 chunk grid takes milliseconds.

    >>> fg = np.zeros((4, 4), bool)
    >>> fg[0, 3] = True
    >>> chunk_mask_from_pixels(fg, (8, 8), tile=2, margin=0).astype(int).tolist()
    [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    >>> chunk_mask_from_pixels(fg, (8, 8), tile=2, margin=1).astype(int).tolist()
    [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    """
    height, width = (
        parse_int(grid_shape[0], "grid height", minimum=1),
        parse_int(grid_shape[1], "grid width", minimum=1),
    )
    tile = parse_int(tile, "tile size", minimum=1)
    margin = parse_int(margin, "mask margin", minimum=0)
    fg = np.asarray(fg)
    if fg.ndim != 2:
        raise ValueError(f"Expected a 2-D foreground image. Got shape {fg.shape}.")
    fy, fx = fg.shape
    table = np.zeros((fy + 1, fx + 1), np.int64)
    table[1:, 1:] = (fg != 0).cumsum(axis=0).cumsum(axis=1)
    row, col, rows, cols = window or (0, 0, height, width)
    top, bottom = _spans(height, tile, fy, margin, row, rows)
    left, right = _spans(width, tile, fx, margin, col, cols)
    count = (
        table[np.ix_(bottom, right)]
        - table[np.ix_(top, right)]
        - table[np.ix_(bottom, left)]
        + table[np.ix_(top, left)]
    )
    keep: np.ndarray = count > 0
    return keep


def _spans(size: int, tile: int, low_size: int, margin: int, offset: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop (exclusive) in the low-resolution image of each chunk along one axis; the
    chunks cover ``[offset, offset + length)`` of the ``size`` pixels."""
    start = np.arange(offset, offset + length, tile, dtype=np.int64)
    stop = np.minimum(start + tile, offset + length)
    first = (start * low_size) // size - margin  # integer floor and ceil: exact at any size
    last = -((-stop * low_size) // size) + margin
    return np.clip(first, 0, low_size), np.clip(last, 0, low_size)


def mask_level(levels: Sequence[tuple[int, int]], grid_shape: tuple[int, int], tile: int) -> int:
    """Index of the level of ``levels`` (``(Y, X)`` each) to derive a mask for ``grid_shape`` from.

    The coarsest level that still has at least 4 pixels per chunk side: fewer would make the mask
    a blur of its one-pixel margin. If no level has that many, the finest.

    >>> levels = [(4096, 4096), (1024, 1024), (256, 256)]
    >>> mask_level(levels, (4096, 4096), tile=64), mask_level(levels, (4096, 4096), tile=32)
    (2, 1)
    """
    enough = [i for i, shape in enumerate(levels) if pixels_per_chunk(shape, grid_shape, tile) >= MIN_PIXELS_PER_CHUNK]
    if enough:
        return min(enough, key=lambda i: levels[i][0] * levels[i][1])
    return max(range(len(levels)), key=lambda i: pixels_per_chunk(levels[i], grid_shape, tile))


def affordable_level(levels: Sequence[tuple[int, int]], grid_shape: tuple[int, int], tile: int) -> int | None:
    """:func:`mask_level`, or None when that level has more than :data:`MAX_PIXELS` pixels: reading
    it would cost a noticeable part of the run (a large raster without overviews).

    >>> affordable_level([(8192, 8192)], (8192, 8192), 512) is None
    True
    """
    level = mask_level(levels, grid_shape, tile)
    return None if levels[level][0] * levels[level][1] > MAX_PIXELS else level


def pixels_per_chunk(shape: tuple[int, int], grid_shape: tuple[int, int], tile: int) -> float:
    """Pixels of an image of ``shape`` along a chunk's shorter side, the image covering the grid's extent.

    A grid smaller than one tile is one chunk of the grid's size.

    >>> pixels_per_chunk((1024, 768), (8192, 6144), tile=512), pixels_per_chunk((24, 24), (24, 24), tile=512)
    (64.0, 24.0)
    """
    return min(min(tile, grid_shape[0]) * shape[0] / grid_shape[0], min(tile, grid_shape[1]) * shape[1] / grid_shape[1])


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """``(C, ceil(Y / f), ceil(X / f))`` float32 means of ``f x f`` blocks of a ``(C, Y, X)`` image.

    Blocks at the bottom and right edges are partial and are the mean of the pixels they have.

    Unsigned integer pixels whose block sums stay below 2**24 are summed as integers, in the pixels'
    own memory order (a slide's are interleaved): the same float32 values as summing in float32, where
    every partial sum is an integer float32 holds exactly, in a third of the time (a 4096² RGB level
    in 32 x 32 blocks: 0.40 against 0.79 s).

    >>> image = np.arange(6).reshape(1, 2, 3)
    >>> block_mean(image, 2).tolist(), block_mean(image.astype(np.uint8), 2).tolist()
    ([[[2.0, 3.5]]], [[[2.0, 3.5]]])
    """
    channels, height, width = image.shape
    rows, cols = np.arange(0, height, factor), np.arange(0, width, factor)
    counts = np.outer(np.diff(rows, append=height), np.diff(cols, append=width)).astype(np.float32)
    if np.issubdtype(image.dtype, np.unsignedinteger) and factor * factor * np.iinfo(image.dtype).max < 2**24:
        pixels = np.moveaxis(image, 0, -1)  # (Y, X, C): a slide's own layout, so no transposing copy
        pixels = np.pad(pixels, ((0, -height % factor), (0, -width % factor), (0, 0)))  # zeros add nothing
        blocks = pixels.reshape(len(rows), factor, len(cols), factor, channels)
        whole: np.ndarray = np.moveaxis(blocks.sum(axis=(1, 3), dtype=np.uint32), -1, 0).astype(np.float32)
        return whole / counts
    sums = np.add.reduceat(np.add.reduceat(image, rows, axis=1, dtype=np.float32), cols, axis=2)
    out: np.ndarray = sums / counts
    return out


DARK_BACKGROUND = 0.35
"""Median brightness below which an image is taken to have a dark background (fluorescence):
brightfield glass is near white (0.9 and above) and stained tissue rarely below 0.5."""
BRIGHTNESS_CLAMP = (0.02, 0.2)
"""Bounds on an automatic (Otsu) brightness threshold on a dark background: at least 2% of the
range (an all-dark image is all background, not split in sensor noise), at most 20% (a bright
stain does not push dim tissue into the background)."""


def brightness(image: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray | None:
    """``(Y, X)`` float32 brightest channel of a ``(C, Y, X)`` image, in [0, 1] of its dtype's range
    (floats: of [0, max(1, their maximum)]); None for signed pixels, whose range says nothing.

    >>> brightness(np.array([[[0, 255]], [[51, 0]]], np.uint8), np.dtype("uint8")).astype(float).round(2).tolist()
    [[0.2, 1.0]]
    """
    if np.issubdtype(dtype, np.unsignedinteger):
        top = float(np.iinfo(dtype).max)
    elif np.issubdtype(dtype, np.floating):
        top = max(1.0, float(np.nanmax(image)) if image.size else 1.0)
    else:
        return None
    light: np.ndarray = np.clip(np.nan_to_num((image.max(axis=0) / top).astype(np.float32)), 0.0, 1.0)
    return light


def fluorescence_pixels(light: np.ndarray, threshold: float | None) -> tuple[np.ndarray, float]:
    """Foreground of a dark-background image: brightness above ``threshold``, else above Otsu's
    threshold clamped into :data:`BRIGHTNESS_CLAMP`; and the threshold used."""
    if threshold is None:
        low, high = BRIGHTNESS_CLAMP
        threshold = float(np.clip(otsu_threshold(light), low, high))
    return light > threshold, float(threshold)
