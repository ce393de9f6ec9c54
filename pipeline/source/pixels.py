"""Read windows of a TIFF level as ``(C, Y, X)`` arrays, decoding only the tiles or strips under them.

A task names what it reads with a small picklable :class:`SourceRef` (a path and a choice of
series and level), not an open file: the same task graph then runs on threads, processes or a
distributed cluster, and each thread opens the file itself, once (:func:`_open_level`).

A level is read segment by segment (a tile or a strip) with tifffile's own decoder: ``os.pread``
(a URL: one batch of ranged requests per window, :mod:`pipeline.remote`) fetches the bytes, so
threads share no file position. One code path for every layout tifffile lays out as pages (RGB,
separate planes, a page per channel as in OME-TIFF or ScanImage, tiles or strips), and faster than
tifffile's Zarr view (2.5 against 1.2 ms per 512 x 512 JPEG tile); it leaves zarr to the store.

Channel layout: whatever the file's axes (``YXS`` for RGB, ``CYX`` for OME, ``TCYX`` for ScanImage),
windows come back as ``(C, Y, X)``. Axes other than Y, X and the channel axis (time, depth, ...)
are read at index 0. An alpha band (TIFF ExtraSamples = associated/unassociated alpha) is dropped.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import numpy as np
import tifffile

from pipeline import remote
from pipeline.errors import SourceError
from pipeline.tiling import Box, cells_under

SPATIAL = "YX"
_Key = tuple[object, ...]
_Options = dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class SourceRef:
    """What a task needs to read pixels: small, picklable, no open file handle."""

    path: str
    series: int
    level: int
    axes: str
    """Axes of the level as tifffile reports them, e.g. ``"YXS"``."""
    channel_axis: str | None
    """The axis holding channels (``"S"`` or ``"C"``), or None for a single-channel image."""
    channels: int
    """Channels kept (alpha dropped); ``read_window`` returns this many."""
    alpha: bool = False
    """The channel axis ends with an alpha band (0 = no data) after the kept channels."""
    nodata: float | None = None
    """GDAL_NODATA: a pixel whose every kept channel equals it holds no data."""
    mask_series: int | None = None
    """Series holding a GDAL internal mask (PhotometricInterpretation MASK) of this level's size."""
    cache_tiles: bool = False
    """Keep recently decoded file tiles (:data:`TILE_CACHE`): for reads in tile order, where
    neighbouring windows share the tiles under their halo; not for random patches."""
    storage: tuple[tuple[str, Any], ...] = field(default=(), repr=False, compare=False)
    """fsspec options of a URL input (``input.storage_options``): they may hold credentials, so they
    are never shown (``repr``) and never written anywhere; they travel with the task."""


def one_line(err: BaseException) -> str:
    """An exception as one line: its message with newlines folded, or its type if it has none."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def read_window(ref: SourceRef, box: Box) -> np.ndarray:
    """Pixels of ``box = (y0, y1, x0, x1)`` as a ``(C, y1 - y0, x1 - x0)`` array of the file's dtype.

    Decodes only the tiles or strips that overlap the box. A tile that cannot be decoded raises
    SourceError naming the file and the window.
    """
    return _read(ref, box)[: ref.channels]


def read_masked(ref: SourceRef, box: Box) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`read_window`, and where the source has data: ``(Y, X)`` bool, or None if everywhere.

    No data means alpha 0, 0 in a GDAL internal mask, every channel equal to GDAL_NODATA, or a
    non-finite value (NaN, infinity) in any channel of a float image, which is returned as 0.
    """
    data = _read(ref, box)
    valid = None
    if ref.alpha:
        valid = data[ref.channels] != 0
    if ref.mask_series is not None:
        mask_ref = SourceRef(ref.path, ref.mask_series, ref.level, "YX", None, 1, storage=ref.storage)
        in_mask = _read(mask_ref, box)[0] != 0
        valid = in_mask if valid is None else valid & in_mask
    if ref.nodata is not None and not math.isnan(ref.nodata):  # NaN: below, with every non-finite value
        has_data = (data[: ref.channels] != np.asarray(ref.nodata, dtype=data.dtype)).any(axis=0)
        valid = has_data if valid is None else valid & has_data
    kept = data[: ref.channels]
    if np.issubdtype(kept.dtype, np.floating):
        finite = np.isfinite(kept).all(axis=0)
        if not finite.all():  # no data, and zeros for the network: a NaN would spread over its receptive field
            kept[:, ~finite] = 0
            valid = finite if valid is None else valid & finite
    return kept, valid


