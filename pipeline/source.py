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
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import tifffile
import zarr

from pipeline.errors import SourceError

SPATIAL = "YX"
CHANNEL_AXES = "SC"
_ALPHA = {tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA}


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
    crs: str | None
    """``"EPSG:<code>"`` for a GeoTIFF, else None."""
    pixel_size: tuple[float, float] | None
    """GeoTIFF pixel size ``(x, y)`` in CRS units at the chosen level."""

    @property
    def path(self) -> str:
        return self.ref.path


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
    except (tifffile.TiffFileError, ValueError, KeyError, IndexError, OSError, struct_error()) as err:
        raise SourceError(f"{path}: not a readable TIFF ({one_line(err)})") from err


def struct_error() -> type[Exception]:
    import struct

    return struct.error


def _check_file(path: str) -> int:
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file")
    if os.path.isdir(path):
        raise SourceError(f"{path}: is a directory, not a TIFF file")
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
    mpp0 = _microns_per_pixel(tif, chosen.levels[0].keyframe)
    crs, pixel0 = _georeference(tif)
    return SourceInfo(
        ref=SourceRef(
            path=path,
            series=series,
            level=level,
            axes=axes,
            channel_axis=channel_axes[0] if channel_axes else None,
            channels=channels,
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
        crs=crs,
        pixel_size=None if pixel0 is None else (pixel0[0] * downsample, pixel0[1] * downsample),
    )


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


_UNIT_TO_MICRONS = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _microns_per_pixel(tif: tifffile.TiffFile, page: Any) -> float | None:
    """Level-0 micrometres per pixel from SVS, OME or TIFF resolution tags, else None."""
    if tif.is_svs:
        match = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", str(tif.pages[0].description))
        return float(match.group(1)) if match else None
    if tif.is_ome and tif.ome_metadata:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        if not match:
            return None
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        return float(match.group(1)) * _UNIT_TO_MICRONS.get(unit.group(1) if unit else "µm", 1.0)
    if tif.is_geotiff:
        return None
    unit = page.tags.get("ResolutionUnit")
    res = page.tags.get("XResolution")
    if unit is None or res is None:
        return None
    numerator, denominator = res.value
    if not numerator or not denominator:
        return None
    per_unit = {tifffile.RESUNIT.CENTIMETER: 1e4, tifffile.RESUNIT.INCH: 25400.0}.get(unit.value)
    return None if per_unit is None else per_unit * denominator / numerator


def _georeference(tif: tifffile.TiffFile) -> tuple[str | None, tuple[float, float] | None]:
    """``("EPSG:<code>", (pixel width, pixel height))`` at level 0, or Nones."""
    if not tif.is_geotiff:
        return None, None
    meta = tif.geotiff_metadata or {}
    code = meta.get("ProjectedCSTypeGeoKey") or meta.get("GeographicTypeGeoKey")
    crs = f"EPSG:{int(code)}" if code is not None and 0 < int(code) < 32767 else None
    scale = meta.get("ModelPixelScale")
    if scale:
        return crs, (float(scale[0]), float(scale[1]))
    matrix = meta.get("ModelTransformation")
    if matrix:
        return crs, (math.hypot(matrix[0][0], matrix[1][0]), math.hypot(matrix[0][1], matrix[1][1]))
    return crs, None


def one_line(err: BaseException) -> str:
    """An exception as one line: its message with newlines folded, or its type if it has none."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


# --- reading pixels -------------------------------------------------------------------------------

_OPEN_LIMIT = 8
_local = threading.local()


def _open_level(ref: SourceRef) -> Any:
    """This thread's zarr view of ``ref``'s level, opened once and kept (a few files per thread)."""
    cache: OrderedDict[tuple[str, int, int], Any] | None = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = OrderedDict()
    key = (ref.path, ref.series, ref.level)
    if key in cache:
        cache.move_to_end(key)
        return cache[key][1]
    store = tifffile.imread(ref.path, aszarr=True, series=ref.series, level=ref.level)
    array = zarr.open_array(store, mode="r")
    cache[key] = (store, array)
    while len(cache) > _OPEN_LIMIT:
        old_store, _ = cache.popitem(last=False)[1]
        old_store.close()
    return array


def read_window(ref: SourceRef, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels of ``box = (y0, y1, x0, x1)`` as a ``(C, y1 - y0, x1 - x0)`` array of the file's dtype.

    Decodes only the tiles or strips that overlap the box. A tile that cannot be decoded raises
    SourceError naming the file and the window.
    """
    y0, y1, x0, x1 = box
    index: list[int | slice] = []
    for axis in ref.axes:
        if axis == "Y":
            index.append(slice(y0, y1))
        elif axis == "X":
            index.append(slice(x0, x1))
        elif axis == ref.channel_axis:
            index.append(slice(0, ref.channels))
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


# --- describing a file ----------------------------------------------------------------------------


def describe_file(path: str | os.PathLike[str]) -> list[str]:
    """Lines for ``fcnpipe inspect``: every series with its levels, dtype, compression and resolution.

    Reads the directory only. A series that cannot be used says why instead of failing the rest.
    """
    first = open_source(path)
    lines = [f"{first.path}: {first.file_size:,} bytes, {first.series_count} series"]
    for index in range(first.series_count):
        name = first.series_names[index]
        try:
            info = first if index == 0 else open_source(path, series=index)
        except SourceError as err:
            lines.append(f"series {index} ({name}): not usable: {str(err).removeprefix(f'{first.path}: ')}")
            continue
        lines.extend(_describe_series(index, name, info))
    return lines


def _describe_series(index: int, name: str, info: SourceInfo) -> list[str]:
    channels = info.shape[0]
    notes = []
    if info.alpha_dropped:
        notes.append("alpha band dropped")
    if info.other_axes:
        notes.append(f"axes {info.other_axes} read at index 0")
    chunk = "x".join(map(str, info.chunk_shape))
    lines = [
        f"series {index} ({name}): axes {info.ref.axes}, {channels} channels, {info.dtype}, "
        f"{info.compression}, {'tiles' if info.tiled else 'strips'} {chunk}"
        + (f" ({'; '.join(notes)})" if notes else "")
    ]
    for number, level in enumerate(info.levels):
        height, width = level.shape
        lines.append(f"  level {number}: {height} x {width} px (downsample {level.downsample:g})")
    if info.mpp is not None:
        lines.append(f"  resolution: {info.mpp:g} micrometres per pixel at level 0")
    elif info.crs is not None or info.pixel_size is not None:
        size = "unknown" if info.pixel_size is None else f"{info.pixel_size[0]:g} x {info.pixel_size[1]:g}"
        lines.append(f"  georeference: {info.crs or 'unknown CRS'}, pixel size {size} CRS units")
    else:
        lines.append("  resolution: not recorded in the file")
    return lines
