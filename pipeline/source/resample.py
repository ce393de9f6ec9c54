"""Read a source at a resolution it does not store: area-weighted resampling on a global grid.

A network is trained at one physical resolution (micrometres per pixel, or ground sample
distance); the run reads the closest pyramid level at or finer than it and resamples the rest of
the way. Output pixel ``i`` covers source pixels ``[i * f, (i + 1) * f)`` (``f`` = output pixel size
/ source pixel size, per axis) and takes their area-weighted mean. The weights depend only on
global pixel indices, never on which window is read, so tiled reading stays exactly equal to
resampling the whole image first: tiling remains seam-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from pipeline.errors import ConfigError, SourceError, option
from pipeline.source.georef import Georeference
from pipeline.source.pixels import SourceRef, read_masked
from pipeline.source.tiff import SourceInfo, open_source


@dataclass(frozen=True, slots=True)
class Resampling:
    factor_y: float
    """Output pixel height in source pixels (> 1 shrinks, < 1 enlarges)."""
    factor_x: float

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(Y, X)`` of the resampled grid over a ``height x width`` source.

        >>> Resampling(1.5, 2.0).output_shape(10, 9)
        (7, 5)
        """
        return (max(1, math.ceil(height / self.factor_y)), max(1, math.ceil(width / self.factor_x)))


def area_weights(start: int, stop: int, factor: float, size: int) -> tuple[int, np.ndarray]:
    """``(first source index, (stop - start, n) weights)`` of output pixels ``[start, stop)``.

    Rows sum to one (the last output pixel may cover fewer source pixels at the image's end).

    >>> first, w = area_weights(0, 2, 1.5, 3)
    >>> first, w.round(3).tolist()
    (0, [[0.667, 0.333, 0.0], [0.0, 0.333, 0.667]])
    """
    lo = math.floor(start * factor)
    hi = min(size, math.ceil(stop * factor))
    edges = np.arange(lo, hi + 1, dtype=np.float64)
    out_lo = np.arange(start, stop, dtype=np.float64)[:, None] * factor
    out_hi = np.minimum((np.arange(start, stop, dtype=np.float64)[:, None] + 1) * factor, size)
    overlap = np.clip(np.minimum(out_hi, edges[None, 1:]) - np.maximum(out_lo, edges[None, :-1]), 0, None)
    return lo, overlap / overlap.sum(axis=1, keepdims=True)


