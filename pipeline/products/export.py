"""Export a finished store to one TIFF: a Cloud-Optimized GeoTIFF for GIS, an OME-TIFF for slide viewers.

The store is read and written a tile at a time, never whole. Either output is first written into
a temporary folder next to the target and moved into place only when complete, so a failed or
interrupted export never leaves a file that looks finished, and the temporary folder is removed
either way (:func:`pipeline.products.view.staged`).

* :func:`pipeline.products.cog.export_cog` (rasterio / GDAL): level 0 with the store's CRS and
  transform, GDAL's internal overviews.
* :func:`pipeline.products.ome_tiff.export_ome_tiff` (tifffile): the store's own pyramid as SubIFDs,
  one page per class, the class names and micrometres per pixel in the OME-XML.

:func:`export_store` chooses between them by the file's name.
"""

from __future__ import annotations

import os

from pipeline.errors import ConfigError, option
from pipeline.parse import parse_choice
from pipeline.products.cog import export_cog
from pipeline.products.ome_tiff import export_ome_tiff
from pipeline.products.view import check_output_file

KINDS = ("cog", "ome-tiff")

_OME_NAMES = (".ome.tif", ".ome.tiff", ".ome.btf")
_TIFF_NAMES = (".tif", ".tiff")


def kind_for(path: str, kind: str | None) -> str:
    """The kind of TIFF to write at ``path``: ``kind``, else what the name says (``.ome.tif`` an
    OME-TIFF, ``.tif`` a COG); a name that contradicts ``kind``, or says neither, is refused.

    >>> kind_for("a.ome.tiff", None), kind_for("a.TIF", None)
    ('ome-tiff', 'cog')
    >>> try:
    ...     kind_for("a.tif", "ome-tiff")
    ... except ConfigError as err:
    ...     print(err.render({"kind": "--as", "out_path": "-o"}))
    a.tif: an OME-TIFF's name ends in .ome.tif; pass -o a.ome.tif, or pass --as cog
    """
    lower = os.path.basename(path).lower()
    named = "ome-tiff" if lower.endswith(_OME_NAMES) else "cog" if lower.endswith(_TIFF_NAMES) else None
    if kind is None:
        if named is None:
            raise ConfigError(
                f"{path}: fcnpipe export writes a TIFF: name it .tif for a Cloud-Optimized GeoTIFF (GIS) or "
                ".ome.tif for an OME-TIFF (slide viewers)"
            )
        return named
    parse_choice(kind, "kind", KINDS)
    stem = path[: len(path) - len(lower) + lower.index(".")] if "." in lower else path
    if kind == "ome-tiff" and named != "ome-tiff":
        raise ConfigError(
            f"{path}: an OME-TIFF's name ends in .ome.tif; {option('out_path', stem + '.ome.tif')}, "
            f"or {option('kind', 'cog')}"
        )
    if kind == "cog" and named != "cog":
        raise ConfigError(f"{path}: a Cloud-Optimized GeoTIFF's name ends in .tif; {option('out_path', stem + '.tif')}")
    return kind


def export_store(
    store: str,
    out_path: str,
    *,
    kind: str | None = None,
    what: str = "probabilities",
    dtype: str | None = None,
    overwrite: bool = False,
) -> None:
    """Export ``store`` as ``kind`` (``cog`` or ``ome-tiff``, by default what ``out_path``'s name
    says, :func:`kind_for`); see :func:`export_cog`, :func:`export_ome_tiff`."""
    check_output_file(out_path, overwrite)
    kind = kind_for(out_path, kind)  # what and dtype are checked by the exporter, before any write
    exporter = export_cog if kind == "cog" else export_ome_tiff
    exporter(store, out_path, what=what, dtype=dtype, overwrite=overwrite)
