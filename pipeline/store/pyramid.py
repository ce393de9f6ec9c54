"""Multiscale levels: shapes, and the 2 x 2 reductions that make each level from the one above.

Pure numpy, no I/O. Probabilities are averaged (a coarse pixel is the mean probability of the four
it covers, those with data: still a probability, still summing to one over classes); labels are subsampled (the
top-left pixel of each 2 x 2 block), never averaged: the mean of class 1 and class 3 is not class 2.

In a sharded store (``output.shard N``) every level is in shards of N x N chunks, or one whole-level
shard where the level is smaller than that (:func:`pipeline.store.layout.shard_shape`): the same rule
at every level, and the coarse levels are a few files anyway. A level-1 shard is made of the chunks
of four level-0 shards, that is of four tasks, so the level-0 tasks do not write level 1 there: each
level from 1 on is made after the one above is complete, by tasks that each write one whole shard,
chunk by chunk, reading the 2 x 2 chunks above each (:func:`pipeline.store.arrays.reduce_cores`).
"""

from __future__ import annotations

import numpy as np

_NODATA_UINT8 = 255
"""No data in uint8 probabilities (see :mod:`pipeline.store.arrays`, which owns the convention)."""
VIEWER_SIDE = 1024
"""Levels halve until the whole image fits in about this many pixels a side."""


def level_shapes(height: int, width: int, smallest: int = VIEWER_SIDE) -> list[tuple[int, int]]:
    """``(Y, X)`` of level 0, 1, ... each half the one above (rounded up), down to <= ``smallest``.

    >>> level_shapes(5000, 3000)
    [(5000, 3000), (2500, 1500), (1250, 750), (625, 375)]
    >>> level_shapes(700, 900)
    [(700, 900)]
    """
    shapes = [(height, width)]
    while max(shapes[-1]) > smallest:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def mean_2x2(block: np.ndarray, dtype: str) -> np.ndarray:
    """``(C, Y, X)`` -> ``(C, ceil(Y/2), ceil(X/2))``: the mean of each 2 x 2 block, as ``dtype``.

    The mean is over the pixels that exist (an odd edge) and hold data: no data (NaN, or 255 in
    uint8, see :func:`pipeline.store.arrays.nodata_value`) is left out, and a block with no data at all
    is no data. uint8 input holds ``round(p * 254)`` and the result is rounded back the same way.

    >>> mean_2x2(np.array([[[0.0, 1.0, 0.5], [1.0, 0.0, 0.25]]]), "float32").tolist()
    [[[0.5, 0.375]]]
    >>> mean_2x2(np.array([[[0.0, np.nan, np.nan], [1.0, 0.0, np.nan]]]), "float32").tolist()
    [[[0.3333333432674408, nan]]]
    >>> mean_2x2(np.array([[[10, 255], [20, 255]]], np.uint8), "uint8").tolist()
    [[[15]]]
    """
    c, y, x = block.shape
    uint8 = block.dtype == np.uint8
    if dtype == "uint8" and uint8 and not y % 2 and not x % 2 and not (block == _NODATA_UINT8).any():
        return _mean_2x2_uint8(block)
    valid = block != _NODATA_UINT8 if uint8 else ~np.isnan(block)
    padded = np.zeros((c, y + y % 2, x + x % 2), np.float32)
    np.copyto(padded[:, :y, :x], block, where=valid, casting="unsafe")
    counts = np.zeros((c, y + y % 2, x + x % 2), np.float32)
    counts[:, :y, :x] = valid
    # four strided views added elementwise: a reshape-and-sum took 24 ms per 1024 x 1024 block
    sums = padded[:, ::2, ::2] + padded[:, 1::2, ::2] + padded[:, ::2, 1::2] + padded[:, 1::2, 1::2]
    n = counts[:, ::2, ::2] + counts[:, 1::2, ::2] + counts[:, ::2, 1::2] + counts[:, 1::2, 1::2]
    empty = n == 0
    mean: np.ndarray = sums / np.where(empty, 1.0, n)
    if dtype == "uint8":
        out: np.ndarray = np.rint(mean).astype(np.uint8)
        out[empty] = _NODATA_UINT8
        return out
    mean[empty] = np.nan
    result: np.ndarray = mean.astype(dtype)
    return result


def _mean_2x2_uint8(block: np.ndarray) -> np.ndarray:
    """:func:`mean_2x2` of a uint8 block of even height and width, in integers: the same bytes
    (the sum over 4, rounded half to even like ``np.rint``) in a quarter of the time.

    Each pair of horizontal neighbours is read as one uint16, so every pass is over contiguous
    memory (numpy's passes over strided or mixed-type operands were 4x slower).

    >>> _mean_2x2_uint8(np.array([[[1, 1, 1, 2], [0, 0, 1, 1]]], np.uint8)).tolist()  # 2/4 -> 0, 5/4 -> 1
    [[[0, 1]]]
    >>> _mean_2x2_uint8(np.array([[[3, 3], [0, 0]]], np.uint8)).tolist()  # 6/4 = 1.5 -> 2
    [[[2]]]
    """
    pairs = np.ascontiguousarray(block).view(np.uint16)
    sums = pairs & 0xFF
    sums += pairs >> 8  # the two bytes of a pair, whichever the byte order
    sums = sums[:, ::2] + sums[:, 1::2]
    # round(s / 4) half to even is (s + 1 + (s / 4 truncated is odd)) // 4
    odd = sums >> 2
    odd &= 1
    sums += odd
    sums += 1
    sums >>= 2
    return sums.astype(np.uint8)


def subsample_2x2(labels: np.ndarray) -> np.ndarray:
    """``(Y, X)`` -> ``(ceil(Y/2), ceil(X/2))``: the top-left label of each 2 x 2 block.

    >>> subsample_2x2(np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])).tolist()
    [[1, 3], [7, 9]]
    """
    return labels[::2, ::2]