def _read(ref: SourceRef, box: Box) -> np.ndarray:
    """Every channel of the box, alpha included, as ``(C, Y, X)``."""
    y0, y1, x0, x1 = box
    index: list[int | slice] = []
    for axis in ref.axes:
        if axis == "Y":
            index.append(slice(y0, y1))
        elif axis == "X":
            index.append(slice(x0, x1))
        elif axis == ref.channel_axis:
            index.append(slice(0, ref.channels + int(ref.alpha)))
        else:
            index.append(0)
    try:
        data = _open_level(ref)[tuple(index)]
    except Exception as err:  # any codec or I/O failure in this window: report it with its place
        if isinstance(err, SourceError) and remote.is_url(ref.path):
            raise  # already one line naming the URL
        raise SourceError(
            f"{remote.redact(ref.path)}: cannot read pixels of level {ref.level} at rows {y0}-{y1}, "
            f"columns {x0}-{x1}: {one_line(err)}"
        ) from err
    kept = [a for a in ref.axes if a in SPATIAL or a == ref.channel_axis]
    if ref.channel_axis is None:
        return data[np.newaxis] if kept == ["Y", "X"] else data.T[np.newaxis]
    return np.transpose(data, [kept.index(ref.channel_axis), kept.index("Y"), kept.index("X")])


# --- the decoded-tile cache ---------------------------------------------------------------------------------------


class _TileCache:
    """Decoded file tiles, shared by the threads of a process, least recently used dropped first.

    A task's window (a 2 x 2 block of cores and its halo) touches a ring of file tiles for the
    halo's pixel or two; the next task along the row needs half of them again. Keeping the last
    few dozen decoded tiles halves the JPEG decoding of a slide, for memory that does not depend
    on the image's size.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: OrderedDict[tuple[object, ...], Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> Any:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: tuple[object, ...], value: Any, size: int) -> None:
        with self.lock:
            if key in self.items or size > self.max_bytes:
                return
            self.items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self.items.popitem(last=False)
                self.bytes -= dropped

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.bytes = 0


TILE_CACHE = _TileCache(max_bytes=32 * 2**20)
FETCHED_CACHE = _TileCache(max_bytes=64 * 2**20)
"""Undecoded tiles of URL inputs, grown to hold :data:`ROWS_FETCHED` rows of a level's tiles (at most
512 MiB): a 32768² slide (453 MiB, 7 MiB a row) fetched 1.20 x its bytes with 64 MiB, 1.00 x with 256."""
ROWS_FETCHED = 40

_OPEN_LIMIT = 8
"""Levels each thread keeps open (a file descriptor each)."""
_local = threading.local()
_shared: OrderedDict[tuple[str, int, int, bool], Level] = OrderedDict()
"""The levels of URL inputs, shared by this process's threads."""
_shared_lock = threading.Lock()


def clear_reader_caches() -> None:
    """Forget the decoded tiles of this process and close this thread's open files."""
    TILE_CACHE.clear()
    FETCHED_CACHE.clear()
    cache = getattr(_local, "cache", None)
    while cache:
        cache.popitem(last=False)[1].close()
    with _shared_lock:
        while _shared:
            _shared.popitem(last=False)[1].close()


def _open_level(ref: SourceRef) -> Level:
    """This thread's :class:`Level` of ``ref``, opened once and kept (a few files per thread); for a
    URL, this process's: its reads share no file position, and its directory then comes over the
    network once per process, not once per thread."""
    if remote.is_url(ref.path):
        with _shared_lock:
            return _cached_level(ref, _shared)
    cache: OrderedDict[tuple[str, int, int, bool], Level] | None = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = OrderedDict()
    return _cached_level(ref, cache)


def _cached_level(ref: SourceRef, cache: OrderedDict[tuple[str, int, int, bool], Level]) -> Level:
    key = (ref.path, ref.series, ref.level, ref.cache_tiles)
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    name: tuple[object, ...] | None = None
    if ref.cache_tiles:  # a file rewritten at the same path must not meet its old tiles
        if remote.is_url(ref.path):
            name = (*key, remote.info(ref.path, dict(ref.storage))["version"])
        else:
            stat = os.stat(ref.path)
            name = (*key, stat.st_mtime_ns, stat.st_size)
    cache[key] = Level.open(ref.path, ref.series, ref.level, name, dict(ref.storage))
    while len(cache) > _OPEN_LIMIT:
        cache.popitem(last=False)[1].close()
    return cache[key]


