"""Which output chunks hold foreground: skip what is not there.

A whole-slide image is mostly glass, and a satellite scene often has a no-data collar; running a
network there costs as much as on tissue or land and writes nothing useful. Before a run, a small
*low-resolution* image of the input decides, for every ``tile x tile`` chunk of the network's grid,
whether the chunk is computed at all (:class:`ChunkMask`). The image is a pyramid level read whole
(at most 16 Mpx), so deciding costs at most a couple of seconds, even for a gigapixel input.

Foreground comes from one of three places (:func:`foreground_mask`):

- **no data** (``"auto"`` on a file with an alpha band, GDAL_NODATA or a GDAL internal mask): the
  pixels the file says hold data, as :func:`pipeline.source.tiff.read_masked` reads them;
- **tissue** (``"auto"`` on a 3-channel image that is not a GeoTIFF): HSV saturation above a
  threshold, Otsu's by default (:func:`tissue_pixels`): glass is grey or white, stained tissue is not;
- **fluorescence** (``"auto"`` on an image that is not a GeoTIFF and whose background is dark, any
  number of channels): brightness above a threshold, Otsu's by default (:func:`fluorescence_pixels`);
- **a user mask** (a path): any TIFF or PNG whose nonzero pixels are foreground, of any size that
  covers the same extent as the image.

The mask errs towards computing: a chunk is kept when any foreground pixel lies within one
low-resolution pixel of it (:func:`chunk_mask_from_pixels`), so tissue thinner than a low-resolution
pixel at a chunk's edge is not lost to rounding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, SourceError
from pipeline.source.tiff import SourceInfo, SourceRef, open_source, read_masked, read_window

MODES = ("auto", "none")
"""Mode strings with a meaning; anything else is the path of a user mask image."""
MAX_PIXELS = 4096 * 4096
"""Largest low-resolution level read for a mask (16 Mpx: 48 MB of RGB, about 2 s to decode and threshold)."""
MIN_PIXELS_PER_CHUNK = 4
"""Low-resolution pixels per chunk side below which a finer level is preferred, if there is one."""
TISSUE_PIXELS_PER_CHUNK = 16
"""A level read for tissue with at least twice this many pixels per chunk side is averaged down to it."""
SATURATION_CLAMP = (0.04, 0.15)
"""Bounds on an automatic (Otsu) saturation threshold; see :func:`tissue_pixels`."""
_BINS = 256
_BAND_PIXELS = 1 << 22  # pixels per read of a large user mask


@dataclass(frozen=True, eq=False)
class ChunkMask:
    """Which chunks of the grid a run computes, and how that was decided.

    ``eq=False``: two masks compare by identity, as comparing arrays element-wise is not a bool.
    """

    keep: np.ndarray
    """``(rows, cols)`` bool over the chunk grid; True = compute this chunk. Read-only."""
    method: str
    """One line for the plan, e.g. ``"tissue: saturation > 0.071 (Otsu) on level 2 (768 x 1024 px)"``."""

    def __post_init__(self) -> None:
        keep = np.asarray(self.keep)
        if keep.ndim != 2 or keep.dtype != np.bool_:
            raise ValueError(f"Expected a 2-D bool array of chunks to keep. Got {keep.dtype} of shape {keep.shape}.")
        keep = keep.copy()
        keep.flags.writeable = False  # frozen means frozen: a plan cannot be changed after it was printed
        object.__setattr__(self, "keep", keep)

    @property
    def skipped_fraction(self) -> float:
        """Fraction of the chunks that are not computed (0.0 for an empty grid)."""
        return 0.0 if self.keep.size == 0 else 1.0 - float(self.keep.mean())

    def kept(self, row: int, col: int) -> bool:
        """Whether chunk ``(row, col)`` is computed; raises IndexError outside the grid."""
        rows, cols = self.keep.shape
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(f"chunk ({row}, {col}) is outside the {rows} x {cols} chunk grid")
        return bool(self.keep[row, col])


# --- pure pixel functions -------------------------------------------------------------------------


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


def chunk_mask_from_pixels(fg: np.ndarray, grid_shape: tuple[int, int], tile: int, margin: int = 1) -> np.ndarray:
    """``(rows, cols)`` bool: the chunks of a ``grid_shape`` grid in which ``fg`` has a foreground pixel.

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
    height, width = _positive(grid_shape[0], "grid height"), _positive(grid_shape[1], "grid width")
    tile = _positive(tile, "tile size")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ConfigError(f"Expected a non-negative integer for the mask margin. Got {margin!r} instead.")
    fg = np.asarray(fg)
    if fg.ndim != 2:
        raise ValueError(f"Expected a 2-D foreground image. Got shape {fg.shape}.")
    fy, fx = fg.shape
    table = np.zeros((fy + 1, fx + 1), np.int64)
    table[1:, 1:] = (fg != 0).cumsum(axis=0).cumsum(axis=1)
    top, bottom = _spans(height, tile, fy, margin)
    left, right = _spans(width, tile, fx, margin)
    count = (
        table[np.ix_(bottom, right)]
        - table[np.ix_(top, right)]
        - table[np.ix_(bottom, left)]
        + table[np.ix_(top, left)]
    )
    keep: np.ndarray = count > 0
    return keep


