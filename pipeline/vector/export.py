"""``fcnpipe export STORE -o OUT.geojson | .geojson.gz | .gpkg | .fgb``: the label map as polygons.

The level-0 labels are polygonised chunk by chunk (:func:`pipeline.vector.polygons.regions`,
equal to polygonising the whole map at once), filtered, mapped to the reader's coordinates
(:mod:`pipeline.vector.features`) and written batch by batch (:mod:`pipeline.vector.writers`), so
memory stays that of the open seams and one batch however large the map. ``simplify`` is the
exception: a coverage is simplified as a whole so that the edges two polygons share stay shared,
so with it every polygon is held until the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np
import shapely  # type: ignore[import-untyped, unused-ignore]

from pipeline.errors import ConfigError
from pipeline.products.view import check_output_file
from pipeline.store.reading import open_store
from pipeline.vector import features
from pipeline.vector.features import Matrix, finish, single, transformed
from pipeline.vector.polygons import Region, regions, tidy
from pipeline.vector.writers import Batch, vector_kind, write_ogr, write_qupath

BATCH = 20_000
"""Polygons written at a time: large enough that per-call overheads vanish, small in memory."""


@dataclass(frozen=True, slots=True)
class Shaping:
    """What is done to each region between the label map and the file."""

    matrix: Matrix
    min_pixels: float
    simplify: float | None
    fill_holes: bool


def export_polygons(
    store: str,
    out_path: str,
    *,
    object_type: str = "annotation",
    classes: Sequence[str] | None = None,
    skip_classes: Sequence[str] | None = None,
    connectivity: int = 4,
    min_area: str | None = None,
    simplify: float | None = None,
    fill_holes: bool = False,
    overwrite: bool = False,
) -> int:
    """Write the regions of ``store``'s level-0 labels to ``out_path`` (QuPath GeoJSON, GeoPackage or
    FlatGeobuf, by its name); the number of polygons written.

    ``classes``: only these (None: all); ``skip_classes``: not these (None: the background
    classes); ``min_area``: drop smaller regions (:func:`~pipeline.vector.features.min_area_pixels`);
    ``simplify``: tolerance in output units; ``fill_holes``: outer outlines only."""
    kind = vector_kind(out_path)
    if kind is None:
        raise ConfigError(f"{out_path}: a vector export is named .geojson, .geojson.gz, .gpkg or .fgb")
    if simplify is not None and simplify < 0:
        raise ConfigError(f"Expected a tolerance >= 0 for 'simplify'. Got {simplify} instead.")
    check_output_file(out_path, overwrite)  # the same rule as every export
    reader = open_store(store, complete=True, why="rerun it before exporting")
    record = reader.record
    names = [c.name for c in record.classes]
    keep = features.chosen_labels(names, classes, skip_classes)
    matrix = features.output_matrix(record, features.level0_shape(record))
    shaping = Shaping(matrix, features.min_area_pixels(min_area, record), simplify, fill_holes)
    found = regions(reader.labels[0], connectivity=connectivity, keep=keep)
    batches = shaped(found, shaping)
    if kind == "geojson":
        colors = [c.color for c in record.classes]
        crs = record.crs if record.transform is not None else None
        return write_qupath(out_path, batches, names=names, colors=colors, object_type=object_type, crs=crs)
    if object_type != "annotation":
        raise ConfigError("an object type is QuPath's; GeoPackage and FlatGeobuf hold plain polygons")
    crs = record.crs if record.transform is not None else None
    return write_ogr(out_path, batches, kind=kind, names=names, crs=crs, multi=connectivity == 8)


def shaped(found: Iterable[Region], shaping: Shaping) -> Iterator[Batch]:
    """Batches of the regions as written (see :class:`Shaping`); all in one batch with ``simplify``."""
    pending = iter(found)
    kept_labels: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    while chunk := list(islice(pending, BATCH)):
        labels = np.array([r.label for r in chunk], np.int64)
        geometries = tidy(np.array([r.geometry for r in chunk], dtype=object))
        if shaping.min_pixels > 0:
            large = shapely.area(geometries) >= shaping.min_pixels
            labels, geometries = labels[large], geometries[large]
        geometries = transformed(geometries, shaping.matrix)
        if shaping.simplify:
            kept_labels.append(labels)
            kept.append(geometries)
            continue
        yield labels, _written(finish(geometries, simplify=None, fill_holes=shaping.fill_holes))
    if kept:
        geometries = np.concatenate(kept)
        done = finish(geometries, simplify=shaping.simplify, fill_holes=shaping.fill_holes)
        yield np.concatenate(kept_labels), _written(done)


def _written(geometries: np.ndarray) -> np.ndarray:
    return np.array([single(g) for g in geometries], dtype=object)
