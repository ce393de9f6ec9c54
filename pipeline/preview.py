"""A PNG preview of a run: the input beside its coloured label map, both small.

Nothing here reads a full-resolution array at once. :func:`label_thumbnail` walks the chunk grid
of a 2-D Zarr array and keeps every ``stride``-th pixel of each chunk, so memory is one chunk plus
the thumbnail however large the map is; chunks that hold no sampled pixel are never read.
:func:`source_thumbnail` reads the smallest pyramid level that is still large enough, window by
window. PNGs are encoded with imagecodecs (no Pillow).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import imagecodecs
import numpy as np

from pipeline.errors import ConfigError, OutputError
from pipeline.source import SourceInfo, read_window

_GAP = 8  # px of white between the two panels
_UNKNOWN_COLOR = (255, 0, 255)  # labels without a colour show as magenta
_WINDOW = 2048  # px, side of the windows a thumbnail is read in


def stride_for(shape: Sequence[int], max_size: int) -> int:
    """Smallest step that brings the largest side of ``shape`` to at most ``max_size`` pixels.

    >>> stride_for((8192, 4000), 1024), stride_for((1000, 600), 1024), stride_for((1025, 10), 1024)
    (8, 1, 2)
    """
    if max_size < 1:
        raise ConfigError(f"Expected a positive thumbnail size. Got {max_size} instead.")
    return max(1, math.ceil(max(shape) / max_size))


def label_thumbnail(array: Any, max_size: int = 1024) -> np.ndarray:
    """``array[::s, ::s]`` of a 2-D (Zarr) array, read chunk by chunk, with ``s`` from :func:`stride_for`.

    ``array`` needs ``shape``, ``dtype`` and basic slicing, and is read in its ``chunks`` (a
    zarr.Array); without ``chunks`` (a NumPy array) it is read in 1024 x 1024 blocks. The result has
    ``ceil(Y / s) x ceil(X / s)`` pixels.
    """
    height, width = array.shape
    chunk_y, chunk_x = getattr(array, "chunks", None) or (1024, 1024)
    stride = stride_for((height, width), max_size)
    out = np.zeros((-(-height // stride), -(-width // stride)), dtype=array.dtype)
    for y0 in range(0, height, chunk_y):
        rows = _sampled(y0, min(y0 + chunk_y, height), stride)
        if rows is None:
            continue
        for x0 in range(0, width, chunk_x):
            cols = _sampled(x0, min(x0 + chunk_x, width), stride)
            if cols is None:
                continue
            block = np.asarray(array[y0 : min(y0 + chunk_y, height), x0 : min(x0 + chunk_x, width)])
            out[rows[1], cols[1]] = block[rows[0], cols[0]]
    return out


def _sampled(start: int, stop: int, stride: int) -> tuple[slice, slice] | None:
    """Where the multiples of ``stride`` in ``[start, stop)`` lie: in the block, and in the thumbnail.

    >>> _sampled(10, 20, 4)
    (slice(2, 10, 4), slice(3, 5, None))
    >>> _sampled(9, 11, 4) is None
    True
    """
    first = -(-start // stride) * stride
    if first >= stop:
        return None
    count = -(-(stop - first) // stride)
    return slice(first - start, stop - start, stride), slice(first // stride, first // stride + count)


def choose_level(levels: Sequence[tuple[int, int]], max_size: int) -> int:
    """The smallest level whose larger side is at least ``max_size``, else level 0 (the largest).

    >>> choose_level([(8192, 8192), (4096, 4096), (2048, 2048), (1024, 1024), (512, 512)], 1024)
    3
    >>> choose_level([(800, 600), (400, 300)], 1024)
    0
    """
    large_enough = [index for index, shape in enumerate(levels) if max(shape) >= max_size]
    return min(large_enough, key=lambda index: max(levels[index])) if large_enough else 0


def source_thumbnail(info: SourceInfo, max_size: int = 1024) -> np.ndarray:
    """``(3, h, w)`` uint8 thumbnail of the input, largest side at most ``max_size`` pixels.

    Reads the level :func:`choose_level` picks, in windows of about 2048 px, keeping every
    ``stride``-th pixel. Grey is repeated to three channels, two channels get a zero third, more
    than three keep the first three; non-uint8 data is scaled by the thumbnail's own min and max.
    """
    shapes = [level.shape for level in info.levels]
    level = choose_level(shapes, max_size)
    ref = replace(info.ref, level=level)
    height, width = shapes[level]
    stride = stride_for((height, width), max_size)
    step = -(-_WINDOW // stride) * stride  # a multiple of the stride, so every window starts on a sample
    out = np.zeros((info.shape[0], -(-height // stride), -(-width // stride)), dtype=info.dtype)
    for y0 in range(0, height, step):
        y1 = min(y0 + step, height)
        for x0 in range(0, width, step):
            x1 = min(x0 + step, width)
            window = read_window(ref, (y0, y1, x0, x1))[:, ::stride, ::stride]
            ty, tx = y0 // stride, x0 // stride
            out[:, ty : ty + window.shape[1], tx : tx + window.shape[2]] = window
    return to_rgb8(out)


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """``(C, h, w)`` of any dtype -> ``(3, h, w)`` uint8 for display.

    >>> to_rgb8(np.array([[[0, 512, 1024]]], dtype=np.uint16)).tolist()
    [[[0, 128, 255]], [[0, 128, 255]], [[0, 128, 255]]]
    """
    if image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    elif image.shape[0] == 2:
        image = np.concatenate([image, np.zeros_like(image[:1])])
    image = image[:3]
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    data = image.astype(np.float64)
    finite = data[np.isfinite(data)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scaled = (np.nan_to_num(data, nan=low) - low) * (255.0 / (high - low) if high > low else 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def colorize(labels: np.ndarray, colors: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """``(h, w)`` class indices -> ``(h, w, 3)`` uint8 colours; indices without a colour are magenta."""
    palette = np.tile(np.asarray(_UNKNOWN_COLOR, np.uint8), (256, 1))
    palette[: len(colors)] = np.asarray(colors, np.uint8).reshape(-1, 3)[:256]
    return palette[labels.astype(np.uint8)]


def resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes of ``image`` to ``height x width``."""
    rows = np.arange(height) * image.shape[0] // height
    cols = np.arange(width) * image.shape[1] // width
    out: np.ndarray = image[rows[:, None], cols[None, :]]
    return out


