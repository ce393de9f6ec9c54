"""Open a TIFF lazily and read windows of it as ``(C, Y, X)`` arrays.

This module owns tifffile. :func:`open_source` parses only the file's directory (IFDs and tags),
never pixel data, and returns a :class:`SourceInfo` with everything a run or ``fcnpipe inspect``
needs. Pixels are read by :func:`read_window`, which takes a small picklable :class:`SourceRef`
(a path and a choice of series and level) instead of an open file: the same task graph then runs
on threads, processes or a distributed cluster, and each thread opens the file itself, once.

Channel layout: whatever the file's axes (``YXS`` for RGB, ``CYX`` for OME, ``TCYX`` for ScanImage),
windows come back as ``(C, Y, X)``. Axes other than Y, X and the channel axis (time, depth, ...)
are read at index 0. An alpha band (TIFF ExtraSamples = associated/unassociated alpha) is dropped.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import tifffile
import zarr

from pipeline.errors import SourceError, warn
from pipeline.source.georef import Georeference, from_geokeys, ome_mpp, resolution_mpp, svs_mpp
from pipeline.tiling import cells_under

SPATIAL = "YX"
CHANNEL_AXES = "SC"
_ALPHA = {tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA}
GDAL_NODATA = 42113


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


@dataclass(frozen=True, slots=True)
class LevelInfo:
    shape: tuple[int, int]
    """``(Y, X)`` in pixels."""
    downsample: float
    """Level-0 width divided by this level's width."""


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What is known about an input before any pixel is read."""

    ref: SourceRef
    shape: tuple[int, int, int]
    """``(C, Y, X)`` of the chosen level, alpha excluded."""
    dtype: np.dtype[Any]
    file_size: int
    series_count: int
    series_names: tuple[str, ...]
    levels: tuple[LevelInfo, ...]
    compression: str
    chunk_shape: tuple[int, int]
    """``(Y, X)`` of the file's tiles, or of its strips for a stripped file."""
    tiled: bool
    alpha_dropped: bool
    other_axes: str
    """Axes read at index 0 only (e.g. ``"T"``)."""
    mpp: float | None
    """Micrometres per pixel at the chosen level, or None when the file does not say."""
    georeference: Georeference | None
    """CRS and affine transform of the chosen level, for a GeoTIFF."""

    @property
    def path(self) -> str:
        return self.ref.path

    @property
    def crs(self) -> str | None:
        return None if self.georeference is None else self.georeference.crs

    @property
    def pixel_size(self) -> tuple[float, float] | None:
        """Pixel ``(width, height)`` in CRS units at the chosen level, for a GeoTIFF."""
        return None if self.georeference is None else self.georeference.pixel_size


def open_source(path: str | os.PathLike[str], series: int = 0, level: int = 0) -> SourceInfo:
    """Parse a TIFF's structure and choose one series and pyramid level; read no pixel data.

    Raises SourceError naming the file for: missing, empty, not a TIFF, truncated (tile or strip
    data past the end of the file), an unknown series or level, or a layout tifffile cannot decode.
    """
    path = os.fspath(path)
    file_size = _check_file(path)
    try:
        with tifffile.TiffFile(path) as tif:
            return _describe(tif, path, file_size, series, level)
    except SourceError:
        raise
    except Exception as err:  # tifffile meets malformed files with errors of every kind
        raise SourceError(f"{path}: not a readable TIFF ({one_line(err)})") from err


def _check_file(path: str) -> int:
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file")
    if os.path.isdir(path):
        raise SourceError(f"{path}: is a directory, not a TIFF file (fcnpipe batch takes a folder of inputs)")
    size = os.path.getsize(path)
    if size == 0:
        raise SourceError(f"{path}: file is empty (0 bytes)")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] not in (b"II", b"MM") or magic[2:4] not in (b"*\x00", b"\x00*", b"+\x00", b"\x00+"):
        raise SourceError(f"{path}: not a TIFF file (starts with {magic!r})")
    return size


