"""The ``fcnpipe`` command: parse and validate, then call the plain functions of the package.

This is the only module that imports click. Every :class:`~pipeline.errors.FcnpipeError` becomes
one line on stderr and a non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from pipeline import __version__
from pipeline.cli.progress import Progress
from pipeline.errors import WARNINGS, ConfigError, FcnpipeError, Interrupted

INTERNAL_ERROR = 70
BROKEN_PIPE = 141
"""The exit code of a Unix tool killed by SIGPIPE (128 + 13)."""


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is left of it at exit cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


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
            click.echo(f"fcnpipe: {err.label}: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("fcnpipe: interrupted", err=True)
            ctx.exit(Interrupted.exit_code)
        except BrokenPipeError:  # `fcnpipe inspect FILE | head`: the reader left; leave quietly, like Unix tools
            _quiet_stdout()
            ctx.exit(BROKEN_PIPE)
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
    fcnpipe plan SLIDE.svs --model M.pt           chunks, skipped background, ETA, memory, disk
    fcnpipe run SLIDE.svs --model M.pt -o OUT.zarr   probabilities + labels, OME-Zarr, preview PNG
    fcnpipe batch scans/ --model M.pt -o OUTDIR   many inputs, manifest; rerun to resume
    fcnpipe preview OUT.zarr                      the PNG again (input, classes over it, legend)
    fcnpipe export OUT.zarr -o OUT.tif            a COG for QGIS (or --as ome-tiff for slide viewers)
    """
    _route_warnings()


class _WarningLines(logging.Handler):
    """``fcnpipe: warning: MESSAGE`` on stderr for each :func:`pipeline.errors.warn`."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"fcnpipe: warning: {record.getMessage()}", err=True)


def _route_warnings() -> None:
    """Our warnings to stderr as one line each (and, through the ``fcnpipe`` logger, to the log);
    tifffile's own log records only to the log: the file's problem reaches the user once, as the
    line fcnpipe writes about it, not as a library's message beside it."""
    warnings = logging.getLogger(WARNINGS)
    if not any(isinstance(h, _WarningLines) for h in warnings.handlers):
        warnings.addHandler(_WarningLines(logging.WARNING))
    library = logging.getLogger("tifffile")
    library.propagate = False
    if not library.handlers:
        library.addHandler(_ToFcnpipeLog())


