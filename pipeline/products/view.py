"""A finished store opened for export, and what every exporter does with it.

:func:`open_finished` refuses a store whose run did not finish and gathers what an exporter
writes besides the pixels (class names and colours, pixel size, CRS and transform, provenance);
:func:`convert` turns stored values into the exported dtype, no data kept as no data; :func:`windows`
walks a level a tile at a time; :func:`staged` makes the file appear only when it is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, OutputError, option
from pipeline.parse import parse_choice
from pipeline.store.layout import UINT8_SCALE, is_nodata, nodata_value, quantize
from pipeline.store.reading import open_store

WHATS = ("probabilities", "labels")
DTYPES = ("uint8", "float32")
TIFF_TILE = 512
"""Tile side of the OME-TIFF and block side of the COG, in pixels: what viewers and GDAL read best."""


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


def open_finished(store: str, what: str) -> StoreView:
    """Open the store written by ``fcnpipe run`` at ``store``; refuse one whose run did not finish."""
    parse_choice(what, "what", WHATS)
    reader = open_store(store, complete=True, why="rerun it before exporting")
    record = reader.record
    return StoreView(
        path=store,
        what=what,
        levels=reader.probabilities if what == "probabilities" else reader.labels,
        class_names=tuple(c.name for c in record.classes),
        class_colors=tuple(c.color for c in record.classes),
        mpp=record.mpp,
        crs=record.crs,
        transform=record.transform,
        provenance={
            "FCNPIPE_STORE": os.path.abspath(store),
            "FCNPIPE_VERSION": record.version,
            "FCNPIPE_MODEL_SHA256": record.model_sha256,
        },
    )


def target_dtype(view: StoreView, dtype: str | None) -> str:
    """The dtype written: labels stay uint8; probabilities as asked, else as stored (float16 -> float32).

    float16 is widened because neither OME-XML nor most GIS tools take half floats.
    """
    if view.what == "labels":
        if dtype not in (None, "uint8"):
            raise ConfigError(f"labels are uint8 class indices; dtype {dtype} applies to probabilities only")
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
        raise OutputError(f"{path}: already exists; {option('overwrite')} to replace it")


@contextmanager
def staged(path: str) -> Iterator[str]:
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
