"""A synthetic, slide-like TIFF with a ground-truth label mask, generated tile by tile.

The picture is a deterministic function of level-0 coordinates ``(y, x)`` and a seed: pink
"stroma" made of a few large rotated ellipses with noisy borders and white holes, containing
purple "nuclei" (small ellipses, at most one per 32 x 32 px cell), on a near-white background,
with smooth colour variation and fibre-like texture; only the per-pixel noise on top is drawn
per tile (seeded by the seed, the level and the tile's position). Every tile, and every pyramid
level (sampled at its own pixel centres), is computed from that function alone, so the full
image never exists in memory: memory is a few tiles plus small noise grids, the largest
``(size / 5) ** 2`` float32 values (11 MB at ``size=8192``).

The image is written the way scanners write slides: tiled, JPEG-compressed RGB (stored as YCbCr
with 2 x 2 chroma subsampling) with reduced-resolution levels in SubIFDs, so that
``tifffile.TiffFile(path).series[0].levels`` lists them, and 0.5 micrometres per pixel. The mask
is a tiled, Deflate-compressed uint8 TIFF of class indices (0 background, 1 stroma, 2 nuclei) of
the same height and width.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from pipeline.errors import ConfigError
from pipeline.parse import parse_int
from pipeline.source.writer import Image, write_tiff

Box = tuple[int, int, int, int]
"""``(y0, y1, x0, x1)``: half-open pixel ranges of one level."""
CLASS_NAMES = ("background", "stroma", "nuclei")
CLASS_COLORS = ((86, 180, 233), (0, 158, 115), (240, 200, 0))
"""Display colours of the classes (for label maps), not the colours of the synthetic tissue: sky blue,
green and yellow, far from the slide's pink stroma and purple nuclei."""
MPP = 0.5
"""Micrometres per pixel written into the slide at level 0."""
JPEG_QUALITY = 90

_NUCLEUS_CELL = 32  # px; at most one nucleus per cell, so each pixel only looks at its own cell
_NUCLEUS_RADII = (5.0, 10.0)  # px, semi-axes of the nuclei
_NUCLEUS_CHANCE = 0.6
_FIBRE_CELL = 5.0  # px, scale of the stroma texture
_EDGE_NOISE = 0.45  # amplitude of the border noise in units of the ellipse field
_BACKGROUND_RGB = (243.0, 241.0, 245.0)
_STROMA_RGB = (232.0, 160.0, 198.0)
_NUCLEUS_RGB = (92.0, 58.0, 150.0)
_WORKERS = 2  # tiles rendered (and encoded) at once; numpy and the codecs release the GIL


@dataclass(frozen=True)
class SyntheticSlide:
    """Where the synthetic slide and its mask were written, and what their classes are."""

    image_path: str
    mask_path: str
    size: int
    """Height and width of level 0 in pixels."""
    tile: int
    levels: tuple[tuple[int, int], ...]
    """``(Y, X)`` of every pyramid level, level 0 first."""
    class_names: tuple[str, ...] = CLASS_NAMES
    class_colors: tuple[tuple[int, int, int], ...] = CLASS_COLORS
    mpp: float = MPP


@dataclass(frozen=True)
class _Layout:
    """Every random choice of one slide: a few small arrays, never an image."""

    blobs: np.ndarray
    """``(n, 5)``: centre y, centre x, semi-axis y, semi-axis x, angle (radians) of the tissue ellipses."""
    holes: np.ndarray
    """``(m, 5)``: the same for the holes cut out of the tissue."""
    edge_grids: tuple[tuple[np.ndarray, float], ...]
    """Value-noise grids and their cell sizes (px) that roughen the tissue borders."""
    shade_grid: tuple[np.ndarray, float]
    fibre_grid: tuple[np.ndarray, float]
    nuclei: np.ndarray
    """``(8, rows, cols)`` per 32 px cell: present, centre y, x, 1 / semi-axis y, 1 / semi-axis x, cos, sin, tone."""


def make_synthetic_slide(
    image_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    size: int = 8192,
    tile: int = 512,
    seed: int = 0,
) -> SyntheticSlide:
    """Write a ``size x size`` RGB slide (tiled JPEG, pyramidal) and its uint8 label mask.

    ``tile`` is the TIFF tile edge in pixels (a multiple of 16); levels halve until the largest
    side fits in one tile. Takes about 5 s for ``size=8192`` on one core.
    """
    parse_int(size, "slide size", minimum=16)
    if parse_int(tile, "tile size", minimum=16) % 16:
        raise ConfigError(f"Expected a multiple of 16 for 'tile size'. Got {tile} instead.")
    layout = _make_layout(size, seed)
    levels = pyramid_shapes(size, tile)
    image_path, mask_path = os.fspath(image_path), os.fspath(mask_path)
    _write_image(image_path, layout, levels, tile, seed)
    _write_mask(mask_path, layout, size, tile)
    return SyntheticSlide(image_path=image_path, mask_path=mask_path, size=size, tile=tile, levels=levels)


