"""``fcnpipe run``, ``plan`` and ``batch``: parse, check, then call :mod:`pipeline.run`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from pipeline.cli import report
from pipeline.cli.app import cli, log_to, quiet, say
from pipeline.cli.options import PROGRESS, RESUME, RUN_OPTIONS, click_option, load, run_options
from pipeline.cli.progress import Progress
from pipeline.errors import ConfigError, FcnpipeError, Interrupted


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.option("-o", "--output", help="Zarr store to write (a folder, e.g. OUT.zarr).  [required, or output.path]")
@run_options
@click_option(RESUME)
@click_option(PROGRESS)
@click.option(
    "--preview/--no-preview",
    default=True,
    show_default=True,
    help="Write OUT.preview.png beside the store: input, classes over it, legend.",
)
@click.option(
    "--log", "log_path", type=click.Path(), help="Log file, appended to.  [default: OUT.log beside the store]"
)
def run(
    input_path: str, output: str | None, configs: tuple[str, ...], preview: bool, log_path: str | None, **given: Any
) -> None:
    """Predict class probabilities for every pixel of INPUT and write them to a Zarr store.

    The image is read lazily in tiles with a halo as wide as the network needs, so the stitched
    map equals one whole-image forward pass, and memory does not grow with the image. The store
    holds `0` (classes x Y x X probabilities) and `labels/argmax/0` (Y x X class index); its
    `fcnpipe` attribute records the config, model hash and timings, and `complete: true` last.

    \b
    Before computing it prints the plan: chunks, how many have no tissue / data (skipped, see
    --mask), the halo's extra reads, and an ETA, peak memory and size on disk measured on a
    sample of the image. A run that is killed or interrupted leaves a store that --resume completes.
    """
    config = load(configs, given, input__path=input_path, output__path=output)  # bad values fail before torch loads
    out = _required(config.output.path, "-o", "--output", "output.path", "the Zarr store to write")
    _required(config.model.path, "-m", "--model", "model.path", "the network to run")
    from pipeline.compute.engine import open_engine
    from pipeline.files import register
    from pipeline.run.estimate import estimate
    from pipeline.run.execute import execute
    from pipeline.run.plan import prepare
    from pipeline.store.safety import store_lock

    register(out, config.output.storage_options)  # a store in S3: its lease and log, before the plan
    with (
        log_to(log_path or _beside(out, ".log")),
        store_lock(out),  # a second writer is refused now, before the plan and the sample timing
        _interrupted(out, config.output.resume),
        open_engine(config.compute, config.cluster) as engine,
    ):
        plan = prepare(config, engine)
        _show([*report.plan_lines(plan), *(report.estimate_lines(estimate(plan)) if plan.chunks_to_compute else [])])
        with Progress(plan.megapixels_to_compute, config.compute.progress, say) as bar:
            result = execute(plan, lambda pixels: bar.update(pixels / 1e6))
        _show(report.summary_lines(result))
    if preview and result.status == "done":
        png = _preview_quietly(result.output_path)
        if png is not None:
            say(f"preview {png}")


@cli.command("plan")
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.option("-o", "--output", help="Zarr store a run would write (checked, not written).")
@run_options
@click.option("--resume", "output__resume", is_flag=True, default=None, help="Plan the rest of an interrupted OUTPUT.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (sizes as width and height in pixels).")
def plan_command(input_path: str, output: str | None, configs: tuple[str, ...], as_json: bool, **given: Any) -> None:
    """Show what `fcnpipe run` would do with the same arguments, without writing anything.

    Prints the chunks, how many are skipped for lack of tissue or data, the halo's extra reads,
    and, from one task's worth of tiles computed on this machine, the ETA, the peak memory and
    the output's size on disk.
    """
    config = load(configs, given, input__path=input_path, output__path=output or report.UNNAMED_OUTPUT)
    _required(config.model.path, "-m", "--model", "model.path", "the network to run")
    from pipeline.run.describe import plan_info
    from pipeline.run.estimate import estimate
    from pipeline.run.plan import prepare

    plan = prepare(config)
    measured = estimate(plan) if plan.chunks_to_compute else None
    if as_json:
        named = None if config.output.path == report.UNNAMED_OUTPUT else config.output.path
        click.echo(report.json_text(plan_info(plan, measured, named)))
        return
    for line in [*report.plan_lines(plan, dry_run=True), *(report.estimate_lines(measured) if measured else [])]:
        click.echo(line)


@cli.command()
@click.argument("inputs", metavar="INPUTS...", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    "outdir",
    required=True,
    type=click.Path(),
    help="Folder for the stores (INPUT name + .zarr), manifest.json/.csv, report.html and fcnpipe-batch.log.",
)
@run_options
@click_option(PROGRESS)
@click.option("--preview/--no-preview", default=True, show_default=True, help="A PNG beside each store.")
def batch(inputs: tuple[str, ...], outdir: str, configs: tuple[str, ...], preview: bool, **given: Any) -> None:
    """Run many inputs, one store each in OUTDIR, with a manifest and report.html of what happened to each.

    \b
    INPUTS are files, folders (their TIFFs), glob patterns ('scans/**/*.svs') or @list.txt
    (one path per line). Run it again after a crash, a kill or a power cut: complete stores
    are kept, interrupted ones resumed chunk by chunk (--overwrite starts all again).
    A complete store made with another model or config is reported as failed, saying what
    differs; --overwrite computes it again. One bad input never stops the others; the exit
    code is 1 if any input failed.
    """
    config = load(configs, given)
    _required(config.model.path, "-m", "--model", "model.path", "the network to run on every input")
    from pipeline.compute.engine import open_engine
    from pipeline.run.batch import expand_inputs, run_batch

    paths = expand_inputs(inputs)
    if not paths:
        raise ConfigError(f"No input files found in {' '.join(inputs)}")
    started = time.perf_counter()
    with (
        log_to(os.path.join(outdir, "fcnpipe-batch.log")),
        _batch_interrupted(),
        open_engine(config.compute, config.cluster) as engine,
        Progress(0.0, config.compute.progress, say) as bar,
    ):

        def on_plan(item: Any, plan: Any) -> None:
            bar.add_total(plan.megapixels_to_compute)
            bar.clear()
            _show(report.plan_lines(plan))

        def on_item(item: Any) -> None:
            bar.clear()
            if item.status == "done" and preview:
                _preview_quietly(item.output)
            line = report.batch_item_line(item)
            if item.status == "failed" and quiet():  # -q keeps errors: a failed input is one
                click.echo(f"fcnpipe: error: {line}", err=True)
            say(line)

        items = run_batch(config, paths, outdir, on_plan, lambda pixels: bar.update(pixels / 1e6), on_item, engine)
        bar.close()
        _show(report.batch_lines(items, time.perf_counter() - started, outdir))
    if any(item.status == "failed" for item in items):
        sys.exit(1)


def _required(value: str | None, short: str, name: str, key: str, what: str) -> str:
    """``value``, or the usage error Click gives a missing required option (exit code 2)."""
    if value is None:
        raise click.UsageError(f"Missing option '{short}' / '{name}': {what} (or {key} in a -c config).")
    return value


def _show(lines: list[str]) -> None:
    for line in lines:
        say(line)


def _beside(store: str, suffix: str) -> str:
    """``OUT.log`` beside the store ``OUT.zarr``."""
    from pipeline.files import is_remote
    from pipeline.store.layout import beside

    return beside(store if is_remote(store) else os.path.abspath(store), suffix)


@contextlib.contextmanager
def _interrupted(store: str, resuming: bool) -> Iterator[None]:
    """Turn Ctrl-C into one line that says what was left and how to go on, and log it."""
    try:
        yield
    except KeyboardInterrupt:
        from pipeline.files import normalized
        from pipeline.run.resume import check_target

        started = True
        try:
            check_target(normalized(store), overwrite=False)
            started = False  # nothing there: the run had not begun writing
        except FcnpipeError:
            pass
        again = "the same command" if resuming else "the same command with --resume"
        message = f"{store} is incomplete; run {again} to continue it" if started else "nothing was written"
        logging.getLogger("fcnpipe").warning("interrupted: %s", message)
        raise Interrupted(message) from None


@contextlib.contextmanager
def _batch_interrupted() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        message = "run the same command again to continue: complete stores are kept, interrupted ones resumed"
        logging.getLogger("fcnpipe").warning("interrupted: %s", message)
        raise Interrupted(message) from None


def _preview_quietly(store: str) -> str | None:
    """The preview PNG of a complete store, or a warning: a missing picture must not fail a run."""
    from pipeline.products.preview import default_preview_path, write_store_preview

    try:
        return write_store_preview(store, default_preview_path(store))
    except FcnpipeError as err:
        click.echo(f"fcnpipe: warning: no preview written for {store}: {err}", err=True)
        return None


@cli.group("config")
def config_group() -> None:
    """Configs: what a run would use, and where each value comes from.

    \b
    Presets ship with fcnpipe and work from any folder: -c pathology, -c satellite, -c cluster,
    -c cluster-gpu (and default, the documented defaults). A path works too, and several -c layer.
    """


@config_group.command("show")
@run_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object: key -> {value, source}.")
def config_show(configs: tuple[str, ...], as_json: bool, **given: Any) -> None:
    """Print the resolved config, one `section.key: value` line each, with the source of each value:
    `default`, the YAML file that set it, or the flag.

    Takes the same -c files and flags as `fcnpipe run`, and checks them the same way.
    """
    import json

    from pipeline.config import config_keys
    from pipeline.parse import read_yaml
    from pipeline.presets import config_file, config_sources, flatten

    config = load(configs, given)
    files = [(f if config_file(f) == f else f"preset {f}: {config_file(f)}", config_file(f)) for f in configs]
    layers: list[tuple[str, dict[str, Any]]] = [(name, read_yaml(path)) for name, path in files]
    layers += [(option.flags[-1], _nested(option.key)) for option in RUN_OPTIONS if given.get(option.dest) is not None]
    sources = config_sources(config_keys(), layers)
    values = dict(flatten(config.to_dict()))
    if as_json:
        click.echo(json.dumps({key: {"value": values[key], "source": sources[key]} for key in sources}, indent=2))
        return
    for key, source in sources.items():
        click.echo(f"{key}: {json.dumps(values[key])}  ({source})")


def _nested(key: str) -> dict[str, Any]:
    section, name = key.split(".")
    return {section: {name: True}}


@cli.command("report")
@click.argument("outdir", metavar="OUTDIR", type=click.Path())
def report_command(outdir: str) -> None:
    """Write OUTDIR/report.html again from OUTDIR/manifest.json, the folder of `fcnpipe batch`.

    One static page, no server or network needed: one row per input (failed ones first, with
    the reason), its status, time, megapixels, class areas and shares, a thumbnail of its preview
    linking to the PNG, and a link to its store; totals last. Click a column to sort by it.
    `fcnpipe batch` writes the same page as inputs end.
    """
    from pipeline.run.overview import write_report

    say(f"report {write_report(outdir)}")
