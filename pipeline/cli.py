"""The ``fcnpipe`` command: parse and validate, then call the plain functions of the package.

This is the only module that imports click. Every :class:`~pipeline.errors.FcnpipeError` becomes
one line on stderr and a non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from pipeline import __version__
from pipeline.errors import ConfigError, FcnpipeError

INTERNAL_ERROR = 70


class _Group(click.Group):
    """A group that turns errors into one line, unless ``--debug``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except FcnpipeError as err:
            if ctx.params.get("debug"):
                raise
            click.echo(f"fcnpipe: error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("fcnpipe: interrupted; the output is not marked complete", err=True)
            ctx.exit(130)
        except Exception as err:  # a bug or an environment failure: still one line, never a traceback
            if ctx.params.get("debug"):
                raise
            text = " ".join(str(err).split()) or type(err).__name__
            click.echo(f"fcnpipe: internal error: {type(err).__name__}: {text} (rerun with --debug)", err=True)
            ctx.exit(INTERNAL_ERROR)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fcnpipe")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
def cli(debug: bool) -> None:
    """Turn gigapixel TIFFs (whole-slide scans, GeoTIFFs) into per-pixel class-probability maps.

    \b
    fcnpipe demo                                  make a synthetic slide, train, run, score
    fcnpipe inspect SLIDE.svs                     what is in a TIFF, before a long run
    fcnpipe inspect-model M.pt                    classes, receptive field, stride, halo
    fcnpipe train IMAGES... --masks M... -o M.pt  train any FCN on labelled TIFFs
    fcnpipe run SLIDE.svs --model M.pt -o OUT.zarr   probabilities + labels, OME-Zarr, preview PNG
    fcnpipe preview OUT.zarr                      the PNG again (input, classes over it, legend)
    fcnpipe export OUT.zarr -o OUT.tif            a COG for QGIS (or --as ome-tiff for slide viewers)
    """


def _floats(value: str | None, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError as err:
        raise ConfigError(f"Expected comma-separated numbers for {name}. Got {value!r} instead.") from err


def _overrides(**flags: Any) -> dict[str, Any]:
    """Nested config overrides from the flags that were given (``section__key=value``)."""
    out: dict[str, Any] = {}
    for name, value in flags.items():
        if value is not None:
            section, key = name.split("__")
            out.setdefault(section, {})[key] = value
    return out


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("-o", "--output", help="Zarr store to write (a folder, e.g. OUT.zarr).")
@click.option("-m", "--model", help="fcnpipe checkpoint, TorchScript file, or state_dict (.pt).")
@click.option("--factory", help="package.module:function that builds the module of a state_dict.")
@click.option("-c", "--config", "configs", multiple=True, type=click.Path(dir_okay=False),
              help="YAML config; repeat to layer them (later wins; flags win over all).")  # fmt: skip
@click.option("--level", type=int, help="Pyramid level read as it is (0 = full resolution).  [default: by --mpp/--gsd]")
@click.option("--mpp", type=float, help="Read a slide at this many micrometres per pixel.  [default: the model's]")
@click.option("--gsd", type=float, help="Read a raster at this many CRS units per pixel.  [default: the model's]")
@click.option("--series", type=int, help="Image series of the file (see inspect).  [default: 0]")
@click.option("--tile", type=int, help="Tile core in pixels = output chunk size.  [default: 512]")
@click.option("--batch", type=int, help="Tiles per task / forward pass.  [default: 4]")
@click.option("--halo", type=int, help="Context read around each tile in pixels.  [default: the model's exact halo]")
@click.option("--blend", type=click.Choice(["none", "gaussian", "cosine"]),
              help="Below the exact halo: weighted mean of overlapping windows.  [default: none]")  # fmt: skip
@click.option("--dtype", type=click.Choice(["float32", "float16", "uint8"]),
              help="Stored probabilities; uint8 holds round(p*255).  [default: float32]")  # fmt: skip
@click.option("--format", "output_format", type=click.Choice(["ome-zarr-0.4", "ome-zarr-0.5"]),
              help="OME-Zarr 0.4 on Zarr v2 (QuPath, GDAL/QGIS, napari) or 0.5 on Zarr v3."
                   "  [default: ome-zarr-0.4]")  # fmt: skip
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), help="[default: auto]")
@click.option("--precision", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Forward-pass arithmetic; half precision on CUDA only.  [default: float32]")  # fmt: skip
@click.option("--tta", type=click.Choice(["none", "flips"]), help="Average the 4 flips of each tile.  [default: none]")
@click.option("--workers", type=int, help="Tasks at once.  [default: from the cores]")
@click.option("--torch-threads", type=int, help="Threads per forward pass.  [default: cores / workers]")
@click.option("--classes", help="Class names in channel order, e.g. background,stroma,tumour.")
@click.option("--colors", help="Class colours, e.g. '#000000,#3CB44B,#E6194B'.")
@click.option("--mean", help="Per-channel mean after scaling to [0, 1], e.g. 0.485,0.456,0.406.")
@click.option("--std", help="Per-channel std after the mean, e.g. 0.229,0.224,0.225.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output store.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (only ever on a terminal).")
@click.option("--preview/--no-preview", default=True, show_default=True,
              help="Write OUT.preview.png beside the store: input, classes over it, legend.")  # fmt: skip
def run(
    input_path: str, output: str | None, model: str | None, configs: tuple[str, ...], preview: bool, **flags: Any
) -> None:
    """Predict class probabilities for every pixel of INPUT and write them to a Zarr store.

    The image is read lazily in tiles with a halo as wide as the network's receptive radius, so the
    stitched map equals one whole-image forward pass, and memory does not grow with the image.
    The store holds `0` (classes x Y x X probabilities) and `labels/argmax/0` (Y x X class index);
    its `fcnpipe` attribute records the config, model hash and timings, and `complete: true` last.
    """
    from pipeline.config import load_config
    from pipeline.run import execute, prepare

    overrides = _overrides(
        input__path=input_path,
        input__level=flags["level"],
        input__mpp=flags["mpp"],
        input__gsd=flags["gsd"],
        input__series=flags["series"],
        model__path=model,
        model__factory=flags["factory"],
        model__class_names=None if flags["classes"] is None else tuple(flags["classes"].split(",")),
        model__class_colors=None if flags["colors"] is None else tuple(flags["colors"].split(",")),
        model__mean=_floats(flags["mean"], "--mean"),
        model__std=_floats(flags["std"], "--std"),
        tiling__tile=flags["tile"],
        tiling__batch=flags["batch"],
        tiling__halo=flags["halo"],
        tiling__blend=flags["blend"],
        output__path=output,
        output__dtype=flags["dtype"],
        output__format=flags["output_format"],
        output__overwrite=flags["overwrite"],
        compute__device=flags["device"],
        compute__precision=flags["precision"],
        model__tta=flags["tta"],
        compute__workers=flags["workers"],
        compute__torch_threads=flags["torch_threads"],
        compute__progress=flags["progress"],
    )
    config = load_config(configs, overrides)
    plan = prepare(config)
    for line in plan.describe():
        click.echo(line, err=True)
    with _progress_bar(plan.megapixels, config.compute.progress) as bar:
        result = execute(plan, lambda pixels: bar.update(pixels / 1e6))
    rate = result.megapixels / result.seconds if result.seconds else float("inf")
    click.echo(f"wrote {result.output_path}: {result.shape} in {result.seconds:.1f} s ({rate:.2f} Mpx/s)", err=True)
    if preview:
        from pipeline.preview import default_preview_path, write_store_preview

        try:
            png = write_store_preview(result.output_path, default_preview_path(result.output_path))
        except FcnpipeError as err:  # the store is complete; a missing picture must not fail the run
            click.echo(f"fcnpipe: warning: no preview written: {err}", err=True)
        else:
            click.echo(f"preview {png}", err=True)


def _progress_bar(total_mpx: float, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=round(total_mpx, 2),
        unit="Mpx",
        unit_scale=False,
        disable=None if enabled else True,  # None: only on a terminal
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} Mpx [{elapsed}<{remaining}, {rate_fmt}]",
        dynamic_ncols=True,
    )