def _spans(size: int, tile: int, low_size: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop (exclusive) in the low-resolution image of each chunk along one axis."""
    start = np.arange(0, size, tile, dtype=np.int64)
    stop = np.minimum(start + tile, size)
    first = (start * low_size) // size - margin  # integer floor and ceil: exact at any size
    last = -((-stop * low_size) // size) + margin
    return np.clip(first, 0, low_size), np.clip(last, 0, low_size)


def choose_level(
    levels: Sequence[tuple[int, int]], grid_shape: tuple[int, int], tile: int, max_pixels: int | None = MAX_PIXELS
) -> int | None:
    """Index of the level of ``levels`` (``(Y, X)`` each) to derive a mask for ``grid_shape`` from.

    The coarsest level that still has at least 4 pixels per chunk side: fewer would make the mask
    a blur of its one-pixel margin. If no level has that many, the finest. None when that level
    has more than ``max_pixels`` pixels: reading it would cost a noticeable part of the run.

    >>> levels = [(4096, 4096), (1024, 1024), (256, 256)]
    >>> choose_level(levels, (4096, 4096), tile=64), choose_level(levels, (4096, 4096), tile=32)
    (2, 1)
    """
    enough = [i for i, shape in enumerate(levels) if pixels_per_chunk(shape, grid_shape, tile) >= MIN_PIXELS_PER_CHUNK]
    if enough:
        chosen = min(enough, key=lambda i: levels[i][0] * levels[i][1])
    else:
        chosen = max(range(len(levels)), key=lambda i: pixels_per_chunk(levels[i], grid_shape, tile))
    if max_pixels is not None and levels[chosen][0] * levels[chosen][1] > max_pixels:
        return None
    return chosen


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

    >>> block_mean(np.arange(6).reshape(1, 2, 3), 2).tolist()
    [[[2.0, 3.5]]]
    """
    _, height, width = image.shape
    rows, cols = np.arange(0, height, factor), np.arange(0, width, factor)
    sums = np.add.reduceat(np.add.reduceat(image, rows, axis=1, dtype=np.float32), cols, axis=2)
    counts = np.outer(np.diff(rows, append=height), np.diff(cols, append=width)).astype(np.float32)
    out: np.ndarray = sums / counts
    return out


def _positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ConfigError(f"Expected a positive integer for {name}. Got {value!r} instead.")
    return int(value)


# --- from a source or a file ----------------------------------------------------------------------


def foreground_mask(
    mode: str, source: SourceInfo, grid_shape: tuple[int, int], tile: int, threshold: float | None = None
) -> ChunkMask | None:
    """The chunks of the ``grid_shape`` grid (chunks of ``tile`` px) worth computing, or None for all.

    ``source`` is the input as opened for the run; the grid covers its whole extent (any level, or
    a resampled grid). ``mode``:

    - ``"none"``: None.
    - ``"auto"``: a no-data mask when the file has an alpha band, GDAL_NODATA or an internal mask;
      else None for a GeoTIFF (every pixel of a raster without no-data is data); else a tissue mask
      for a 3-channel image (a slide); else None (tissue detection needs RGB). Also None when the
      level to read is larger than 16 Mpx (:func:`choose_level`): a mask should cost seconds, not a
      pass over a large raster without overviews.
    - anything else: the path of a TIFF or PNG whose nonzero pixels are foreground, of any size with
      the grid's aspect ratio (within 2 %).

    ``threshold`` overrides the automatic saturation threshold of a tissue mask.
    """
    _positive(tile, "tile size")
    _positive(grid_shape[0], "grid height")
    _positive(grid_shape[1], "grid width")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0
    ):
        raise ConfigError(f"Expected a saturation threshold between 0 and 1. Got {threshold!r} instead.")
    if mode not in MODES:
        return user_mask(mode, grid_shape, tile)
    if mode == "none":
        return None
    ref = source.ref
    if ref.alpha or ref.nodata is not None or ref.mask_series is not None:
        return _nodata_mask(source, grid_shape, tile)
    if source.georeference is not None:
        return None
    return _tissue_mask(source, grid_shape, tile, threshold)


