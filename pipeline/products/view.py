"""A finished store opened for export, and what every exporter does with it.

:func:`open_finished` refuses a store whose run did not finish and gathers what an exporter
writes besides the pixels (class names and colours, pixel size, CRS and transform, provenance);
:func:`select_classes` keeps the probability bands asked for; :func:`convert` turns stored values
into the exported dtype, no data kept as no data; :func:`pixels_per_cm` is a slide's TIFF
resolution as an exact rational; :func:`windows` walks a level a tile at a time; :func:`staged`
makes the file (and GDAL's ``.aux.xml`` sidecar, when there is one) appear only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import numpy as np

from pipeline import remote
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
    source_name: str
    """The file name of the run's input (``CMU-1.svs``): what viewers call the image."""
    bands: tuple[int, ...]
    """The classes exported as probability bands, as indices into ``C``, in the order written."""

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(self.class_names[i] for i in self.bands)

    @property
    def band_colors(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(self.class_colors[i] for i in self.bands)


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
        source_name=os.path.basename(record.input_path) or os.path.basename(os.path.normpath(store)),
        bands=tuple(range(len(record.classes))),
    )


def select_classes(view: StoreView, classes: Sequence[str] | None) -> StoreView:
    """``view`` with only the probability bands of ``classes``, in that order (None: every class).

    Labels hold every class in one band, so a choice of classes applies to probabilities only.
    """
    if classes is None:
        return view
    if view.what != "probabilities":
        raise ConfigError("choosing classes picks probability bands; the labels always hold every class")
    known = ", ".join(view.class_names)
    for name in classes:
        if name not in view.class_names:
            raise ConfigError(f"unknown class {name!r}; the classes of {view.path} are {known}")
    if not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"Expected distinct class names for 'classes'. Got {list(classes)} instead.")
    return replace(view, bands=tuple(view.class_names.index(name) for name in classes))


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


def pixels_per_cm(mpp: float, level: int = 0) -> tuple[int, int]:
    """TIFF's XResolution (pixels per centimetre) of ``level`` for ``mpp`` µm per pixel at level 0,
    as the nearest rational whose terms fit TIFF's 32-bit fields: ``1e4 / mpp`` exactly when it can be.

    libtiff and GDAL pass the value through a float32 (0.499 µm reads back 0.49900000204667971);
    this rational reads back the decimal the store holds.

    >>> pixels_per_cm(0.499), pixels_per_cm(0.25, level=2)
    ((10000000, 499), (10000, 1))
    """
    exact = Fraction(10_000) / (Fraction(repr(float(mpp))) * 2**level)
    limit = 2**32 - 1
    if exact.numerator > limit or exact.denominator > limit:
        exact = exact.limit_denominator(max(1, min(limit, int(limit / exact))))
    return exact.numerator, exact.denominator


def windows(height: int, width: int, side: int) -> Iterator[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of the ``side`` x ``side`` tiles of a grid, row band by row band.

    >>> list(windows(3, 5, 2))
    [(0, 2, 0, 2), (0, 2, 2, 4), (0, 2, 4, 5), (2, 3, 0, 2), (2, 3, 2, 4), (2, 3, 4, 5)]
    """
    for y0 in range(0, height, side):
        for x0 in range(0, width, side):
            yield y0, min(y0 + side, height), x0, min(x0 + side, width)


SIDECAR = ".aux.xml"
"""GDAL's PAM sidecar beside a TIFF (``x.tif.aux.xml``): where the GTiff driver keeps category names
and raster attribute tables, and what GDAL reads together with the TIFF."""


def check_output_file(path: str, overwrite: bool) -> None:
    """Refuse an existing file, or GDAL sidecar of it, without ``overwrite``, and a folder even with it.

    A sidecar left from an earlier file would lend its class names to the new one in every GDAL tool.
    """
    remote.refuse_output(path, "an export")
    if os.path.isdir(path):
        raise OutputError(f"{path}: is a folder; the export is one file")
    for existing in (path, path + SIDECAR):
        if os.path.lexists(existing) and not overwrite:
            raise OutputError(f"{existing}: already exists; {option('overwrite')} to replace it")


@contextmanager
def staged(path: str) -> Iterator[str]:
    """A temporary folder beside ``path``, always removed; its ``done.tif`` becomes ``path`` on success,
    and its ``done.tif.aux.xml``, if written, ``path.aux.xml`` (a stale sidecar is removed).

    Beside, so that the final moves stay on one file system and are atomic. The sidecar goes
    first and the TIFF last, so that the TIFF appears only once all of it is in place.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        folder = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except OSError as err:
        raise OutputError(f"{path}: cannot write beside it ({err.strerror or err})") from err
    try:
        yield folder
        done = os.path.join(folder, "done.tif")
        try:
            if os.path.exists(done + SIDECAR):
                os.replace(done + SIDECAR, path + SIDECAR)
            elif os.path.lexists(path + SIDECAR):
                os.remove(path + SIDECAR)
            os.replace(done, path)
        except OSError as err:
            raise OutputError(f"{path}: cannot move the finished file into place ({err.strerror or err})") from err
    finally:
        shutil.rmtree(folder, ignore_errors=True)
