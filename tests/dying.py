"""``fcnpipe`` with a file-system fault at an exact moment: run as ``python tests/dying.py ARGS...``.

An audit hook (:func:`sys.addaudithook`) counts the writes (``open`` for writing, ``os.mkdir``,
``os.rename``) whose path contains ``FCNPIPE_FAULT_TARGET``, and at the ``FCNPIPE_FAULT_AT``-th:

* ``FCNPIPE_FAULT=kill``: the process SIGKILLs itself, before the write happens;
* ``FCNPIPE_FAULT=full``: that write and every later one fails with ENOSPC, as on a full disk;
* ``FCNPIPE_FAULT=log`` (or no ``FCNPIPE_FAULT_AT``): nothing fails; every counted write is
  appended to ``FCNPIPE_FAULT_LOG`` as ``<n> <event> <path>``.

Random kills almost never land in the milliseconds a store takes to be created; this lands on any
chosen write of it.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import Any

_TARGET = os.environ.get("FCNPIPE_FAULT_TARGET", "")
_MODE = os.environ.get("FCNPIPE_FAULT", "log")
_AT = int(os.environ.get("FCNPIPE_FAULT_AT", "0"))
_LOG = os.environ.get("FCNPIPE_FAULT_LOG")
_count = 0


def _is_write(event: str, args: tuple[Any, ...]) -> str | None:
    if event not in ("open", "os.mkdir", "os.rename") or not isinstance(args[0], str | bytes | os.PathLike):
        return None
    path = os.fsdecode(args[0])
    if not _TARGET or _TARGET not in path:
        return None
    if event == "open":
        mode, flags = args[1], args[2]
        writing = any(c in mode for c in "wax+") if mode is not None else flags & (os.O_WRONLY | os.O_RDWR)
        if not writing:
            return None
    return path


def _hook(event: str, args: tuple[Any, ...]) -> None:
    global _count
    path = _is_write(event, args)
    if path is None:
        return
    _count += 1
    if _LOG is not None:
        with open(_LOG, "a", encoding="utf-8") as log:  # not counted: not under the target
            log.write(f"{_count} {event} {path}\n")
    if not _AT or _count < _AT or _MODE == "log":
        return
    if _MODE == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


if __name__ == "__main__":
    sys.addaudithook(_hook)
    from pipeline.cli import main

    sys.argv = ["fcnpipe", *sys.argv[1:]]
    main()