def _level_ref(source: SourceInfo, level: int) -> SourceRef:
    """``source``'s reference at another level of its series.

    Opened afresh rather than ``replace(ref, level=...)``: the internal mask's series, alpha and
    GDAL_NODATA are tags of each level's own page. An overview without the GDAL_NODATA tag keeps the
    value of the run's level, which GDAL means for the whole file.
    """
    if level == source.ref.level:
        return source.ref
    ref = open_source(source.path, source.ref.series, level).ref
    return ref if ref.nodata is not None else replace(ref, nodata=source.ref.nodata)


def _nodata_mask(source: SourceInfo, grid_shape: tuple[int, int], tile: int) -> ChunkMask | None:
    level = choose_level([lv.shape for lv in source.levels], grid_shape, tile)
    if level is None:
        return None
    ref = _level_ref(source, level)
    height, width = source.levels[level].shape
    _, valid = read_masked(ref, (0, height, 0, width))
    if valid is None:  # this level records no no-data after all: every pixel is data
        return None
    what = [name for name, has in (("alpha band", ref.alpha), ("internal mask", ref.mask_series is not None)) if has]
    if ref.nodata is not None:
        what.append(f"GDAL_NODATA {ref.nodata:g}")
    keep = chunk_mask_from_pixels(valid, grid_shape, tile)
    return ChunkMask(keep, f"no-data: {', '.join(what)} on level {level} ({height} x {width} px)")


