"""Export a finished store to one TIFF: a Cloud-Optimized GeoTIFF for GIS, an OME-TIFF for slide viewers.

The store is read and written a tile at a time, never whole; for a COG, GDAL's overview pass adds
its block cache (``GDAL_CACHEMAX``) and a buffer that grows with the image width. Either output
is first written into a temporary folder next to the target and moved into place only when
complete, so a failed or interrupted export never leaves a file that looks finished, and the
temporary folder is removed either way.

* :func:`export_cog` (rasterio / GDAL): level 0 into a tiled GeoTIFF with the store's CRS and
  transform, then GDAL's COG driver adds the internal overviews (``average`` for probabilities,
  ``nearest`` for labels) and lays the file out for HTTP range reads.
* :func:`export_ome_tiff` (tifffile): the store's own pyramid as SubIFDs of one OME-TIFF, one page
  per class, with the class names and the micrometres per pixel in the OME-XML (QuPath, napari).

rasterio is imported only when a COG is written (it loads GDAL, which nothing else needs).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import tifffile
import zarr

from pipeline import __version__
from pipeline.errors import ConfigError, OutputError
from pipeline.store.arrays import LABEL_GROUP, NODATA_LABEL, UINT8_SCALE, is_nodata, is_store, nodata_value, quantize
from pipeline.store.ome import read_record

KINDS = ("cog", "ome-tiff")
WHATS = ("probabilities", "labels")
DTYPES = ("uint8", "float32")
TIFF_TILE = 512
"""Tile side of the OME-TIFF and block side of the COG, in pixels: what viewers and GDAL read best."""
_BIGTIFF_FROM = 2**31
"""Uncompressed bytes from which the OME-TIFF is a BigTIFF (half the classic 4 GiB limit)."""


@dataclass(frozen=True, slots=True)
class StoreView:
    """A complete store opened for reading: the arrays of one kind and what describes them."""

    path: str
    what: str
    """``probabilities`` or ``labels``."""
    levels: tuple[Any, ...]
    """zarr arrays of level 0, 1, ...: ``(C, Y, X)`` probabilities or ``(Y, X)`` uint8 labels."""
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    mpp: float | None
    """Micrometres per pixel at level 0, for a slide."""
    crs: str | None
    """``"EPSG:<code>"`` for a GeoTIFF input."""
    transform: tuple[float, float, float, float, float, float] | None
    """GDAL affine of level 0 (pixel corners), in CRS units."""
    provenance: dict[str, str]
    """Short ``FCNPIPE_*`` tags naming the store, version and model."""


def parse_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a :class:`ConfigError` listing them."""
    if value not in choices:
        raise ConfigError(f"Expected one of {', '.join(choices)} for {name}. Got {value!r} instead.")
    return value


def open_finished(store: str, what: str) -> StoreView:
    """Open the store written by ``fcnpipe run`` at ``store``; refuse one without ``complete: true``."""
    parse_choice(what, "what", WHATS)
    if not is_store(store):
        raise OutputError(f"{store}: not a Zarr store (no .zgroup or zarr.json)")
    record = read_record(store)
    if record is None:
        raise OutputError(f"{store}: has no 'fcnpipe' attribute; it was not written by fcnpipe run")
    if record.get("complete") is not True:
        raise OutputError(f"{store}: is incomplete (the run did not finish); rerun it before exporting")
    levels = _levels(store, "" if what == "probabilities" else LABEL_GROUP)
    classes = record.get("model", {}).get("classes") or []
    spatial = record.get("spatial") or {}
    transform = spatial.get("transform")
    model_hash = str(record.get("model", {}).get("sha256", ""))
    return StoreView(
        path=store,
        what=what,
        levels=levels,
        class_names=tuple(str(c["name"]) for c in classes),
        class_colors=tuple((int(c["color"][0]), int(c["color"][1]), int(c["color"][2])) for c in classes),
        mpp=None if spatial.get("mpp") is None else float(spatial["mpp"]),
        crs=spatial.get("crs"),
        transform=None if transform is None else _affine(transform),
        provenance={
            "FCNPIPE_STORE": os.path.abspath(store),
            "FCNPIPE_VERSION": str(record.get("version", __version__)),
            "FCNPIPE_MODEL_SHA256": model_hash,
        },
    )