class _ToFcnpipeLog(logging.Handler):
    """Hands a library's records to the ``fcnpipe`` logger's handlers (the log file, if any)."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger("fcnpipe").handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


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


_RUN_OPTIONS = [
    click.option("-m", "--model",
                 help="fcnpipe checkpoint, TorchScript file, or state_dict (.pt).  [required, or model.path]"),
    click.option("--factory", help="package.module:function that builds the module of a state_dict."),
    click.option("-c", "--config", "configs", multiple=True, type=click.Path(),
                 help="YAML config; repeat to layer them (later wins; flags win over all)."),
    click.option("--level", type=int,
                 help="Pyramid level read as it is (0 = full resolution).  [default: by --mpp/--gsd]"),
    click.option("--mpp", type=float, help="Read a slide at this many micrometres per pixel.  [default: the model's]"),
    click.option("--gsd", type=float, help="Read a raster at this many CRS units per pixel.  [default: the model's]"),
    click.option("--series", type=int, help="Image series of the file (see inspect).  [default: 0]"),
    click.option("--mask", "mask_mode", metavar="auto|none|PATH",
                 help="Chunks to compute: auto = tissue on slides, data (not nodata/alpha) on rasters; "
                      "none = all; or a mask image (non-zero = compute).  [default: auto]"),
    click.option("--mask-threshold", type=float,
                 help="Tissue saturation threshold in [0, 1].  [default: Otsu's, kept in 0.04-0.15]"),
    click.option("--tile", type=int, help="Tile core in pixels = output chunk size.  [default: 512]"),
    click.option("--batch", type=int, help="Tiles per task in a row (blended tiling, pyramid).  [default: 4]"),
    click.option("--forward-batch", type=int, help="Tiles per forward pass.  [default: 1 on CPU, 4 on GPU]"),
    click.option("--forward-tile", type=int,
                 help="Predict each tile in pieces of this many pixels.  [default: whole tiles, or on a CPU "
                      "pieces whose activations stay under 8 MiB]"),
    click.option("--halo", type=int,
                 help="Context read around each tile in pixels.  [default: the model's exact halo]"),
    click.option("--blend", type=click.Choice(["none", "gaussian", "cosine"]),
                 help="Below the exact halo: weighted mean of overlapping windows.  [default: none]"),
    click.option("--dtype", type=click.Choice(["float32", "float16", "uint8"]),
                 help="Stored probabilities; uint8 holds round(p*254), 255 = no data.  [default: uint8]"),
    click.option("--format", "output_format", type=click.Choice(["ome-zarr-0.4", "ome-zarr-0.5"]),
                 help="OME-Zarr 0.4 on Zarr v2 (QuPath, GDAL/QGIS, napari) or 0.5 on Zarr v3."
                      "  [default: ome-zarr-0.4]"),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), help="[default: auto]"),
    click.option("--precision", type=click.Choice(["float32", "float16", "bfloat16"]),
                 help="Forward-pass arithmetic; half precision on CUDA only.  [default: float32]"),
    click.option("--tta", type=click.Choice(["none", "flips"]),
                 help="Average the 4 flips of each tile.  [default: none]"),
    click.option("--scheduler", metavar="threads|processes|tcp://HOST:PORT|slurm|pbs|sge",
                 help="Where tasks run: this process's threads; a local Dask cluster of --workers processes; "
                      "a running Dask scheduler; or batch jobs started for the run (see configs/cluster.yaml)."
                      "  [default: threads]"),
    click.option("--workers", type=int,
                 help="Tasks at once (threads), or worker processes (--scheduler processes).  [default: by cores]"),
    click.option("--torch-threads", type=int, help="Threads per forward pass.  [default: cores / workers]"),
    click.option("--classes", help="Class names in channel order, e.g. background,stroma,tumour."),
    click.option("--colors", help="Class colours, e.g. '#000000,#3CB44B,#E6194B'."),
    click.option("--mean", help="Per-channel mean after scaling to [0, 1], e.g. 0.485,0.456,0.406."),
    click.option("--std", help="Per-channel std after the mean, e.g. 0.229,0.224,0.225."),
    click.option("--allow-other-dtype", is_flag=True, default=None,
                 help="Run a checkpoint on pixels of another type (e.g. uint16) than it was trained on (uint8)."),
    click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output store."),
]  # fmt: skip
"""Options shared by run, plan and batch: declared once, like rasterio's ``rio/options.py``."""


def _run_options(command: Any) -> Any:
    for option in reversed(_RUN_OPTIONS):
        command = option(command)
    return command


def _load(configs: tuple[str, ...], input_path: str | None, output: str | None, **flags: Any) -> Any:
    """The run config from the YAML files and the flags of run / plan / batch."""
    from pipeline.config import load_config

    overrides = _overrides(
        input__path=input_path,
        input__level=flags["level"],
        input__mpp=flags["mpp"],
        input__gsd=flags["gsd"],
        input__series=flags["series"],
        model__path=flags["model"],
        model__factory=flags["factory"],
        model__class_names=None if flags["classes"] is None else tuple(flags["classes"].split(",")),
        model__class_colors=None if flags["colors"] is None else tuple(flags["colors"].split(",")),
        model__mean=_floats(flags["mean"], "--mean"),
        model__std=_floats(flags["std"], "--std"),
        model__tta=flags["tta"],
        model__allow_other_dtype=flags["allow_other_dtype"],
        mask__mode=flags["mask_mode"],
        mask__threshold=flags["mask_threshold"],
        tiling__tile=flags["tile"],
        tiling__batch=flags["batch"],
        tiling__forward_batch=flags["forward_batch"],
        tiling__forward_tile=flags["forward_tile"],
        tiling__halo=flags["halo"],
        tiling__blend=flags["blend"],
        output__path=output,
        output__dtype=flags["dtype"],
        output__format=flags["output_format"],
        output__overwrite=flags["overwrite"],
        output__resume=flags.get("resume"),
        compute__device=flags["device"],
        compute__precision=flags["precision"],
        compute__workers=flags["workers"],
        compute__scheduler=flags["scheduler"],
        compute__torch_threads=flags["torch_threads"],
        compute__progress=flags.get("progress"),
    )
    return load_config(configs, overrides)


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.option("-o", "--output", help="Zarr store to write (a folder, e.g. OUT.zarr).  [required, or output.path]")
@_run_options
@click.option(
    "--resume",
    is_flag=True,
    default=None,
    help="Continue an interrupted OUTPUT: compute only its missing chunks (same input, model, config).",
)
@click.option("--progress/--no-progress", default=None,
              help="A bar with rate and ETA on a terminal; elsewhere (nohup, a log, a cluster job) a line "
                   "at each tenth of the work, or every 5 minutes.  [default: on]")  # fmt: skip
