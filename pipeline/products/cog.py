"""A finished store as a Cloud-Optimized GeoTIFF, for GIS (rasterio / GDAL).

Level 0 goes into a tiled GeoTIFF with the store's CRS and transform, block by block; then GDAL's
COG driver adds the internal overviews (``average`` for probabilities, ``nearest`` for labels) and
lays the file out for HTTP range reads. GDAL's overview pass adds its block cache
(``GDAL_CACHEMAX``) and a buffer that grows with the image width to the memory used.

What GIS tools read besides the pixels: probability bands are grey (``PHOTOMETRIC=MINISBLACK``:
three uint8 bands would otherwise be taken for an RGB photo) and named after their classes; no
data is GDAL's nodata value; labels carry the class colour table, and their class names as GDAL
category names and a raster attribute table in the ``.aux.xml`` sidecar, where the GTiff driver
keeps them (QGIS and ArcGIS legends read them there). A slide's resolution tags are rewritten after
GDAL, exactly (:func:`pipeline.source.writer.overwrite_resolution`).

This module owns rasterio, imported only when a COG is written (it loads GDAL, which nothing
else needs).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, OutputError
from pipeline.products.view import (
    SIDECAR,
    TIFF_TILE,
    StoreView,
    check_output_file,
    convert,
    open_finished,
    pixels_per_cm,
    select_classes,
    staged,
    target_dtype,
    windows,
)
from pipeline.source.writer import overwrite_resolution
from pipeline.store.layout import NODATA_LABEL, NODATA_UINT8, UINT8_SCALE, nodata_value

_KEY_VALUE = re.compile(r"([A-Za-z][A-Za-z0-9_]*)=(.+)")


def _rasterio() -> Any:
    try:
        import rasterio
        import rasterio.crs
        import rasterio.enums
        import rasterio.errors
        import rasterio.io
        import rasterio.shutil
        import rasterio.transform
        import rasterio.windows
    except ImportError as err:
        raise OutputError(f"writing a COG needs rasterio: pip install 'rasterio>=1.4' ({err})") from err
    return rasterio


def parse_creation_options(items: Sequence[str]) -> dict[str, str]:
    """GDAL creation options for the COG driver from ``KEY=VALUE`` strings, keys upper-cased.

    >>> parse_creation_options(["compress=zstd", "LEVEL=9"])
    {'COMPRESS': 'zstd', 'LEVEL': '9'}
    >>> parse_creation_options(["zstd"])
    Traceback (most recent call last):
    ...
    pipeline.errors.ConfigError: Expected KEY=VALUE for a GDAL creation option. Got 'zstd' instead.
    """
    options: dict[str, str] = {}
    for item in items:
        match = _KEY_VALUE.fullmatch(item.strip())
        if match is None:
            raise ConfigError(f"Expected KEY=VALUE for a GDAL creation option. Got {item!r} instead.")
        options[match.group(1).upper()] = match.group(2)
    return options


def parse_nodata(view: StoreView, dtype: str, value: float | None) -> float | int:
    """The nodata value to write: the store's fill value (255, NaN), or ``value`` if it cannot be
    taken for data: not a class index for labels, not a probability in [0, 1] for float32.

    uint8 probabilities use every value up to 254, so their nodata stays 255.
    """
    default = NODATA_LABEL if view.what == "labels" else nodata_value(dtype)
    value = None if value is None else float(value)
    if value is None or (math.isnan(value) and dtype == "float32" and view.what == "probabilities"):
        return default
    if view.what == "labels":
        lowest = len(view.class_names)
        if not (value.is_integer() and lowest <= value <= 255):
            raise ConfigError(
                f"Expected an integer from {lowest} to 255 (not a class index) for the nodata of labels. "
                f"Got {value:g} instead."
            )
        return int(value)
    if dtype == "uint8":
        if value != NODATA_UINT8:
            raise ConfigError(
                f"uint8 probabilities use every value from 0 to {UINT8_SCALE}, so their nodata is 255. "
                f"Got {value:g} instead; export float32 for another nodata value"
            )
        return default
    if 0.0 <= value <= 1.0 or math.isinf(value):
        raise ConfigError(
            f"Expected NaN or a finite number outside [0, 1] for the nodata of probabilities. Got {value:g} instead."
        )
    return float(np.float32(value))


@contextmanager
def _gdal_complaints() -> Iterator[list[str]]:
    """The warnings GDAL logs through rasterio while the block runs (an unknown creation option is one)."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(re.sub(r"^CPLE_\w+ in ", "", " ".join(record.getMessage().split())))

    logger = logging.getLogger("rasterio._env")
    handler = Collect(logging.WARNING)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # heard whatever the root logger's level
    logger.propagate = False  # the complaint reaches the user once, as the error that quotes it
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _check_creation_options(options: dict[str, str], dtype: str, count: int) -> None:
    """Let GDAL judge ``options`` on a 32 x 32 image of the export's dtype and bands, in memory, before
    the export starts: GDAL only warns about an unknown option or value, and this refuses it."""
    rasterio = _rasterio()
    from rasterio._err import CPLE_BaseError

    shown = " ".join(f"{k}={v}" for k, v in options.items())
    profile = {"driver": "GTiff", "width": 32, "height": 32, "count": count, "dtype": dtype}
    with rasterio.io.MemoryFile() as memory, _gdal_complaints() as complaints:
        try:
            with memory.open(**profile) as small:
                small.write(np.zeros((count, 32, 32), dtype))
                rasterio.shutil.copy(small, "/vsimem/fcnpipe-check.tif", driver="COG", **options)
            rasterio.shutil.delete("/vsimem/fcnpipe-check.tif")
        except (rasterio.errors.RasterioError, CPLE_BaseError) as err:
            raise ConfigError(f"GDAL creation options {shown}: {' '.join(str(err).split())}") from err
    relevant = [c for c in complaints if "creation option" in c or "not recognised" in c]
    if relevant:
        raise ConfigError(f"GDAL creation options {shown}: {relevant[0]}")


