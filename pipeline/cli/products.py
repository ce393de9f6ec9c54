"""What goes into a run and what comes out, without running the network: ``fcnpipe inspect`` (a
TIFF), ``inspect-model`` (a checkpoint), ``preview`` and ``export`` (a finished store)."""

from __future__ import annotations

import click

from pipeline.cli import report
from pipeline.cli.app import cli, say

JSON_HELP = "One JSON document: sizes as width and height in pixels, other units in the keys (_px, _s, _bytes)."


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def inspect(input_path: str, as_json: bool) -> None:
    """Show what is in a TIFF, or in a store that `fcnpipe run` wrote.

    \b
    A TIFF: each series (the slide's baseline, label, macro, a GDAL mask, ...) with its levels
    (width x height), dtype, compression, tiles, micrometres per pixel or CRS, its units, bounds,
    corners and nodata. Reads only the file's directory, never its pixels: instant on any slide.
    A store (OUT.zarr): complete or unfinished (chunks on disk), classes, levels, input, model.
    """
    if as_json:
        from pipeline.run.describe import inspect_info

        click.echo(report.json_text(inspect_info(input_path)))
        return
    for line in report.inspect_lines(input_path):
        click.echo(line)


@cli.command("inspect-model")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--factory", help="package.module:function that builds the module of a state_dict.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def inspect_model(model_path: str, factory: str | None, as_json: bool) -> None:
    """Show what a model file holds and the tiling it needs: receptive radius, stride, halo.

    Both are measured from the network itself, so they are right for any FCN, TorchScript included.
    """
    if as_json:
        from pipeline.run.describe import model_info

        click.echo(report.json_text(model_info(model_path, factory)))
        return
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
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="File to write: a TIFF (OUT.tif) or polygons (OUT.geojson, .geojson.gz, .gpkg, .fgb).",
)
@click.option(
    "--as",
    "kind",
    type=click.Choice(["cog", "ome-tiff", "overlay"]),
    help="Cloud-Optimized GeoTIFF, OME-TIFF pyramid, or colour overlay (see above).  "
    "[default: by the name: .ome.tif an OME-TIFF, .overlay.tif an overlay, .tif a COG]",
)
@click.option(
    "--what",
    type=click.Choice(["probabilities", "labels"]),
    help="One band per class, or the uint8 argmax map (nodata 255).  [default: probabilities; an overlay: labels]",
)
@click.option(
    "--dtype",
    type=click.Choice(["uint8", "float32"]),
    help="Probabilities as round(p*254) or float32.  [default: as stored; float16 -> float32]",
)
@click.option(
    "--class",
    "classes",
    multiple=True,
    metavar="NAME",
    help="Export only this class's probability band; repeat for more, in the order given.  "
    "Polygons: only the regions of this class, a background class too.",
)
@click.option(
    "--co",
    "creation_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="GDAL creation option of the COG (e.g. COMPRESS=ZSTD); repeat for more.",
)
@click.option(
    "--nodata",
    type=float,
    help="Nodata value of a COG: NaN or a value outside [0, 1] for float32, a non-class value for labels.  "
    "[default: NaN, 255]",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (and its .aux.xml).")
@click.option(
    "--skip-class",
    "skip_classes",
    multiple=True,
    metavar="NAME",
    help="Polygons: leave this class out; repeat for more.  [default: the background classes (background, "
    "bg, glass, no tissue, unlabelled; any case) unless --class names them]",
)
@click.option(
    "--object-type",
    type=click.Choice(["annotation", "detection"]),
    help="Polygons in GeoJSON: the QuPath object each becomes.  [default: annotation]",
)
@click.option(
    "--connectivity",
    type=click.Choice(["4", "8"]),
    help="Polygons: pixels of one region share an edge (4), or an edge or a corner (8).  [default: 4]",
)
@click.option(
    "--min-area",
    metavar="AREA",
    help="Polygons: drop regions smaller than this, in label-map pixels (50), um2 on a slide (20um2) or m2 "
    "on a raster (900m2).",
)
@click.option(
    "--simplify",
    type=click.FloatRange(min=0),
    metavar="TOL",
    help="Polygons: simplify by this tolerance in output units (level-0 pixels, CRS units); shared edges stay "
    "shared. Holds all polygons in memory.",
)
@click.option("--fill-holes", is_flag=True, help="Polygons: outer outlines only, holes dropped.")
def export(
    store: str,
    output: str,
    kind: str | None,
    what: str | None,
    dtype: str | None,
    classes: tuple[str, ...],
    creation_options: tuple[str, ...],
    nodata: float | None,
    overwrite: bool,
    skip_classes: tuple[str, ...],
    object_type: str | None,
    connectivity: str | None,
    min_area: str | None,
    simplify: float | None,
    fill_holes: bool,
) -> None:
    """Write a finished store (from `fcnpipe run`) as one TIFF or as polygons, for the viewer at hand.

    \b
    OUT.tif          Cloud-Optimized GeoTIFF: QGIS, GDAL, ArcGIS (grey bands named after the
                     classes, nodata; labels with class colours and names in OUT.tif.aux.xml)
    OUT.ome.tif      OME-TIFF pyramid: QuPath, napari, Bio-Formats (channels named after the
                     classes; labels as a palette image with the class names in the OME-XML)
    OUT.overlay.tif  the labels in their class colours, RGBA, no data transparent: OpenSlide-based
                     viewers, and QuPath as a colour overlay
    OUT.geojson      the regions of each class as polygons, QuPath GeoJSON: annotations (or
                     detections) in level-0 pixels of the slide, with class names and colours;
                     in CRS units for a GeoTIFF (.geojson.gz: gzipped)
    OUT.gpkg, .fgb   the same as GeoPackage or FlatGeobuf: QGIS, GDAL (the input's CRS, one
                     layer 'regions' with 'class' and 'area' in CRS units squared)

    Polygons equal those of the whole label map at once (rasterio / gdal_polygonize), holes
    included, without seams at chunk edges; no data and the background classes are left out.

    The store is read chunk by chunk, so memory stays small however large the map. A store whose
    run did not finish is refused. The file appears only when complete.
    """
    from pipeline.vector.writers import vector_kind

    if vector_kind(output) is not None:
        from pipeline.errors import ConfigError
        from pipeline.vector.export import export_polygons

        tiff_only: dict[str, object] = {
            "--as": kind,
            "--what": what,
            "--dtype": dtype,
            "--co": creation_options,
            "--nodata": nodata,
        }
        given = [flag for flag, value in tiff_only.items() if value not in (None, ())]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to a TIFF export, not to polygons ({output})")
        count = export_polygons(
            store,
            output,
            object_type=object_type or "annotation",
            classes=classes or None,
            skip_classes=skip_classes or None,
            connectivity=int(connectivity or 4),
            min_area=min_area,
            simplify=simplify,
            fill_holes=fill_holes,
            overwrite=overwrite,
        )
        say(f"wrote {output} ({count:,} polygons)")
        return
    polygon_only: dict[str, object] = {"--skip-class": skip_classes, "--object-type": object_type}
    polygon_only["--connectivity"] = connectivity
    polygon_only |= {"--min-area": min_area, "--simplify": simplify, "--fill-holes": fill_holes or None}
    given = [flag for flag, value in polygon_only.items() if value not in (None, ())]
    if given:
        from pipeline.errors import ConfigError

        raise ConfigError(f"{', '.join(given)} apply to polygons (.geojson, .gpkg, .fgb), not to {output}")
    from pipeline.products.export import export_store

    export_store(
        store,
        output,
        kind=kind,
        what=what,
        dtype=dtype,
        overwrite=overwrite,
        creation_options=creation_options,
        nodata=nodata,
        classes=classes or None,
    )
    say(f"wrote {output}")


@cli.command("stats")
@click.argument("store", metavar="STORE", type=click.Path())
@click.option(
    "--regions",
    type=click.Path(),
    help="Count inside each polygon of this file: QuPath GeoJSON (level-0 pixels of the slide), or "
    "GeoPackage / GeoJSON in the raster's CRS.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document: classes keyed by name, numbers as numbers.")
def stats(store: str, regions: str | None, as_json: bool) -> None:
    """Class areas of a finished store: pixels, area and share of the labelled pixels per class.

    \b
    Areas are in um2 and mm2 on a slide (its micrometres per pixel), in m2 and ha on a raster in
    a metric CRS (other CRS units squared otherwise), pixels only without a scale. No data is in
    no class; the classes add up to the labelled area. The run stored them; a store written by an
    earlier fcnpipe is counted now, chunk by chunk. With --regions, the same inside each polygon:
    a pixel counts for a region when its centre is strictly inside it.
    """
    from pipeline.store.reading import open_store, store_stats

    reader = open_store(store, complete=True, why="its class areas need every chunk")
    if regions is None:
        document = store_stats(reader)
        if as_json:
            click.echo(report.json_text({"store": store, **document}))
            return
        for line in report.class_lines(document):
            click.echo(line)
        return
    from pipeline.vector.regions import region_stats

    found = region_stats(reader, regions)
    if as_json:
        click.echo(report.json_text({"store": store, "regions_file": regions, "regions": found}))
        return
    for region in found:
        kind = "" if region["classification"] in (None, region["name"]) else f" ({region['classification']})"
        click.echo(f"region {region['index']} {region['name']}{kind}: {region['pixels']:,} px whose centre is inside")
        for line in report.class_lines(region, indent="  "):
            click.echo(line)
