"""Class areas inside the user's polygons: QuPath annotations on a slide, GIS polygons on a raster.

A pixel of the store counts for a region when its *centre* is strictly inside the region's
polygon (the pixel-centre rule of GDAL's rasterize; a centre exactly on an edge counts for
none). Overlapping regions each count the pixels they share. The labels are read chunk by chunk,
only the chunks under some region's bounding box, each once; inside a chunk each region tests the
pixel centres of its bounding box there (:func:`shapely.contains_xy`), or takes them all when the
polygon holds the whole box, so no mask of the whole image is ever made.

Where the coordinates are:

* a slide (no transform in the record): QuPath's GeoJSON, in full-resolution (level-0) pixels of
  the slide, ``x`` right and ``y`` down. They are mapped to the store's grid through the level the
  run read (its downsample from level 0), the resampling and a window run's offset;
* a georeferenced raster: GeoPackage or GeoJSON in the raster's CRS, mapped with the inverse of the
  store's transform (a file that names another EPSG code is refused: reproject it first).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely  # type: ignore[import-untyped, unused-ignore]

from pipeline.errors import ConfigError
from pipeline.store.layout import NODATA_LABEL
from pipeline.store.reading import StoreReader, chunk_boxes, class_stats, pixel_area
from pipeline.store.record import StoreRecord
from pipeline.vector.features import Matrix, level0_shape, output_matrix, transformed

GEOJSON = (".geojson", ".json")


@dataclass(frozen=True)
class Region:
    """One polygon of the user's file: its names and its (multi)polygon, in the file's coordinates."""

    index: int
    """Its place among the file's features, from 0."""
    name: str | None
    classification: str | None
    geometry: Any

    @property
    def label(self) -> str:
        """What to call it: its name, else its classification, else ``region <index + 1>``."""
        return self.name or self.classification or f"region {self.index + 1}"