def _block_side(chunks: tuple[int, ...]) -> int:
    """The store's chunk side when GDAL can tile with it (a multiple of 16), else :data:`TIFF_TILE`.

    Blocks equal to chunks mean each chunk is decoded once and each block written once.
    """
    side = min(chunks[-2:])
    return side if side % 16 == 0 and side <= 4096 else TIFF_TILE


def _gtiff_profile(view: StoreView, dtype: str, side: int, nodata: float) -> dict[str, Any]:
    rasterio = _rasterio()
    level0 = view.levels[0]
    height, width = level0.shape[-2:]
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "dtype": dtype,
        "count": len(view.bands) if view.what == "probabilities" else 1,
        "tiled": True,
        "blockxsize": side,
        "blockysize": side,
        "compress": "DEFLATE",
        "zlevel": 1,
        "bigtiff": "IF_SAFER",
        "nodata": nodata,
    }
    if view.what == "probabilities":  # grey bands, never RGB(A): the COG driver copies this
        profile["photometric"] = "MINISBLACK"
    if view.crs is not None:
        profile["crs"] = rasterio.crs.CRS.from_user_input(view.crs)
    if view.transform is not None:
        profile["transform"] = rasterio.transform.Affine(*view.transform)
    return profile


def _describe_bands(dst: Any, view: StoreView, dtype: str, nodata: float) -> None:
    """Band names, the class colour table of labels, the 1/254 scale of uint8 probabilities, tags."""
    rasterio = _rasterio()
    tags = {**view.provenance, "FCNPIPE_CLASSES": json.dumps(list(view.class_names))}
    if view.mpp is not None:  # TIFF resolution in pixels per centimetre, as slide readers expect
        per_cm = repr(1e4 / view.mpp)  # rounded by libtiff; made exact once GDAL is done
        tags.update(TIFFTAG_XRESOLUTION=per_cm, TIFFTAG_YRESOLUTION=per_cm)
        tags.update(TIFFTAG_RESOLUTIONUNIT="3", FCNPIPE_MPP=repr(view.mpp))
    dst.update_tags(**tags)
    if view.what == "labels":
        dst.set_band_description(1, "class")
        colormap = {i: (*color, 255) for i, color in enumerate(view.class_colors)}
        dst.write_colormap(1, {**colormap, int(nodata): (0, 0, 0, 0)})
        return
    dst.colorinterp = [rasterio.enums.ColorInterp.gray] + [rasterio.enums.ColorInterp.undefined] * (dst.count - 1)
    for band, name in enumerate(view.band_names, start=1):
        dst.set_band_description(band, name)
    if dtype == "uint8":  # GDAL's unscaled value is then the probability itself
        dst.scales = (1 / UINT8_SCALE,) * dst.count
        dst.offsets = (0.0,) * dst.count


def _write_gtiff(view: StoreView, path: str, dtype: str, nodata: float) -> None:
    """Level 0 into a tiled GeoTIFF at ``path``, one block-sized window at a time; no data as ``nodata``."""
    rasterio = _rasterio()
    level0 = view.levels[0]
    side = _block_side(level0.chunks)
    height, width = level0.shape[-2:]
    default = NODATA_LABEL if view.what == "labels" else nodata_value(dtype)
    bands = list(view.bands)
    with rasterio.open(path, "w", **_gtiff_profile(view, dtype, side, nodata)) as dst:
        _describe_bands(dst, view, dtype, nodata)
        for y0, y1, x0, x1 in windows(height, width, side):
            window = rasterio.windows.Window(x0, y0, x1 - x0, y1 - y0)
            if view.what == "labels":
                block = np.asarray(level0[y0:y1, x0:x1])[np.newaxis]
            else:
                block = convert(np.asarray(level0[:, y0:y1, x0:x1])[bands], dtype)
            if not (nodata == default or (math.isnan(nodata) and math.isnan(default))):
                block = np.where(np.isnan(block) if dtype == "float32" else block == default, nodata, block)
                block = block.astype(dtype, copy=False)
            dst.write(block, window=window)


