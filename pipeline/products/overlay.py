"""A finished store's labels as a colour overlay TIFF, for OpenSlide-based viewers and QuPath.

Each pixel is its class colour, RGBA, no data and background classes fully transparent
(``(0, 0, 0, 0)``), so the file can be laid over the slide. The store's label pyramid becomes
successive tiled IFDs, largest first, the coarser ones marked reduced-resolution: OpenSlide's
"generic-tiff" layout, which OpenSlide, tiffslide and QuPath read as a pyramid. Every level carries its TIFF resolution
(pixels per centimetre, exact), so OpenSlide reports ``openslide.mpp-x``. Written with tifffile
through :mod:`pipeline.source.writer`, a tile at a time; zlib, so the colours stay exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.errors import OutputError
from pipeline.products.preview import background_classes
from pipeline.products.view import (
    TIFF_TILE,
    StoreView,
    check_output_file,
    open_finished,
    pixels_per_cm,
    staged,
    windows,
)
from pipeline.source.writer import Image, write_tiff
from pipeline.store.layout import NODATA_LABEL

NODATA_RGBA = (0, 0, 0, 0)
"""The colour of no data in the overlay: transparent."""

_BIGTIFF_FROM = 2**31


def class_lut(view: StoreView) -> np.ndarray:
    """``(256, 4)`` uint8: the RGBA colour of each label value: its class colour, opaque; transparent
    for no data and for a background class (as the preview draws it: the slide shows through)."""
    lut = np.zeros((256, 4), np.uint8)
    lut[:] = NODATA_RGBA
    for index, color in enumerate(view.class_colors):
        lut[index] = (*color, 255)
    lut[[NODATA_LABEL, *background_classes(view.class_names)]] = NODATA_RGBA
    return lut


def _tiles(labels: Any, lut: np.ndarray) -> Iterator[np.ndarray]:
    """``labels``' tiles in TIFF order as ``(tile, tile, 4)`` RGBA."""
    height, width = labels.shape
    for y0, y1, x0, x1 in windows(height, width, TIFF_TILE):
        yield lut[np.asarray(labels[y0:y1, x0:x1])]


def _write_overlay(view: StoreView, path: str) -> None:
    lut = class_lut(view)
    total = sum(int(np.prod(level.shape)) * 4 for level in view.levels)
    images = []
    for index, level in enumerate(view.levels):
        options: dict[str, Any] = {
            "shape": (*level.shape, 4),
            "dtype": "uint8",
            "tile": (TIFF_TILE, TIFF_TILE),
            "compression": "zlib",
            "photometric": "rgb",
            "extrasamples": ["unassalpha"],
            "metadata": None,  # no tifffile shape description: a plain TIFF every reader takes as it is
            "subfiletype": 1 if index else 0,
            "description": f"fcnpipe class overlay of {view.source_name}, level {index}",
        }
        if view.mpp is not None:
            per_cm = pixels_per_cm(view.mpp, index)
            options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
        images.append(Image(_tiles(level, lut), options))
    write_tiff(path, images, bigtiff=total >= _BIGTIFF_FROM)


def export_overlay(store: str, out_tif: str, *, overwrite: bool = False) -> None:
    """Write the labels of ``store`` as a tiled pyramidal RGBA TIFF at ``out_tif``, each level of the
    store's label pyramid one IFD, ``(Y, X, 4)`` uint8 in the class colours, no data transparent."""
    check_output_file(out_tif, overwrite)
    view = open_finished(store, "labels")
    with staged(out_tif) as folder:
        try:
            _write_overlay(view, os.path.join(folder, "done.tif"))
        except OSError as err:
            raise OutputError(f"{out_tif}: cannot write the overlay ({err.strerror or err})") from err