def read_regions(path: str) -> tuple[list[Region], str | None]:
    """The polygons of a GeoJSON (QuPath's included) or any file pyogrio reads (GeoPackage,
    FlatGeobuf, Shapefile), and the CRS the file names (None: none). Features that are not
    polygons (points, lines) are left out; a file with no polygon at all is refused."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file of regions")
    regions, crs = _read_geojson(path) if path.lower().endswith(GEOJSON) else _read_ogr(path)
    kept = [r for r in regions if not r.geometry.is_empty]
    if not kept:
        raise ConfigError(f"{path}: holds no polygon (regions must be Polygon or MultiPolygon features)")
    return kept, crs


def _polygons(geometry: Any) -> Any:
    """The areal part of a geometry, made valid (a self-crossing hand-drawn outline counts once)."""
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    parts = [g for g in shapely.get_parts(geometry) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _read_geojson(path: str) -> tuple[list[Region], str | None]:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read it as GeoJSON ({type(err).__name__}: {err})") from err
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:  # QuPath also writes a bare list of features
        features = data if isinstance(data, list) else []
    crs = ((data.get("crs") or {}).get("properties") or {}).get("name") if isinstance(data, dict) else None
    regions = []
    for index, feature in enumerate(features):
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            continue
        try:
            geometry = _polygons(shapely.geometry.shape(feature["geometry"]))
        except (ValueError, TypeError, AttributeError, shapely.errors.GEOSException) as err:
            raise ConfigError(f"{path}: feature {index} has a malformed geometry ({err})") from err
        properties = feature.get("properties") or {}
        classification = properties.get("classification")
        kind = classification.get("name") if isinstance(classification, dict) else classification
        name = properties.get("name")
        named, kind = None if name is None else str(name), None if kind is None else str(kind)
        regions.append(Region(index, named, kind, geometry))
    return regions, None if crs is None else str(crs)


def _read_ogr(path: str) -> tuple[list[Region], str | None]:
    import pyogrio.errors  # type: ignore[import-untyped, unused-ignore]
    import pyogrio.raw  # type: ignore[import-untyped, unused-ignore]

    try:
        meta, _, wkb, fields = pyogrio.raw.read(path)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as err:
        raise ConfigError(f"{path}: cannot read it as a vector file ({' '.join(str(err).split())})") from err
    names = [str(n) for n in meta.get("fields", [])]

    def value(index: int, *columns: str) -> str | None:
        for column in columns:
            if column in names and fields[names.index(column)][index] is not None:
                return str(fields[names.index(column)][index])
        return None

    regions = [
        Region(i, value(i, "name", "Name", "NAME"), value(i, "classification", "class", "Class"), _polygons(geometry))
        for i, geometry in enumerate(shapely.from_wkb(wkb))
        if geometry is not None
    ]
    crs = meta.get("crs")
    return regions, None if crs is None else str(crs)


def grid_matrix(record: StoreRecord, level0: tuple[int, int] | None = None) -> Matrix:
    """The affine map from the regions' coordinates to the store's grid (pixels, ``(0, 0)`` the
    top-left corner of its pixel ``(0, 0)``): the inverse of the map polygons are exported with
    (:func:`pipeline.vector.features.output_matrix`), so both directions agree by construction.

    >>> r = StoreRecord(config={}, input={"shape_cyx": [3, 100, 100]}, model={}, tile=8, halo=0,
    ...                 spatial={"level_read": 1, "level0_shape": [400, 400], "resampling": [2.0, 2.0]})
    >>> grid_matrix(r)
    (0.125, 0.0, 0.0, 0.125, 0.0, 0.0)
    """
    a, b, d, e, xoff, yoff = output_matrix(record, level0)
    det = a * e - b * d
    inverse = (e, -b, -d, a, b * yoff - e * xoff, d * xoff - a * yoff)
    return tuple(v / det + 0.0 for v in inverse)  # type: ignore[return-value]  # + 0.0: no -0.0


def _epsg(crs: str | None) -> str | None:
    text = (crs or "").upper().replace("URN:OGC:DEF:CRS:EPSG::", "EPSG:")
    return text if text.startswith("EPSG:") and text[5:].isdigit() else None


def count_regions(labels: Any, geometries: Sequence[Any], classes: int) -> list[tuple[list[int], int]]:
    """For each polygon (in grid pixels), the pixels per label ``0 ... classes - 1`` and all the
    pixels whose centre it holds, from a ``(Y, X)`` label array read chunk by chunk."""
    height, width = int(labels.shape[0]), int(labels.shape[1])
    counts = np.zeros((len(geometries), NODATA_LABEL + 1), np.int64)
    inside = [0] * len(geometries)
    boxes = []
    for geometry in geometries:
        shapely.prepare(geometry)
        x0, y0, x1, y1 = geometry.bounds
        rows = (max(0, math.floor(y0)), min(height, math.ceil(y1)))
        boxes.append((*rows, max(0, math.floor(x0)), min(width, math.ceil(x1))))
    live = [i for i, (y0, y1, x0, x1) in enumerate(boxes) if y0 < y1 and x0 < x1]
    if not live:
        return [([0] * classes, 0) for _ in geometries]
    union = (min(boxes[i][0] for i in live), max(boxes[i][1] for i in live), 0, 0)
    union = (*union[:2], min(boxes[i][2] for i in live), max(boxes[i][3] for i in live))
    for cy0, cy1, cx0, cx1 in chunk_boxes((height, width), (int(labels.chunks[0]), int(labels.chunks[1])), union):
        hits = [i for i in live if boxes[i][0] < cy1 and cy0 < boxes[i][1] and boxes[i][2] < cx1 and cx0 < boxes[i][3]]
        if not hits:
            continue
        block = np.asarray(labels[cy0:cy1, cx0:cx1])
        for i in hits:
            y0, y1 = max(cy0, boxes[i][0]), min(cy1, boxes[i][1])
            x0, x1 = max(cx0, boxes[i][2]), min(cx1, boxes[i][3])
            values = block[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0]
            centres = shapely.box(x0 + 0.5, y0 + 0.5, x1 - 0.5, y1 - 0.5)
            if y1 - y0 > 1 and x1 - x0 > 1 and shapely.contains_properly(geometries[i], centres):
                chosen = values.ravel()  # the polygon holds every centre of the box
            else:
                xs = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
                ys = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
                chosen = values[shapely.contains_xy(geometries[i], xs, ys)]
            counts[i] += np.bincount(chosen, minlength=NODATA_LABEL + 1)
            inside[i] += int(chosen.size)
    return [([int(n) for n in counts[i, :classes]], inside[i]) for i in range(len(geometries))]


def region_stats(store: StoreReader, path: str) -> list[dict[str, Any]]:
    """The class areas (:func:`pipeline.store.reading.class_stats`) inside each region of the file
    at ``path``, with its ``index``, ``name`` and ``classification``; ``pixels`` are those whose
    centre it holds, ``nodata_pixels`` those of them without a label."""
    regions, crs = read_regions(path)
    record = store.record
    if record.transform is not None and _epsg(crs) and _epsg(record.crs) and _epsg(crs) != _epsg(record.crs):
        raise ConfigError(
            f"{path}: its polygons are in {crs}, the store is in {record.crs}; reproject them first "
            f"(ogr2ogr -t_srs {record.crs} OUT.gpkg {os.path.basename(path)})"
        )
    matrix = grid_matrix(record, level0_shape(record))
    geometries = list(transformed(np.asarray([r.geometry for r in regions], dtype=object), matrix))
    names = [k.name for k in record.classes]
    area, unit = pixel_area(record.mpp, record.transform, record.crs)
    found = count_regions(store.labels[0], geometries, len(names))
    return [
        {
            **{"index": region.index, "name": region.label, "classification": region.classification},
            **class_stats(counts, names, pixels, area, unit),
        }
        for region, (counts, pixels) in zip(regions, found, strict=True)
    ]