def _levels(store: str, node: str) -> tuple[Any, ...]:
    """The arrays ``0``, ``1``, ... of ``node`` ("" = root), in order, up to the first missing one."""
    group = zarr.open_group(store, mode="r")
    try:
        parent = group[node] if node else group
    except KeyError as err:
        raise OutputError(f"{store}: has no {node} group") from err
    names = set(parent.array_keys())
    levels: list[Any] = []
    while str(len(levels)) in names:
        levels.append(parent[str(len(levels))])
    if not levels:
        raise OutputError(f"{store}: has no level 0 in {node or 'its root'}")
    return tuple(levels)


def _affine(values: list[float]) -> tuple[float, float, float, float, float, float]:
    a, b, c, d, e, f = (float(v) for v in values[:6])
    return (a, b, c, d, e, f)


def target_dtype(view: StoreView, dtype: str | None) -> str:
    """The dtype written: labels stay uint8; probabilities as asked, else as stored (float16 -> float32).

    float16 is widened because neither OME-XML nor most GIS tools take half floats.
    """
    if view.what == "labels":
        if dtype not in (None, "uint8"):
            raise ConfigError(f"labels are uint8 class indices; --dtype {dtype} applies to probabilities only")
        return "uint8"
    if dtype is not None:
        return parse_choice(dtype, "dtype", DTYPES)
    stored = str(view.levels[0].dtype)
    return "float32" if stored == "float16" else stored