def _tissue_mask(
    source: SourceInfo, grid_shape: tuple[int, int], tile: int, threshold: float | None
) -> ChunkMask | None:
    """Tissue on a low-resolution level: by saturation on a bright background (brightfield), by
    brightness on a dark one (fluorescence, any number of channels); None where neither applies
    (a brightfield image that is not RGB, signed or float pixels of unknown range)."""
    level = choose_level([lv.shape for lv in source.levels], grid_shape, tile)
    if level is None:
        return None
    height, width = source.levels[level].shape
    image = read_window(_level_ref(source, level), (0, height, 0, width))
    if np.issubdtype(image.dtype, np.floating):  # NaN and infinities are no data: dark, unsaturated
        image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
    # Finer than needed (a slide without a pyramid): average it down as a pyramid level would be.
    # Single pixels carry JPEG speckle and dust whose saturation would keep empty chunks.
    factor = int(pixels_per_chunk((height, width), grid_shape, tile) // TISSUE_PIXELS_PER_CHUNK)
    averaged = ""
    if factor > 1:
        image = block_mean(image, factor)
        averaged = f", averaged in {factor} x {factor} blocks"
    light = brightness(image, source.dtype)
    where = f"level {level} ({height} x {width} px{averaged})"
    if light is not None and float(np.median(light)) < DARK_BACKGROUND:
        foreground, used = fluorescence_pixels(light, threshold)
        kind, name = "fluorescence", "brightness"
    elif image.shape[0] == 3:
        foreground, used = tissue_pixels(image, threshold)
        kind, name = "tissue", "saturation"
    else:
        return None
    clamp = SATURATION_CLAMP if kind == "tissue" else BRIGHTNESS_CLAMP
    how = "given" if threshold is not None else ("Otsu, clamped" if used in clamp else "Otsu")
    keep = chunk_mask_from_pixels(foreground, grid_shape, tile)
    return ChunkMask(keep, f"{kind}: {name} > {used:.3f} ({how}) on {where}")


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


def user_mask(path: str | os.PathLike[str], grid_shape: tuple[int, int], tile: int) -> ChunkMask:
    """A mask from an image file: nonzero pixels (in any channel) are foreground.

    A TIFF is read through :mod:`pipeline.source.tiff` (any layout it reads, its coarsest level with at
    least 4 pixels per chunk, decoded in bands when that level is large); anything else through
    Pillow (PNG, ...). Raises ConfigError naming the file when it is missing or unreadable, or when
    its aspect ratio differs from the grid's by more than 2 % (it would not cover the same extent).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such mask file" + (" (it is a directory)" if os.path.isdir(path) else ""))
    with open(path, "rb") as fh:
        is_tiff = fh.read(2) in (b"II", b"MM")
    fg, full_shape, level = _read_tiff_mask(path, grid_shape, tile) if is_tiff else _read_picture_mask(path)
    height, width = grid_shape
    if abs((full_shape[0] / full_shape[1]) / (height / width) - 1) > 0.02:
        raise ConfigError(
            f"{path}: the mask is {full_shape[0]} x {full_shape[1]} px but the image grid is {height} x {width} px; "
            "their aspect ratios differ by more than 2 %, so the mask cannot cover the same extent"
        )
    where = "" if level is None else f"level {level}, "
    keep = chunk_mask_from_pixels(fg, grid_shape, tile)
    return ChunkMask(keep, f"user mask: {path} ({where}{fg.shape[0]} x {fg.shape[1]} px)")


def _read_tiff_mask(
    path: str, grid_shape: tuple[int, int], tile: int
) -> tuple[np.ndarray, tuple[int, int], int | None]:
    """Foreground of a TIFF mask, its level-0 ``(Y, X)``, and the level read."""
    try:
        info = open_source(path)
        level = choose_level([lv.shape for lv in info.levels], grid_shape, tile, max_pixels=None)
        assert level is not None  # no max_pixels: always a level
        ref = info.ref if level == 0 else open_source(path, info.ref.series, level).ref
        fg = _nonzero_reduced(ref, info.levels[level].shape)
    except SourceError as err:
        reason = str(err).removeprefix(f"{path}: ")
        raise ConfigError(f"{path}: cannot read the mask: {reason}") from err
    return fg, info.levels[0].shape, level


def _nonzero_reduced(ref: SourceRef, shape: tuple[int, int]) -> np.ndarray:
    """``(Y', X')`` bool: whether each cell of the level has a nonzero pixel, with ``Y' * X'`` <= 16 Mpx.

    Cell ``(i, j)`` holds the level's rows ``[ceil(i Y / Y'), ceil((i + 1) Y / Y'))`` (columns alike):
    the fraction ``[i / Y', (i + 1) / Y')`` of the extent to within one pixel, which is how
    :func:`chunk_mask_from_pixels` maps it. The level is read in bands of about 4 Mpx, so a
    full-resolution mask (say 100k x 100k) is never in memory whole.
    """
    height, width = shape
    factor = max(1, math.ceil(math.sqrt(height * width / MAX_PIXELS)))
    rows, cols = -(-height // factor), -(-width // factor)
    col_starts = -(-(np.arange(cols) * width) // cols)
    out = np.zeros((rows, cols), bool)
    band = max(1, _BAND_PIXELS // width)
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        nonzero = (read_window(ref, (y0, y1, 0, width)) != 0).any(axis=0)
        row_of = (np.arange(y0, y1) * rows) // height
        starts = np.flatnonzero(np.diff(row_of, prepend=-1))
        cells = np.logical_or.reduceat(np.logical_or.reduceat(nonzero, col_starts, axis=1), starts, axis=0)
        out[row_of[starts]] |= cells  # a cell may straddle two bands
    return out


def _read_picture_mask(path: str) -> tuple[np.ndarray, tuple[int, int], None]:
    """Foreground of a PNG (or any image Pillow reads), its ``(Y, X)``, and no level."""
    from PIL import Image  # only for user masks that are not TIFFs

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ConfigError(f"{path}: cannot read the mask: {' '.join(str(err).split()) or type(err).__name__}") from err
    fg = pixels != 0 if pixels.ndim == 2 else (pixels != 0).any(axis=-1)
    return fg, (fg.shape[0], fg.shape[1]), None
