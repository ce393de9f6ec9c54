"""Polygons of a label map, chunk by chunk, equal to polygonising the whole map at once.

A region is a connected set of pixels of one class: 4-connected (pixels sharing an edge, what
``rasterio.features.shapes`` and ``gdal_polygonize`` do by default) or 8-connected (corners too).
Its polygon is in pixel-corner coordinates, ``x`` right and ``y`` down, holes included.

How a chunk becomes polygons (:func:`chunk_pieces`): each row is cut into runs of one class, runs
that repeat exactly in the next row are stacked into one rectangle, and the union of a class's
rectangles (GEOS, exact on these integer coordinates) falls apart into its 4-connected parts:
the interiors of two parts meet nowhere, since pixels that share an edge share interior.

How chunks are joined (:class:`Frontier`): chunks are read row by row. A piece (one part in one
chunk) is joined to another, by union-find, exactly where two pixels of one class are neighbours
across a chunk edge (and, with 8-connectivity, across a corner, inside a chunk too); which piece
holds a pixel is found by its centre, which lies strictly inside one piece. So the groups are the
connected components of the whole map, and the union of a group's pieces (which share whole
pixel edges along the seams) is the polygon of that component, holes that close across chunks
included. A piece keeps its group open while it holds a pixel on a seam whose other side is not
read yet; a group with no open piece is final, unioned and handed out at once, so only what
touches the unread part of the map is held: memory grows with the width, never the height.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely  # type: ignore[import-untyped, unused-ignore]

from pipeline.errors import ConfigError
from pipeline.store.layout import NODATA_LABEL
from pipeline.store.reading import chunk_boxes

CONNECTIVITIES = (4, 8)


@dataclass(frozen=True, slots=True)
class Region:
    """One connected region: its class and its polygon, in pixel-corner coordinates of the map."""

    label: int
    geometry: Any
    """A shapely Polygon; with 8-connectivity a MultiPolygon where parts meet only at corners."""


def row_runs(block: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The rectangles of one class that cover ``block`` (``(Y, X)`` labels), as rows of
    ``(label, y0, y1, x0, x1)`` in block pixels: runs along each row, stacked where a run repeats
    exactly in the next row. Labels with ``keep[label]`` False are left out.

    >>> row_runs(np.array([[1, 1, 2], [1, 1, 0]], np.uint8), np.ones(256, bool)).tolist()
    [[0, 1, 2, 2, 3], [1, 0, 2, 0, 2], [2, 0, 1, 2, 3]]
    >>> row_runs(np.zeros((2, 3), np.uint8), np.arange(256) > 0).shape
    (0, 5)
    """
    width = block.shape[1]
    starts = np.ones(block.shape, bool)
    starts[:, 1:] = block[:, 1:] != block[:, :-1]
    ys, xs = np.nonzero(starts)
    ends = np.append(xs[1:], width)
    ends[np.append(ys[1:] != ys[:-1], True)] = width
    labels = block[ys, xs].astype(np.int64)
    chosen = keep[labels]
    ys, xs, ends, labels = ys[chosen], xs[chosen], ends[chosen], labels[chosen]
    if not len(ys):  # nothing kept in this block (all background, or all no data)
        return np.empty((0, 5), np.int64)
    order = np.lexsort((ys, ends, xs, labels))
    ys, xs, ends, labels = ys[order], xs[order], ends[order], labels[order]
    same = np.zeros(len(ys), bool)
    same[1:] = (labels[1:] == labels[:-1]) & (xs[1:] == xs[:-1]) & (ends[1:] == ends[:-1]) & (ys[1:] == ys[:-1] + 1)
    first = np.flatnonzero(~same)
    last = np.append(first[1:], len(ys)) - 1
    return np.stack([labels[first], ys[first], ys[last] + 1, xs[first], ends[first]], axis=1)