def _describe(tif: tifffile.TiffFile, path: str, file_size: int, series: int, level: int) -> SourceInfo:
    if not tif.series:
        raise SourceError(f"{path}: contains no image")
    if not 0 <= series < len(tif.series):
        raise SourceError(f"{path}: has {len(tif.series)} series (0-{len(tif.series) - 1}), not series {series}")
    chosen = tif.series[series]
    if not 0 <= level < len(chosen.levels):
        raise SourceError(
            f"{path}: series {series} has {len(chosen.levels)} levels (0-{len(chosen.levels) - 1}), not level {level}"
        )
    lvl = chosen.levels[level]
    page = lvl.keyframe
    axes = lvl.axes
    if "Y" not in axes or "X" not in axes:
        raise SourceError(f"{path}: series {series} has axes {axes!r}, not an image with Y and X")
    _check_decodable(page, path)
    _check_not_truncated(lvl, path, file_size)

    channel_axes = [a for a in axes if a in CHANNEL_AXES and lvl.shape[axes.index(a)] > 1]
    if len(channel_axes) > 1:
        raise SourceError(f"{path}: has several channel axes {''.join(channel_axes)!r}; cannot choose one")
    channels = lvl.shape[axes.index(channel_axes[0])] if channel_axes else 1
    alpha = bool(page.extrasamples) and page.extrasamples[-1] in _ALPHA and channels > 1
    if alpha:
        channels -= 1
    other = "".join(a for a in axes if a not in SPATIAL and a not in channel_axes and lvl.shape[axes.index(a)] > 1)

    level0_width = chosen.levels[0].shape[chosen.levels[0].axes.index("X")]
    levels = tuple(
        LevelInfo(
            shape=(lv.shape[lv.axes.index("Y")], lv.shape[lv.axes.index("X")]),
            downsample=level0_width / lv.shape[lv.axes.index("X")],
        )
        for lv in chosen.levels
    )
    height, width = levels[level].shape
    downsample = levels[level].downsample
    mpp0 = _microns_per_pixel(tif, chosen.levels[0].keyframe, path)
    georeference = None
    if tif.is_geotiff:
        level0_height = chosen.levels[0].shape[chosen.levels[0].axes.index("Y")]
        georeference = _georeference(tif, path, (level0_height, level0_width))
        georeference = None if georeference is None else georeference.scaled(downsample, level0_height / height)
    nodata_tag = page.tags.get(GDAL_NODATA)
    return SourceInfo(
        ref=SourceRef(
            path=path,
            series=series,
            level=level,
            axes=axes,
            channel_axis=channel_axes[0] if channel_axes else None,
            channels=channels,
            alpha=alpha,
            nodata=_parse_nodata(nodata_tag.value if nodata_tag else None, np.dtype(lvl.dtype), path),
            mask_series=_mask_series(tif, series, level, (height, width)),
        ),
        shape=(channels, height, width),
        dtype=np.dtype(lvl.dtype),
        file_size=file_size,
        series_count=len(tif.series),
        series_names=tuple(s.name or s.kind or f"series {i}" for i, s in enumerate(tif.series)),
        levels=levels,
        compression=page.compression.name,
        chunk_shape=(page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, page.imagewidth),
        tiled=bool(page.is_tiled),
        alpha_dropped=alpha,
        other_axes=other,
        mpp=None if mpp0 is None else mpp0 * downsample,
        georeference=georeference,
    )


def _mask_series(tif: tifffile.TiffFile, series: int, level: int, shape: tuple[int, int]) -> int | None:
    """The series of a GDAL internal mask whose same level matches ``shape``, if there is one."""
    for index, candidate in enumerate(tif.series):
        if index == series or candidate.keyframe.photometric != tifffile.PHOTOMETRIC.MASK:
            continue
        if level < len(candidate.levels) and tuple(candidate.levels[level].shape) == shape:
            return index
    return None


