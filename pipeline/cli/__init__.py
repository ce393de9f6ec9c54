"""The command line: the only package that imports click and tqdm.

:mod:`~pipeline.cli.app` is the ``fcnpipe`` group (errors, warnings, the log); the commands are
grouped by what they do (:mod:`~pipeline.cli.run`: run, plan, batch; :mod:`~pipeline.cli.products`:
inspect, inspect-model, preview, export; :mod:`~pipeline.cli.training`: train, demo);
:mod:`~pipeline.cli.options` declares the run options once, :mod:`~pipeline.cli.report` writes the
lines people read and :mod:`~pipeline.cli.progress` the bar or the progress lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from pipeline.cli import products, run, training  # noqa: F401  (each registers its commands)
from pipeline.cli.app import cli

__all__ = ["cli", "main"]


def main() -> None:
    """The console script: run the command, then end the process without tearing it down.

    Python's teardown of the loaded modules (torch above all) took 0.5-0.7 s after every command,
    a fixed cost on each slide of a batch script. By then the command has closed what it wrote
    (stores, markers, preview, manifest); the streams and the log are flushed here, then the
    process exits with the command's code. An uncaught error (``--debug``) still ends the normal way.
    """
    try:
        cli(prog_name="fcnpipe")
        code = 0
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (fcnpipe plan | head) is not an error
            stream.flush()
    os._exit(code)