@click.option(
    "--preview/--no-preview",
    default=True,
    show_default=True,
    help="Write OUT.preview.png beside the store: input, classes over it, legend.",
)
@click.option("--log", "log_path", type=click.Path(),
              help="Log file, appended to.  [default: OUT.log beside the store]")  # fmt: skip
def run(
    input_path: str, output: str | None, configs: tuple[str, ...], preview: bool, log_path: str | None, **flags: Any
) -> None:
    """Predict class probabilities for every pixel of INPUT and write them to a Zarr store.

    The image is read lazily in tiles with a halo as wide as the network's receptive radius, so the
    stitched map equals one whole-image forward pass, and memory does not grow with the image.
    The store holds `0` (classes x Y x X probabilities) and `labels/argmax/0` (Y x X class index);
    its `fcnpipe` attribute records the config, model hash and timings, and `complete: true` last.

    \b
    Before computing it prints the plan: chunks, how many have no tissue / data (skipped, see
    --mask), the halo's extra reads, and an ETA, peak memory and size on disk measured on a
    sample of the image. A run that is killed or interrupted leaves a store that --resume completes.
    """
    config = _load(configs, input_path, output, **flags)  # a bad flag or config fails here, before torch loads
    out = _required(config.output.path, "-o", "--output", "output.path", "the Zarr store to write")
    _required(config.model.path, "-m", "--model", "model.path", "the network to run")
    from pipeline.compute.engine import open_engine
    from pipeline.run.estimate import estimate
    from pipeline.run.execute import execute, prepare
    from pipeline.store.lock import store_lock

    with (
        _log_to(log_path or default_log_path(out)),
        store_lock(out),  # a second writer is refused now, before the plan and the sample timing
        _interrupted(out, bool(config.output.resume)),
        open_engine(config.compute, config.cluster) as engine,
    ):
        plan = prepare(config, engine)
        _show_plan(plan, estimate(plan).describe() if plan.tiles_to_compute else [])
        with Progress(plan.megapixels_to_compute, config.compute.progress, _say) as bar:
            result = execute(plan, lambda pixels: bar.update(pixels / 1e6))
        for line in _summary(result):
            _say(line)
    if preview and result.status == "done":
        png = _preview_quietly(result.output_path)
        if png is not None:
            click.echo(f"preview {png}", err=True)


def _required(value: str | None, short: str, name: str, key: str, what: str) -> str:
    """``value``, or the usage error Click gives a missing required option (exit code 2)."""
    if value is None:
        raise click.UsageError(f"Missing option '{short}' / '{name}': {what} (or {key} in a -c config).")
    return value


@contextlib.contextmanager
def _interrupted(store: str, resuming: bool) -> Iterator[None]:
    """Turn Ctrl-C into one line that says what was left and how to go on, and log it."""
    try:
        yield
    except KeyboardInterrupt:
        from pipeline.run.resume import check_target

        started = True
        try:
            check_target(os.path.realpath(store), overwrite=False)
            started = False  # nothing there: the run had not begun writing
        except FcnpipeError:
            pass
        again = "the same command" if resuming else "the same command with --resume"
        message = f"{store} is incomplete; run {again} to continue it" if started else "nothing was written"
        logging.getLogger("fcnpipe").warning("interrupted: %s", message)
        raise Interrupted(message) from None


