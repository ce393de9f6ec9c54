"""Open a TIFF lazily: what it holds, before any pixel is read.

:func:`open_source` parses only the file's directory (IFDs and tags), never pixel data, and
returns a :class:`SourceInfo` with everything a run or ``fcnpipe inspect`` needs: the level's
shape, channels and dtype, its pyramid, its pixel size (SVS, OME, resolution tags) or its GeoTIFF
georeference, and where it says it holds no data (alpha, GDAL_NODATA, a GDAL internal mask).
Malformed metadata is warned about and ignored; a file that cannot be read fails here, naming
itself, so that a run fails before it starts. Pixels are read by :mod:`pipeline.source.pixels`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import tifffile

from pipeline import remote
from pipeline.errors import SourceError, warn
from pipeline.source.georef import Georeference, from_geokeys, ome_mpp, resolution_mpp, svs_mpp
from pipeline.source.pixels import SPATIAL, SourceRef, layout_problem, one_line

CHANNEL_AXES = "SC"
ASSOCIATED = frozenset({"thumbnail", "label", "macro", "map"})
"""Names (lower case) that SVS and NDPI files give the images beside the slide."""
_ALPHA = {tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA}
GDAL_NODATA = 42113


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
    crs_units: str | None = None
    """Unit of the CRS axes and of :attr:`pixel_size` (``"metre"``, ``"degree"``), from the GeoKeys;
    None when they do not say."""
    file_format: str = "TIFF"
    """What kind of TIFF: ``"Aperio SVS"``, ``"Hamamatsu NDPI"``, ``"OME-TIFF"``, ``"GeoTIFF"``, ...,
    with ``" (BigTIFF)"`` when it is one."""

    @property
    def path(self) -> str:
        return self.ref.path

    @property
    def name(self) -> str:
        """What the chosen series is: ``"baseline"``, ``"label"``, ``"macro"``, ``"mask"``, ..."""
        return self.series_names[self.ref.series]

    @property
    def associated(self) -> bool:
        """A slide's label, macro, thumbnail or map: a picture beside the slide, not a level of it."""
        return self.name in ASSOCIATED

    @property
    def crs(self) -> str | None:
        return None if self.georeference is None else self.georeference.crs

    @property
    def pixel_size(self) -> tuple[float, float] | None:
        """Pixel ``(width, height)`` in CRS units at the chosen level, for a GeoTIFF."""
        return None if self.georeference is None else self.georeference.pixel_size


def open_source(
    path: str | os.PathLike[str], series: int = 0, level: int = 0, storage: dict[str, Any] | None = None
) -> SourceInfo:
    """Parse a TIFF's structure and choose one series and pyramid level; read no pixel data.

    ``path`` is a file or a URL (:mod:`pipeline.remote`; ``storage``: its fsspec options, None for
    those :func:`pipeline.remote.configure` set). Raises SourceError naming the file for: missing,
    empty, not a TIFF, truncated (tile or strip data past the end of the file), an unknown series or
    level, a layout tifffile cannot decode, or a URL that cannot be reached.
    """
    path = os.fspath(path)
    if remote.is_url(path):
        options = remote.configured() if storage is None else storage
        file_size = _check_file(path, options)
        opened: Any = remote.open_file(path, options, file_size)
    else:
        options, file_size, opened = {}, _check_file(path), path
    try:
        with tifffile.TiffFile(opened, name=remote.redact(path)) as tif:
            info = _describe(tif, path, file_size, series, level)
    except SourceError as err:
        if remote.redact(path) != path:  # a URL's credentials or signature never reach a message
            raise SourceError(str(err).replace(path, remote.redact(path))) from err
        raise
    except Exception as err:  # tifffile meets malformed files with errors of every kind
        if remote.is_url(path) and not isinstance(err, ValueError | tifffile.TiffFileError | KeyError | IndexError):
            raise remote.remote_error(path, err) from err
        raise SourceError(f"{remote.redact(path)}: not a readable TIFF ({one_line(err)})") from err
    finally:
        if opened is not path:
            opened.close()
    if options:
        info = replace(info, ref=replace(info.ref, storage=tuple(sorted(options.items()))))
    return info