@cli.command()
@click.argument("store", type=click.Path(file_okay=False))
@click.option("-o", "--output", "png_path", help="PNG to write.  [default: STORE without .zarr + .preview.png]")
@click.option("--size", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Largest side of each panel in pixels.")  # fmt: skip
def preview(store: str, png_path: str | None, size: int) -> None:
    """Write a PNG of a run's output: the input, its classes over it, and a legend with class shares.

    Reads a small pyramid level of STORE chunk by chunk, so it is quick on any slide. Works on an
    unfinished run too (marked INCOMPLETE) and, if the input TIFF has moved, shows the labels alone.
    """
    from pipeline.preview import default_preview_path, write_store_preview

    click.echo(write_store_preview(store, png_path or default_preview_path(store), max_size=size))


@cli.command("export")
@click.argument("store", metavar="STORE", type=click.Path())
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="TIFF file to write, e.g. OUT.tif."
)
@click.option("--as", "kind", type=click.Choice(["cog", "ome-tiff"]), default="cog", show_default=True,
              help="Cloud-Optimized GeoTIFF (GIS) or OME-TIFF pyramid (QuPath, napari).")  # fmt: skip
@click.option("--what", type=click.Choice(["probabilities", "labels"]), default="probabilities", show_default=True,
              help="One band per class, or the uint8 argmax map (nodata 255).")  # fmt: skip
@click.option("--dtype", type=click.Choice(["uint8", "float32"]),
              help="Probabilities as round(p*255) or float32.  [default: as stored; float16 -> float32]")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def export(store: str, output: str, kind: str, what: str, dtype: str | None, overwrite: bool) -> None:
    """Write a finished store (from `fcnpipe run`) as one TIFF: a COG or an OME-TIFF.

    The store is read chunk by chunk, so memory stays small however large the map. A store whose
    run did not finish is refused. The file appears only when complete.
    """
    from pipeline.export import export_store

    export_store(store, output, kind=kind, what=what, dtype=dtype, overwrite=overwrite)
    click.echo(f"wrote {output}", err=True)


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
def inspect(input_path: str) -> None:
    """Show what is in a TIFF: series, pyramid levels, dtype, compression, tiles, resolution.

    Reads only the file's directory, never its pixels, so it is instant on a 100k x 100k slide.
    """
    from pipeline.describe import describe_file

    for line in describe_file(input_path):
        click.echo(line)


