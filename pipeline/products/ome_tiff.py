"""A finished store as one OME-TIFF pyramid, for slide viewers (QuPath, napari).

The store's own pyramid becomes the SubIFDs of one OME-TIFF, one page per class, with the class
names and colours and the micrometres per pixel in the OME-XML; written with tifffile through
:mod:`pipeline.source.writer`, a tile at a time. The image is named after the slide the run read.
Labels are a palette image (the class colours as the TIFF colour map, no data black) whose
OME-XML names each class in a MapAnnotation (value -> name) and in the image's description.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.errors import OutputError
from pipeline.products.view import (
    TIFF_TILE,
    StoreView,
    check_output_file,
    convert,
    open_finished,
    pixels_per_cm,
    select_classes,
    staged,
    target_dtype,
    windows,
)
from pipeline.source.writer import Image, write_tiff

_BIGTIFF_FROM = 2**31
"""Uncompressed bytes from which the OME-TIFF is a BigTIFF (half the classic 4 GiB limit)."""


def _tiles(array: Any, dtype: str, bands: tuple[int, ...]) -> Iterator[np.ndarray]:
    """``array``'s ``TIFF_TILE`` tiles in TIFF order: page (class of ``bands``) by page, then row-major.

    Each read decodes the ``(C, tile, tile)`` chunk for one class: C decodes per chunk, the price
    of OME-TIFF's one-page-per-channel layout without holding whole planes in memory.
    """
    height, width = array.shape[-2:]
    planes = [()] if array.ndim == 2 else [(c,) for c in bands]
    for plane in planes:
        for y0, y1, x0, x1 in windows(height, width, TIFF_TILE):
            yield convert(np.asarray(array[(*plane, slice(y0, y1), slice(x0, x1))]), dtype)


def _ome_color(rgb: tuple[int, int, int]) -> int:
    """OME's signed 32-bit RGBA integer.

    >>> _ome_color((255, 0, 0))
    -16776961
    """
    value = (rgb[0] << 24) | (rgb[1] << 16) | (rgb[2] << 8) | 255
    return value - 2**32 if value >= 2**31 else value


CLASSES_NAMESPACE = "fcnpipe.org/classes"
"""Namespace of the MapAnnotation of a labels OME-TIFF: label value -> class name."""


def _colormap(view: StoreView) -> np.ndarray:
    """The TIFF colour map of labels, ``(3, 256)`` uint16: class ``i`` in its colour, the rest black."""
    colormap = np.zeros((3, 256), np.uint16)
    for index, color in enumerate(view.class_colors):
        colormap[:, index] = np.array(color, np.uint16) * 257
    return colormap


def _ome_metadata(view: StoreView) -> dict[str, Any]:
    """tifffile's OME metadata: the slide's name, axes, channel names and colours (the classes of
    labels as a MapAnnotation and a description), physical pixel size in µm."""
    metadata: dict[str, Any] = {"Name": view.source_name}
    if view.what == "labels":
        legend = {str(i): name for i, name in enumerate(view.class_names)}
        hexes = ", ".join(
            f"{i} {name} #{r:02x}{g:02x}{b:02x}"
            for i, (name, (r, g, b)) in enumerate(zip(view.class_names, view.class_colors, strict=True))
        )
        metadata.update(axes="YX", Channel={"Name": ["class"]})
        metadata.update(Description=f"fcnpipe class labels (255 no data): {hexes}")
        metadata.update(MapAnnotation={"Namespace": CLASSES_NAMESPACE, **legend})
    else:
        colors = [_ome_color(c) for c in view.band_colors]
        metadata.update(axes="CYX", Channel={"Name": list(view.band_names), "Color": colors})
    if view.mpp is not None:
        metadata.update(PhysicalSizeX=view.mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=view.mpp)
        metadata["PhysicalSizeYUnit"] = "µm"
    return metadata


def _write_ome(view: StoreView, path: str, dtype: str) -> None:
    levels = view.levels
    itemsize = np.dtype(dtype).itemsize
    planes = len(view.bands) if view.what == "probabilities" else 1
    total = sum(int(np.prod(level.shape[-2:])) * planes * itemsize for level in levels)
    images = []
    for index, level in enumerate(levels):
        options: dict[str, Any] = {
            "shape": (planes, *level.shape[-2:]) if view.what == "probabilities" else level.shape,
            "dtype": dtype,
            "tile": (TIFF_TILE, TIFF_TILE),
            "compression": "zlib",
            "photometric": "minisblack",
        }
        if view.what == "labels":
            options.update(photometric="palette", colormap=_colormap(view))
        if view.mpp is not None:  # pixels per centimetre, exact
            per_cm = pixels_per_cm(view.mpp, index)
            options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
        if index == 0:
            options.update(subifds=len(levels) - 1, metadata=_ome_metadata(view))
        else:
            options.update(subfiletype=1)
        images.append(Image(_tiles(level, dtype, view.bands), options))
    write_tiff(path, images, bigtiff=total >= _BIGTIFF_FROM, ome=True)


def export_ome_tiff(
    store: str,
    out_tif: str,
    *,
    what: str = "probabilities",
    dtype: str | None = None,
    overwrite: bool = False,
    classes: Sequence[str] | None = None,
) -> None:
    """Write every level of ``store`` as one OME-TIFF pyramid at ``out_tif``.

    Level 0 is the main image (one page per class, ``(C, Y, X)``; labels ``(Y, X)``), the store's
    coarser levels its SubIFDs; tiles 512 x 512, zlib (lossless: JPEG would change probabilities and
    labels). ``dtype`` and ``classes`` as for :func:`export_cog`. The OME-XML names the image after
    the slide, names the classes and, for a slide, gives ``PhysicalSizeX``/``Y`` in µm; labels are a
    palette image in the class colours.
    """
    check_output_file(out_tif, overwrite)
    view = select_classes(open_finished(store, what), classes)
    dtype = target_dtype(view, dtype)
    with staged(out_tif) as folder:
        try:
            _write_ome(view, os.path.join(folder, "done.tif"), dtype)
        except OSError as err:
            raise OutputError(f"{out_tif}: cannot write the OME-TIFF ({err.strerror or err})") from err
