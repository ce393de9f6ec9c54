"""The one error hierarchy of fcnpipe, and how messages name the settings that fix them.

Every failure a user can cause (a bad input file, a bad config value, a checkpoint that does not fit,
an output that already exists) is raised as a subclass of :class:`FcnpipeError` whose message is one
line that names the file or key concerned and says what is wrong. The CLI prints that line and exits
non-zero; nothing else in the package decides how errors are shown.

The core does not know the command line: where a message says which setting fixes the problem,
it names it with :func:`option`, which reads as the config key (``set output.overwrite to true``)
in ``str(err)`` and as the flag (``pass --overwrite``) once the CLI renders it with its table of
flags (:meth:`FcnpipeError.render`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

_MARK = "\x1f"
_OPTION = re.compile(f"{_MARK}([^{_MARK}]*){_MARK}([^{_MARK}]*){_MARK}")


def option(key: str, value: object = True) -> str:
    """A setting in a message: ``key`` (``"section.name"``) set to ``value``; see :func:`render`."""
    return f"{_MARK}{key}{_MARK}{json.dumps(value)}{_MARK}"


def render(text: str, flags: Mapping[str, str] | None = None) -> str:
    """``text`` with each :func:`option` written out: ``pass --flag [value]`` where ``flags`` maps the
    key to a flag, else ``set key to value``.

    >>> text = f"exists; {option('output.overwrite')} to replace it"
    >>> render(text), render(text, {"output.overwrite": "--overwrite"})
    ('exists; set output.overwrite to true to replace it', 'exists; pass --overwrite to replace it')
    >>> render(f"{option('mask.mode', 'none')} computes all", {"mask.mode": "--mask"})
    'pass --mask none computes all'
    """

    def written(match: re.Match[str]) -> str:
        key, value = match.group(1), json.loads(match.group(2))
        shown = value if isinstance(value, str) else json.dumps(value)
        flag = (flags or {}).get(key)
        if flag is None:
            return f"set {key} to {shown}"
        return f"pass {flag}" if value is True else f"pass {flag} {shown}"

    return _OPTION.sub(written, text)


class FcnpipeError(Exception):
    """Base of all errors a user can act on. ``str(err)`` is the one-line message."""

    exit_code = 1
    label = "error"
    """What the CLI prints before the message: ``fcnpipe: error: ...``."""

    def __str__(self) -> str:
        return render(super().__str__())

    def render(self, flags: Mapping[str, str]) -> str:
        """The message with the settings it names written as the CLI's ``flags``."""
        return render(super().__str__(), flags)


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
    (a malformed tag ignored, a value out of range): logged under :data:`WARNINGS` (written out
    by :func:`render`; the raw text, for the CLI's own rendering, as the record's ``raw``), each
    message once per process however often the file is opened."""
    if message not in _warned:
        _warned.add(message)
        logging.getLogger(WARNINGS).warning(render(message), extra={"raw": message})
