"""The ``fcnpipe`` group: one line per error, warnings as lines, the log, and how the process ends.

Every :class:`~pipeline.errors.FcnpipeError` becomes one line on stderr, with the settings it
names written as flags (:data:`pipeline.cli.options.FLAGS`), and a non-zero exit code; ``--debug``
shows the traceback instead. The commands are in the modules beside this one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import click

from pipeline import __version__, files
from pipeline.cli.options import FLAGS
from pipeline.errors import WARNINGS, ConfigError, FcnpipeError, Interrupted, render

INTERNAL_ERROR = 70
BROKEN_PIPE = 141
"""The exit code of a Unix tool killed by SIGPIPE (128 + 13)."""


VERBOSITY = {"level": 0}
"""-1 with ``-q`` (errors and warnings only; what would be said goes to the log alone), 0, 1 with
``-v`` (the log's records on stderr too), set by every command from its own ``-q`` / ``-v``."""


def quiet() -> bool:
    return VERBOSITY["level"] < 0


class _Command(click.Command):
    """A command with ``-q`` / ``-v``, as every fcnpipe command has (rio's and gdal's habit)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(["-q", "--quiet"], is_flag=True, help="Errors and warnings only (the log keeps the rest).")
        )
        self.params.append(
            click.Option(["-v", "--verbose"], is_flag=True, help="Also show the log's records (more detail).")
        )

    def invoke(self, ctx: click.Context) -> Any:
        quiet_flag, verbose = ctx.params.pop("quiet", False), ctx.params.pop("verbose", False)
        if quiet_flag and verbose:
            raise click.UsageError("-q and -v contradict each other: give one")
        VERBOSITY["level"] = -1 if quiet_flag else 1 if verbose else 0
        logger = logging.getLogger("fcnpipe")
        handler = next((h for h in logger.handlers if isinstance(h, _Verbose)), None)
        if verbose and handler is None:
            logger.addHandler(_Verbose(logging.DEBUG))
            logger.setLevel(logging.DEBUG)
        elif not verbose and handler is not None:
            logger.removeHandler(handler)
        return super().invoke(ctx)


class _Verbose(logging.Handler):
    """With ``-v``: the ``fcnpipe`` logger's records on stderr (what :func:`say` says is there already)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, "said", False):
            click.echo(f"fcnpipe: {record.levelname.lower()}: {record.getMessage()}", err=True)


class _Group(click.Group):
    """A group that turns errors into one line, unless ``--debug``; its commands take ``-q`` / ``-v``."""

    command_class = _Command
    group_class = type  # subgroups (fcnpipe config) are alike

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except FcnpipeError as err:
            if ctx.params.get("debug"):
                raise
            click.echo(f"fcnpipe: {err.label}: {err.render(FLAGS)}", err=True)
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


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is left of it at exit cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


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
    fcnpipe run SLIDE.svs -m M.pt -o C.zarr --window 0 0 2048 2048   a corner first, same values
    fcnpipe batch scans/ --model M.pt -o OUTDIR   many inputs, manifest; rerun to resume
    fcnpipe preview OUT.zarr                      the PNG again (input, classes over it, legend)
    fcnpipe export OUT.zarr -o OUT.tif            a COG for QGIS (OUT.ome.tif QuPath, OUT.overlay.tif OpenSlide)
    fcnpipe config show -c pathology              the resolved config, and where each value comes from

    
    Every command takes -q (errors and warnings only) and -v (more detail); inspect, plan and
    inspect-model take --json. Presets: -c pathology, satellite, cluster, cluster-gpu.
    """
    _route_warnings()


class _WarningLines(logging.Handler):
    """``fcnpipe: warning: MESSAGE`` on stderr for each :func:`pipeline.errors.warn`."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"fcnpipe: warning: {render(getattr(record, 'raw', record.getMessage()), FLAGS)}", err=True)


class _ToFcnpipeLog(logging.Handler):
    """Hands a library's records to the ``fcnpipe`` logger's handlers (the log file, if any)."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger("fcnpipe").handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


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


def say(line: str) -> None:
    """A line for the person at the terminal (stderr, unless ``-q``) and for the log file."""
    if not quiet():
        click.echo(line, err=True)
    logging.getLogger("fcnpipe").info(line, extra={"said": True})


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
def log_to(path: str) -> Iterator[None]:
    """Append the ``fcnpipe`` logger's records to ``path`` while the block runs, the file made at
    the first record; an error that ends the block after something was logged is logged too.

    A ``path`` in object storage (beside a store there) is written locally, then appended to the
    object when the block ends (an object cannot be appended to in place)."""
    if not files.is_remote(path):
        with _log_file(path):
            yield
        return
    with tempfile.TemporaryDirectory(prefix="fcnpipe-log-") as folder:
        local = os.path.join(folder, "fcnpipe.log")
        try:
            with _log_file(local):
                yield
        finally:
            if os.path.exists(local):
                with contextlib.suppress(FcnpipeError), open(local, "rb") as file:  # never hides the error
                    files.put(path, (files.get(path) or b"") + file.read())


@contextlib.contextmanager
def _log_file(path: str) -> Iterator[None]:
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
            logger.error("%s: %s", err.label, err.render(FLAGS))
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
