"""A finished store as a Cloud-Optimized GeoTIFF, for GIS (rasterio / GDAL).

Level 0 goes into a tiled GeoTIFF with the store's CRS and transform, block by block; then GDAL's
COG driver adds the internal overviews (``average`` for probabilities, ``nearest`` for labels) and
lays the file out for HTTP range reads. GDAL's overview pass adds its block cache
(``GDAL_CACHEMAX``) and a buffer that grows with the image width to the memory used.

This module owns rasterio, imported only when a COG is written (it loads GDAL, which nothing
else needs).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np

from pipeline.errors import OutputError
from pipeline.products.view import (
    TIFF_TILE,
    StoreView,
    check_output_file,
    convert,
    open_finished,
    staged,
    target_dtype,
    windows,
)
from pipeline.store.layout import NODATA_LABEL, UINT8_SCALE, nodata_value


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
        "driver": "GTiff",
        "width": width,
        "height": height,
        "dtype": dtype,
        "count": level0.shape[0] if view.what == "probabilities" else 1,
        "tiled": True,
        "blockxsize": side,
        "blockysize": side,
        "compress": "DEFLATE",
        "zlevel": 1,
        "bigtiff": "IF_SAFER",
    }
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
    with staged(out_tif) as folder, warnings.catch_warnings():
        # A slide has no georeference, and that is fine: say nothing about it.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        tiled, cog = os.path.join(folder, "level0.tif"), os.path.join(folder, "done.tif")
        try:
            _write_gtiff(view, tiled, dtype)
            rasterio.shutil.copy(tiled, cog, driver="COG", **options)
        except (rasterio.errors.RasterioError, CPLE_BaseError, OSError) as err:
            raise OutputError(f"{out_tif}: cannot write the COG ({' '.join(str(err).split())})") from err
