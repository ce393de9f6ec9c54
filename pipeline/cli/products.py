"""What goes into a run and what comes out, without running the network: ``fcnpipe inspect`` (a
TIFF), ``inspect-model`` (a checkpoint), ``preview`` and ``export`` (a finished store)."""

from __future__ import annotations

import click

from pipeline.cli import report
from pipeline.cli.app import cli


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path())
def inspect(input_path: str) -> None:
    """Show what is in a TIFF: series, pyramid levels, dtype, compression, tiles, resolution.

    Reads only the file's directory, never its pixels, so it is instant on a 100k x 100k slide.
    """
    for line in report.file_lines(input_path):
        click.echo(line)


@cli.command("inspect-model")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--factory", help="package.module:function that builds the module of a state_dict.")
def inspect_model(model_path: str, factory: str | None) -> None:
    """Show what a model file holds and the tiling it needs: receptive radius, stride, halo.

    Both are measured from the network itself, so they are right for any FCN, TorchScript included.
    """
    for line in report.model_lines(model_path, factory):
        click.echo(line)


@cli.command()
@click.argument("store", type=click.Path())
@click.option("-o", "--output", "png_path", help="PNG to write.  [default: STORE without .zarr + .preview.png]")
@click.option(
    "--size", default=1024, show_default=True, type=click.IntRange(min=1), help="Largest side of each panel in pixels."
)
def preview(store: str, png_path: str | None, size: int) -> None:
    """Write a PNG of a run's output: the input, its classes over it, and a legend with class shares.

    Reads a small pyramid level of STORE chunk by chunk, so it is quick on any slide. Works on an
    unfinished run too (marked INCOMPLETE) and, if the input TIFF has moved, shows the labels alone.
    """
    from pipeline.products.preview import default_preview_path, write_store_preview

    click.echo(write_store_preview(store, png_path or default_preview_path(store), max_size=size))


@cli.command("export")
@click.argument("store", metavar="STORE", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="TIFF file to write, e.g. OUT.tif.")
@click.option(
    "--as",
    "kind",
    type=click.Choice(["cog", "ome-tiff"]),
    help="Cloud-Optimized GeoTIFF (GIS) or OME-TIFF pyramid (QuPath, napari).  "
    "[default: by the name: .ome.tif an OME-TIFF, .tif a COG]",
)
@click.option(
    "--what",
    type=click.Choice(["probabilities", "labels"]),
    default="probabilities",
    show_default=True,
    help="One band per class, or the uint8 argmax map (nodata 255).",
)
@click.option(
    "--dtype",
    type=click.Choice(["uint8", "float32"]),
    help="Probabilities as round(p*254) or float32.  [default: as stored; float16 -> float32]",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def export(store: str, output: str, kind: str | None, what: str, dtype: str | None, overwrite: bool) -> None:
    """Write a finished store (from `fcnpipe run`) as one TIFF: a COG or an OME-TIFF.

    The store is read chunk by chunk, so memory stays small however large the map. A store whose
    run did not finish is refused. The file appears only when complete.
    """
    from pipeline.products.export import export_store

    export_store(store, output, kind=kind, what=what, dtype=dtype, overwrite=overwrite)
    click.echo(f"wrote {output}", err=True)