def convert(block: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as ``dtype``: probabilities ``p`` in [0, 1], or uint8 ``round(p * 254)``; no
    data (NaN, or 255 in uint8) stays no data.

    >>> convert(np.array([0.0, 0.5, 1.0, np.nan], np.float32), "uint8").tolist()
    [0, 127, 254, 255]
    >>> convert(np.array([0, 254, 255], np.uint8), "float32").tolist()
    [0.0, 1.0, nan]
    """
    empty = is_nodata(block)
    if block.dtype == np.uint8:
        if dtype == "uint8":
            return block
        out: np.ndarray = (block / np.float32(UINT8_SCALE)).astype(dtype)
    else:
        out = quantize(np.where(empty, 0.0, block), dtype)
    out[empty] = nodata_value(dtype)
    return out


def windows(height: int, width: int, side: int) -> Iterator[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of the ``side`` x ``side`` tiles of a grid, row band by row band.

    >>> list(windows(3, 5, 2))
    [(0, 2, 0, 2), (0, 2, 2, 4), (0, 2, 4, 5), (2, 3, 0, 2), (2, 3, 2, 4), (2, 3, 4, 5)]
    """
    for y0 in range(0, height, side):
        for x0 in range(0, width, side):
            yield y0, min(y0 + side, height), x0, min(x0 + side, width)


def check_output_file(path: str, overwrite: bool) -> None:
    """Refuse an existing file without ``overwrite``, and a folder even with it."""
    if os.path.isdir(path):
        raise OutputError(f"{path}: is a folder; the export is one TIFF file")
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")


@contextmanager
def _staging(path: str) -> Iterator[str]:
    """A temporary folder beside ``path``, always removed; its ``done.tif`` becomes ``path`` on success.

    Beside, so that the final move stays on one file system and is atomic.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        folder = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except OSError as err:
        raise OutputError(f"{path}: cannot write beside it ({err.strerror or err})") from err
    try:
        yield folder
        try:
            os.replace(os.path.join(folder, "done.tif"), path)
        except OSError as err:
            raise OutputError(f"{path}: cannot move the finished file into place ({err.strerror or err})") from err
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- Cloud-Optimized GeoTIFF (rasterio / GDAL) ----------------------------------------------------


def _rasterio() -> Any:
    try:
        import rasterio
        import rasterio.crs
        import rasterio.errors
        import rasterio.shutil
        import rasterio.transform
        import rasterio.windows
    except ImportError as err:
        raise OutputError(f"writing a COG needs rasterio: pip install 'rasterio>=1.4' ({err})") from err
    return rasterio


def _block_side(chunks: tuple[int, ...]) -> int:
    """The store's chunk side when GDAL can tile with it (a multiple of 16), else :data:`TIFF_TILE`.

    Blocks equal to chunks mean each chunk is decoded once and each block written once.
    """
    side = min(chunks[-2:])
    return side if side % 16 == 0 and side <= 4096 else TIFF_TILE


def _gtiff_profile(view: StoreView, dtype: str, side: int) -> dict[str, Any]:
    rasterio = _rasterio()
    level0 = view.levels[0]
    height, width = level0.shape[-2:]
    profile: dict[str, Any] = {
        "driver": "GTiff", "width": width, "height": height, "dtype": dtype,
        "count": level0.shape[0] if view.what == "probabilities" else 1,
        "tiled": True, "blockxsize": side, "blockysize": side,
        "compress": "DEFLATE", "zlevel": 1, "bigtiff": "IF_SAFER",
    }  # fmt: skip
    if view.crs is not None:
        profile["crs"] = rasterio.crs.CRS.from_user_input(view.crs)
    if view.transform is not None:
        profile["transform"] = rasterio.transform.Affine(*view.transform)
    profile["nodata"] = NODATA_LABEL if view.what == "labels" else nodata_value(dtype)
    return profile


def _describe_bands(dst: Any, view: StoreView, dtype: str) -> None:
    """Band names, the class colour table of labels, the 1/254 scale of uint8 probabilities, tags."""
    tags = {**view.provenance, "FCNPIPE_CLASSES": json.dumps(list(view.class_names))}
    if view.mpp is not None:  # TIFF resolution in pixels per centimetre, as slide readers expect
        tags.update(TIFFTAG_XRESOLUTION=f"{1e4 / view.mpp:.6f}", TIFFTAG_YRESOLUTION=f"{1e4 / view.mpp:.6f}")
        tags.update(TIFFTAG_RESOLUTIONUNIT="3", FCNPIPE_MPP=f"{view.mpp:g}")
    dst.update_tags(**tags)
    if view.what == "labels":
        dst.set_band_description(1, "argmax class index")
        colormap = {i: (*color, 255) for i, color in enumerate(view.class_colors)}
        dst.write_colormap(1, {**colormap, NODATA_LABEL: (0, 0, 0, 0)})
        return
    for band, name in enumerate(view.class_names, start=1):
        dst.set_band_description(band, name)
    if dtype == "uint8":  # GDAL's unscaled value is then the probability itself
        dst.scales = (1 / UINT8_SCALE,) * dst.count
        dst.offsets = (0.0,) * dst.count


def _write_gtiff(view: StoreView, path: str, dtype: str) -> None:
    """Level 0 into a tiled GeoTIFF at ``path``, one block-sized window at a time."""
    rasterio = _rasterio()
    level0 = view.levels[0]
    side = _block_side(level0.chunks)
    height, width = level0.shape[-2:]
    with rasterio.open(path, "w", **_gtiff_profile(view, dtype, side)) as dst:
        _describe_bands(dst, view, dtype)
        for y0, y1, x0, x1 in windows(height, width, side):
            window = rasterio.windows.Window(x0, y0, x1 - x0, y1 - y0)
            if view.what == "labels":
                dst.write(np.asarray(level0[y0:y1, x0:x1]), 1, window=window)
            else:
                dst.write(convert(np.asarray(level0[:, y0:y1, x0:x1]), dtype), window=window)


def export_cog(
    store: str, out_tif: str, *, what: str = "probabilities", dtype: str | None = None, overwrite: bool = False
) -> None:
    """Write level 0 of ``store`` as a Cloud-Optimized GeoTIFF with internal overviews at ``out_tif``.

    Probabilities: one band per class, named after it, float32 ``p`` (nodata NaN) or uint8
    ``round(p * 254)`` (band scale 1/254, nodata 255); ``dtype=None`` keeps the stored dtype (float16
    becomes float32). Labels: one uint8 band with the class colour table and nodata 255. The store's
    CRS and transform (pixel corners, CRS units) are kept; a slide's micrometres per pixel go into the
    TIFF resolution tags.
    """
    check_output_file(out_tif, overwrite)
    view = open_finished(store, what)
    dtype = target_dtype(view, dtype)
    rasterio = _rasterio()
    from rasterio._err import CPLE_BaseError

    options = {"compress": "DEFLATE", "blocksize": TIFF_TILE, "bigtiff": "IF_SAFER"}
    options["overview_resampling"] = "average" if what == "probabilities" else "nearest"
    if dtype == "float32":
        options["predictor"] = "YES"  # floating-point predictor: about 20 % smaller
    with _staging(out_tif) as folder, warnings.catch_warnings():
        # A slide has no georeference, and that is fine: say nothing about it.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        tiled, cog = os.path.join(folder, "level0.tif"), os.path.join(folder, "done.tif")
        try:
            _write_gtiff(view, tiled, dtype)
            rasterio.shutil.copy(tiled, cog, driver="COG", **options)
        except (rasterio.errors.RasterioError, CPLE_BaseError, OSError) as err:
            raise OutputError(f"{out_tif}: cannot write the COG ({' '.join(str(err).split())})") from err


# --- OME-TIFF pyramid (tifffile) ------------------------------------------------------------------


def _tiles(array: Any, dtype: str) -> Iterator[np.ndarray]:
    """``array``'s ``TIFF_TILE`` tiles in TIFF order: page (class) by page, then row-major.

    Each read decodes the ``(C, tile, tile)`` chunk for one class: C decodes per chunk, the price
    of OME-TIFF's one-page-per-channel layout without holding whole planes in memory.
    """
    height, width = array.shape[-2:]
    planes = [()] if array.ndim == 2 else [(c,) for c in range(array.shape[0])]
    for plane in planes:
        for y0, y1, x0, x1 in windows(height, width, TIFF_TILE):
            yield convert(np.asarray(array[(*plane, slice(y0, y1), slice(x0, x1))]), dtype)


def _ome_color(rgb: tuple[int, int, int]) -> int:
    """OME's signed 32-bit RGBA integer.

    >>> _ome_color((255, 0, 0))
    -16776961
    """
    value = (rgb[0] << 24) | (rgb[1] << 16) | (rgb[2] << 8) | 255
    return value - 2**32 if value >= 2**31 else value


def _ome_metadata(view: StoreView) -> dict[str, Any]:
    """tifffile's OME metadata: axes, channel names and colours, physical pixel size in µm."""
    metadata: dict[str, Any] = {"Name": os.path.basename(os.path.normpath(view.path))}
    if view.what == "labels":
        metadata.update(axes="YX", Channel={"Name": ["argmax"]})
    else:
        colors = [_ome_color(c) for c in view.class_colors]
        metadata.update(axes="CYX", Channel={"Name": list(view.class_names), "Color": colors})
    if view.mpp is not None:
        metadata.update(PhysicalSizeX=view.mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=view.mpp)
        metadata["PhysicalSizeYUnit"] = "µm"
    return metadata


def _write_ome(view: StoreView, path: str, dtype: str) -> None:
    levels = view.levels
    itemsize = np.dtype(dtype).itemsize
    total = sum(int(np.prod(level.shape)) * itemsize for level in levels)
    with tifffile.TiffWriter(path, bigtiff=total >= _BIGTIFF_FROM, ome=True) as tif:
        for index, level in enumerate(levels):
            options: dict[str, Any] = {
                "shape": level.shape, "dtype": dtype, "tile": (TIFF_TILE, TIFF_TILE),
                "compression": "zlib", "photometric": "minisblack",
            }  # fmt: skip
            if view.mpp is not None:  # pixels per centimetre
                per_cm = 1e4 / (view.mpp * 2**index)
                options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            if index == 0:
                tif.write(_tiles(level, dtype), subifds=len(levels) - 1, metadata=_ome_metadata(view), **options)
            else:
                tif.write(_tiles(level, dtype), subfiletype=1, **options)


def export_ome_tiff(
    store: str, out_tif: str, *, what: str = "probabilities", dtype: str | None = None, overwrite: bool = False
) -> None:
    """Write every level of ``store`` as one OME-TIFF pyramid at ``out_tif``.

    Level 0 is the main image (one page per class, ``(C, Y, X)``; labels ``(Y, X)``), the store's
    coarser levels its SubIFDs; tiles 512 x 512, zlib (lossless: JPEG would change probabilities and
    labels). ``dtype`` as for :func:`export_cog`. The OME-XML names the classes and, for a slide,
    gives ``PhysicalSizeX``/``Y`` in µm.
    """
    check_output_file(out_tif, overwrite)
    view = open_finished(store, what)
    dtype = target_dtype(view, dtype)
    with _staging(out_tif) as folder:
        try:
            _write_ome(view, os.path.join(folder, "done.tif"), dtype)
        except OSError as err:
            raise OutputError(f"{out_tif}: cannot write the OME-TIFF ({err.strerror or err})") from err


_OME_NAMES = (".ome.tif", ".ome.tiff", ".ome.btf")
_TIFF_NAMES = (".tif", ".tiff")


def kind_for(path: str, kind: str | None) -> str:
    """The kind of TIFF to write at ``path``: ``kind``, else what the name says (``.ome.tif`` an
    OME-TIFF, ``.tif`` a COG); a name that contradicts ``kind``, or says neither, is refused.

    >>> kind_for("a.ome.tiff", None), kind_for("a.TIF", None)
    ('ome-tiff', 'cog')
    >>> try:
    ...     kind_for("a.tif", "ome-tiff")
    ... except ConfigError as err:
    ...     print(str(err).split("; ")[1])
    use -o a.ome.tif, or --as cog
    """
    lower = os.path.basename(path).lower()
    named = "ome-tiff" if lower.endswith(_OME_NAMES) else "cog" if lower.endswith(_TIFF_NAMES) else None
    if kind is None:
        if named is None:
            raise ConfigError(
                f"{path}: fcnpipe export writes a TIFF: name it .tif for a Cloud-Optimized GeoTIFF (GIS) or "
                ".ome.tif for an OME-TIFF (slide viewers)"
            )
        return named
    parse_choice(kind, "--as", KINDS)
    stem = path[: len(path) - len(lower) + lower.index(".")] if "." in lower else path
    if kind == "ome-tiff" and named != "ome-tiff":
        raise ConfigError(
            f"{path}: --as ome-tiff writes an OME-TIFF, whose name ends in .ome.tif; use -o {stem}.ome.tif, or --as cog"
        )
    if kind == "cog" and named != "cog":
        raise ConfigError(f"{path}: --as cog writes a GeoTIFF, whose name ends in .tif; use -o {stem}.tif")
    return kind


def export_store(
    store: str,
    out_path: str,
    *,
    kind: str | None = None,
    what: str = "probabilities",
    dtype: str | None = None,
    overwrite: bool = False,
) -> None:
    """Export ``store`` as ``kind`` (``cog`` or ``ome-tiff``, by default what ``out_path``'s name
    says, :func:`kind_for`); see :func:`export_cog`, :func:`export_ome_tiff`."""
    check_output_file(out_path, overwrite)
    kind = kind_for(out_path, kind)  # what and dtype are checked by the exporter, before any write
    exporter = export_cog if kind == "cog" else export_ome_tiff
    exporter(store, out_path, what=what, dtype=dtype, overwrite=overwrite)