@cli.command()
@click.option("-o", "--output", "workdir", default="demo-output", show_default=True,
              help="Folder for the synthetic slide, the model, the store and the preview.")  # fmt: skip
@click.option("--size", default=8192, show_default=True, help="Slide width and height in pixels.")
@click.option("--seed", default=0, show_default=True, help="Seed for the slide and the training.")
@click.option("--train-seconds", default=45.0, show_default=True, help="Training time budget.")
def demo(workdir: str, size: int, seed: int, train_seconds: float) -> None:
    """The whole job on a synthetic slide: make it, train the reference FCN, run, score, preview.

    Makes a tiled, JPEG-compressed, pyramidal slide-like TIFF with a ground-truth mask, trains the
    reference FCN on patches of it (the code of fcnpipe train), runs the full pipeline on the whole
    slide, prints per-class IoU against the ground truth and writes a PNG preview.
    """
    from pipeline.demo import run_demo

    started = time.perf_counter()
    result = run_demo(
        workdir,
        size=size,
        seed=seed,
        progress=True,
        train_seconds=train_seconds,
        log=lambda line: click.echo(line, err=True),
    )
    for name, iou in result.ious.items():
        click.echo(f"IoU {name:<12} {iou:.3f}")
    click.echo(f"mean IoU {result.mean_iou:.3f}")
    click.echo(f"store    {result.store_path}")
    click.echo(f"preview  {result.preview_path}")
    click.echo(f"took     {time.perf_counter() - started:.0f} s")


@cli.command()
@click.argument("images", metavar="IMAGES...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--masks", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Mask of IMAGE (uint8 class indices); once per image, in the same order.")  # fmt: skip
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (MODEL.pt).")
@click.option("--architecture", type=click.Choice(["reference_fcn", "fcn8s", "unet"]), default="reference_fcn",
              show_default=True, help="Network to train.")  # fmt: skip
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True, help="Epochs of training.")
@click.option("--patches-per-epoch", type=click.IntRange(min=1), default=256, show_default=True,
              help="Random training patches per epoch; validation follows each epoch.")  # fmt: skip
@click.option("--patch", type=click.IntRange(min=3), default=128, show_default=True,
              help="Patch side in pixels; a multiple of the network's stride (fcn8s 32, unet 8).")  # fmt: skip
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Patches per step.")
@click.option("--classes", metavar="NAME,NAME,...",
              help="Class names in label order.  [default: class_0, class_1, ... for the labels found]")  # fmt: skip
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True),
              help="Micrometres per pixel of the images.  [default: as the first image says]")  # fmt: skip
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True),
              help="Wall-clock budget; training stops after the step that spends it.")  # fmt: skip
@click.option("--seed", default=0, show_default=True, help="Seed for the patches and the initial weights.")
def train(
    images: tuple[str, ...], masks: tuple[str, ...], output: str, architecture: str, epochs: int,
    patches_per_epoch: int, patch: int, batch: int, classes: str | None, mpp: float | None,
    seconds: float | None, seed: int,
) -> None:  # fmt: skip
    """Train a network on image / mask TIFF pairs and save an fcnpipe checkpoint.

    \b
    fcnpipe train a.tif b.tif --masks a_mask.tif --masks b_mask.tif -o model.pt --classes background,tumour

    Reads random patches lazily (never a whole image), keeps the last 20% of each image's rows for
    validation, prints the loss and the validation IoU per class after each epoch, and keeps the
    weights of the best epoch.
    """
    from pipeline.train import train_from_tiffs

    names = None if classes is None else tuple(name.strip() for name in classes.split(","))
    if names is not None and (len(names) < 2 or not all(names)):
        raise ConfigError(f"Expected at least 2 comma-separated class names for --classes. Got {classes!r} instead.")
    result = train_from_tiffs(
        list(images), list(masks), output, architecture=architecture, class_names=names, epochs=epochs,
        patches_per_epoch=patches_per_epoch, patch=patch, batch=batch, mpp=mpp, seconds=seconds, seed=seed,
        progress=True, log=lambda line: click.echo(line, err=True),
    )  # fmt: skip
    click.echo(
        f"wrote {result.path}: epoch {result.best_epoch} of {result.epochs}, "
        f"val mIoU {result.best_mean_iou:.3f}, {result.seconds:.0f} s"
    )


@cli.command("inspect-model")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--factory", help="package.module:function that builds the module of a state_dict.")
def inspect_model(model_path: str, factory: str | None) -> None:
    """Show what a model file holds and the tiling it needs: receptive radius, stride, halo.

    Both are measured from the network itself, so they are right for any FCN, TorchScript included.
    """
    from pipeline.describe import describe_model

    for line in describe_model(model_path, factory):
        click.echo(line)


def main() -> None:
    cli(prog_name="fcnpipe")
