"""Export a finished store to one TIFF: a Cloud-Optimized GeoTIFF for GIS, an OME-TIFF for slide viewers.

The store is read and written a tile at a time, never whole. Every output is first written into
a temporary folder next to the target and moved into place only when complete, so a failed or
interrupted export never leaves a file that looks finished, and the temporary folder is removed
either way (:func:`pipeline.products.view.staged`).

* :func:`pipeline.products.cog.export_cog` (rasterio / GDAL), for QGIS, GDAL and ArcGIS: level 0
  with the store's CRS and transform, GDAL's internal overviews, grey bands named after the
  classes, nodata; labels with their colour table and class names (``.aux.xml`` sidecar).
* :func:`pipeline.products.ome_tiff.export_ome_tiff` (tifffile), for QuPath, napari and
  Bio-Formats: the store's own pyramid as SubIFDs, one page per class, the class names and
  micrometres per pixel in the OME-XML; labels as a palette image.
* :func:`pipeline.products.overlay.export_overlay` (tifffile), for OpenSlide-based viewers and as
  a colour overlay in QuPath: the labels in their class colours, RGBA, a pyramid of plain IFDs.

:func:`export_store` chooses between them by the file's name (:func:`kind_for`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from pipeline.errors import ConfigError, option
from pipeline.parse import parse_choice
from pipeline.products.cog import export_cog, parse_creation_options
from pipeline.products.ome_tiff import export_ome_tiff
from pipeline.products.overlay import export_overlay
from pipeline.products.view import check_output_file

KINDS = ("cog", "ome-tiff", "overlay")

_OME_NAMES = (".ome.tif", ".ome.tiff", ".ome.btf")
_OVERLAY_NAMES = (".overlay.tif", ".overlay.tiff")
_TIFF_NAMES = (".tif", ".tiff")
_SUFFIX = {"cog": ".tif", "ome-tiff": ".ome.tif", "overlay": ".overlay.tif"}
_WHAT = {"cog": "a Cloud-Optimized GeoTIFF", "ome-tiff": "an OME-TIFF", "overlay": "an overlay"}


def _named(lower: str) -> str | None:
    if lower.endswith(_OME_NAMES):
        return "ome-tiff"
    if lower.endswith(_OVERLAY_NAMES):
        return "overlay"
    return "cog" if lower.endswith(_TIFF_NAMES) else None


def kind_for(path: str, kind: str | None) -> str:
    """The kind of TIFF to write at ``path``: ``kind``, else what the name says (``.ome.tif`` an
    OME-TIFF, ``.overlay.tif`` a colour overlay, ``.tif`` a COG); a name that contradicts ``kind``,
    or says none, is refused.

    >>> kind_for("a.ome.tiff", None), kind_for("a.TIF", None), kind_for("a.overlay.tif", None)
    ('ome-tiff', 'cog', 'overlay')
    >>> try:
    ...     kind_for("a.tif", "ome-tiff")
    ... except ConfigError as err:
    ...     print(err.render({"kind": "--as", "out_path": "-o"}))
    a.tif: an OME-TIFF's name ends in .ome.tif; pass -o a.ome.tif, or pass --as cog
    """
    lower = os.path.basename(path).lower()
    named = _named(lower)
    if kind is None:
        if named is None:
            raise ConfigError(
                f"{path}: fcnpipe export writes what the name says: .tif a Cloud-Optimized GeoTIFF (GIS), "
                ".ome.tif an OME-TIFF (slide viewers), .overlay.tif a colour overlay (OpenSlide), or polygons: "
                ".geojson / .geojson.gz (QuPath), .gpkg / .fgb (GIS)"
            )
        return named
    parse_choice(kind, "kind", KINDS)
    if kind == named:
        return kind
    stem = path[: len(path) - len(lower) + lower.index(".")] if "." in lower else path
    message = f"{path}: {_WHAT[kind]}'s name ends in {_SUFFIX[kind]}; {option('out_path', stem + _SUFFIX[kind])}"
    raise ConfigError(message + (f", or {option('kind', named)}" if named is not None else ""))


def export_store(
    store: str,
    out_path: str,
    *,
    kind: str | None = None,
    what: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    creation_options: Sequence[str] = (),
    nodata: float | None = None,
    classes: Sequence[str] | None = None,
) -> None:
    """Export ``store`` as ``kind`` (``cog``, ``ome-tiff`` or ``overlay``; by default what
    ``out_path``'s name says, :func:`kind_for`); see :func:`export_cog`, :func:`export_ome_tiff`,
    :func:`export_overlay`. ``what`` defaults to ``probabilities`` (an overlay shows ``labels``).
    ``creation_options`` and ``nodata`` apply to a COG only, ``dtype`` and ``classes`` to
    probabilities; each is refused, before anything is written, where it does not apply."""
    check_output_file(out_path, overwrite)
    kind = kind_for(out_path, kind)  # what and dtype are checked by the exporter, before any write
    if kind != "cog":
        if creation_options:
            parse_creation_options(creation_options)  # a malformed one is named first
            raise ConfigError(f"GDAL creation options apply to a COG only, not to {_WHAT[kind]}")
        if nodata is not None:
            raise ConfigError(f"a nodata value applies to a COG only; {_WHAT[kind]} keeps 255 (labels) or NaN")
    if kind == "overlay":
        if what not in (None, "labels"):
            raise ConfigError(f"an overlay shows the labels in their class colours; {option('what', 'labels')}")
        if dtype is not None or classes is not None:
            raise ConfigError("an overlay is the labels in RGBA; a dtype or a choice of classes does not apply")
        export_overlay(store, out_path, overwrite=overwrite)
        return
    what = what or "probabilities"
    if kind == "cog":
        export_cog(
            store,
            out_path,
            what=what,
            dtype=dtype,
            overwrite=overwrite,
            creation_options=creation_options,
            nodata=nodata,
            classes=classes,
        )
    else:
        export_ome_tiff(store, out_path, what=what, dtype=dtype, overwrite=overwrite, classes=classes)
