"""Where the pixels are: microns per pixel on a slide, CRS and affine transform on the ground.

Parsed from a TIFF's tags by :mod:`pipeline.source.tiff` (which owns tifffile and passes the parsed
values here), so that the output can carry the same physical scale or georeference as the input
and overlays line up in QuPath, napari or QGIS.

Transforms follow GDAL and rasterio: ``(a, b, c, d, e, f)`` maps the *corner* of pixel
``(col, row)`` to ``x = a * col + b * row + c``, ``y = d * col + e * row + f``. A ``PixelIsPoint``
GeoTIFF ties pixel *centres* to coordinates, so its transform is shifted by half a pixel, exactly
as GDAL reports it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

Affine = tuple[float, float, float, float, float, float]

PIXEL_IS_POINT = 2
_UNIT_TO_MICRONS = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


@dataclass(frozen=True)
class Georeference:
    crs: str | None
    """``"EPSG:<code>"``, or None when the GeoTIFF names no EPSG code."""
    transform: Affine | None
    """Affine transform of the chosen level (pixel corners), or None without tiepoints."""
    pixel_is_point: bool = False

    @property
    def north_up(self) -> bool:
        """True when rows and columns follow the CRS axes (no rotation or shear)."""
        return self.transform is not None and self.transform[1] == 0.0 and self.transform[3] == 0.0

    @property
    def pixel_size(self) -> tuple[float, float] | None:
        """``(width, height)`` of one pixel in CRS units."""
        if self.transform is None:
            return None
        a, b, _, d, e, _ = self.transform
        return (math.hypot(a, d), math.hypot(b, e))

    def scaled(self, factor_x: float, factor_y: float) -> Georeference:
        """The georeference of a level ``factor`` times coarser than this one.

        >>> Georeference("EPSG:3857", (2.0, 0.0, 100.0, 0.0, -2.0, 50.0)).scaled(4, 4).transform
        (8.0, 0.0, 100.0, 0.0, -8.0, 50.0)
        """
        if self.transform is None:
            return self
        a, b, c, d, e, f = self.transform
        return replace(self, transform=(a * factor_x, b * factor_y, c, d * factor_x, e * factor_y, f))


def from_geokeys(meta: Mapping[str, Any]) -> Georeference:
    """Parse tifffile's ``geotiff_metadata`` dict.

    >>> keys = {"ProjectedCSTypeGeoKey": 32618, "ModelPixelScale": [300.0, 300.0, 0.0],
    ...         "ModelTiepoint": [0.0, 0.0, 0.0, 101985.0, 2826915.0, 0.0]}
    >>> from_geokeys(keys).transform
    (300.0, 0.0, 101985.0, 0.0, -300.0, 2826915.0)
    >>> from_geokeys({**keys, "GTRasterTypeGeoKey": 2}).transform
    (300.0, 0.0, 101835.0, 0.0, -300.0, 2827065.0)
    """
    code = meta.get("ProjectedCSTypeGeoKey") or meta.get("GeographicTypeGeoKey")
    crs = f"EPSG:{int(code)}" if code is not None and 0 < int(code) < 32767 else None
    point = int(meta.get("GTRasterTypeGeoKey") or 1) == PIXEL_IS_POINT
    transform: Affine | None = None
    scale, tiepoint, matrix = meta.get("ModelPixelScale"), meta.get("ModelTiepoint"), meta.get("ModelTransformation")
    if matrix:
        (a, b, _, c), (d, e, _, f) = matrix[0], matrix[1]
        transform = (float(a), float(b), float(c), float(d), float(e), float(f))
    elif scale and tiepoint and len(tiepoint) >= 6:
        i, j, _, x, y, _ = (float(v) for v in tiepoint[:6])
        sx, sy = float(scale[0]), float(scale[1])
        transform = (sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy)
    if transform is not None and point:
        a, b, c, d, e, f = transform
        transform = (a, b, c - 0.5 * (a + b), d, e, f - 0.5 * (d + e))
    return Georeference(crs=crs, transform=transform, pixel_is_point=point)


def svs_mpp(description: str) -> float | None:
    """``MPP`` from an Aperio ImageDescription (``...|MPP = 0.499|...``).

    >>> svs_mpp("Aperio Image Library v11.2.1 |AppMag = 20|MPP = 0.499|Date = 12/29/09")
    0.499
    """
    match = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", description)
    return float(match.group(1)) if match else None


def ome_mpp(xml: str) -> float | None:
    """``PhysicalSizeX`` of the first OME Pixels element, converted to micrometres.

    >>> ome_mpp('<Pixels PhysicalSizeX="250" PhysicalSizeXUnit="nm" SizeX="3"/>')
    0.25
    """
    match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', xml)
    if not match:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', xml)
    return float(match.group(1)) * _UNIT_TO_MICRONS.get(unit.group(1) if unit else "µm", 1.0)


def resolution_mpp(resolution: tuple[int, int] | None, microns_per_unit: float | None) -> float | None:
    """Micrometres per pixel from a TIFF XResolution rational (pixels per unit) and its unit.

    >>> resolution_mpp((20000, 1), 1e4)  # 20000 pixels per centimetre
    0.5
    """
    if resolution is None or microns_per_unit is None or not resolution[0] or not resolution[1]:
        return None
    return microns_per_unit * resolution[1] / resolution[0]