def write_preview(
    png_path: str | os.PathLike[str],
    thumbnail: np.ndarray,
    labels: np.ndarray,
    colors: Sequence[tuple[int, int, int]],
) -> None:
    """Write a PNG of ``thumbnail`` (``(3, h, w)`` uint8) beside ``labels`` coloured with ``colors``.

    The label map is resized to ``h x w`` by nearest neighbour if it differs, and the panels are
    separated by 8 white pixels, so the PNG is ``h x (2 w + 8)`` RGB.
    """
    if thumbnail.ndim != 3 or thumbnail.shape[0] != 3 or thumbnail.dtype != np.uint8:
        raise ConfigError(f"Expected a (3, h, w) uint8 thumbnail. Got {thumbnail.shape} {thumbnail.dtype} instead.")
    _, height, width = thumbnail.shape
    label_rgb = colorize(resize_nearest(labels, height, width), colors)
    canvas = np.full((height, 2 * width + _GAP, 3), 255, np.uint8)
    canvas[:, :width] = np.moveaxis(thumbnail, 0, -1)
    canvas[:, width + _GAP :] = label_rgb
    path = os.fspath(png_path)
    try:
        with open(path, "wb") as fh:
            fh.write(imagecodecs.png_encode(canvas))
    except OSError as err:
        raise OutputError(f"{path}: cannot write the preview ({err.strerror or err})") from err