def read_resampled(
    ref: SourceRef, box: tuple[int, int, int, int], resampling: Resampling | None, source_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`pipeline.source.tiff.read_masked` on the resampled grid: ``(C, Y, X)`` and the validity mask.

    Without ``resampling`` this is ``read_masked`` itself. Resampled pixels are float32 in the
    source's units; a resampled pixel has data when at least half its area has.
    """
    if resampling is None:
        return read_masked(ref, box)
    y0, y1, x0, x1 = box
    height, width = source_shape
    sy, wy = area_weights(y0, y1, resampling.factor_y, height)
    sx, wx = area_weights(x0, x1, resampling.factor_x, width)
    data, valid = read_masked(ref, (sy, sy + wy.shape[1], sx, sx + wx.shape[1]))
    wy32, wx32 = wy.astype(np.float32), wx.astype(np.float32)
    out: np.ndarray = wy32 @ data.astype(np.float32) @ wx32.T
    if valid is None:
        return out, None
    return out, (wy32 @ valid.astype(np.float32) @ wx32.T) >= 0.5


@dataclass(frozen=True)
class Grid:
    """The pixel grid the network sees and the output is written on."""

    source: SourceInfo
    """The level read."""
    resampling: Resampling | None
    shape: tuple[int, int]
    """``(Y, X)`` of the output."""
    mpp: float | None
    """Micrometres per output pixel, when known."""
    georeference: Georeference | None
    """CRS and transform of the output grid (for a GeoTIFF)."""
    note: str | None = None
    """What a user should know about the choice, e.g. that the input records no resolution."""
    origin: tuple[int, int] = (0, 0)
    """``(row, col)`` of the output's top-left pixel in the full grid (a window run, else 0, 0)."""
    full_shape: tuple[int, int] | None = None
    """``(Y, X)`` of the full grid of a window run (None: the output is the full grid)."""

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """The full grid in output pixels, ``(y0, y1, x0, x1)``: where halos may read beyond the output.

        >>> grid = Grid(None, None, (10, 20), None, None)  # type: ignore[arg-type]
        >>> replace(grid, origin=(4, 8), full_shape=(100, 200)).bounds
        (-4, 96, -8, 192)
        """
        oy, ox = self.origin
        height, width = self.full_shape or self.shape
        return (-oy, height - oy, -ox, width - ox)


def window_grid(grid: Grid, window: tuple[int, int, int, int], stride: int) -> Grid:
    """The ``(col_off, row_off, width, height)`` window of ``grid``, georeferenced where it lies.

    Its offsets must be multiples of the network's ``stride``, so that its tiles see the sampling
    phase of a full run and its values equal that window of a full run.

    >>> small = window_grid(Grid(None, None, (100, 200), 0.5, None), (8, 4, 20, 10), 4)  # type: ignore[arg-type]
    >>> small.shape, small.origin, small.full_shape
    ((10, 20), (4, 8), (100, 200))
    """
    col, row, width, height = window
    full_height, full_width = grid.shape
    if col + width > full_width or row + height > full_height:
        raise ConfigError(
            f"{grid.source.path}: the window {col} {row} {width} {height} (col_off row_off width height) reaches "
            f"beyond the {full_width} x {full_height} px (width x height) image read"
        )
    if row % stride or col % stride:
        fix = f"{col // stride * stride} {row // stride * stride}"
        raise ConfigError(
            f"the window's offsets {col} {row} are not multiples of the network's stride {stride}: its values would "
            f"not equal a full run's; start it at {fix}"
        )
    georef = grid.georeference
    if georef is not None and georef.transform is not None:
        a, b, c, d, e, f = georef.transform
        shifted = (a, b, c + a * col + b * row, d, e, f + d * col + e * row)
        georef = replace(georef, transform=shifted)
    return replace(grid, shape=(height, width), origin=(row, col), full_shape=grid.shape, georeference=georef)


def bbox_window(grid: Grid, bbox: tuple[float, float, float, float], stride: int) -> tuple[int, int, int, int]:
    """The window of ``grid`` that covers ``bbox`` = ``(min_x, min_y, max_x, max_y)``: CRS units for a
    georeferenced raster, micrometres from the top-left corner for a slide; every pixel it touches,
    the start moved back to a multiple of ``stride``.

    >>> bbox_window(Grid(None, None, (100, 200), 0.5, None), (10.0, 5.0, 20.0, 7.5), 4)  # type: ignore[arg-type]
    (20, 8, 20, 7)
    """
    min_x, min_y, max_x, max_y = bbox
    georef = grid.georeference
    if georef is not None and georef.transform is not None:
        a, _, c, _, e, f = georef.transform
        cols, rows = sorted(((min_x - c) / a, (max_x - c) / a)), sorted(((min_y - f) / e, (max_y - f) / e))
        unit = "CRS units"
    elif grid.mpp is not None:
        cols, rows = [min_x / grid.mpp, max_x / grid.mpp], [min_y / grid.mpp, max_y / grid.mpp]
        unit = "µm"
    else:
        raise ConfigError(f"{grid.source.path}: has no georeference or pixel size to place a bbox in; give a window")
    height, width = grid.shape
    col0, col1 = max(0, math.floor(cols[0])), min(width, math.ceil(cols[1]))
    row0, row1 = max(0, math.floor(rows[0])), min(height, math.ceil(rows[1]))
    if col0 >= col1 or row0 >= row1:
        raise ConfigError(
            f"{grid.source.path}: the bbox {min_x:g} {min_y:g} {max_x:g} {max_y:g} ({unit}) misses the image"
        )
    col0, row0 = col0 // stride * stride, row0 // stride * stride
    return (col0, row0, col1 - col0, row1 - row0)


def native_grid(source: SourceInfo, note: str | None = None) -> Grid:
    """The chosen level as it is."""
    _, height, width = source.shape
    return Grid(source, None, (height, width), source.mpp, source.georeference, note)


def choose_grid(
    source0: SourceInfo,
    *,
    level_chosen: bool,
    mpp: float | None,
    gsd: float | None,
    explicit: bool,
    tolerance: float = 0.0,
) -> Grid:
    """Read at ``mpp`` (slides) or ``gsd`` (rasters): the coarsest level at least that fine, resampled.

    ``source0`` is the input opened at the user's level, or at level 0. ``level_chosen``: the
    user chose that level, and it is read as it is. Without a target, or when the input records no
    resolution, level 0 is read as it is; ``explicit`` (the user asked for the resolution, rather
    than the checkpoint) turns the latter into an error. A level whose pixel size is within
    ``tolerance`` (a fraction) of the target on both axes is read as it is, at its own scale.
    """
    target = mpp if mpp is not None else gsd
    if level_chosen or target is None:
        return native_grid(source0)
    path, series = source0.path, source0.ref.series
    per_pixel = _level0_pixel_size(source0, "mpp" if mpp is not None else "gsd")
    what = "micrometres per pixel" if mpp is not None else "CRS units per pixel"
    if per_pixel is None:
        message = f"{path}: records no {'microns per pixel' if mpp is not None else 'pixel size'}"
        if explicit:
            raise SourceError(
                f"{message}; cannot read it at {target:g} {what} ({option('input.level', 0)} to read a level as it is)"
            )
        return native_grid(source0, f"{message}: reading level 0 as it is, not at the model's {target:g} {what}")
    size_x, size_y = per_pixel
    downsamples = [nominal_downsample(source0.levels[0].shape, lv.shape) for lv in source0.levels]
    slack = max(tolerance, 1e-6)
    fits = [i for i, ds in enumerate(downsamples) if size_x * ds <= target * (1 + slack)]
    chosen = max(fits) if fits else 0
    source = source0 if chosen == 0 else open_source(path, series, chosen)
    fy, fx = target / (size_y * downsamples[chosen]), target / (size_x * downsamples[chosen])
    if abs(fy - 1) <= slack and abs(fx - 1) <= slack:
        if abs(fy - 1) < 1e-6 and abs(fx - 1) < 1e-6:
            return native_grid(source)
        size = size_x * downsamples[chosen]
        note = (
            f"level {chosen} read as it is: {size:.4g} {what} is within {tolerance:.0%} of the model's {target:g} "
            "(input.resolution_tolerance)"
        )
        return native_grid(source, note)
    height, width = source.levels[chosen].shape
    resampling = Resampling(fy, fx)
    georef = None if source.georeference is None else source.georeference.scaled(fx, fy)
    out_mpp = mpp if source.mpp is not None else None
    return Grid(source, resampling, resampling.output_shape(height, width), out_mpp, georef)


def nominal_downsample(level0: tuple[int, int], level: tuple[int, int]) -> float:
    """A level's downsample: the power of two its size rounds to, else the measured ratio.

    Pyramids halve sizes with rounding (301 -> 151), so measured ratios are a little off 2**k;
    the writer meant 2**k, and so does the pixel size.

    >>> nominal_downsample((301, 257), (151, 129)), nominal_downsample((5120, 5120), (2048, 2048))
    (2.0, 2.5)
    """
    ratio = max(level0[0] / level[0], level0[1] / level[1])
    power = 2.0 ** round(math.log2(ratio))
    return power if max(abs(level0[i] / power - level[i]) for i in (0, 1)) <= 1 else ratio


def _level0_pixel_size(source: SourceInfo, kind: str) -> tuple[float, float] | None:
    """``(x, y)`` pixel size at level 0 in micrometres (``mpp``) or CRS units (``gsd``)."""
    downsample = source.levels[source.ref.level].downsample
    if kind == "mpp":
        return None if source.mpp is None else (source.mpp / downsample, source.mpp / downsample)
    size = source.pixel_size
    if size is None:
        return None
    h0, _ = source.levels[0].shape
    height = source.levels[source.ref.level].shape[0]
    return (size[0] / downsample, size[1] * height / h0)
