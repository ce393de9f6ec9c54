"""Writing polygons as they come: QuPath GeoJSON (optionally gzipped), GeoPackage, FlatGeobuf.

Each writer takes batches of ``(labels, geometries)`` and writes them at once, so a file of
millions of polygons never sits in memory. The file is written under a temporary name beside the
target and renamed only when complete, so a failed or interrupted export leaves no file that
looks finished.

QuPath (0.4 to 0.6) imports a GeoJSON FeatureCollection whose features have an ``id`` (a UUID),
``properties.objectType`` (``annotation`` or ``detection``) and ``properties.classification``
``{"name", "color": [r, g, b]}``, with Polygon or MultiPolygon geometry in full-resolution pixels.
The GIS files hold one layer, ``regions``, with the class name (``class``) and the area in CRS
units squared (``area``), in the store's CRS.
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

import numpy as np
import shapely  # type: ignore[import-untyped, unused-ignore]

from pipeline.errors import ConfigError, OutputError

Batch = tuple[np.ndarray, np.ndarray]
"""``(labels, geometries)``: int labels and shapely (Multi)Polygons of one batch."""

VECTOR_NAMES = {".geojson": "geojson", ".geojson.gz": "geojson", ".gpkg": "gpkg", ".fgb": "fgb"}
DRIVERS = {"gpkg": "GPKG", "fgb": "FlatGeobuf"}
OBJECT_TYPES = ("annotation", "detection")
LAYER = "regions"


def vector_kind(path: str) -> str | None:
    """``geojson``, ``gpkg`` or ``fgb`` by the name at ``path``; None for a name of no vector file.

    >>> vector_kind("a.GeoJSON.gz"), vector_kind("a.gpkg"), vector_kind("a.tif")
    ('geojson', 'gpkg', None)
    """
    lower = os.path.basename(path).lower()
    for suffix, kind in VECTOR_NAMES.items():
        if lower.endswith(suffix):
            return kind
    return None


@contextmanager
def staged_file(path: str) -> Iterator[str]:
    """A temporary file name beside ``path`` (same suffix, for GDAL's driver), moved to ``path`` on
    success and removed either way."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{uuid.uuid4().hex[:12]}.tmp.{name}")
    try:
        yield temporary
        try:
            os.replace(temporary, path)
        except OSError as err:
            raise OutputError(f"{path}: cannot move the finished file into place ({err.strerror or err})") from err
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


def _open_text(path: str, gzipped: bool) -> IO[str]:
    try:
        if gzipped:
            return gzip.open(path, "wt", encoding="utf-8", compresslevel=6)
        return open(path, "w", encoding="utf-8")
    except OSError as err:
        raise OutputError(f"{path}: cannot write it ({err.strerror or err})") from err


def write_qupath(
    path: str,
    batches: Iterable[Batch],
    *,
    names: Sequence[str],
    colors: Sequence[tuple[int, int, int]],
    object_type: str = "annotation",
    crs: str | None = None,
) -> int:
    """Write QuPath GeoJSON to ``path`` (gzipped when it ends in ``.gz``); the features written.

    ``crs`` (a raster's) is named in the legacy ``crs`` member, as GDAL and QGIS read it; a slide's
    pixels name none."""
    if object_type not in OBJECT_TYPES:
        raise ConfigError(f"Expected one of {', '.join(OBJECT_TYPES)} for 'object_type'. Got {object_type!r} instead.")
    classes = [
        json.dumps({"name": n, "color": [int(v) for v in c]}, ensure_ascii=False)
        for n, c in zip(names, colors, strict=True)
    ]
    head: dict[str, Any] = {"type": "FeatureCollection"}
    if crs:
        head["crs"] = {"type": "name", "properties": {"name": crs}}
    written = 0
    with staged_file(path) as temporary, _open_text(temporary, path.lower().endswith(".gz")) as file:
        file.write(json.dumps(head)[:-1] + ', "features": [')
        for labels, geometries in batches:
            texts = shapely.to_geojson(geometries)
            for label, text in zip(labels, texts, strict=True):
                properties = f'{{"objectType": "{object_type}", "classification": {classes[int(label)]}}}'
                file.write(
                    f'{"," if written else ""}\n{{"type": "Feature", "id": "{uuid.uuid4()}", '
                    f'"geometry": {text}, "properties": {properties}}}'
                )
                written += 1
        file.write("\n]}\n")
    return written


def write_ogr(
    path: str, batches: Iterable[Batch], *, kind: str, names: Sequence[str], crs: str | None, multi: bool
) -> int:
    """Write a GeoPackage or FlatGeobuf (``kind``) of one layer, appended batch by batch; the
    features written. ``multi``: declare MultiPolygon (8-connectivity), every feature promoted."""
    written = 0
    with staged_file(path) as temporary:
        for labels, geometries in batches:
            if multi:
                geometries = np.array([_multi(g) for g in geometries], dtype=object)
            fields = [np.array([names[int(k)] for k in labels], dtype=object), shapely.area(geometries)]
            _write_batch((temporary, path), geometries, fields, kind, crs, multi, append=written > 0)
            written += len(labels)
        if not written:
            empty = np.array([], dtype=object)
            _write_batch((temporary, path), empty, [empty, np.array([])], kind, crs, multi)
    return written


def _write_batch(
    paths: tuple[str, str],
    geometries: np.ndarray,
    fields: list[np.ndarray],
    kind: str,
    crs: str | None,
    multi: bool,
    append: bool = False,
) -> None:
    import pyogrio.errors  # type: ignore[import-untyped, unused-ignore]
    import pyogrio.raw  # type: ignore[import-untyped, unused-ignore]

    path, shown = paths  # the temporary file, and the name the user gave
    try:
        with warnings.catch_warnings():  # a slide's pixels have no CRS, and pyogrio warns of that
            warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
            pyogrio.raw.write(
                path,
                np.asarray(shapely.to_wkb(geometries), dtype=object),
                fields,
                fields=["class", "area"],
                geometry_type="MultiPolygon" if multi else "Polygon",
                crs=crs,
                driver=DRIVERS[kind],
                layer=LAYER,
                append=append,
                # GeoPackage 1.2: what GDAL 3.6 (QGIS LTR) reads without warning it "may only be
                # partially supported" (pyogrio's GDAL writes 1.4 otherwise)
                **({"dataset_options": {"VERSION": "1.2"}} if kind == "gpkg" and not append else {}),
            )
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, OSError) as err:
        raise OutputError(f"{shown}: cannot write it ({' '.join(str(err).split())})") from err


def _multi(geometry: Any) -> Any:
    return shapely.MultiPolygon([geometry]) if geometry.geom_type == "Polygon" else geometry
