"""Reading a store that a run wrote: its record, its arrays level by level, and its class areas.

The products (exports, previews) and the demo's scoring read stores only through
:func:`open_store`, so that what a store is and what it means to be complete is decided here, next
to the code that writes it. The arrays it hands out are read lazily, chunk by chunk: slicing one
reads only the chunks under the slice.

The class areas (:func:`class_stats`) are pixel counts of the level-0 labels times the area of one
pixel: micrometres squared from the scale of a slide, CRS units squared from the transform of a
raster (``|a e - b d|``, so a rotated grid is right too). No data (label 255) is in no class.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline import files
from pipeline.errors import OutputError
from pipeline.store.layout import LABEL_GROUP, NODATA_LABEL, is_store, zarr_store
from pipeline.store.record import ATTRIBUTE, StoreRecord, read_record


@dataclass(frozen=True, kw_only=True)
class StoreReader:
    """An fcnpipe store opened for reading."""

    path: str
    record: StoreRecord
    probabilities: tuple[Any, ...]
    """Level 0, 1, ...: lazily read ``(C, Y, X)`` arrays of the stored probabilities."""
    labels: tuple[Any, ...]
    """Level 0, 1, ...: lazily read ``(Y, X)`` uint8 arrays of the class labels (255: no data)."""

    def written(self, level: int) -> float:
        """The share of the label chunks of ``level`` that are on disk (chunks that are all no data
        are not stored): for an unfinished run, how far a level got."""
        array = self.labels[level]
        return float(array.nchunks_initialized / array.nchunks)


def open_store(path: str, *, complete: bool, why: str = "") -> StoreReader:
    """The fcnpipe store at ``path``; with ``complete``, one whose run finished, else OutputError
    (``why``: what needs it complete, for the message)."""
    if not files.exists(path):
        raise OutputError(f"{path}: no such file or folder")
    if not is_store(path):
        kind = "a folder" if files.is_remote(path) or os.path.isdir(path) else "a file"
        raise OutputError(f"{path}: {kind}, not a Zarr store (no .zgroup or zarr.json in it)")
    try:
        record = read_record(path)
    except (OSError, ValueError) as err:
        raise OutputError(f"{path}: cannot read the output store ({type(err).__name__}: {err})") from err
    if record is None:
        raise OutputError(f"{path}: has no '{ATTRIBUTE}' attribute; it was not written by fcnpipe run")
    if complete and not record.complete:
        raise OutputError(f"{path}: is incomplete (the run did not finish); {why or 'rerun it first'}")
    group = zarr.open_group(zarr_store(path, read_only=True), mode="r")
    return StoreReader(
        path=path, record=record, probabilities=_levels(group, "", path), labels=_levels(group, LABEL_GROUP, path)
    )


def _levels(group: Any, node: str, path: str) -> tuple[Any, ...]:
    """The arrays ``0``, ``1``, ... of ``node`` ("" = root), in order, up to the first missing one."""
    try:
        parent = group[node] if node else group
    except KeyError as err:
        raise OutputError(f"{path}: has no {node} group") from err
    names = set(parent.array_keys())
    levels: list[Any] = []
    while str(len(levels)) in names:
        levels.append(parent[str(len(levels))])
    if not levels:
        raise OutputError(f"{path}: has no level 0 in {node or 'its root'}")
    return tuple(levels)


Box = tuple[int, int, int, int]
"""``(y0, y1, x0, x1)`` in pixels of a level."""


def chunk_boxes(shape: tuple[int, int], chunk: tuple[int, int], within: Box | None = None) -> Iterator[Box]:
    """The chunks of a ``(Y, X)`` array, clipped to ``within`` (default: all of it), row by row.

    >>> list(chunk_boxes((5, 7), (4, 4)))
    [(0, 4, 0, 4), (0, 4, 4, 7), (4, 5, 0, 4), (4, 5, 4, 7)]
    >>> list(chunk_boxes((5, 7), (4, 4), within=(1, 3, 3, 6)))
    [(1, 3, 3, 4), (1, 3, 4, 6)]
    """
    y0, y1, x0, x1 = within or (0, shape[0], 0, shape[1])
    y0, y1, x0, x1 = max(0, y0), min(shape[0], y1), max(0, x0), min(shape[1], x1)
    (cy, cx) = chunk
    for top in range(y0 - y0 % cy, y1, cy):
        for left in range(x0 - x0 % cx, x1, cx):
            yield (max(top, y0), min(top + cy, y1), max(left, x0), min(left + cx, x1))


def count_labels(labels: Any, classes: int, boxes: Iterable[Box] | None = None) -> list[int]:
    """Pixels of each label ``0 ... classes - 1`` in ``boxes`` of a ``(Y, X)`` label array (default:
    all of it), read one chunk at a time, so memory stays one chunk whatever the image."""
    shape = (int(labels.shape[0]), int(labels.shape[1]))
    chunk = (int(labels.chunks[0]), int(labels.chunks[1]))
    counts = np.zeros(NODATA_LABEL + 1, np.int64)
    for box in chunk_boxes(shape, chunk) if boxes is None else boxes:
        for y0, y1, x0, x1 in chunk_boxes(shape, chunk, box):
            counts += np.bincount(np.asarray(labels[y0:y1, x0:x1]).ravel(), minlength=NODATA_LABEL + 1)
    return [int(n) for n in counts[:classes]]


METRE = ("metre", "meter", "metres", "meters", "m")


def crs_unit(crs: str | None) -> str | None:
    """The unit of a CRS's first axis (``"metre"``, ``"degree"``), from pyproj; None if unknown."""
    if not crs:
        return None
    import pyproj

    try:
        axes = pyproj.CRS.from_user_input(crs).axis_info
    except pyproj.exceptions.CRSError:
        return None
    return str(axes[0].unit_name) if axes else None


