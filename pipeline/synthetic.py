"""A synthetic, slide-like TIFF with a ground-truth label mask, generated tile by tile.

The picture is a deterministic function of level-0 coordinates ``(y, x)`` and a seed: pink
"stroma" made of a few large rotated ellipses with noisy borders and white holes, containing
purple "nuclei" (small ellipses, at most one per 32 x 32 px cell), on a near-white background,
with smooth colour variation, fibre-like texture and per-pixel noise. Because every tile (and
every pyramid level, sampled at its own pixel centres) is computed from that function alone,
the full-resolution image never exists in memory: memory is a few tiles plus small noise grids
(``O((size / 5) ** 2)`` floats), whatever the slide size.

The image is written the way scanners write slides: tiled, JPEG-compressed RGB with reduced
resolution levels in SubIFDs (so ``tifffile.TiffFile(path).series[0].levels`` lists them) and a
resolution of 0.5 micrometres per pixel. The mask is a tiled, Deflate-compressed uint8 TIFF of
class indices (0 background, 1 stroma, 2 nuclei) of the same height and width.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import tifffile

from pipeline.errors import ConfigError

Box = tuple[int, int, int, int]
"""``(y0, y1, x0, x1)``: half-open pixel ranges of one level."""
CLASS_NAMES = ("background", "stroma", "nuclei")
CLASS_COLORS = ((0, 0, 0), (230, 25, 75), (0, 130, 200))
"""Display colours of the classes (for label maps), not the colours of the synthetic tissue."""
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
_WORKERS = 2  # tiles rendered at once; numpy releases the GIL for the heavy part


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
    """``(7, rows, cols)`` per nucleus cell: present, centre y, centre x, semi-axes y and x, angle, tone."""


def make_synthetic_slide(
    image_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    size: int = 8192,
    tile: int = 512,
    seed: int = 0,
) -> SyntheticSlide:
    """Write a ``size x size`` RGB slide (tiled JPEG, pyramidal) and its uint8 label mask.

    ``tile`` is the TIFF tile edge in pixels (a multiple of 16); levels halve until the largest
    side fits in one tile. Takes about 10 s for ``size=8192`` on two cores.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ConfigError(f"Expected an integer of at least 16 for the slide size. Got {size!r} instead.")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0 or tile % 16:
        raise ConfigError(f"Expected a positive multiple of 16 for the tile size. Got {tile!r} instead.")
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
    count = 10
    blobs = np.column_stack(
        [
            rng.uniform(0.12, 0.88, count) * size,
            rng.uniform(0.12, 0.88, count) * size,
            rng.uniform(0.08, 0.2, count) * size,
            rng.uniform(0.08, 0.2, count) * size,
            rng.uniform(0.0, np.pi, count),
        ]
    )
    holes_count = 24
    holes = np.column_stack(
        [
            rng.uniform(0.0, 1.0, holes_count) * size,
            rng.uniform(0.0, 1.0, holes_count) * size,
            rng.uniform(0.006, 0.02, holes_count) * size,
            rng.uniform(0.006, 0.02, holes_count) * size,
            rng.uniform(0.0, np.pi, holes_count),
        ]
    )
    coarse, fine = max(8.0, size / 20), max(4.0, size / 90)
    edge_grids = ((_noise_grid(rng, size, coarse), coarse), (_noise_grid(rng, size, fine), fine))
    shade = max(8.0, size / 12)
    layout = _Layout(
        blobs=blobs,
        holes=holes,
        edge_grids=edge_grids,
        shade_grid=(_noise_grid(rng, size, shade), shade),
        fibre_grid=(_noise_grid(rng, size, _FIBRE_CELL), _FIBRE_CELL),
        nuclei=np.zeros((7, 0, 0)),
    )
    return replace(layout, nuclei=_make_nuclei(rng, size, layout))