@cli.command("plan")
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.option("-o", "--output", help="Zarr store a run would write (checked, not written).")
@_run_options
@click.option("--resume", is_flag=True, default=None, help="Plan the rest of an interrupted OUTPUT.")
def plan_command(input_path: str, output: str | None, configs: tuple[str, ...], **flags: Any) -> None:
    """Show what `fcnpipe run` would do with the same arguments, without writing anything.

    Prints the chunks, how many are skipped for lack of tissue or data, the halo's extra reads,
    and, from one task's worth of tiles computed on this machine, the ETA, the peak memory and
    the output's size on disk.
    """
    config = _load(configs, input_path, output or "(not written).zarr", **flags)
    _required(config.model.path, "-m", "--model", "model.path", "the network to run")
    from pipeline.run.estimate import estimate
    from pipeline.run.execute import prepare

    plan = prepare(config)
    for line in [*plan.describe(), *(estimate(plan).describe() if plan.tiles_to_compute else [])]:
        click.echo(line)


@cli.command()
@click.argument("inputs", metavar="INPUTS...", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    "outdir",
    required=True,
    type=click.Path(),
    help="Folder for the stores (INPUT name + .zarr), manifest.json/.csv and fcnpipe-batch.log.",
)
@_run_options
@click.option("--progress/--no-progress", default=None,
              help="A bar on a terminal; elsewhere a line at each tenth of the work, or every 5 minutes.")  # fmt: skip
@click.option("--preview/--no-preview", default=True, show_default=True, help="A PNG beside each store.")
def batch(inputs: tuple[str, ...], outdir: str, configs: tuple[str, ...], preview: bool, **flags: Any) -> None:
    """Run many inputs, one store each in OUTDIR, with a manifest of what happened to each.

    \b
    INPUTS are files, folders (their TIFFs), glob patterns ('scans/**/*.svs') or @list.txt
    (one path per line). Run it again after a crash, a kill or a power cut: complete stores
    are skipped, interrupted ones resumed chunk by chunk (--overwrite starts all again).
    A complete store made with another model or config is reported as failed, saying what
    differs; --overwrite computes it again. One bad input never stops the others; the exit
    code is 1 if any input failed.
    """
    config = _load(configs, None, None, **flags)
    _required(config.model.path, "-m", "--model", "model.path", "the network to run on every input")
    from pipeline.compute.engine import open_engine
    from pipeline.run.batch import expand_inputs, run_batch

    paths = expand_inputs(inputs)
    if not paths:
        raise ConfigError(f"No input files found in {' '.join(inputs)}")
    started = time.perf_counter()
    with (
        _log_to(os.path.join(outdir, "fcnpipe-batch.log")),
        _batch_interrupted(),
        open_engine(config.compute, config.cluster) as engine,
        Progress(0.0, config.compute.progress, _say) as bar,
    ):

        def on_plan(item: Any, plan: Any) -> None:
            bar.add_total(plan.megapixels_to_compute)
            bar.clear()
            _show_plan(plan, [])

        def on_item(item: Any) -> None:
            bar.clear()
            line = f"{item.status:<7} {item.input}" + (f": {item.reason}" if item.reason else "")
            if item.status == "done":
                line += f" ({item.megapixels:.0f} Mpx in {item.seconds:.0f} s)"
                if preview:
                    _preview_quietly(item.output)
            _say(line)

        items = run_batch(config, paths, outdir, on_plan, lambda pixels: bar.update(pixels / 1e6), on_item, engine)
        elapsed = time.perf_counter() - started
        counts = {status: sum(item.status == status for item in items) for status in ("done", "skipped", "failed")}
        megapixels = sum(item.megapixels for item in items if item.status == "done")
        chunks = sum(item.chunks for item in items if item.status == "done")
        masked = sum(item.chunks_skipped for item in items if item.status == "done")
        bar.close()
        _say(
            f"batch   {len(items)} inputs: {counts['done']} done, {counts['skipped']} already complete, "
            f"{counts['failed']} failed; {megapixels:.1f} Mpx in {elapsed:.0f} s; "
            f"{masked / max(1, chunks):.0%} of chunks skipped as background"
        )
        _say(f"manifest {os.path.join(outdir, 'manifest.json')}")
    if counts["failed"]:
        sys.exit(1)


