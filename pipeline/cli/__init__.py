"""The command line: the only package that imports click (and tqdm)."""

from pipeline.cli.commands import cli, main

__all__ = ["cli", "main"]
