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
from dataclasses import dataclass, replace

import numpy as np

from pipeline.errors import ConfigError, SourceError
from pipeline.source.foreground import (
    BRIGHTNESS_CLAMP,
    DARK_BACKGROUND,
    MAX_PIXELS,
    SATURATION_CLAMP,
    affordable_level,
    block_mean,
    brightness,
    chunk_mask_from_pixels,
    fluorescence_pixels,
    mask_level,
    pixels_per_chunk,
    tissue_pixels,
)
from pipeline.source.pixels import SourceRef, read_masked, read_window
from pipeline.source.tiff import SourceInfo, open_source

TISSUE_PIXELS_PER_CHUNK = 16
"""A level read for tissue with at least twice this many pixels per chunk side is averaged down to it."""
_BAND_PIXELS = 1 << 22  # pixels per read of a large user mask


Window = tuple[int, int, int, int] | None
"""``(row, col, height, width)`` of the grid that a window run computes; None: the whole grid."""


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


# --- from a source or a file ----------------------------------------------------------------------


def foreground_mask(
    kind: str,
    source: SourceInfo,
    grid_shape: tuple[int, int],
    tile: int,
    *,
    image: str | None = None,
    threshold: float | None = None,
    window: tuple[int, int, int, int] | None = None,
) -> ChunkMask | None:
    """The chunks of the ``grid_shape`` grid (chunks of ``tile`` px) worth computing, or None for all.

    ``source`` is the input as opened for the run; the grid covers its whole extent (any level, or
    a resampled grid). ``kind`` (:attr:`pipeline.config.MaskConfig.kind`):

    - ``"none"``: None.
    - ``"auto"``: a no-data mask when the file has an alpha band, GDAL_NODATA or an internal mask;
      else None for a GeoTIFF (every pixel of a raster without no-data is data); else a tissue or
      fluorescence mask. Also None when the level to read is larger than 16 Mpx
      (:func:`affordable_level`): a mask should cost seconds, not a pass over a large raster
      without overviews.
    - ``"image"``: ``image`` is the path of a TIFF or PNG whose nonzero pixels are foreground, of
      any size with the grid's aspect ratio (within 2 %).

    ``threshold`` (in [0, 1], checked by the config) overrides the automatic threshold of a tissue
    or fluorescence mask. ``window`` ``(row, col, height, width)``: the chunks of that window of the
    grid (a window run), from the same foreground as a full run's.
    """
    if kind == "image":
        if image is None:
            raise ConfigError("Expected the path of a mask image for a mask of kind 'image'. Got none.")
        return user_mask(image, grid_shape, tile, window)
    if kind == "none":
        return None
    ref = source.ref
    if ref.alpha or ref.nodata is not None or ref.mask_series is not None:
        return _nodata_mask(source, grid_shape, tile, window)
    if source.georeference is not None:
        return None
    return _tissue_mask(source, grid_shape, tile, threshold, window)


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


def _nodata_mask(source: SourceInfo, grid_shape: tuple[int, int], tile: int, window: Window) -> ChunkMask | None:
    level = affordable_level([lv.shape for lv in source.levels], grid_shape, tile)
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
    keep = chunk_mask_from_pixels(valid, grid_shape, tile, window=window)
    return ChunkMask(keep, f"no-data: {', '.join(what)} on level {level} ({width} x {height} px)")


def _tissue_mask(
    source: SourceInfo, grid_shape: tuple[int, int], tile: int, threshold: float | None, window: Window
) -> ChunkMask | None:
    """Tissue on a low-resolution level: by saturation on a bright background (brightfield), by
    brightness on a dark one (fluorescence, any number of channels); None where neither applies
    (a brightfield image that is not RGB, signed or float pixels of unknown range)."""
    level = affordable_level([lv.shape for lv in source.levels], grid_shape, tile)
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
    where = f"level {level} ({width} x {height} px{averaged})"
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
    keep = chunk_mask_from_pixels(foreground, grid_shape, tile, window=window)
    return ChunkMask(keep, f"{kind}: {name} > {used:.3f} ({how}) on {where}")


def user_mask(path: str | os.PathLike[str], grid_shape: tuple[int, int], tile: int, window: Window = None) -> ChunkMask:
    """A mask from an image file: nonzero pixels (in any channel) are foreground.

    A TIFF is read through :mod:`pipeline.source.pixels` (any layout it reads, its coarsest level with at
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
            f"{path}: the mask is {full_shape[1]} x {full_shape[0]} px but the image grid is {width} x {height} px "
            "(width x height); "
            "their aspect ratios differ by more than 2 %, so the mask cannot cover the same extent"
        )
    where = "" if level is None else f"level {level}, "
    keep = chunk_mask_from_pixels(fg, grid_shape, tile, window=window)
    return ChunkMask(keep, f"user mask: {path} ({where}{fg.shape[1]} x {fg.shape[0]} px)")


def _read_tiff_mask(
    path: str, grid_shape: tuple[int, int], tile: int
) -> tuple[np.ndarray, tuple[int, int], int | None]:
    """Foreground of a TIFF mask, its level-0 ``(Y, X)``, and the level read."""
    try:
        info = open_source(path)
        level = mask_level([lv.shape for lv in info.levels], grid_shape, tile)
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
    """Foreground of a PNG (or a JPEG, WebP, ... that imagecodecs decodes), its ``(Y, X)``, and no level."""
    import imagecodecs  # only for user masks that are not TIFFs

    try:
        pixels = np.asarray(imagecodecs.imread(path))
    except Exception as err:  # each codec raises its own error for a file it cannot decode
        raise ConfigError(f"{path}: cannot read the mask: {' '.join(str(err).split()) or type(err).__name__}") from err
    fg = pixels != 0 if pixels.ndim == 2 else (pixels != 0).any(axis=-1)
    return fg, (fg.shape[0], fg.shape[1]), None
