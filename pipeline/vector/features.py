"""What becomes a feature: which classes, which regions, in which coordinates, how simplified.

The regions come from :func:`pipeline.vector.polygons.regions` in pixels of the store's grid.
They leave in the coordinates the reader expects:

* a slide (no transform in the record): full-resolution (level-0) pixels of the slide, ``x`` right
  and ``y`` down, what QuPath reads. The grid is mapped back through a window run's offset, the
  resampling factors and the downsample of the level the run read (level-0 size over that
  level's, as :func:`pipeline.vector.regions.grid_matrix`, its inverse, maps the other way);
* a georeferenced raster: CRS units through the store's transform (GDAL's affine of level-0
  pixel corners; a window run's is already shifted).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import shapely  # type: ignore[import-untyped, unused-ignore]

from pipeline.errors import ConfigError, OutputError, SourceError
from pipeline.products.preview import background_classes
from pipeline.store.reading import pixel_area
from pipeline.store.record import StoreRecord

Matrix = tuple[float, float, float, float, float, float]
"""shapely's affine ``[a, b, d, e, xoff, yoff]``: ``x' = a x + b y + xoff``, ``y' = d x + e y + yoff``."""

_AREA = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(px|um2|µm2|μm2|m2)?\s*$")


def chosen_labels(names: Sequence[str], keep: Sequence[str] | None, skip: Sequence[str] | None) -> list[int]:
    """The labels to polygonise: those of ``keep`` (None: every class), less those of ``skip``
    (None: the background classes, :func:`pipeline.products.preview.background_classes`).

    >>> chosen_labels(["background", "tumour", "stroma"], None, None)
    [1, 2]
    >>> chosen_labels(["background", "tumour", "stroma"], ["stroma", "background"], [])
    [0, 2]
    """
    known = ", ".join(names)
    for name in [*(keep or ()), *(skip or ())]:
        if name not in names:
            raise ConfigError(f"unknown class {name!r}; the classes of the store are {known}")
    skipped = set(background_classes(names)) if skip is None else {names.index(n) for n in skip}
    wanted = range(len(names)) if keep is None else sorted(names.index(n) for n in keep)
    labels = [label for label in wanted if (keep is not None and skip is None) or label not in skipped]
    if not labels:
        raise ConfigError(f"no class left to export of {known}: every one is skipped")
    return labels


def min_area_pixels(text: str | None, record: StoreRecord) -> float:
    """``--min-area`` as pixels of the store's grid: a number of pixels (``50``, ``50px``), or an
    area in ``um2`` (µm², a slide) or ``m2`` (a raster in a metric CRS), through the pixel size.

    >>> min_area_pixels("20", StoreRecord(config={}, input={}, model={}, tile=8, halo=0, spatial={}))
    20.0
    """
    if text is None:
        return 0.0
    match = _AREA.match(text)
    if match is None:
        raise ConfigError(f"Expected an area like 50, 50px, 20um2 or 100m2 for 'min_area'. Got {text!r} instead.")
    value, unit = float(match.group(1)), match.group(2) or "px"
    if unit == "px":
        return value
    area, area_unit = pixel_area(record.mpp, record.transform, record.crs)
    wanted = "µm²" if unit != "m2" else "m²"
    if area is None or area_unit != wanted:
        scale = f"pixels of {area_unit}" if area_unit else "no pixel size"
        raise ConfigError(f"an area in {unit} needs a store whose pixels are in {wanted}; this one has {scale}")
    return value / area


def output_matrix(record: StoreRecord, level0_shape: tuple[int, int] | None = None) -> Matrix:
    """The affine map from the store's grid (pixel corners) to the coordinates written: the store's
    transform on a raster, else level-0 pixels of the slide (see the module's docstring).

    ``level0_shape``: ``(Y, X)`` of the slide's level 0, for a store whose record lacks it.

    >>> r = StoreRecord(config={}, input={"shape_cyx": [3, 100, 100]}, model={}, tile=8, halo=0,
    ...                 spatial={"level_read": 1, "level0_shape": [400, 400], "resampling": [2.0, 2.0],
    ...                          "window": [8, 4, 20, 10]})
    >>> output_matrix(r)
    (8.0, 0.0, 0.0, 8.0, 64.0, 32.0)
    """
    if record.transform is not None:
        a, b, c, d, e, f = record.transform
        return (a, b, d, e, c, f)
    _, height, width = record.input_shape
    full = record.spatial.get("level0_shape") or level0_shape
    if full is None:
        if record.level_read != 0:
            raise OutputError(
                f"the store records no level-0 size and was read at level {record.level_read}, and its input "
                f"{record.input_path} is gone: cannot place full-resolution coordinates"
            )
        full = (height, width)
    fy, fx = (float(v) for v in record.spatial.get("resampling") or (1.0, 1.0))
    sy, sx = fy * float(full[0]) / height, fx * float(full[1]) / width
    col, row = (int(v) for v in (record.spatial.get("window") or (0, 0))[:2])
    return (sx, 0.0, 0.0, sy, col * sx, row * sy)


def level0_shape(record: StoreRecord) -> tuple[int, int] | None:
    """``(Y, X)`` of the slide's level 0 from its TIFF, for a store of an earlier fcnpipe that read
    another level and did not record it; None where not needed or the TIFF is gone."""
    if record.transform is not None or record.level_read == 0 or record.spatial.get("level0_shape"):
        return None
    from pipeline.source.tiff import open_source

    try:
        return open_source(record.input_path, record.series).levels[0].shape
    except SourceError:
        return None


def transformed(geometries: np.ndarray, matrix: Matrix) -> np.ndarray:
    """``geometries`` through ``matrix`` (exact for the usual scale-only maps of whole pixels)."""
    a, b, d, e, xoff, yoff = matrix
    if matrix == (1.0, 0.0, 0.0, 1.0, 0.0, 0.0):
        return geometries
    linear = np.array([[a, d], [b, e]])
    return np.asarray(shapely.transform(geometries, lambda xy: xy @ linear + (xoff, yoff)))


def finish(geometries: np.ndarray, *, simplify: float | None, fill_holes: bool) -> np.ndarray:
    """The polygons as written: simplified together by ``simplify`` (output units; edges that two
    polygons share stay shared, :func:`shapely.coverage_simplify`), holes dropped with
    ``fill_holes``, exterior rings counter-clockwise (RFC 7946)."""
    if simplify:
        geometries = np.asarray(shapely.coverage_simplify(geometries, simplify))
    if fill_holes:
        geometries = np.array([_filled(g) for g in geometries], dtype=object)
    return np.asarray(shapely.orient_polygons(geometries, exterior_cw=False))


def _filled(geometry: Any) -> Any:
    parts = [shapely.Polygon(p.exterior) for p in shapely.get_parts(geometry)]
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def single(geometry: Any) -> Any:
    """A MultiPolygon of one polygon as that Polygon (QuPath and many readers expect it so)."""
    if geometry.geom_type == "MultiPolygon" and len(geometry.geoms) == 1:
        return geometry.geoms[0]
    return geometry