def pixel_area(
    mpp: float | None, transform: Sequence[float] | None, crs: str | None, crs_units: str | None = None
) -> tuple[float | None, str | None]:
    """The area of one pixel of a grid and its unit: ``(mpp², "µm²")`` on a slide, ``(|a e - b d|,
    "<unit>²")`` on a georeferenced raster (``crs_units``: the unit the input's GeoKeys name; else
    pyproj's for ``crs``), ``(None, None)`` when the input records neither.

    >>> pixel_area(0.5, None, None), pixel_area(None, (10, 0, 0, 0, -10, 0), "EPSG:32633")
    ((0.25, 'µm²'), (100, 'm²'))
    """
    if mpp is not None:
        return mpp**2, "µm²"
    if transform is not None:
        a, b, _, d, e, _ = transform[:6]
        unit = crs_units or crs_unit(crs)
        return abs(a * e - b * d), "m²" if unit in METRE else f"{unit or 'CRS unit'}²"
    return None, None


def area_values(pixels: int, area: float | None, unit: str | None) -> dict[str, float]:
    """``pixels`` as areas, keyed by unit: ``area_um2`` and ``area_mm2`` (a slide), ``area_m2`` and
    ``area_ha`` (metres), ``area_crs_units2`` (another CRS unit), nothing (no scale).

    >>> area_values(4_000_000, 0.25, "µm²")
    {'area_um2': 1000000.0, 'area_mm2': 1.0}
    >>> area_values(3, 100.0, "m²")
    {'area_m2': 300.0, 'area_ha': 0.03}
    """
    if area is None:
        return {}
    value = pixels * area
    if unit == "µm²":
        return {"area_um2": value, "area_mm2": value / 1e6}
    if unit == "m²":
        return {"area_m2": value, "area_ha": value / 1e4}
    return {"area_crs_units2": value}


def class_stats(
    counts: Sequence[int], names: Sequence[str], total_pixels: int, area: float | None, unit: str | None
) -> dict[str, Any]:
    """The class areas of a label map from its pixels per class (``counts[k]`` of class ``names[k]``)
    and all its ``total_pixels`` (the rest are no data): as stored in the record and given by
    ``fcnpipe stats --json``. ``share`` is of the labelled pixels; the classes add up to ``labelled``.

    >>> doc = class_stats([3, 1], ["a", "b"], 10, 0.25, "µm²")
    >>> doc["labelled"], doc["nodata_pixels"], doc["classes"]["a"]["share"]
    ({'pixels': 4, 'area_um2': 1.0, 'area_mm2': 1e-06}, 6, 0.75)
    """
    labelled = int(sum(counts))
    return {
        "pixel_area": area,
        "pixel_area_unit": unit,
        "pixels": int(total_pixels),
        "nodata_pixels": int(total_pixels) - labelled,
        "labelled": {"pixels": labelled, **area_values(labelled, area, unit)},
        "classes": {
            name: {"pixels": int(n), "share": n / labelled if labelled else 0.0, **area_values(int(n), area, unit)}
            for name, n in zip(names, counts, strict=True)
        },
    }


def store_stats(store: StoreReader, crs_units: str | None = None) -> dict[str, Any]:
    """The class areas of a store: those its record holds, or, for a store written before fcnpipe
    kept them, counted now from its level-0 labels (one pass, chunk by chunk)."""
    if store.record.stats is not None:
        return store.record.stats
    names = [k.name for k in store.record.classes]
    labels = store.labels[0]
    record = store.record
    area, unit = pixel_area(record.mpp, record.transform, record.crs, crs_units)
    return class_stats(count_labels(labels, len(names)), names, int(labels.shape[0] * labels.shape[1]), area, unit)
