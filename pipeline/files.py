"""Writing a file so that it is whole or absent: a temporary file beside it, renamed over it.

A rename within one folder is atomic, so a reader (or a run resumed after a kill) sees either the
old file or the whole new one, never half of one. Every file fcnpipe writes this way ends in
:data:`PARTIAL` while it is written, so that what a killed writer left behind can be recognised
and removed (:func:`remove_partial_files`).
"""

from __future__ import annotations

import os
import threading

PARTIAL = ".partial"
"""The suffix of a file being written; renamed away once it is whole."""


def atomic_write(path: str, data: bytes | str, durable: bool = False) -> None:
    """Write ``data`` to ``path`` whole or not at all; ``durable``: flush it (and the rename) to disk
    first, so that a power cut keeps it too.

    The temporary name carries the thread, so two threads of one process never share one.
    """
    temporary = f"{path}.{threading.get_ident()}{PARTIAL}"
    raw = data if isinstance(data, bytes) else data.encode("utf-8")
    try:
        _write(temporary, raw, durable)
    except FileNotFoundError:  # the first file of its folder: make the folder (not a stat per file)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _write(temporary, raw, durable)
    os.replace(temporary, path)
    if durable:
        fsync_path(os.path.dirname(path) or ".", directory=True)


def _write(path: str, data: bytes, durable: bool) -> None:
    with open(path, "wb") as file:
        file.write(data)
        if durable:
            file.flush()
            os.fsync(file.fileno())


def fsync_path(path: str, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_files(folder: str) -> int:
    """Delete the ``*.partial`` files under ``folder`` that killed writers left; return how many.

    Zarr's own metadata writes use the same suffix, so this covers them too.
    """
    removed = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            if name.endswith(PARTIAL):
                os.unlink(os.path.join(parent, name))
                removed += 1
    return removed
