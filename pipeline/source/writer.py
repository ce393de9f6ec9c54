"""Writing TIFFs: the synthetic slides of the demo and tests, and the OME-TIFF exports.

This package owns tifffile; :mod:`pipeline.source.tiff` and :mod:`pipeline.source.pixels` read, and this is the one
writer. A TIFF is written as a sequence of images (a level of a pyramid, a page), each from an
iterable of tiles in TIFF order, so that no image is ever held whole (the OME-TIFF and the
colour overlay of :mod:`pipeline.products`). :func:`overwrite_resolution` mends the one tag GDAL
cannot write exactly in a COG.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tifffile


@dataclass(frozen=True)
class Image:
    """One image of a TIFF: its tiles, in the order TIFF stores them, and tifffile's options for it
    (``shape``, ``dtype``, ``tile``, ``compression``, ``photometric``, ``subifds``, ``metadata``, ...)."""

    tiles: Iterable[np.ndarray]
    options: dict[str, Any] = field(default_factory=dict)


def write_tiff(path: str, images: Sequence[Image], *, bigtiff: bool, ome: bool = False) -> None:
    """Write ``images`` into one TIFF at ``path``, in order (a pyramid: level 0 with
    ``subifds=n`` first, then its ``n`` levels with ``subfiletype=1``). ``ome``: level 0's
    ``metadata`` is written as OME-XML."""
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=ome) as tif:
        for image in images:
            tif.write(image.tiles, **image.options)


def overwrite_resolution(path: str, resolution: tuple[int, int]) -> None:
    """Set the XResolution and YResolution of the first image of the TIFF at ``path`` to the rational
    ``resolution`` (numerator, denominator), in place: no byte moves, so a Cloud-Optimized GeoTIFF
    keeps its layout. A ValueError if the image has no resolution tags to overwrite.

    GDAL writes the resolution through libtiff, which rounds it to a float32; this writes it exact.
    """
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages.first.tags
        for name in ("XResolution", "YResolution"):
            tag = tags.get(name)
            if tag is None:
                raise ValueError(f"{path}: has no {name} tag to overwrite")
            tag.overwrite(resolution)