def _parse_nodata(text: object, dtype: np.dtype[Any], path: str) -> float | None:
    """The GDAL_NODATA tag as a pixel value, or None (with a warning naming the file and the tag)
    when it is not a number or no pixel of ``dtype`` can hold it: the file is read without no-data."""
    if text is None:
        return None
    shown = repr(str(text).strip().strip("\x00"))[:40]
    try:
        value = float(str(text).strip().strip("\x00"))
    except ValueError:
        warn(f"{path}: its GDAL_NODATA tag {shown} is not a number; ignored (every pixel is read as data)")
        return None
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if not math.isfinite(value) or value != math.floor(value) or not info.min <= value <= info.max:
            warn(
                f"{path}: its GDAL_NODATA tag {shown} does not fit its {dtype} pixels "
                f"({info.min} to {info.max}); ignored (every pixel is read as data)"
            )
            return None
    return value


def _georeference(tif: tifffile.TiffFile, path: str, shape: tuple[int, int]) -> Georeference | None:
    """The file's GeoTIFF georeference, or None (with a warning) when its tags cannot be used:
    unreadable geokeys, or a transform that is not finite, maps pixels onto a line, or puts the
    corners of the ``(Y, X)`` level 0 beyond any coordinate (1e30)."""
    try:
        georeference = from_geokeys(tif.geotiff_metadata or {})
    except Exception as err:  # tifffile's geokey parser meets any kind of malformed tag
        warn(f"{path}: its GeoTIFF tags cannot be read ({one_line(err)}); read without a georeference")
        return None
    transform = georeference.transform
    if transform is not None:
        a, b, c, d, e, f = transform
        height, width = shape
        corners = [a * x + b * y + c for x in (0, width) for y in (0, height)]
        corners += [d * x + e * y + f for x in (0, width) for y in (0, height)]
        usable = all(math.isfinite(v) for v in transform) and a * e - b * d != 0
        if not usable or not all(abs(v) < 1e30 for v in corners):
            warn(f"{path}: its GeoTIFF transform {transform} is not usable; read without a georeference")
            return None
    return georeference


def _checked_mpp(value: float | None, path: str, what: str) -> float | None:
    """A micrometres-per-pixel value a scanner could have written, else None with a warning."""
    if value is None:
        return None
    if not math.isfinite(value) or not MPP_RANGE[0] < value < MPP_RANGE[1]:
        warn(f"{path}: its {what} says {value:g} micrometres per pixel, which is no pixel size; ignored")
        return None
    return value


MPP_RANGE = (1e-4, 1e6)
"""Micrometres per pixel a file may say, exclusive: from a tenth of a nanometre to a metre."""


def _check_decodable(page: Any, path: str) -> None:
    if (
        page.photometric == tifffile.PHOTOMETRIC.YCBCR
        and page.compression != tifffile.COMPRESSION.JPEG
        and tuple(page.subsampling or (1, 1)) != (1, 1)
    ):
        raise SourceError(
            f"{path}: YCbCr with {page.subsampling[0]}x{page.subsampling[1]} chroma subsampling and "
            f"{page.compression.name} compression is not supported (only JPEG-compressed YCbCr is)"
        )


def _check_not_truncated(level: Any, path: str, file_size: int) -> None:
    """Every tile or strip of the level must lie inside the file (missing ones, offset 0, are fine)."""
    for page in level.pages:
        if page is None:
            continue
        offsets = np.asarray(page.dataoffsets, dtype=np.uint64)
        counts = np.asarray(page.databytecounts, dtype=np.uint64)
        if offsets.size and int((offsets + counts).max()) > file_size:
            raise SourceError(
                f"{path}: truncated or corrupt: image data is said to run to byte "
                f"{int((offsets + counts).max())} but the file has {file_size} bytes"
            )


def _microns_per_pixel(tif: tifffile.TiffFile, page: Any, path: str) -> float | None:
    """Level-0 micrometres per pixel from SVS, OME or TIFF resolution tags, else None; a malformed
    or impossible value is ignored with a warning naming the file and the tag."""
    try:
        if tif.is_svs:
            return _checked_mpp(svs_mpp(str(tif.pages[0].description)), path, "Aperio MPP")
        if tif.is_ome and tif.ome_metadata:
            return _checked_mpp(ome_mpp(tif.ome_metadata), path, "OME PhysicalSizeX")
        if tif.is_geotiff:
            return None
        unit = page.tags.get("ResolutionUnit")
        res = page.tags.get("XResolution")
        per_unit = (
            None if unit is None else {tifffile.RESUNIT.CENTIMETER: 1e4, tifffile.RESUNIT.INCH: 25400.0}.get(unit.value)
        )
        return _checked_mpp(resolution_mpp(None if res is None else res.value, per_unit), path, "XResolution tag")
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, IndexError) as err:
        warn(f"{path}: its resolution metadata cannot be read ({one_line(err)}); ignored")
        return None