def run_polygons(runs: np.ndarray, top: int, left: int) -> np.ndarray:
    """The rectangles ``runs`` (rows of ``(label, y0, y1, x0, x1)``, one class) as polygons at
    ``top``, ``left`` whose every shared edge has the same vertices on both sides (a valid coverage
    for :func:`shapely.coverage_union_all`, far quicker than a general union): the top and bottom
    edge of each rectangle pass through every corner of the others that lies on them.

    >>> shapely.to_wkt(run_polygons(np.array([[1, 0, 1, 0, 3], [1, 1, 2, 1, 2]]), 0, 0)[0])
    'POLYGON ((0 0, 3 0, 3 1, 2 1, 1 1, 0 1, 0 0))'
    """
    _, y0, y1, x0, x1 = (runs[:, i] for i in range(5))
    k = int(x1.max()) + 1
    corners = np.unique(np.concatenate([y0 * k + x0, y0 * k + x1, y1 * k + x0, y1 * k + x1]))
    top_lo = np.searchsorted(corners, y0 * k + x0, "right")
    on_top = np.searchsorted(corners, y0 * k + x1, "left") - top_lo
    bottom_hi = np.searchsorted(corners, y1 * k + x1, "left")
    on_bottom = bottom_hi - np.searchsorted(corners, y1 * k + x0, "right")
    sizes = 4 + on_top + on_bottom
    starts = np.cumsum(sizes) - sizes
    keys = np.empty(int(sizes.sum()), np.int64)
    keys[starts] = y0 * k + x0
    inner = ((on_top, starts + 1, top_lo, 1), (on_bottom, starts + 3 + on_top, bottom_hi - 1, -1))
    for count, at, first, step in inner:
        box = np.repeat(np.arange(len(runs)), count)
        nth = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
        keys[at[box] + nth] = corners[first[box] + step * nth]  # left to right on top, back on the bottom
    keys[starts + 1 + on_top] = y0 * k + x1
    keys[starts + 2 + on_top] = y1 * k + x1
    keys[starts + 3 + on_top + on_bottom] = y1 * k + x0
    rings = shapely.linearrings(keys % k + left, keys // k + top, indices=np.repeat(np.arange(len(runs)), sizes))
    return np.asarray(shapely.polygons(rings))


def chunk_pieces(block: np.ndarray, top: int, left: int, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 4-connected parts of each kept class of ``block`` (labels at rows ``top...``, columns
    ``left...`` of the map) as shapely polygons in map pixels, and their labels."""
    runs = row_runs(block, keep)
    geometries: list[Any] = []
    labels: list[int] = []
    for label in np.unique(runs[:, 0]):
        parts = shapely.get_parts(shapely.coverage_union_all(run_polygons(runs[runs[:, 0] == label], top, left)))
        geometries.extend(parts)
        labels.extend([int(label)] * len(parts))
    return np.array(geometries, dtype=object), np.array(labels, np.int64)


def owners(pieces: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """For the pixels ``(ys, xs)`` of a chunk, the index of the piece holding each (by its centre),
    -1 for a pixel in no piece (no data, a class left out)."""
    found = np.full(len(ys), -1, np.int64)
    if len(ys) and len(pieces):
        points = shapely.points(xs + 0.5, ys + 0.5)
        point, piece = shapely.STRtree(pieces).query(points, predicate="within")
        found[point] = piece
    return found


@dataclass
class _Group:
    label: int
    members: list[int]
    pieces: list[Any]
    open: int = 0
    """How many (piece, seam) pairs of it wait for an unread chunk."""


@dataclass
class Frontier:
    """The pieces not yet final, joined by union-find; see the module's docstring."""

    parent: dict[int, int] = field(default_factory=dict)
    groups: dict[int, _Group] = field(default_factory=dict)
    """Of each root piece id."""

    def root(self, piece: int) -> int:
        parent = self.parent
        while parent[piece] != piece:
            parent[piece] = parent[parent[piece]]
            piece = parent[piece]
        return piece

    def add(self, first: int, geometries: np.ndarray, labels: np.ndarray) -> None:
        for offset, (geometry, label) in enumerate(zip(geometries, labels, strict=True)):
            self.parent[first + offset] = first + offset
            self.groups[first + offset] = _Group(int(label), [first + offset], [geometry])

    def join(self, a: np.ndarray, b: np.ndarray) -> set[int]:
        """Join the pieces ``a[i]`` and ``b[i]``; the roots touched."""
        touched = set()
        for one, other in {(int(p), int(q)) for p, q in zip(a, b, strict=True)}:
            ra, rb = self.root(one), self.root(other)
            if ra != rb:
                if len(self.groups[ra].members) < len(self.groups[rb].members):
                    ra, rb = rb, ra
                merged, gone = self.groups[ra], self.groups.pop(rb)
                merged.pieces.extend(gone.pieces)
                merged.members.extend(gone.members)
                merged.open += gone.open
                self.parent[rb] = ra
            touched.add(ra)
        return touched

    def opened(self, pieces: Collection[int], by: int) -> set[int]:
        roots = set()
        for piece in pieces:
            root = self.root(piece)
            self.groups[root].open += by
            roots.add(root)
        return roots

    def finished(self, roots: Collection[int]) -> Iterator[Region]:
        """The groups among ``roots`` that no unread chunk can reach, unioned, removed from here."""
        for root in sorted({self.root(r) for r in roots}):
            group = self.groups.get(root)
            if group is None or group.open > 0:
                continue
            del self.groups[root]
            for member in group.members:
                del self.parent[member]
            pieces = group.pieces
            geometry = pieces[0] if len(pieces) == 1 else shapely.union_all(pieces)
            yield Region(group.label, shapely.normalize(geometry))


Side = tuple[np.ndarray, np.ndarray]
"""The labels along one side of a seam and the ids of the pieces holding them (-1: none)."""


def _pairs(new: Side, old: Side, shifts: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The (new piece, old piece) pairs of neighbours of one class across a seam: ``new`` and ``old``
    are the labels and piece ids along each side, ``shifts`` the offsets along it that touch."""
    (new_labels, new_ids), (old_labels, old_ids) = new, old
    found_new, found_old = [], []
    for shift in shifts:
        at = np.arange(len(new_labels))
        there = at + shift
        inside = (there >= 0) & (there < len(old_labels))
        at, there = at[inside], there[inside]
        match = (new_ids[at] >= 0) & (old_ids[there] >= 0) & (new_labels[at] == old_labels[there])
        found_new.append(new_ids[at[match]])
        found_old.append(old_ids[there[match]])
    return np.concatenate(found_new), np.concatenate(found_old)


def _corners(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(y, x)`` pairs of pixels of one class that meet only at a corner, inside ``block``:
    what 8-connectivity joins beyond what the union of a chunk joins."""
    a, b, c, d = block[:-1, :-1], block[:-1, 1:], block[1:, :-1], block[1:, 1:]
    ys, xs = np.nonzero((a == d) & (a != b) & (a != c))  # top-left with bottom-right
    ya, xa = np.nonzero((b == c) & (b != a) & (b != d))  # top-right with bottom-left
    return (
        np.concatenate([ys, ya]),
        np.concatenate([xs, xa + 1]),
        np.concatenate([ys + 1, ya + 1]),
        np.concatenate([xs + 1, xa]),
    )


def regions(
    labels: Any, *, connectivity: int = 4, keep: Collection[int] | None = None, chunk: tuple[int, int] | None = None
) -> Iterator[Region]:
    """The connected regions of a ``(Y, X)`` uint8 label map (a zarr array or anything sliced the
    same way), each class ``keep`` holds (default: all but no data, 255), read a ``chunk`` at a time
    (default: the array's chunks), handed out as soon as each is final; equal, region for region,
    to polygonising the whole map at once (see the module's docstring)."""
    if connectivity not in CONNECTIVITIES:
        raise ConfigError(f"Expected 4 or 8 for connectivity. Got {connectivity} instead.")
    height, width = (int(n) for n in labels.shape)
    cy, cx = chunk or (int(labels.chunks[0]), int(labels.chunks[1]))
    kept = np.zeros(NODATA_LABEL + 1, bool)
    kept[list(range(NODATA_LABEL)) if keep is None else list(keep)] = True
    kept[NODATA_LABEL] = False
    shifts = (0,) if connectivity == 4 else (-1, 0, 1)
    frontier = Frontier()
    above = (np.zeros(width, np.uint8), np.full(width, -1, np.int64))
    below = (np.zeros(width, np.uint8), np.full(width, -1, np.int64))
    beside = (np.zeros(0, np.uint8), np.full(0, -1, np.int64))
    bottoms: dict[tuple[int, int], list[int]] = {}
    rights: dict[tuple[int, int], list[int]] = {}
    columns = -(-width // cx)
    first = 0
    for y0, y1, x0, x1 in chunk_boxes((height, width), (cy, cx)):
        row, col = y0 // cy, x0 // cx
        if col == 0 and y0 > 0:
            above, below = below, (np.zeros(width, np.uint8), np.full(width, -1, np.int64))
        block = np.asarray(labels[y0:y1, x0:x1])
        geometries, piece_labels = chunk_pieces(block, y0, x0, kept)
        frontier.add(first, geometries, piece_labels)
        h, w = block.shape
        edge_y = [np.zeros(w, np.int64), np.full(w, h - 1), np.arange(h), np.arange(h)]
        edge_x = [np.arange(w), np.arange(w), np.zeros(h, np.int64), np.full(h, w - 1)]
        if connectivity == 8:
            ya, xa, yb, xb = _corners(block)
            edge_y += [ya, yb]
            edge_x += [xa, xb]
        ys, xs = np.concatenate(edge_y), np.concatenate(edge_x)
        found = owners(geometries, ys + y0, xs + x0)
        ids = np.where(found >= 0, found + first, -1)
        values = block[ys, xs]
        cuts = np.cumsum([len(e) for e in edge_y])[:-1]
        (top, bottom, left, right, *diagonal) = np.split(ids, cuts)
        (top_v, bottom_v, left_v, right_v, *_) = np.split(values, cuts)
        touched = set(range(first, first + len(geometries)))
        if y0 > 0:
            old = (above[0][max(0, x0 - 1) : x1 + 1], above[1][max(0, x0 - 1) : x1 + 1])
            offset = 1 if x0 > 0 else 0
            touched |= frontier.join(*_pairs((top_v, top), old, tuple(s + offset for s in shifts)))
        if x0 > 0:
            touched |= frontier.join(*_pairs((left_v, left), beside, shifts))
        if connectivity == 8:
            a, b = diagonal
            both = (a >= 0) & (b >= 0)
            touched |= frontier.join(a[both], b[both])
        below[0][x0:x1], below[1][x0:x1] = bottom_v, bottom
        beside = (right_v, right)
        if y1 < height:
            bottoms[(row, col)] = _held(bottom)
            frontier.opened(bottoms[(row, col)], 1)
        if x1 < width:
            rights[(row, col)] = _held(right)
            frontier.opened(rights[(row, col)], 1)
        # the seams no unread chunk touches any more: this one's left, the bottom of the one up-left
        released = rights.pop((row, col - 1), []) + bottoms.pop((row - 1, col - 1), [])
        if col == columns - 1:
            released += bottoms.pop((row - 1, col), [])
        touched |= frontier.opened(released, -1)
        first += len(geometries)
        yield from frontier.finished(touched)
    for group in frontier.groups.values():
        group.open = 0  # nothing is left unread
    yield from frontier.finished(list(frontier.groups))


def _held(ids: np.ndarray) -> list[int]:
    return [int(p) for p in np.unique(ids[ids >= 0])]


def tidy(geometries: np.ndarray) -> np.ndarray:
    """``geometries`` without the vertices where an outline runs straight on (left where runs of
    different widths, or pieces of two chunks, meet): the same polygons, as few vertices as
    ``gdal_polygonize`` writes. Douglas-Peucker at tolerance 0 drops exactly those."""
    return np.asarray(shapely.simplify(geometries, 0.0, preserve_topology=False))