def _check_file(path: str, options: dict[str, Any] | None = None) -> int:
    """The size of a file or URL (``options``: its fsspec options) that starts as a TIFF does."""
    if remote.is_url(path):
        size = int(remote.info(path, options)["size"])
        magic = remote.read_ranges(path, [(0, 4)], options)[0] if size else b""
    else:
        if not os.path.exists(path):
            raise SourceError(f"{path}: no such file")
        if os.path.isdir(path):
            raise SourceError(f"{path}: is a directory, not a TIFF file (fcnpipe batch takes a folder of inputs)")
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            magic = fh.read(4)
    if size == 0:
        raise SourceError(f"{remote.redact(path)}: file is empty (0 bytes)")
    if magic[:2] not in (b"II", b"MM") or magic[2:4] not in (b"*\x00", b"\x00*", b"+\x00", b"\x00+"):
        raise SourceError(f"{remote.redact(path)}: not a TIFF file (starts with {magic!r})")
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
    problem = layout_problem(lvl)
    if problem is not None:
        raise SourceError(f"{path}: series {series} level {level} cannot be read window by window: {problem}")

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
    mpp0 = None if tif.is_svs and series else _microns_per_pixel(tif, chosen.levels[0].keyframe, path)
    georeference, units = None, None
    if tif.is_geotiff:  # the GeoKeys are those of the first image; another series is an overview of it
        image = tif.series[0].levels[0]
        shape0 = (image.shape[image.axes.index("Y")], image.shape[image.axes.index("X")])
        georeference = _georeference(tif, path, shape0)
        if georeference is not None:
            georeference = georeference.scaled(shape0[1] / width, shape0[0] / height)
            units = crs_units(tif.geotiff_metadata or {})
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
        series_names=tuple(_series_name(s, i) for i, s in enumerate(tif.series)),
        levels=levels,
        compression=page.compression.name,
        chunk_shape=(page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, page.imagewidth),
        tiled=bool(page.is_tiled),
        alpha_dropped=alpha,
        other_axes=other,
        mpp=None if mpp0 is None else mpp0 * downsample,
        georeference=georeference,
        crs_units=units,
        file_format=_file_format(tif),
    )


def _series_name(series: Any, index: int) -> str:
    """``"mask"`` (a GDAL internal mask), a slide's ``"baseline"``, ``"label"``, ..., an OME image's
    own name, ``"image"`` for the first series and ``"overview"`` for a reduced-resolution one."""
    name = (series.name or "").strip()
    if series.keyframe.photometric == tifffile.PHOTOMETRIC.MASK:
        return "mask"
    if name.lower() in {"baseline", *ASSOCIATED}:
        return name.lower()
    if name or index == 0:
        return name or "image"
    return "overview" if series.keyframe.subfiletype & tifffile.FILETYPE.REDUCEDIMAGE else f"image {index}"


def _file_format(tif: tifffile.TiffFile) -> str:
    kinds = {"svs": "Aperio SVS", "ndpi": "Hamamatsu NDPI", "ome": "OME-TIFF", "scanimage": "ScanImage TIFF"}
    kind = next((text for flag, text in kinds.items() if getattr(tif, f"is_{flag}")), None)
    kind = kind or ("GeoTIFF" if tif.is_geotiff else "TIFF")
    return f"{kind} (BigTIFF)" if tif.is_bigtiff else kind


_LINEAR_UNITS = {9001: "metre", 9002: "foot", 9003: "US survey foot", 9030: "nautical mile", 9036: "kilometre"}
_ANGULAR_UNITS = {9101: "radian", 9102: "degree", 9103: "arc-minute", 9104: "arc-second", 9105: "grad"}


def crs_units(meta: dict[str, Any]) -> str | None:
    """The unit of a GeoTIFF's CRS axes from its GeoKeys (EPSG unit codes), or None if unknown.

    A projected CRS says it in ProjLinearUnitsGeoKey (UTM zones, without it, are in metres); a
    geographic one in GeogAngularUnitsGeoKey (degrees when it is left out); geocentric is in metres.

    >>> crs_units({"GTModelTypeGeoKey": 1, "ProjectedCSTypeGeoKey": 32618, "ProjLinearUnitsGeoKey": 9001})
    'metre'
    >>> crs_units({"GTModelTypeGeoKey": 2, "GeographicTypeGeoKey": 4326})
    'degree'
    """

    def code(key: str) -> int | None:
        try:
            return None if meta.get(key) is None else int(meta[key])
        except (TypeError, ValueError):
            return None

    model, projected, linear = code("GTModelTypeGeoKey"), code("ProjectedCSTypeGeoKey"), code("ProjLinearUnitsGeoKey")
    if model == 3:
        return "metre"
    if model == 2 or (model is None and projected is None and code("GeographicTypeGeoKey") is not None):
        angular = code("GeogAngularUnitsGeoKey") or 9102
        return _ANGULAR_UNITS.get(angular, f"EPSG unit {angular}")
    if linear is not None:
        return _LINEAR_UNITS.get(linear, f"EPSG unit {linear}")
    utm = projected is not None and (32601 <= projected <= 32660 or 32701 <= projected <= 32760)
    return "metre" if utm or projected == 3857 else None


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