def _sidecar(view: StoreView) -> str:
    """GDAL's PAM XML for labels: the class names as category names (value = index) and a thematic
    raster attribute table of value, class name and R, G, B, A."""
    dataset = ET.Element("PAMDataset")
    band = ET.SubElement(dataset, "PAMRasterBand", band="1")
    categories = ET.SubElement(band, "CategoryNames")
    for name in view.class_names:
        ET.SubElement(categories, "Category").text = name
    table = ET.SubElement(band, "GDALRasterAttributeTable", tableType="thematic")
    # GDAL's field types (0 integer, 2 string) and usages (5 min-max, 2 name, 6-9 red ... alpha)
    fields = [("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8), ("Alpha", 0, 9)]
    for index, (name, kind, usage) in enumerate(fields):
        field = ET.SubElement(table, "FieldDefn", index=str(index))
        for tag, text in (("Name", name), ("Type", str(kind)), ("Usage", str(usage))):
            ET.SubElement(field, tag).text = text
    for value, (name, color) in enumerate(zip(view.class_names, view.class_colors, strict=True)):
        row = ET.SubElement(table, "Row", index=str(value))
        for text in (str(value), name, *(str(c) for c in color), "255"):
            ET.SubElement(row, "F").text = text
    ET.indent(dataset)
    return ET.tostring(dataset, encoding="unicode") + "\n"


def export_cog(
    store: str,
    out_tif: str,
    *,
    what: str = "probabilities",
    dtype: str | None = None,
    overwrite: bool = False,
    creation_options: Sequence[str] = (),
    nodata: float | None = None,
    classes: Sequence[str] | None = None,
) -> None:
    """Write level 0 of ``store`` as a Cloud-Optimized GeoTIFF with internal overviews at ``out_tif``.

    Probabilities: one grey band per class (or per class of ``classes``, in that order), named after
    it, float32 ``p`` (nodata NaN) or uint8 ``round(p * 254)`` (band scale 1/254, nodata 255);
    ``dtype=None`` keeps the stored dtype (float16 becomes float32). Labels: one uint8 band with the
    class colour table, nodata 255, and ``out_tif.aux.xml`` naming the classes. ``nodata`` replaces
    the nodata value (:func:`parse_nodata`); ``creation_options`` (``KEY=VALUE``) are GDAL's COG
    creation options, over fcnpipe's (DEFLATE, 512 px blocks). The store's CRS and transform (pixel
    corners, CRS units) are kept; a slide's micrometres per pixel go into the TIFF resolution tags.
    """
    check_output_file(out_tif, overwrite)
    view = select_classes(open_finished(store, what), classes)
    dtype = target_dtype(view, dtype)
    written_nodata = parse_nodata(view, dtype, nodata)
    options: dict[str, Any] = {"COMPRESS": "DEFLATE", "BLOCKSIZE": TIFF_TILE, "BIGTIFF": "IF_SAFER"}
    options["OVERVIEW_RESAMPLING"] = "AVERAGE" if what == "probabilities" else "NEAREST"
    if dtype == "float32":
        options["PREDICTOR"] = "YES"  # floating-point predictor: about 20 % smaller
    asked = parse_creation_options(creation_options)
    if asked:
        _check_creation_options(asked, dtype, len(view.bands) if what == "probabilities" else 1)
    options.update(asked)
    rasterio = _rasterio()
    from rasterio._err import CPLE_BaseError

    with staged(out_tif) as folder, warnings.catch_warnings():
        # A slide has no georeference, and that is fine: say nothing about it.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        tiled, cog = os.path.join(folder, "level0.tif"), os.path.join(folder, "done.tif")
        try:
            _write_gtiff(view, tiled, dtype, written_nodata)
            rasterio.shutil.copy(tiled, cog, driver="COG", **options)
            if view.mpp is not None:
                overwrite_resolution(cog, pixels_per_cm(view.mpp))
            if view.what == "labels":
                with open(cog + SIDECAR, "w", encoding="utf-8") as sidecar:
                    sidecar.write(_sidecar(view))
        except (rasterio.errors.RasterioError, CPLE_BaseError, OSError, ValueError) as err:
            raise OutputError(f"{out_tif}: cannot write the COG ({' '.join(str(err).split())})") from err