@contextlib.contextmanager
def _batch_interrupted() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        message = "run the same command again to continue: complete stores are kept, interrupted ones resumed"
        logging.getLogger("fcnpipe").warning("interrupted: %s", message)
        raise Interrupted(message) from None


def default_log_path(store: str) -> str:
    """``OUT.log`` beside the store ``OUT.zarr``."""
    from pipeline.store.arrays import beside

    return beside(os.path.abspath(store), ".log")


def _show_plan(plan: Any, extra: list[str]) -> None:
    for line in [*plan.describe(), *extra]:
        _say(line)


def _say(line: str) -> None:
    """A line for the person at the terminal (stderr) and for the log file."""
    click.echo(line, err=True)
    logging.getLogger("fcnpipe").info(line)


def _summary(result: Any) -> list[str]:
    if result.status != "done":
        return [f"{result.output_path}: {result.status}, nothing to do"]
    rate = result.megapixels / result.seconds if result.seconds else float("inf")
    return [
        f"wrote {result.output_path}: {result.shape} in {result.seconds:.1f} s ({rate:.2f} Mpx/s)",
        f"chunks {result.tiles_computed} computed, {result.tiles_masked} skipped without foreground "
        f"({result.skipped_fraction:.0%}), {result.tiles_resumed} from earlier runs; "
        f"peak memory {result.peak_rss_mib:.0f} MiB",
        *(
            [
                f"nodata {result.nodata_pixels:,} px of the computed chunks hold no data (alpha 0, GDAL_NODATA, "
                "NaN or infinite values): probabilities NaN / 255, label 255"
            ]
            if result.nodata_pixels
            else []
        ),
    ]


def _preview_quietly(store: str) -> str | None:
    """The preview PNG of a complete store, or a warning: a missing picture must not fail a run."""
    from pipeline.products.preview import default_preview_path, write_store_preview

    try:
        return write_store_preview(store, default_preview_path(store))
    except FcnpipeError as err:
        click.echo(f"fcnpipe: warning: no preview written for {store}: {err}", err=True)
        return None


class _LogFile(logging.FileHandler):
    """The log of one command: its folder and file are made at the first record, so that a command
    that fails before it starts leaves nothing behind."""

    def __init__(self, path: str) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.records = 0

    def _open(self) -> Any:
        os.makedirs(os.path.dirname(os.path.abspath(self.baseFilename)), exist_ok=True)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        super().emit(record)


@contextlib.contextmanager
def _log_to(path: str) -> Iterator[None]:
    """Append the ``fcnpipe`` logger's records to ``path`` while the block runs, the file made at
    the first record; an error that ends the block after something was logged is logged too."""
    folder = os.path.dirname(os.path.abspath(path))
    existing = next(p for p in _parents(folder) if os.path.exists(p))
    if os.path.isdir(path) or not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise ConfigError(f"{path}: cannot write the log file there")
    logger = logging.getLogger("fcnpipe")
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    except FcnpipeError as err:
        if handler.records and not isinstance(err, Interrupted):  # the run had begun: say how it ended
            logger.error("%s: %s", err.label, err)
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()


def _parents(folder: str) -> Iterator[str]:
    """``folder`` and the folders above it, nearest first."""
    while True:
        yield folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


