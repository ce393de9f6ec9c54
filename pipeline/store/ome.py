"""Metadata for the tools people open a store with: OME-NGFF for viewers, CF and GDAL for GIS.

* OME-NGFF 0.4 (Zarr v2) or 0.5 (Zarr v3): ``multiscales`` over the probability levels with one
  channel per class (``omero``), and the label image ``labels/argmax`` with a colour and a name per
  class value, no data transparent (napari, QuPath, ome-zarr-py);
* for a GeoTIFF input, on the level-0 arrays: ``x``/``y`` pixel-centre coordinates and a CF grid
  mapping with GDAL's exact ``GeoTransform``, and GDAL's ``_CRS`` (GDAL, QGIS, rioxarray).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import zarr

from pipeline.store.arrays import compressor
from pipeline.store.layout import LABEL_GROUP, LABELS, NODATA_LABEL, PROBABILITIES, UINT8_SCALE, zarr_store

OME_VERSIONS = ("0.4", "0.5")


def _scale(level: int, pixel_size: float | None, leading: int) -> list[float]:
    size = (pixel_size or 1.0) * 2**level
    return [1.0] * leading + [size, size]


def _multiscale(
    name: str, levels: int, axes: list[dict[str, str]], pixel_size: float | None, version: str, method: str
) -> dict[str, Any]:
    """One ``multiscales`` entry; ``method`` its ``type`` (how the levels were downsampled, in
    ome-zarr-py's words), which the spec recommends and ngff-zarr's strict schema requires."""
    leading = len(axes) - 2
    block: dict[str, Any] = {
        "name": name,
        "type": method,
        "axes": axes,
        "datasets": [
            {
                "path": str(level),
                "coordinateTransformations": [{"type": "scale", "scale": _scale(level, pixel_size, leading)}],
            }
            for level in range(levels)
        ],
    }
    if version == "0.4":
        block = {"version": "0.4", **block}
    return block


def _space_axes(mpp: float | None) -> list[dict[str, str]]:
    unit = {"unit": "micrometer"} if mpp is not None else {}
    return [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}]


def _wrap(version: str, content: dict[str, Any]) -> dict[str, Any]:
    """0.4 puts OME keys at the top of the attributes; 0.5 nests them under ``ome`` with the version."""
    return content if version == "0.4" else {"ome": {"version": version, **content}}


def ome_image(
    version: str,
    name: str,
    levels: int,
    class_names: list[str],
    colors: list[tuple[int, int, int]],
    mpp: float | None,
    dtype: str,
) -> dict[str, Any]:
    """Root attributes: ``multiscales`` over the probability levels and ``omero`` channel display.

    Axes ``c`` (one channel per class, named after it) and ``y``, ``x`` in micrometres when the
    source says how large a pixel is, else in pixels. Level ``k`` is ``2**k`` times coarser.
    """
    axes = [{"name": "c", "type": "channel"}, *_space_axes(mpp)]
    top = UINT8_SCALE if dtype == "uint8" else 1.0
    omero = {
        "name": name,
        "channels": [
            {
                "label": label,
                "color": "".join(f"{v:02X}" for v in color),
                "active": True,
                "window": {"min": 0, "max": top, "start": 0, "end": top},
            }
            for label, color in zip(class_names, colors, strict=True)
        ],
        "rdefs": {"model": "color"},
    }
    if version == "0.4":
        omero["version"] = "0.4"
    multiscale = _multiscale(name, levels, axes, mpp, version, "local_mean")
    multiscale["metadata"] = {"method": "mean of 2 x 2 blocks of the stored level above"}
    return _wrap(version, {"multiscales": [multiscale], "omero": omero})


def ome_labels_group(version: str, names: list[str]) -> dict[str, Any]:
    """Attributes of the ``labels`` group: the names of its label images."""
    return _wrap(version, {"labels": names})


def ome_label_image(
    version: str,
    levels: int,
    class_names: list[str],
    colors: list[tuple[int, int, int]],
    mpp: float | None,
    nodata_label: int,
) -> dict[str, Any]:
    """Attributes of ``labels/argmax``: its levels and one colour and name per class value.

    ``nodata_label`` (where the source has no data) is transparent.
    """
    label: dict[str, Any] = {
        "colors": [{"label-value": i, "rgba": [*color, 255]} for i, color in enumerate(colors)]
        + [{"label-value": nodata_label, "rgba": [0, 0, 0, 0]}],
        "properties": [{"label-value": i, "name": name} for i, name in enumerate(class_names)]
        + [{"label-value": nodata_label, "name": "no data"}],
        "source": {"image": "../../"},
    }
    if version == "0.4":
        label = {"version": "0.4", **label}
    multiscale = _multiscale("argmax", levels, _space_axes(mpp), mpp, version, "nearest")
    multiscale["metadata"] = {"method": "top-left label of 2 x 2 blocks of the level above"}
    return _wrap(version, {"multiscales": [multiscale], "image-label": label})


def write_viewer_metadata(
    path: str,
    *,
    version: str,
    name: str,
    levels: int,
    class_names: list[str],
    class_colors: list[tuple[int, int, int]],
    mpp: float | None,
    dtype: str,
) -> None:
    """The OME-NGFF attributes of the store at ``path``: the image (``name``: the input's file name),
    the labels group and the label image."""
    update_attributes(path, "", ome_image(version, name, levels, class_names, class_colors, mpp, dtype))
    update_attributes(path, "labels", ome_labels_group(version, ["argmax"]))
    label = ome_label_image(version, levels, class_names, class_colors, mpp, NODATA_LABEL)
    update_attributes(path, LABEL_GROUP, label)


def write_gis_metadata(
    path: str, *, version: str, crs: str | None, transform: tuple[float, ...], shape: tuple[int, int]
) -> None:
    """Coordinates, the CF grid mapping and GDAL's ``_CRS`` on the level-0 arrays of the store at
    ``path``, whose grid is ``shape`` ``(Y, X)`` pixels with the GDAL affine ``transform``."""
    height, width = shape
    xs, ys = pixel_centres(transform, height, width)
    for group, array, dims in (("", PROBABILITIES, ["c", "y", "x"]), (LABEL_GROUP, LABELS, ["y", "x"])):
        write_georeference_arrays(path, group, xs, ys, grid_mapping(crs, transform))
        attributes: dict[str, object] = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"}
        if crs:
            attributes["_CRS"] = crs_attribute(crs)
        if version == "0.4":
            attributes["_ARRAY_DIMENSIONS"] = dims
        update_attributes(path, array, attributes)


# --- GIS: georeference as GDAL and xarray read it from Zarr ------------------------------------------


def write_georeference_arrays(path: str, group_path: str, xs: np.ndarray, ys: np.ndarray, crs: dict[str, Any]) -> None:
    """Coordinates and a CF grid mapping beside the arrays of ``group_path``, as GIS readers expect.

    ``x`` and ``y`` hold pixel-centre coordinates: with ``_ARRAY_DIMENSIONS`` on the data arrays
    that is how GDAL finds the transform (xarray's convention for Zarr format 2). ``spatial_ref``
    is a scalar CF grid-mapping variable whose attributes ``crs`` gives (``spatial_ref``,
    ``GeoTransform``), as rioxarray reads them.
    """
    group = zarr.open_group(zarr_store(path), mode="r+")
    target = group if group_path in ("", "/") else group[group_path]
    zarr_format = group.metadata.zarr_format
    for name, values in (("x", xs), ("y", ys)):
        options = {"dimension_names": [name]} if zarr_format == 3 else {}
        array = target.create_array(
            name,
            shape=values.shape,
            chunks=values.shape,
            dtype="float64",
            fill_value=0.0,
            **compressor(zarr_format, bitshuffle=False),
            **options,
        )
        array[:] = values
        if zarr_format == 2:
            array.attrs["_ARRAY_DIMENSIONS"] = [name]
    mapping = target.create_array("spatial_ref", shape=(), dtype="int32", fill_value=0)
    mapping.attrs.update({**crs, **({"_ARRAY_DIMENSIONS": []} if zarr_format == 2 else {})})


def update_attributes(path: str, node: str, attributes: dict[str, Any]) -> None:
    """Merge ``attributes`` into the attributes of the group or array at ``node`` ("" = root)."""
    group = zarr.open_group(zarr_store(path), mode="r+")
    target = group if node in ("", "/") else group[node]
    target.attrs.update(attributes)


def crs_attribute(crs: str) -> dict[str, Any]:
    """GDAL's ``_CRS`` attribute for ``"EPSG:<code>"``.

    >>> crs_attribute("EPSG:32618")
    {'url': 'http://www.opengis.net/def/crs/EPSG/0/32618'}
    """
    authority, code = crs.split(":")
    return {"url": f"http://www.opengis.net/def/crs/{authority}/0/{code}"}


def grid_mapping(crs: str | None, transform: tuple[float, ...]) -> dict[str, Any]:
    """CF grid-mapping attributes with GDAL's ``GeoTransform`` (exact, unlike coordinates).

    For a CRS: CF 1.8's ``crs_wkt``, ``grid_mapping_name`` and projection parameters (pyproj's
    ``CRS.to_cf``), for CF readers other than GDAL and rioxarray, and ``spatial_ref`` (the same WKT,
    the name GDAL and rioxarray look for).

    >>> grid_mapping("EPSG:3857", (2.0, 0.0, 100.0, 0.0, -2.0, 50.0))["GeoTransform"]
    '100.0 2.0 0.0 50.0 0.0 -2.0'
    >>> cf = grid_mapping("EPSG:32618", (30.0, 0.0, 0.0, 0.0, -30.0, 0.0))
    >>> cf["grid_mapping_name"], cf["longitude_of_central_meridian"], cf["crs_wkt"] == cf["spatial_ref"]
    ('transverse_mercator', -75.0, True)
    """
    a, b, c, d, e, f = transform[:6]
    attributes: dict[str, Any] = {}
    if crs:
        attributes.update(cf_crs(crs))
    attributes["GeoTransform"] = " ".join(repr(float(v)) for v in (c, a, b, f, d, e))
    return attributes


def cf_crs(crs: str) -> dict[str, Any]:
    """CF 1.8 grid-mapping attributes of ``crs`` (an ``"EPSG:<code>"``); ``spatial_ref`` alone, the
    code as given, where PROJ does not know it.

    >>> cf_crs("EPSG:4326")["grid_mapping_name"]
    'latitude_longitude'
    """
    import pyproj

    try:
        with warnings.catch_warnings():  # CRSs without a CF name: the WKT still says everything
            warnings.simplefilter("ignore", UserWarning)
            cf: dict[str, Any] = pyproj.CRS.from_user_input(crs).to_cf()
    except pyproj.exceptions.CRSError:
        return {"spatial_ref": crs}
    return {**cf, "spatial_ref": cf["crs_wkt"]}


def pixel_centres(transform: tuple[float, ...], height: int, width: int) -> tuple[Any, Any]:
    """``(xs, ys)``: coordinates of the centres of the columns and rows of a north-up grid.

    >>> xs, ys = pixel_centres((10.0, 0.0, 100.0, 0.0, -10.0, 50.0), 2, 3)
    >>> xs.tolist(), ys.tolist()
    ([105.0, 115.0, 125.0], [45.0, 35.0])
    """
    a, _, c, _, e, f = transform[:6]
    return c + a * (np.arange(width) + 0.5), f + e * (np.arange(height) + 0.5)