def one_line(err: BaseException) -> str:
    """An exception as one line: its message with newlines folded, or its type if it has none."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


# --- reading pixels -------------------------------------------------------------------------------

_OPEN_LIMIT = 8
_local = threading.local()


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


TILE_CACHE = _TileCache(max_bytes=32 * 2**20)


class _DecodedTiles(zarr.storage.WrapperStore):  # type: ignore[misc]
    """tifffile's Zarr store (which returns *decoded* tiles) with :data:`TILE_CACHE` in front."""

    def __init__(self, store: Any, name: tuple[object, ...]) -> None:
        super().__init__(store)
        self.name = name

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if byte_range is not None:
            return await self._store.get(key, prototype, byte_range)
        cached = TILE_CACHE.get((*self.name, key))
        if cached is not None:
            return cached[0]
        value = await self._store.get(key, prototype, byte_range)
        if value is not None:
            TILE_CACHE.put((*self.name, key), value, len(value))
        return value


class _TiledLevel:
    """A level that is one tiled TIFF page, read tile by tile with tifffile's own decoder.

    tifffile's Zarr interface (:func:`_open_level`'s general case) assembles a window through
    zarr's asynchronous machinery, which cost about as much again as decoding the JPEG tiles
    (2.5 against 1.2 ms per 512 x 512 tile). Here a window is the decoded file tiles it overlaps,
    copied into place; tile bytes are read with ``os.pread``, so the threads share no file position.
    """

    def __init__(self, tif: tifffile.TiffFile, page: Any, path: str, name: tuple[object, ...] | None) -> None:
        self.tif = tif
        self.decode = page.decode
        self.tables = page.jpegtables
        self.header = page.jpegheader
        """The JPEG header an NDPI strip's restart-marker tiles are decoded with (else None)."""
        self.offsets, self.counts = page.dataoffsets, page.databytecounts
        self.tile = (page.tilelength, page.tilewidth)
        self.across = -(-page.imagewidth // page.tilewidth)
        self.samples = page.samplesperpixel
        self.dtype = page.dtype
        self.name = name
        """Key of this level in :data:`TILE_CACHE`; None: decoded tiles are not kept."""
        self.fd = os.open(path, os.O_RDONLY)

    @staticmethod
    def of(tif: tifffile.TiffFile, ref: SourceRef) -> Any:
        """The level's page if it can be read this way: one tiled page that is the whole level."""
        level = tif.series[ref.series].levels[ref.level]
        page = level.pages[0] if len(level.pages) == 1 else None
        if not isinstance(page, tifffile.TiffPage) or not page.is_tiled or page.imagedepth != 1:
            return None
        if ref.axes == "YXS" and page.planarconfig == tifffile.PLANARCONFIG.CONTIG and page.samplesperpixel > 1:
            shape: tuple[int, ...] = (page.imagelength, page.imagewidth, page.samplesperpixel)
        elif ref.axes == "YX" and page.samplesperpixel == 1:
            shape = (page.imagelength, page.imagewidth)
        else:
            return None
        return page if tuple(level.shape) == shape else None

    def __getitem__(self, index: tuple[Any, ...]) -> np.ndarray:
        """``[y0:y1, x0:x1]`` or ``[y0:y1, x0:x1, s0:s1]``, as the Zarr view would return it."""
        rows, cols = index[0], index[1]
        (y0, y1), (x0, x1) = (rows.start, rows.stop), (cols.start, cols.stop)
        th, tw = self.tile
        out = np.empty((y1 - y0, x1 - x0, self.samples), self.dtype)
        for row, col, (a0, a1, b0, b1) in cells_under((y0, y1, x0, x1), self.tile):
            tile = self._tile(row * self.across + col)
            target = out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
            if tile is None:
                target[...] = 0  # a tile the file does not store (a sparse COG): tifffile's fill
            else:
                target[...] = tile[a0 - row * th : a1 - row * th, b0 - col * tw : b1 - col * tw]
        return out[..., index[2]] if len(index) > 2 else out[..., 0]

    def _tile(self, index: int) -> np.ndarray | None:
        key = None if self.name is None else (*self.name, index)
        if key is not None:
            cached = TILE_CACHE.get(key)
            if cached is not None:
                return cached[0]  # type: ignore[no-any-return]
        count = int(self.counts[index])
        if not count:
            return None
        data = os.pread(self.fd, count, int(self.offsets[index]))
        if len(data) < count:
            raise SourceError(f"tile {index} ends past the end of the file")
        decoded = self.decode(data, index, jpegtables=self.tables, jpegheader=self.header)[0]
        tile: np.ndarray = decoded.reshape(*self.tile, self.samples)
        if key is not None:
            TILE_CACHE.put(key, tile, tile.nbytes)
        return tile

    def close(self) -> None:
        os.close(self.fd)
        self.tif.close()


def _open_level(ref: SourceRef) -> Any:
    """This thread's view of ``ref``'s level, opened once and kept (a few files per thread): a
    :class:`_TiledLevel` where the level is one tiled page, else tifffile's Zarr view."""
    cache: OrderedDict[tuple[str, int, int, bool], Any] | None = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = OrderedDict()
    key = (ref.path, ref.series, ref.level, ref.cache_tiles)
    if key in cache:
        cache.move_to_end(key)
        return cache[key][1]
    name = None
    if ref.cache_tiles:
        stat = os.stat(ref.path)  # a file rewritten at the same path must not meet its old tiles
        name = (*key, stat.st_mtime_ns, stat.st_size)
    tif = tifffile.TiffFile(ref.path)
    try:
        page = _TiledLevel.of(tif, ref)
    except BaseException:
        tif.close()
        raise
    if page is not None:
        level = _TiledLevel(tif, page, ref.path, name)
        cache[key] = (level, level)
    else:
        tif.close()
        store = tifffile.imread(ref.path, aszarr=True, series=ref.series, level=ref.level)
        if name is not None:
            store = _DecodedTiles(store, name)
        cache[key] = (store, zarr.open_array(store, mode="r"))
    while len(cache) > _OPEN_LIMIT:
        old_store, _ = cache.popitem(last=False)[1]
        old_store.close()
    return cache[key][1]


def read_window(ref: SourceRef, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels of ``box = (y0, y1, x0, x1)`` as a ``(C, y1 - y0, x1 - x0)`` array of the file's dtype.

    Decodes only the tiles or strips that overlap the box. A tile that cannot be decoded raises
    SourceError naming the file and the window.
    """
    return _read(ref, box)[: ref.channels]


def read_masked(ref: SourceRef, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`read_window`, and where the source has data: ``(Y, X)`` bool, or None if everywhere.

    No data means alpha 0, 0 in a GDAL internal mask, every channel equal to GDAL_NODATA, or a
    non-finite value (NaN, infinity) in any channel of a float image, which is returned as 0.
    """
    data = _read(ref, box)
    valid = None
    if ref.alpha:
        valid = data[ref.channels] != 0
    if ref.mask_series is not None:
        mask_ref = SourceRef(ref.path, ref.mask_series, ref.level, "YX", None, 1)
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


def _read(ref: SourceRef, box: tuple[int, int, int, int]) -> np.ndarray:
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
        data = np.asarray(_open_level(ref)[tuple(index)])
    except Exception as err:  # any codec or I/O failure in this window: report it with its place
        raise SourceError(
            f"{ref.path}: cannot read pixels of level {ref.level} at rows {y0}-{y1}, columns {x0}-{x1}: {one_line(err)}"
        ) from err
    kept = [a for a in ref.axes if a in SPATIAL or a == ref.channel_axis]
    if ref.channel_axis is None:
        return data[np.newaxis] if kept == ["Y", "X"] else data.T[np.newaxis]
    return np.transpose(data, [kept.index(ref.channel_axis), kept.index("Y"), kept.index("X")])