# --- one level, segment by segment --------------------------------------------------------------------------------


def layout_problem(level: Any) -> str | None:
    """Why :class:`Level` cannot read ``level`` (a tifffile series level) window by window, or None.

    It reads levels made of pages, each page one image plane (tiled or stripped, samples
    interleaved or planar) and the pages in the order of the level's leading axes.
    """
    keyframe = level.keyframe
    inner = keyframe.axes
    outer = len(level.axes) - len(inner)
    if keyframe.imagedepth != 1:
        return f"its pages are volumes ({keyframe.imagedepth} planes deep)"
    if inner not in ("YX", "YXS", "SYX"):
        return f"its pages have axes {inner!r}"
    if outer < 0 or not level.axes.endswith(inner) or tuple(level.shape[outer:]) != tuple(keyframe.shape):
        return f"its pages of axes {inner!r} do not make up its axes {level.axes!r}"
    if math.prod(level.shape[:outer]) != len(level.pages):
        return f"it has {len(level.pages)} pages for the {math.prod(level.shape[:outer])} its axes {level.axes!r} need"
    return None


class Level:
    """One level of a series: its pages, read a window at a time (see the module's docstring).

    Indexed as tifffile's Zarr view is, with a slice or an int per axis of ``level.axes``; Y and X
    take slices.
    """

    def __init__(self, tif: tifffile.TiffFile, level: Any, path: str, name: _Key | None, storage: _Options) -> None:
        keyframe = level.keyframe
        self.tif = tif
        self.pages = list(level.pages)
        self.keyframe = keyframe
        self.axes: str = level.axes
        self.shape = tuple(level.shape)
        self.outer = len(self.axes) - len(keyframe.axes)
        self.page_axes: str = keyframe.axes
        self.separate, _, self.height, self.width, self.contig = keyframe.shaped
        if keyframe.is_tiled:
            self.segment = (keyframe.tilelength, keyframe.tilewidth)
        else:
            self.segment = (min(keyframe.rowsperstrip, self.height), self.width)
        self.across = -(-self.width // self.segment[1])
        self.per_plane = -(-self.height // self.segment[0]) * self.across
        self.dtype = keyframe.dtype
        self.name = name
        """Key of this level in :data:`TILE_CACHE`; None: decoded segments are not kept."""
        self.path = path
        self.storage = storage
        self.url = remote.is_url(path)
        self.fd = -1 if self.url else os.open(path, os.O_RDONLY)
        if self.url:  # the tiles of the rows a halo reaches back to stay fetched (bytes of a row here)
            row = sum(int(n) for page in self.pages for n in page.databytecounts) * self.across / self.per_plane
            FETCHED_CACHE.max_bytes = int(min(512 * 2**20, max(FETCHED_CACHE.max_bytes, ROWS_FETCHED * row)))
        self.handle: Any = None  # a URL's file object, which tifffile parsed the directory through

    @classmethod
    def open(cls, path: str, series: int, level: int, name: _Key | None = None, storage: _Options = None) -> Level:
        """Open ``path`` (a file or a URL) and the level (SourceError if its layout cannot be read this way)."""
        handle = remote.open_file(path, storage) if remote.is_url(path) else None
        tif = tifffile.TiffFile(path if handle is None else handle, name=remote.redact(path))
        try:
            chosen = tif.series[series].levels[level]
            problem = layout_problem(chosen)
            if problem is not None:
                raise SourceError(f"{path}: series {series} level {level} cannot be read window by window: {problem}")
            opened = cls(tif, chosen, path, name, storage)
            opened.handle = handle
            return opened
        except BaseException:
            tif.close()
            if handle is not None:
                handle.close()
            raise

    def __getitem__(self, index: tuple[int | slice, ...]) -> np.ndarray:
        outer, inner = index[: self.outer], index[self.outer :]
        picks = [
            range(*item.indices(size)) if isinstance(item, slice) else [item]
            for item, size in zip(outer, self.shape[: self.outer], strict=True)
        ]
        rows = inner[self.page_axes.index("Y")]
        cols = inner[self.page_axes.index("X")]
        if not isinstance(rows, slice) or not isinstance(cols, slice):
            raise TypeError("Y and X take slices")
        y0, y1, _ = rows.indices(self.height)
        x0, x1, _ = cols.indices(self.width)
        planes = [
            self._page(int(np.ravel_multi_index(at, self.shape[: self.outer])) if at else 0, (y0, y1, x0, x1))
            for at in product(*picks)
        ]
        stacked = planes[0] if len(planes) == 1 else np.stack(planes)  # one page (RGB, a GeoTIFF): no copy
        data = stacked.reshape(*(len(p) for p in picks), *planes[0].shape)
        spatial = tuple(
            slice(None) if axis in SPATIAL else item for axis, item in zip(self.page_axes, inner, strict=True)
        )
        outer_index = tuple(0 if isinstance(item, int) else slice(None) for item in outer)
        return data[outer_index + spatial]

    def _page(self, number: int, box: Box) -> np.ndarray:
        """The box of page ``number`` with the page's axes (``YX``, ``YXS`` or ``SYX``)."""
        y0, y1, x0, x1 = box
        out = np.zeros((self.separate, y1 - y0, x1 - x0, self.contig), self.dtype)
        page = self.pages[number]
        if page is not None:  # a page the file does not store reads as 0
            cells = list(cells_under(box, self.segment))
            fetched = self._prefetch(page, number, cells) if self.url else {}
            for plane in range(self.separate):
                for row, col, (a0, a1, b0, b1) in cells:
                    index = plane * self.per_plane + row * self.across + col
                    segment = self._segment(page, number, index, fetched.get(index))
                    if segment is None:
                        continue  # a tile the file does not store (a sparse COG): 0, as tifffile fills it
                    top, left = row * self.segment[0], col * self.segment[1]
                    out[plane, a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = segment[
                        a0 - top : a1 - top, b0 - left : b1 - left
                    ]
        if self.page_axes == "YX":
            return out[0, :, :, 0]
        return out[0] if self.separate == 1 else out[..., 0]

    def _prefetch(self, page: Any, number: int, cells: list[Any]) -> dict[int, bytes]:
        """The undecoded bytes of the window's segments not decoded already, fetched in one batch and
        each once however many threads want it (:func:`remote.read_once`; kept in
        :data:`FETCHED_CACHE`: the next row of windows needs this row's edge tiles)."""
        wanted: dict[_Key, int] = {}
        for index in [p * self.per_plane + r * self.across + c for p in range(self.separate) for r, c, _ in cells]:
            key = (id(self), number, index) if self.name is None else (*self.name, number, index)
            if int(page.databytecounts[index]) and (self.name is None or TILE_CACHE.get(key) is None):
                wanted[key] = index
        ranges = {key: (int(page.dataoffsets[i]), int(page.databytecounts[i])) for key, i in wanted.items()}
        found = remote.read_once(self.path, ranges, self.storage, None if self.name is None else FETCHED_CACHE)
        return {wanted[key]: data for key, data in found.items()}

    def _segment(self, page: Any, number: int, index: int, data: bytes | None = None) -> np.ndarray | None:
        """Segment ``index`` of a page as ``(rows, columns, contiguous samples)``, or None if absent;
        ``data``: its bytes, fetched already."""
        key = None if self.name is None else (*self.name, number, index)
        if key is not None:
            cached = TILE_CACHE.get(key)
            if cached is not None:
                return cached[0]  # type: ignore[no-any-return]
        count = int(page.databytecounts[index])
        if not count:
            return None
        if data is None and self.url:  # decoded when the window was fetched, dropped since: maybe kept undecoded
            wanted, kept = {key or (id(self), number, index): (int(page.dataoffsets[index]), count)}, FETCHED_CACHE
            data = next(iter(remote.read_once(self.path, wanted, self.storage, kept if key else None).values()))
        elif data is None:
            data = os.pread(self.fd, count, int(page.dataoffsets[index]))
        if len(data) < count:
            raise SourceError(f"segment {index} ends past the end of the file")
        header = getattr(page, "jpegheader", None)  # an NDPI strip's restart-marker tiles are decoded with it
        decoded = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=header)[0]
        segment: np.ndarray = decoded.reshape(decoded.shape[-3:])
        if key is not None:
            TILE_CACHE.put(key, segment, segment.nbytes)
        return segment

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.tif.close()
        if self.handle is not None:
            self.handle.close()