def pyramid_shapes(size: int, tile: int) -> tuple[tuple[int, int], ...]:
    """``(Y, X)`` of each level: level 0, then halving (rounded up) until the side is <= ``tile``.

    >>> pyramid_shapes(1000, 256)
    ((1000, 1000), (500, 500), (250, 250))
    >>> pyramid_shapes(256, 512)
    ((256, 256),)
    """
    shapes = [(size, size)]
    while shapes[-1][0] > tile:
        side = -(-shapes[-1][0] // 2)
        shapes.append((side, side))
    return tuple(shapes)


# --- the layout: every random choice, made once --------------------------------------------------


def _make_layout(size: int, seed: int) -> _Layout:
    rng = np.random.default_rng([seed, 0x5EED])
    blobs = _ellipses(rng, 10, (0.12, 0.88), (0.08, 0.2), size)
    holes = _ellipses(rng, 24, (0.0, 1.0), (0.006, 0.02), size)
    coarse, fine = max(8.0, size / 20), max(4.0, size / 90)
    edge_grids = ((_noise_grid(rng, size, coarse), coarse), (_noise_grid(rng, size, fine), fine))
    shade = max(8.0, size / 12)
    layout = _Layout(
        blobs=blobs,
        holes=holes,
        edge_grids=edge_grids,
        shade_grid=(_noise_grid(rng, size, shade), shade),
        fibre_grid=(_noise_grid(rng, size, _FIBRE_CELL), _FIBRE_CELL),
        nuclei=np.zeros((8, 0, 0), np.float32),
    )
    return replace(layout, nuclei=_make_nuclei(rng, size, layout))


def _ellipses(
    rng: np.random.Generator, count: int, centres: tuple[float, float], radii: tuple[float, float], size: int
) -> np.ndarray:
    """``(count, 5)`` random ellipses: centre y, x and semi-axes y, x (fractions of ``size``), angle."""
    return np.column_stack(
        [
            rng.uniform(*centres, count) * size,
            rng.uniform(*centres, count) * size,
            rng.uniform(*radii, count) * size,
            rng.uniform(*radii, count) * size,
            rng.uniform(0.0, np.pi, count),
        ]
    )


def _noise_grid(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Random values in [-1, 1] at the corners of ``cell``-pixel squares covering the slide."""
    n = int(np.ceil((size + 2 * _NUCLEUS_CELL) / cell)) + 2  # covers cell centres just past the edge
    return rng.uniform(-1.0, 1.0, (n, n)).astype(np.float32)


def _make_nuclei(rng: np.random.Generator, size: int, layout: _Layout) -> np.ndarray:
    """One candidate nucleus per cell, kept where the cell's draw says so and its cell centre is tissue."""
    cells = -(-size // _NUCLEUS_CELL)
    shape = (cells, cells)
    low, high = _NUCLEUS_RADII
    ry, rx = rng.uniform(low, high, shape), rng.uniform(low, high, shape)
    margin = np.maximum(ry, rx) + 1.0  # the whole ellipse stays inside its cell
    origin = np.arange(cells, dtype=np.float64) * _NUCLEUS_CELL
    cy = origin[:, None] + margin + rng.uniform(0.0, 1.0, shape) * (_NUCLEUS_CELL - 2 * margin)
    cx = origin[None, :] + margin + rng.uniform(0.0, 1.0, shape) * (_NUCLEUS_CELL - 2 * margin)
    angle = rng.uniform(0.0, np.pi, shape)
    tone = rng.uniform(0.85, 1.15, shape)
    centres = origin + _NUCLEUS_CELL / 2
    present = (rng.uniform(0.0, 1.0, shape) < _NUCLEUS_CHANCE) & (_tissue_field(layout, centres, centres) > 0)
    return np.stack([present, cy, cx, 1 / ry, 1 / rx, np.cos(angle), np.sin(angle), tone]).astype(np.float32)


# --- the analytic picture: functions of level-0 coordinates ---------------------------------------


def _value_noise(grid: tuple[np.ndarray, float], ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Smooth noise in [-1, 1] on the grid of level-0 coordinates ``ys`` (h,) x ``xs`` (w,): ``(h, w)``.

    Separable interpolation (rows first, then columns) costs two gathers of ``(h, w)`` instead of four.
    """
    values, cell = grid
    last = values.shape[0] - 2  # coordinates past the grid (small levels overhang the slide) stay on its edge
    gy, gx = np.asarray(ys, np.float32) / np.float32(cell), np.asarray(xs, np.float32) / np.float32(cell)
    fly, flx = np.clip(np.floor(gy), 0, last), np.clip(np.floor(gx), 0, last)
    iy, ix = fly.astype(np.intp), flx.astype(np.intp)
    fy, fx = _smoothstep(np.clip(gy - fly, 0, 1)), _smoothstep(np.clip(gx - flx, 0, 1))
    first = int(ix.min())
    sub = values[:, first : int(ix.max()) + 2]
    rows = sub[iy] * (1 - fy)[:, None] + sub[iy + 1] * fy[:, None]
    jx = ix - first
    out: np.ndarray = rows[:, jx] * (1 - fx) + rows[:, jx + 1] * fx
    return out


def _smoothstep(t: np.ndarray) -> np.ndarray:
    """``3t^2 - 2t^3``: interpolation weights without creases at cell edges."""
    out: np.ndarray = t * t * (3 - 2 * t)
    return out


def _ellipse(params: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Squared normalised distance from an ellipse's centre (< 1 inside) at ``y`` (h, 1), ``x`` (1, w)."""
    cy, cx, ry, rx, angle = (float(v) for v in params)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    dy, dx = y - np.float32(cy), x - np.float32(cx)
    u = (dx * cos + dy * sin) / np.float32(rx)
    v = (dy * cos - dx * sin) / np.float32(ry)
    out: np.ndarray = u * u + v * v
    return out


def _overlaps(params: np.ndarray, ys: np.ndarray, xs: np.ndarray, grow: float) -> bool:
    """Whether an ellipse's bounding square, grown by ``grow``, meets the extent of ``ys`` x ``xs``."""
    cy, cx, ry, rx, _ = params
    reach = max(ry, rx) * grow
    return bool(ys[0] <= cy + reach and ys[-1] >= cy - reach and xs[0] <= cx + reach and xs[-1] >= cx - reach)


def _tissue_field(layout: _Layout, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``(h, w)`` field, positive on tissue: the blobs minus the holes, with noisy borders.

    ``ys`` and ``xs`` are increasing level-0 coordinates (pixels) of the rows and columns.
    """
    y, x = np.asarray(ys, np.float32)[:, None], np.asarray(xs, np.float32)[None, :]
    floor = np.float32(-1.0 - 2 * _EDGE_NOISE)  # far enough below zero that noise never lifts it
    field = np.full((y.size, x.size), floor, np.float32)
    grow = float(np.sqrt(1 + 2 * _EDGE_NOISE))
    for blob in layout.blobs:
        if _overlaps(blob, ys, xs, grow):
            np.maximum(field, 1 - _ellipse(blob, y, x), out=field)
    for hole in layout.holes:
        if _overlaps(hole, ys, xs, grow):
            np.minimum(field, 4 * (_ellipse(hole, y, x) - 1), out=field)
    coarse, fine = layout.edge_grids
    field += np.float32(0.7 * _EDGE_NOISE) * _value_noise(coarse, ys, xs)
    field += np.float32(0.3 * _EDGE_NOISE) * _value_noise(fine, ys, xs)
    return field


def _nuclei(layout: _Layout, box: Box, downsample: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inside, tone)``, both ``(h, w)``: whether each pixel of ``box`` lies in its cell's nucleus.

    ``downsample`` is a power of two. Each nucleus lies inside its own 32 px cell, so the pixels are
    viewed as ``(cell rows, per, cell columns, per)`` blocks that broadcast against one parameter per
    cell: no per-pixel gathers. ``per`` is 1 when a level's pixel is larger than a cell.
    """
    y0, y1, x0, x1 = box
    per = max(1, _NUCLEUS_CELL // downsample)  # this level's pixels per cell side
    by0, bx0, by1, bx1 = y0 // per * per, x0 // per * per, -(-y1 // per) * per, -(-x1 // per) * per
    ys = ((np.arange(by0, by1, dtype=np.float32) + 0.5) * downsample).reshape(-1, per)
    xs = ((np.arange(bx0, bx1, dtype=np.float32) + 0.5) * downsample).reshape(-1, per)
    rows, cols = layout.nuclei.shape[1:]
    iy = np.minimum((ys[:, 0] // _NUCLEUS_CELL).astype(np.intp), rows - 1)
    ix = np.minimum((xs[:, 0] // _NUCLEUS_CELL).astype(np.intp), cols - 1)
    present, cy, cx, iry, irx, cos, sin, tone = layout.nuclei[:, iy][:, :, ix][:, :, None, :, None]
    dy, dx = ys[:, :, None, None] - cy, xs[None, None, :, :] - cx
    u, v = (dx * cos + dy * sin) * irx, (dy * cos - dx * sin) * iry
    inside = ((u * u + v * v <= 1) & (present > 0)).reshape(ys.size, xs.size)
    tone_px = np.broadcast_to(tone, (ys.shape[0], per, xs.shape[0], per)).reshape(inside.shape)
    crop = (slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0))
    return inside[crop], tone_px[crop]


def _coordinates(box: Box, downsample: int) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 coordinates of the pixel centres of ``box``'s rows and columns in a level."""
    y0, y1, x0, x1 = box
    ys = (np.arange(y0, y1, dtype=np.float32) + 0.5) * downsample
    xs = (np.arange(x0, x1, dtype=np.float32) + 0.5) * downsample
    return ys, xs


def render_labels(layout: _Layout, box: Box, downsample: int = 1) -> np.ndarray:
    """``(y1 - y0, x1 - x0)`` uint8 class indices of ``box`` in the level ``downsample`` times smaller."""
    ys, xs = _coordinates(box, downsample)
    labels = (_tissue_field(layout, ys, xs) > 0).astype(np.uint8)
    inside, _ = _nuclei(layout, box, downsample)
    labels[inside] = 2
    return labels


def render_rgb(layout: _Layout, box: Box, downsample: int, seed: int) -> np.ndarray:
    """``(h, w, 3)`` uint8 pixels of ``box``; the per-pixel noise is seeded by the box and the level."""
    ys, xs = _coordinates(box, downsample)
    stroma = _tissue_field(layout, ys, xs) > 0
    nucleus, tone = _nuclei(layout, box, downsample)
    fibre = _value_noise(layout.fibre_grid, ys, xs)
    shade = 1 + np.float32(0.06) * _value_noise(layout.shade_grid, ys, xs)
    rng = np.random.default_rng([seed, downsample, box[0], box[2]])
    noise = rng.integers(-7, 8, (*stroma.shape, 3), dtype=np.int8)  # uniform, sigma ~4 grey levels
    channels = []
    for c in range(3):
        value = np.where(stroma, _STROMA_RGB[c] * shade + 14 * fibre, np.float32(_BACKGROUND_RGB[c]))
        value = np.where(nucleus, _NUCLEUS_RGB[c] * tone + 10 * fibre, value)
        channels.append(value + noise[..., c])
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


# --- writing --------------------------------------------------------------------------------------


def _boxes(shape: tuple[int, int], tile: int) -> list[Box]:
    """Tile boxes ``(y0, y1, x0, x1)`` in the row-major order TIFF stores them."""
    height, width = shape
    return [
        (y0, min(y0 + tile, height), x0, min(x0 + tile, width))
        for y0 in range(0, height, tile)
        for x0 in range(0, width, tile)
    ]


def _tiles(render: Callable[[Box], np.ndarray], boxes: list[Box]) -> Iterator[np.ndarray]:
    """Render ``boxes`` on a few threads, keeping at most a few tiles in flight."""
    with ThreadPoolExecutor(_WORKERS) as pool:
        for start in range(0, len(boxes), 2 * _WORKERS):
            yield from pool.map(render, boxes[start : start + 2 * _WORKERS])


def _write_image(path: str, layout: _Layout, levels: tuple[tuple[int, int], ...], tile: int, seed: int) -> None:
    tile_bytes = tile * tile * 3
    images = []
    for level, shape in enumerate(levels):
        downsample = 2**level
        images.append(
            Image(
                _tiles(partial(render_rgb, layout, downsample=downsample, seed=seed), _boxes(shape, tile)),
                dict(
                    shape=(*shape, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": JPEG_QUALITY},
                    resolution=(1e4 / (MPP * downsample), 1e4 / (MPP * downsample)),
                    resolutionunit="CENTIMETER",
                    subifds=len(levels) - 1 if level == 0 else None,
                    subfiletype=1 if level else 0,
                    metadata=None,
                    maxworkers=_WORKERS,
                    buffersize=4 * _WORKERS * tile_bytes,  # the default would buffer hundreds of tiles
                    description="fcnpipe synthetic slide" if level == 0 else None,
                ),
            )
        )
    write_tiff(path, images, bigtiff=levels[0][0] * levels[0][1] * 3 > 2**31)


def _write_mask(path: str, layout: _Layout, size: int, tile: int) -> None:
    options = dict(
        shape=(size, size),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="minisblack",
        compression="zlib",
        metadata=None,
        maxworkers=_WORKERS,
        buffersize=4 * _WORKERS * tile * tile,
        description="fcnpipe synthetic ground truth: 0 background, 1 stroma, 2 nuclei",
    )
    tiles = _tiles(partial(render_labels, layout), _boxes((size, size), tile))
    write_tiff(path, [Image(tiles, options)], bigtiff=size * size > 2**31)
