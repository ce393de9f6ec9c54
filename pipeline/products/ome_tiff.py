"""A finished store as one OME-TIFF pyramid, for slide viewers (QuPath, napari).

The store's own pyramid becomes the SubIFDs of one OME-TIFF, one page per class, with the class
names and colours and the micrometres per pixel in the OME-XML; written with tifffile through
:mod:`pipeline.source.writer`, a tile at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.errors import OutputError
from pipeline.products.view import (
    TIFF_TILE,
    StoreView,
    check_output_file,
    convert,
    open_finished,
    staged,
    target_dtype,
    windows,
)
from pipeline.source.writer import Image, write_tiff

_BIGTIFF_FROM = 2**31
"""Uncompressed bytes from which the OME-TIFF is a BigTIFF (half the classic 4 GiB limit)."""


def _tiles(array: Any, dtype: str) -> Iterator[np.ndarray]:
    """``array``'s ``TIFF_TILE`` tiles in TIFF order: page (class) by page, then row-major.

    Each read decodes the ``(C, tile, tile)`` chunk for one class: C decodes per chunk, the price
    of OME-TIFF's one-page-per-channel layout without holding whole planes in memory.
    """
    height, width = array.shape[-2:]
    planes = [()] if array.ndim == 2 else [(c,) for c in range(array.shape[0])]
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


def _ome_metadata(view: StoreView) -> dict[str, Any]:
    """tifffile's OME metadata: axes, channel names and colours, physical pixel size in µm."""
    metadata: dict[str, Any] = {"Name": os.path.basename(os.path.normpath(view.path))}
    if view.what == "labels":
        metadata.update(axes="YX", Channel={"Name": ["argmax"]})
    else:
        colors = [_ome_color(c) for c in view.class_colors]
        metadata.update(axes="CYX", Channel={"Name": list(view.class_names), "Color": colors})
    if view.mpp is not None:
        metadata.update(PhysicalSizeX=view.mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=view.mpp)
        metadata["PhysicalSizeYUnit"] = "µm"
    return metadata


def _write_ome(view: StoreView, path: str, dtype: str) -> None:
    levels = view.levels
    itemsize = np.dtype(dtype).itemsize
    total = sum(int(np.prod(level.shape)) * itemsize for level in levels)
    images = []
    for index, level in enumerate(levels):
        options: dict[str, Any] = {
            "shape": level.shape,
            "dtype": dtype,
            "tile": (TIFF_TILE, TIFF_TILE),
            "compression": "zlib",
            "photometric": "minisblack",
        }
        if view.mpp is not None:  # pixels per centimetre
            per_cm = 1e4 / (view.mpp * 2**index)
            options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
        if index == 0:
            options.update(subifds=len(levels) - 1, metadata=_ome_metadata(view))
        else:
            options.update(subfiletype=1)
        images.append(Image(_tiles(level, dtype), options))
    write_tiff(path, images, bigtiff=total >= _BIGTIFF_FROM, ome=True)


def export_ome_tiff(
    store: str, out_tif: str, *, what: str = "probabilities", dtype: str | None = None, overwrite: bool = False
) -> None:
    """Write every level of ``store`` as one OME-TIFF pyramid at ``out_tif``.

    Level 0 is the main image (one page per class, ``(C, Y, X)``; labels ``(Y, X)``), the store's
    coarser levels its SubIFDs; tiles 512 x 512, zlib (lossless: JPEG would change probabilities and
    labels). ``dtype`` as for :func:`export_cog`. The OME-XML names the classes and, for a slide,
    gives ``PhysicalSizeX``/``Y`` in µm.
    """
    check_output_file(out_tif, overwrite)
    view = open_finished(store, what)
    dtype = target_dtype(view, dtype)
    with staged(out_tif) as folder:
        try:
            _write_ome(view, os.path.join(folder, "done.tif"), dtype)
        except OSError as err:
            raise OutputError(f"{out_tif}: cannot write the OME-TIFF ({err.strerror or err})") from err
