"""The one error hierarchy of fcnpipe.

Every failure a user can cause (a bad input file, a bad config value, a checkpoint that does not fit,
an output that already exists) is raised as a subclass of :class:`FcnpipeError` whose message is one
line that names the file or key concerned and says what is wrong. The CLI prints that line and exits
non-zero; nothing else in the package decides how errors are shown.
"""

from __future__ import annotations


class FcnpipeError(Exception):
    """Base of all errors a user can act on. ``str(err)`` is the one-line message."""

    exit_code = 1
    label = "error"
    """What the CLI prints before the message: ``fcnpipe: error: ...``."""


class ConfigError(FcnpipeError):
    """A config file, key or value is invalid."""

    exit_code = 2


class SourceError(FcnpipeError):
    """The input image is missing, not a TIFF, truncated, corrupt or not supported."""


class ModelError(FcnpipeError):
    """A checkpoint cannot be loaded or does not fit the input."""


class OutputError(FcnpipeError):
    """The output store exists, cannot be written, or is incomplete."""


class ClusterError(FcnpipeError):
    """The Dask scheduler cannot be reached, or was lost during a run."""


class Interrupted(FcnpipeError):
    """The user stopped the run (Ctrl-C); the message says what was left and how to continue."""

    exit_code = 130
    label = "interrupted"


_warned: set[str] = set()
WARNINGS = "fcnpipe.warnings"
"""The logger of :func:`warn`: the CLI prints its records as ``fcnpipe: warning: ...`` lines."""


def warn(message: str) -> None:
    """Tell the user, in one line naming the file or key, about something that was worked around
    (a malformed tag ignored, a value out of range): logged under :data:`WARNINGS`, each message
    once per process however often the file is opened."""
    import logging

    if message not in _warned:
        _warned.add(message)
        logging.getLogger(WARNINGS).warning(message)
