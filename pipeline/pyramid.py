"""Multiscale levels: shapes, and the 2 x 2 reductions that make each level from the one above.

Pure numpy, no I/O. Probabilities are averaged (a coarse pixel is the mean probability of the four
it covers: still a probability, still summing to one over classes); labels are subsampled (the
top-left pixel of each 2 x 2 block), never averaged: the mean of class 1 and class 3 is not class 2.
"""

from __future__ import annotations

import numpy as np

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

    At an odd edge the mean is over the pixels that exist. uint8 input holds ``round(p * 255)``
    and the result is rounded back the same way.

    >>> mean_2x2(np.array([[[0.0, 1.0, 0.5], [1.0, 0.0, 0.25]]]), "float32").tolist()
    [[[0.5, 0.375]]]
    """
    c, y, x = block.shape
    if dtype == "uint8" and block.dtype == np.uint8 and not y % 2 and not x % 2:
        return _mean_2x2_uint8(block)
    padded = np.zeros((c, y + y % 2, x + x % 2), np.float32)
    padded[:, :y, :x] = block
    # four strided views added elementwise: a reshape-and-sum took 24 ms per 1024 x 1024 block
    sums = padded[:, ::2, ::2] + padded[:, 1::2, ::2] + padded[:, ::2, 1::2] + padded[:, 1::2, 1::2]
    n = np.full(sums.shape[1:], 4.0, np.float32)
    if y % 2:
        n[-1, :] /= 2
    if x % 2:
        n[:, -1] /= 2
    mean: np.ndarray = sums / n
    return np.rint(mean).astype(np.uint8) if dtype == "uint8" else mean.astype(dtype)


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
