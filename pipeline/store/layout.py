"""What an fcnpipe store is made of: its names, its encodings, and where it may be.

Layout of the group at the output path (OME-Zarr; Zarr format 2 for OME-NGFF 0.4, 3 for 0.5):

* ``0``, ``1``, ...: probabilities, shape ``(C, Y, X)`` halving level by level, chunks
  ``(C, tile, tile)``; float32/float16, or uint8 holding ``round(p * 254)``;
* ``labels/argmax/0``, ``1``, ...: the argmax of the full-precision probabilities, ``(Y, X)``
  uint8, :data:`NODATA_LABEL` where the source has no data;
* ``x``, ``y``, ``spatial_ref`` (and the same in ``labels/argmax``): pixel-centre coordinates and
  the CF grid mapping, for a GeoTIFF input;
* the root attribute ``fcnpipe`` (:mod:`pipeline.store.record`), and ``.fcnpipe/`` while a run is
  unfinished (:mod:`pipeline.store.safety`).

No data (a chunk the mask skipped, a pixel the source marks as no data) is the arrays' fill value,
and nothing else is: NaN for float probabilities, 255 for uint8 probabilities and labels
(:func:`nodata_value`). A probability of 0 is a value like any other, so readers that take the fill
value as missing (xarray's ``_FillValue``, GDAL's NoData, QGIS) hide only what has no data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

STORE_FORMAT = 2
"""The layout and encoding of the stored values; raised whenever a byte of the same run would change
(2: uint8 probabilities hold round(p * 254), no data is the fill value). Part of the fingerprint, so a
store of another format is never resumed or reused."""

PROBABILITIES = "0"

LABEL_GROUP = "labels/argmax"

LABELS = f"{LABEL_GROUP}/0"

NODATA_LABEL = 255
"""Label where there is no data (alpha 0, GDAL_NODATA, a chunk without foreground); at most 254 classes."""

UINT8_SCALE = 254
"""uint8 probabilities hold ``round(p * 254)``, so that 255 is free to mean no data, as in the labels."""

NODATA_UINT8 = 255


def nodata_value(dtype: Any) -> float | int:
    """The value of no data in an array of stored probabilities (its fill value): 255 or NaN.

    >>> nodata_value("uint8"), nodata_value("float32")
    (255, nan)
    """
    return NODATA_UINT8 if np.dtype(dtype) == np.uint8 else float("nan")


def is_nodata(values: np.ndarray) -> np.ndarray:
    """Where stored values (probabilities or labels) are no data.

    >>> is_nodata(np.array([0, 255], np.uint8)).tolist(), is_nodata(np.array([0.0, np.nan])).tolist()
    ([False, True], [False, True])
    """
    if values.dtype == np.uint8:
        is_fill: np.ndarray = values == NODATA_UINT8
        return is_fill
    is_nan: np.ndarray = np.isnan(values)
    return is_nan


def quantize(probs: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Probabilities in [0, 1] as stored: unchanged, float16, or ``round(p * 254)`` as uint8; into
    ``out`` (of that dtype and shape) if given. The probabilities must be finite.

    >>> quantize(np.array([0.0, 0.5, 1.0], np.float32), "uint8").tolist()
    [0, 127, 254]
    """
    if dtype == "uint8":
        scaled: np.ndarray = np.multiply(probs, float(UINT8_SCALE))
        np.rint(scaled, out=scaled)  # in place: each fresh 3 MB temporary costs its page faults
        if out is None:
            return scaled.astype(np.uint8)
        out[...] = scaled
        return out
    if out is None:
        return probs.astype(dtype, copy=False)
    out[...] = probs
    return out


@dataclass(frozen=True, slots=True)
class OutputRef:
    """What a task needs to write: small and picklable."""

    path: str
    dtype: str
    """``float32``, ``float16`` or ``uint8`` for the probabilities."""
    token: str = ""
    """Unique per created store: handles cached for an earlier store at the same path are not reused."""


def beside(store: str | os.PathLike[str], suffix: str) -> str:
    """A file beside ``store``, named after it: ``.zarr`` replaced by ``suffix`` (preview, log).

    >>> beside("/data/slide1.zarr/", ".preview.png"), beside("out", ".log")
    ('/data/slide1.preview.png', 'out.log')
    """
    path = os.path.normpath(os.fspath(store))
    return (path[:-5] if path.lower().endswith(".zarr") else path) + suffix


_TIFF_NAMES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".btf", ".tf8")

_OTHER_FILES = (".png", ".jpg", ".jpeg", ".svs", ".ndpi", ".h5", ".hdf5", ".nc", ".npy", ".geojson", ".gpkg", ".json")


def check_store_path(path: str) -> None:
    """Refuse an output path whose name says it is a file of another kind: a run writes a Zarr store,
    which is a folder (``OUT.zarr``), and a folder named ``out.tif`` misleads every tool after it.

    >>> check_store_path("maps/s1.zarr"), check_store_path("maps/s1")
    (None, None)
    >>> try:
    ...     check_store_path("s1.tif")
    ... except ConfigError as err:
    ...     print(str(err).split("; ")[1])
    run with -o s1.zarr, then fcnpipe export s1.zarr -o s1.tif
    """
    name = os.path.basename(os.path.normpath(path))
    lower = name.lower()
    for suffix in _TIFF_NAMES:
        if lower.endswith(suffix):
            stem = os.path.join(os.path.dirname(path), name[: -len(suffix)] + ".zarr")
            raise ConfigError(
                f"{path}: fcnpipe run writes a Zarr store (a folder, e.g. {stem}), not a TIFF; "
                f"run with -o {stem}, then fcnpipe export {stem} -o {path}"
            )
    for suffix in _OTHER_FILES:
        if lower.endswith(suffix):
            raise ConfigError(
                f"{path}: fcnpipe run writes a Zarr store (a folder), not a {suffix} file; name it "
                f"{os.path.join(os.path.dirname(path), name[: -len(suffix)])}.zarr"
            )


def is_store(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in (".zgroup", "zarr.json"))


def is_empty_folder(path: str) -> bool:
    """A folder with nothing in it (a store never begun): replacing it loses nothing."""
    return os.path.isdir(path) and not os.listdir(path)