@cli.command()
@click.argument("store", type=click.Path())
@click.option("-o", "--output", "png_path", help="PNG to write.  [default: STORE without .zarr + .preview.png]")
@click.option("--size", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Largest side of each panel in pixels.")  # fmt: skip
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
@click.option("--as", "kind", type=click.Choice(["cog", "ome-tiff"]),
              help="Cloud-Optimized GeoTIFF (GIS) or OME-TIFF pyramid (QuPath, napari).  "
                   "[default: by the name: .ome.tif an OME-TIFF, .tif a COG]")  # fmt: skip
@click.option("--what", type=click.Choice(["probabilities", "labels"]), default="probabilities", show_default=True,
              help="One band per class, or the uint8 argmax map (nodata 255).")  # fmt: skip
@click.option("--dtype", type=click.Choice(["uint8", "float32"]),
              help="Probabilities as round(p*254) or float32.  [default: as stored; float16 -> float32]")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def export(store: str, output: str, kind: str | None, what: str, dtype: str | None, overwrite: bool) -> None:
    """Write a finished store (from `fcnpipe run`) as one TIFF: a COG or an OME-TIFF.

    The store is read chunk by chunk, so memory stays small however large the map. A store whose
    run did not finish is refused. The file appears only when complete.
    """
    from pipeline.products.export import export_store

    export_store(store, output, kind=kind, what=what, dtype=dtype, overwrite=overwrite)
    click.echo(f"wrote {output}", err=True)


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path())
def inspect(input_path: str) -> None:
    """Show what is in a TIFF: series, pyramid levels, dtype, compression, tiles, resolution.

    Reads only the file's directory, never its pixels, so it is instant on a 100k x 100k slide.
    """
    from pipeline.cli.describe import describe_file

    for line in describe_file(input_path):
        click.echo(line)


@cli.command()
@click.option("-o", "--output", "workdir", default="demo-output", show_default=True,
              help="Folder for the synthetic slide, the model, the store and the preview.")  # fmt: skip
@click.option("--size", default=8192, show_default=True, help="Slide width and height in pixels.")
@click.option("--seed", default=0, show_default=True, help="Seed for the slide and the training.")
@click.option("--train-steps", default=300, show_default=True, type=click.IntRange(min=1),
              help="Steps of 8 training patches: a fixed amount, so every machine trains the same model.")  # fmt: skip
def demo(workdir: str, size: int, seed: int, train_steps: int) -> None:
    """The whole job on a synthetic slide: make it, train the reference FCN, run, score, preview.

    Makes a tiled, JPEG-compressed, pyramidal slide-like TIFF with a ground-truth mask, trains the
    reference FCN on patches of it (the code of fcnpipe train), runs the full pipeline on the whole
    slide, prints per-class IoU against the ground truth and writes a PNG preview.
    """
    from pipeline.training.demo import run_demo

    started = time.perf_counter()
    result = run_demo(
        workdir,
        size=size,
        seed=seed,
        progress=True,
        train_steps=train_steps,
        log=lambda line: click.echo(line, err=True),
    )
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
@click.option("--masks", multiple=True, required=True, type=click.Path(),
              help="Mask of IMAGE (uint8 class indices); once per image, in the same order.")  # fmt: skip
@click.option("-o", "--output", required=True, type=click.Path(), help="Checkpoint to write (MODEL.pt).")
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
    from pipeline.training.train import train_from_tiffs

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
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--factory", help="package.module:function that builds the module of a state_dict.")
def inspect_model(model_path: str, factory: str | None) -> None:
    """Show what a model file holds and the tiling it needs: receptive radius, stride, halo.

    Both are measured from the network itself, so they are right for any FCN, TorchScript included.
    """
    from pipeline.cli.describe import describe_model

    for line in describe_model(model_path, factory):
        click.echo(line)


def main() -> None:
    """The console script: run the command, then end the process without tearing it down.

    Python's teardown of the loaded modules (torch above all) took 0.5-0.7 s after every command,
    a fixed cost on each slide of a batch script. By then the command has closed what it wrote
    (stores, preview, manifest); the streams and the log are flushed here, then the process exits
    with the command's code. An uncaught error (``--debug``) still ends the normal way.
    """
    try:
        cli(prog_name="fcnpipe")
        code = 0
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    resume = sys.modules.get("pipeline.run.resume")
    if resume is not None:
        resume.MARK_BEHIND.wait(raise_error=False)  # markers of a failed run's finished tasks
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (fcnpipe plan | head) is not an error
            stream.flush()
    os._exit(code)