def _noise_grid(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Random values in [-1, 1] at the corners of ``cell``-pixel squares covering the slide."""
    n = int(np.ceil(size / cell)) + 2
    return rng.uniform(-1.0, 1.0, (n, n)).astype(np.float32)


def _make_nuclei(rng: np.random.Generator, size: int, layout: _Layout) -> np.ndarray:
    """One candidate nucleus per cell, kept where the cell's draw says so and its centre is tissue."""
    cells = -(-size // _NUCLEUS_CELL)
    shape = (cells, cells)
    low, high = _NUCLEUS_RADII
    ry, rx = rng.uniform(low, high, shape), rng.uniform(low, high, shape)
    margin = np.maximum(ry, rx) + 1.0
    origin_y = np.arange(cells)[:, None] * _NUCLEUS_CELL
    origin_x = np.arange(cells)[None, :] * _NUCLEUS_CELL
    cy = origin_y + margin + rng.uniform(0.0, 1.0, shape) * (_NUCLEUS_CELL - 2 * margin)
    cx = origin_x + margin + rng.uniform(0.0, 1.0, shape) * (_NUCLEUS_CELL - 2 * margin)
    angle = rng.uniform(0.0, np.pi, shape)
    tone = rng.uniform(0.85, 1.15, shape)
    present = (rng.uniform(0.0, 1.0, shape) < _NUCLEUS_CHANCE) & (_tissue_field(layout, cy, cx) > 0)
    return np.stack([present, cy, cx, ry, rx, angle, tone]).astype(np.float32)


# --- the analytic picture -------------------------------------------------------------------------


def _value_noise(grid: tuple[np.ndarray, float], y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Smooth noise in [-1, 1] at broadcastable level-0 coordinates ``y`` and ``x`` (pixels)."""
    values, cell = grid
    gy, gx = np.asarray(y, np.float32) / cell, np.asarray(x, np.float32) / cell
    last = values.shape[0] - 2  # points just past the slide edge (nucleus centres) reuse the last cell
    iy = np.clip(np.floor(gy).astype(np.intp), 0, last)
    ix = np.clip(np.floor(gx).astype(np.intp), 0, last)
    fy, fx = gy - iy, gx - ix
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep: no creases at cell edges
    top = values[iy, ix] + (values[iy, ix + 1] - values[iy, ix]) * fx
    bottom = values[iy + 1, ix] + (values[iy + 1, ix + 1] - values[iy + 1, ix]) * fx
    out: np.ndarray = top + (bottom - top) * fy
    return out


def _ellipse(params: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Squared normalised distance from an ellipse's centre: < 1 inside."""
    cy, cx, ry, rx, angle = (float(v) for v in params)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    dy, dx = y - np.float32(cy), x - np.float32(cx)
    u = (dx * cos + dy * sin) / np.float32(rx)
    v = (dy * cos - dx * sin) / np.float32(ry)
    out: np.ndarray = u * u + v * v
    return out


def _overlaps(params: np.ndarray, y: np.ndarray, x: np.ndarray, grow: float) -> bool:
    """Whether an ellipse's bounding square, grown by ``grow``, meets the extent of ``y`` and ``x``."""
    cy, cx, ry, rx, _ = params
    reach = max(ry, rx) * grow
    return bool(y.min() <= cy + reach and y.max() >= cy - reach and x.min() <= cx + reach and x.max() >= cx - reach)


def _tissue_field(layout: _Layout, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Positive on tissue: the union of the blobs minus the holes, with noisy borders.

    ``y`` and ``x`` are broadcastable float32 level-0 coordinates: ``(h, 1)`` and ``(1, w)`` for a
    tile, or two ``(n,)`` vectors for points.
    """
    y, x = np.asarray(y, np.float32), np.asarray(x, np.float32)
    shape = np.broadcast_shapes(y.shape, x.shape)
    floor = np.float32(-1.0 - 2 * _EDGE_NOISE)  # far enough below zero that noise never lifts it
    field = np.full(shape, floor, np.float32)
    grow = float(np.sqrt(1 + 2 * _EDGE_NOISE))
    for blob in layout.blobs:
        if _overlaps(blob, y, x, grow):
            np.maximum(field, 1 - _ellipse(blob, y, x), out=field)
    for hole in layout.holes:
        if _overlaps(hole, y, x, grow):
            np.minimum(field, 4 * (_ellipse(hole, y, x) - 1), out=field)
    (coarse, fine) = layout.edge_grids
    field += np.float32(_EDGE_NOISE) * (0.7 * _value_noise(coarse, y, x) + 0.3 * _value_noise(fine, y, x))
    return field


def _nucleus_params(layout: _Layout, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(inside, tone)`` for a ``(h, 1)`` x ``(1, w)`` grid: whether a pixel lies in its cell's nucleus."""
    rows, cols = layout.nuclei.shape[1:]
    iy = np.minimum((y // _NUCLEUS_CELL).astype(np.intp), rows - 1)
    ix = np.minimum((x // _NUCLEUS_CELL).astype(np.intp), cols - 1)
    present, cy, cx, ry, rx, angle, tone = (p[iy, ix] for p in layout.nuclei)
    cos, sin = np.cos(angle), np.sin(angle)
    dy, dx = y - cy, x - cx
    u, v = (dx * cos + dy * sin) / rx, (dy * cos - dx * sin) / ry
    inside = (present > 0) & (u * u + v * v <= 1)
    return inside, tone


def _coordinates(box: Box, downsample: int) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 coordinates of the pixel centres of ``box`` (rows, columns of a level)."""
    y0, y1, x0, x1 = box
    ys = (np.arange(y0, y1, dtype=np.float32) + 0.5) * downsample
    xs = (np.arange(x0, x1, dtype=np.float32) + 0.5) * downsample
    return ys[:, None], xs[None, :]


def render_labels(layout: _Layout, box: Box, downsample: int = 1) -> np.ndarray:
    """``(y1 - y0, x1 - x0)`` uint8 class indices of ``box`` of the level ``downsample`` times smaller."""
    y, x = _coordinates(box, downsample)
    labels = (_tissue_field(layout, y, x) > 0).astype(np.uint8)
    inside, _ = _nucleus_params(layout, y, x)
    labels[inside] = 2
    return labels


def render_rgb(layout: _Layout, box: Box, downsample: int, seed: int) -> np.ndarray:
    """``(h, w, 3)`` uint8 pixels of ``box``; the per-pixel noise is seeded by the box and level."""
    y, x = _coordinates(box, downsample)
    tissue = _tissue_field(layout, y, x) > 0
    inside, tone = _nucleus_params(layout, y, x)
    fibre = _value_noise(layout.fibre_grid, y, x)
    shade = 1 + 0.06 * _value_noise(layout.shade_grid, y, x)
    stroma = np.asarray(_STROMA_RGB, np.float32) * shade[..., None] + 14 * fibre[..., None]
    nucleus = np.asarray(_NUCLEUS_RGB, np.float32) * tone[..., None] + 10 * fibre[..., None]
    rgb = np.where(tissue[..., None], stroma, np.asarray(_BACKGROUND_RGB, np.float32))
    rgb = np.where(inside[..., None], nucleus, rgb)
    rng = np.random.default_rng([seed, downsample, box[0], box[2]])
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(4.0)
    return np.clip(rgb, 0, 255).astype(np.uint8)


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
    with tifffile.TiffWriter(path, bigtiff=levels[0][0] * levels[0][1] * 3 > 2**31) as tif:
        for level, shape in enumerate(levels):
            downsample = 2**level
            tif.write(
                _tiles(lambda box, d=downsample: render_rgb(layout, box, d, seed), _boxes(shape, tile)),
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
            )


def _write_mask(path: str, layout: _Layout, size: int, tile: int) -> None:
    with tifffile.TiffWriter(path, bigtiff=size * size > 2**31) as tif:
        tif.write(
            _tiles(lambda box: render_labels(layout, box), _boxes((size, size), tile)),
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
