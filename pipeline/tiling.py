"""Cut an image into tiles: pure integer arithmetic, no I/O.

A tile has a *core*, the block of output pixels it owns, and a *read window*, the core grown by a
halo of real neighbouring pixels on every side and clipped to the image. The cores form a regular
grid of ``tile x tile`` blocks (smaller at the right and bottom edges), which is exactly the chunk
grid of the output Zarr arrays, so no two tiles ever write the same chunk. In a store sharded in
``N x N`` chunks the tiles of a task are those of one shard (:func:`blocks`), for the same reason.

Why clipping is exact: a fully convolutional network zero-pads at the border of whatever it is
given. Where a read window is clipped, its border *is* the image border, so the network sees
the same zero padding there as in one whole-image pass. Everywhere else the halo supplies real
pixels, and as long as ``halo`` is at least the network's receptive radius every core pixel sees
exactly the input it would see in the whole-image pass.

>>> tiles = plan_tiles(height=5, width=7, tile=4, halo=1)
>>> [(t.core, t.window) for t in tiles]  # doctest: +NORMALIZE_WHITESPACE
[((0, 4, 0, 4), (0, 5, 0, 5)), ((0, 4, 4, 7), (0, 5, 3, 7)),
 ((4, 5, 0, 4), (3, 5, 0, 5)), ((4, 5, 4, 7), (3, 5, 3, 7))]
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.parse import parse_int

Box = tuple[int, int, int, int]
"""``(y0, y1, x0, x1)``: half-open pixel ranges, rows then columns."""


@dataclass(frozen=True, slots=True)
class Tile:
    """One unit of work: the core it writes and the window it reads, in image pixels."""

    row: int
    col: int
    core: Box
    window: Box

    @property
    def crop(self) -> Box:
        """Where the core lies inside the window, as ``(y0, y1, x0, x1)`` relative to the window."""
        y0, y1, x0, x1 = self.core
        wy0, _, wx0, _ = self.window
        return (y0 - wy0, y1 - wy0, x0 - wx0, x1 - wx0)

    @property
    def window_shape(self) -> tuple[int, int]:
        wy0, wy1, wx0, wx1 = self.window
        return (wy1 - wy0, wx1 - wx0)

    @property
    def core_pixels(self) -> int:
        y0, y1, x0, x1 = self.core
        return (y1 - y0) * (x1 - x0)


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``.

    >>> round_up(5, 4), round_up(8, 4), round_up(0, 4)
    (8, 8, 0)
    """
    return -(-value // multiple) * multiple


def grid_shape(height: int, width: int, tile: int) -> tuple[int, int]:
    """Number of tile rows and columns that cover a ``height x width`` image."""
    return (math.ceil(height / tile), math.ceil(width / tile))


def plan_tiles(height: int, width: int, tile: int, halo: int, stride: int = 1, bounds: Box | None = None) -> list[Tile]:
    """Cover a ``height x width`` image with ``tile``-sized cores, each read with ``halo`` pixels.

    ``stride`` is the network's total downsampling factor: tiles must start on multiples of it so
    that every tile sees the same sampling phase as the whole image, hence ``tile`` must be a
    multiple of ``stride`` and the halo is rounded up to one. ``bounds`` (default: the image) is
    what windows may read: for a window of a larger image, the larger image, so that halos read
    the real pixels around the window.

    >>> [t.window for t in plan_tiles(4, 8, 4, 2, bounds=(-3, 10, -1, 8))]
    [(-2, 6, -1, 6), (-2, 6, 2, 8)]
    """
    parse_int(height, "image height", minimum=1)
    parse_int(width, "image width", minimum=1)
    parse_int(tile, "tile size", minimum=1)
    parse_int(stride, "network stride", minimum=1)
    parse_int(halo, "halo", minimum=0)
    if tile % stride:
        raise ConfigError(
            f"Tile size {tile} is not a multiple of the network's stride {stride}; use {round_up(tile, stride)}."
        )
    halo = round_up(halo, stride)
    rows, cols = grid_shape(height, width, tile)
    tiles = []
    for row in range(rows):
        y0, y1 = row * tile, min((row + 1) * tile, height)
        for col in range(cols):
            x0, x1 = col * tile, min((col + 1) * tile, width)
            core = (y0, y1, x0, x1)
            tiles.append(Tile(row, col, core, grow(core, halo, bounds or (0, height, 0, width))))
    return tiles


def grow(box: Box, halo: int, bounds: Box) -> Box:
    """``box`` grown by ``halo`` on every side and clipped to ``bounds``: the window that reads it.

    >>> grow((4, 8, 0, 4), 1, (0, 10, 0, 10))
    (3, 9, 0, 5)
    """
    y0, y1, x0, x1 = box
    by0, by1, bx0, bx1 = bounds
    return (max(by0, y0 - halo), min(by1, y1 + halo), max(bx0, x0 - halo), min(bx1, x1 + halo))


def split_core(tile: Tile, size: int, halo: int) -> list[Tile]:
    """``tile``'s core cut into ``size x size`` pieces (smaller at its right and bottom), each read
    with ``halo`` pixels clipped to the tile's window: separate forward passes that together give
    the tile's core exactly, for the reason tiles do (``size`` a multiple of the stride). Pieces
    keep the tile's row and column.

    >>> tile = plan_tiles(height=6, width=8, tile=8, halo=1)[0]
    >>> [(p.core, p.window) for p in split_core(tile, 4, 1)]  # doctest: +NORMALIZE_WHITESPACE
    [((0, 4, 0, 4), (0, 5, 0, 5)), ((0, 4, 4, 8), (0, 5, 3, 8)),
     ((4, 6, 0, 4), (3, 6, 0, 5)), ((4, 6, 4, 8), (3, 6, 3, 8))]
    """
    y0, y1, x0, x1 = tile.core
    if size >= max(y1 - y0, x1 - x0):
        return [tile]
    cores = [(y, min(y + size, y1), x, min(x + size, x1)) for y in range(y0, y1, size) for x in range(x0, x1, size)]
    return [Tile(tile.row, tile.col, core, grow(core, halo, tile.window)) for core in cores]


def forward_size(tile: int, halo: int, stride: int, bytes_per_pixel: float, budget: int, extra: float = 0.05) -> int:
    """The core side of each forward pass: the largest divisor of ``tile`` (itself included, a
    multiple of ``stride``) whose window's largest activation, ``bytes_per_pixel x (side + 2
    halo)^2``, fits ``budget`` bytes; where none fits, the smallest. Only sides whose wider halo
    adds at most ``extra`` to the pixels the network computes are considered.

    >>> forward_size(512, 1, 1, 256, 8 << 20)  # the reference FCN: 16 passes of 130 x 130
    128
    >>> forward_size(512, 56, 8, 256, 8 << 20)  # a halo of 56: smaller passes cost too much
    512
    """
    computed = (tile + 2 * halo) ** 2 / tile**2
    smallest = tile
    for parts in range(1, tile // stride + 1):
        side = tile // parts
        if tile % parts or side % stride:
            continue
        if (side + 2 * halo) ** 2 / side**2 > computed * (1 + extra):
            break  # smaller passes only cost more
        if bytes_per_pixel * (side + 2 * halo) ** 2 <= budget:
            return side
        smallest = side
    return smallest


def batched(tiles: Sequence[Tile], size: int) -> Iterator[list[Tile]]:
    """Groups of at most ``size`` neighbouring tiles of one row, in row-major order.

    A group never spans two rows, so the union of its windows is a strip one tile high: a task
    reads that strip once and cuts the windows out of it, instead of decoding the file tiles
    under each overlapping halo again for every window.

    >>> [[(t.row, t.col) for t in group] for group in batched(plan_tiles(8, 12, 4, 1), 2)]
    [[(0, 0), (0, 1)], [(0, 2)], [(1, 0), (1, 1)], [(1, 2)]]
    """
    parse_int(size, "batch size", minimum=1)
    group: list[Tile] = []
    for tile in tiles:
        if group and (len(group) == size or tile.row != group[0].row):
            yield group
            group = []
        group.append(tile)
    if group:
        yield group


def blocks_2x2(tiles: Sequence[Tile]) -> Iterator[list[Tile]]:
    """Groups of the (up to) 2 x 2 tiles under each chunk of the next coarser level, row-major.

    A task that owns such a block holds everything one chunk of pyramid level 1 is made of, so it
    can write that chunk too, instead of a second pass re-reading level 0.

    >>> [[(t.row, t.col) for t in b] for b in blocks_2x2(plan_tiles(12, 8, 4, 1))]
    [[(0, 0), (0, 1), (1, 0), (1, 1)], [(2, 0), (2, 1)]]
    """
    return blocks(tiles, 2)


def blocks(tiles: Sequence[Tile], side: int) -> Iterator[list[Tile]]:
    """Groups of the (up to) ``side x side`` tiles of each block of that many tile rows and columns,
    block by block in row-major order, each group's tiles in the order given.

    With a store sharded in ``side x side`` chunks, a block is exactly the tiles of one shard: a task
    that owns a block writes that shard whole, and no other task writes into it.

    >>> [[(t.row, t.col) for t in b] for b in blocks(plan_tiles(12, 12, 4, 1), 2)]
    [[(0, 0), (0, 1), (1, 0), (1, 1)], [(0, 2), (1, 2)], [(2, 0), (2, 1)], [(2, 2)]]
    """
    parse_int(side, "block side", minimum=1)
    groups: dict[tuple[int, int], list[Tile]] = {}
    for tile in tiles:
        groups.setdefault((tile.row // side, tile.col // side), []).append(tile)
    return (groups[key] for key in sorted(groups))


def union_window(tiles: Sequence[Tile]) -> Box:
    """The smallest box holding every tile's window.

    >>> union_window(plan_tiles(8, 12, 4, 1)[:2])
    (0, 5, 0, 9)
    """
    return (
        min(t.window[0] for t in tiles),
        max(t.window[1] for t in tiles),
        min(t.window[2] for t in tiles),
        max(t.window[3] for t in tiles),
    )


def cells_under(box: Box, cell: tuple[int, int]) -> Iterator[tuple[int, int, Box]]:
    """The cells of a grid of ``cell = (height, width)`` that ``box`` overlaps, row by row: each
    cell's row, column and the part of ``box`` inside it. How a window is gathered from the tiles
    of a TIFF or the chunks of a Zarr array.

    >>> list(cells_under((3, 5, 0, 6), (4, 4)))
    [(0, 0, (3, 4, 0, 4)), (0, 1, (3, 4, 4, 6)), (1, 0, (4, 5, 0, 4)), (1, 1, (4, 5, 4, 6))]
    """
    y0, y1, x0, x1 = box
    height, width = cell
    for row in range(y0 // height, (y1 - 1) // height + 1):
        for col in range(x0 // width, (x1 - 1) // width + 1):
            top, left = row * height, col * width
            yield row, col, (max(y0, top), min(y1, top + height), max(x0, left), min(x1, left + width))


def halo_overhead(tiles: Sequence[Tile]) -> float:
    """Pixels read divided by pixels written, minus one: the cost of the halo (0.0 = none)."""
    read = sum(h * w for h, w in (t.window_shape for t in tiles))
    written = sum(t.core_pixels for t in tiles)
    return read / written - 1.0
