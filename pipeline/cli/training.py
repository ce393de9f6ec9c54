"""``fcnpipe train`` and ``demo``: fit a network on labelled TIFFs; the whole job on a synthetic slide."""

from __future__ import annotations

import time

import click

from pipeline.cli.app import cli, say
from pipeline.cli.progress import Progress
from pipeline.errors import ConfigError


@cli.command()
@click.option(
    "-o",
    "--output",
    "workdir",
    default="demo-output",
    show_default=True,
    help="Folder for the synthetic slide, the model, the store and the preview.",
)
@click.option("--size", default=8192, show_default=True, help="Slide width and height in pixels.")
@click.option("--seed", default=0, show_default=True, help="Seed for the slide and the training.")
@click.option(
    "--train-steps",
    default=300,
    show_default=True,
    type=click.IntRange(min=1),
    help="Steps of 8 training patches: a fixed amount, so every machine trains the same model.",
)
def demo(workdir: str, size: int, seed: int, train_steps: int) -> None:
    """The whole job on a synthetic slide: make it, train the reference FCN, run, score, preview.

    Makes a tiled, JPEG-compressed, pyramidal slide-like TIFF with a ground-truth mask, trains the
    reference FCN on patches of it (the code of fcnpipe train), runs the full pipeline on the whole
    slide, prints per-class IoU against the ground truth and writes a PNG preview.
    """
    from pipeline.training.demo import run_demo

    started = time.perf_counter()
    bars: dict[str, Progress] = {}

    def progress(step: str, done: float, total: float) -> None:
        if step not in bars:
            for bar in bars.values():
                bar.close()
            bars[step] = Progress(total, True, say, unit="patch" if step == "training" else "Mpx", desc=step)
        bars[step].advance_to(done, total)

    def log(line: str) -> None:
        for bar in bars.values():
            bar.clear()
        say(line)

    try:
        result = run_demo(workdir, size=size, seed=seed, progress=progress, train_steps=train_steps, log=log)
    finally:
        for bar in bars.values():
            bar.close()
    for name, iou in result.ious.items():
        click.echo(f"IoU {name:<12} {iou:.3f}")
    click.echo(f"mean IoU {result.mean_iou:.3f}")
    click.echo(f"model    {result.model_path} sha256 {result.model_sha256}")
    click.echo(f"trained  {result.timings.get('train', 0.0):.0f} s ({train_steps} steps)")
    click.echo(f"store    {result.store_path}")
    click.echo(f"preview  {result.preview_path}")
    click.echo(f"took     {time.perf_counter() - started:.0f} s")


@cli.command()
@click.argument("images", metavar="IMAGES...", nargs=-1, required=True, type=click.Path())
@click.option(
    "--masks",
    multiple=True,
    required=True,
    type=click.Path(),
    help="Mask of IMAGE (uint8 class indices); once per image, in the same order.",
)
@click.option("-o", "--output", required=True, type=click.Path(), help="Checkpoint to write (MODEL.pt).")
@click.option(
    "--architecture",
    type=click.Choice(["reference_fcn", "fcn8s", "unet"]),
    default="reference_fcn",
    show_default=True,
    help="Network to train.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True, help="Epochs of training.")
@click.option(
    "--patches-per-epoch",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Random training patches per epoch; validation follows each epoch.",
)
@click.option(
    "--patch",
    type=click.IntRange(min=3),
    default=128,
    show_default=True,
    help="Patch side in pixels; a multiple of the network's stride (fcn8s 32, unet 8).",
)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Patches per step.")
@click.option(
    "--classes",
    metavar="NAME,NAME,...",
    help="Class names in label order.  [default: class_0, class_1, ... for the labels found]",
)
@click.option(
    "--mpp",
    type=click.FloatRange(min=0, min_open=True),
    help="Micrometres per pixel of the images.  [default: as the first image says]",
)
@click.option(
    "--gsd",
    type=click.FloatRange(min=0, min_open=True),
    help="Ground sample distance of georeferenced images, CRS units (e.g. metres) per pixel; runs read rasters "
    "at it.  [default: as the first image's georeference says]",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    help="Wall-clock budget; training stops after the step that spends it.",
)
@click.option("--seed", default=0, show_default=True, help="Seed for the patches and the initial weights.")
def train(
    images: tuple[str, ...],
    masks: tuple[str, ...],
    output: str,
    architecture: str,
    epochs: int,
    patches_per_epoch: int,
    patch: int,
    batch: int,
    classes: str | None,
    mpp: float | None,
    gsd: float | None,
    seconds: float | None,
    seed: int,
) -> None:
    """Train a network on image / mask TIFF pairs and save an fcnpipe checkpoint.

    \b
    fcnpipe train a.tif b.tif --masks a_mask.tif --masks b_mask.tif -o model.pt --classes background,tumour

    Reads random patches lazily (never a whole image), keeps the last 20% of each image's rows for
    validation, prints the loss and the validation IoU per class after each epoch, and keeps the
    weights of the best epoch.
    """
    from pipeline.training.train import train_from_tiffs

    names = None if classes is None else tuple(name.strip() for name in classes.split(","))
    if names is not None and (len(names) < 2 or not all(names)):
        raise ConfigError(f"Expected at least 2 comma-separated class names for --classes. Got {classes!r} instead.")
    with Progress(epochs * patches_per_epoch, True, say, unit="patch", desc="training") as bar:

        def log(line: str) -> None:
            bar.clear()
            say(line)

        result = train_from_tiffs(
            list(images),
            list(masks),
            output,
            architecture=architecture,
            class_names=names,
            epochs=epochs,
            patches_per_epoch=patches_per_epoch,
            patch=patch,
            batch=batch,
            mpp=mpp,
            gsd=gsd,
            seconds=seconds,
            seed=seed,
            progress=bar.advance_to,
            log=log,
        )
    click.echo(
        f"wrote {result.path}: epoch {result.best_epoch} of {result.epochs}, "
        f"val mIoU {result.best_mean_iou:.3f}, {result.seconds:.0f} s"
    )
