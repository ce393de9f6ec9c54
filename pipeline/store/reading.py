"""Reading a store that a run wrote: its record and its arrays, level by level.

The products (exports, previews) and the demo's scoring read stores only through
:func:`open_store`, so that what a store is and what it means to be complete is decided here, next
to the code that writes it. The arrays it hands out are read lazily, chunk by chunk: slicing one
reads only the chunks under the slice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import zarr

from pipeline.errors import OutputError
from pipeline.store.layout import LABEL_GROUP, is_store
from pipeline.store.record import ATTRIBUTE, StoreRecord, read_record


@dataclass(frozen=True, kw_only=True)
class StoreReader:
    """An fcnpipe store opened for reading."""

    path: str
    record: StoreRecord
    probabilities: tuple[Any, ...]
    """Level 0, 1, ...: lazily read ``(C, Y, X)`` arrays of the stored probabilities."""
    labels: tuple[Any, ...]
    """Level 0, 1, ...: lazily read ``(Y, X)`` uint8 arrays of the class labels (255: no data)."""

    def written(self, level: int) -> float:
        """The share of the label chunks of ``level`` that are on disk (chunks that are all no data
        are not stored): for an unfinished run, how far a level got."""
        array = self.labels[level]
        return float(array.nchunks_initialized / array.nchunks)


def open_store(path: str, *, complete: bool, why: str = "") -> StoreReader:
    """The fcnpipe store at ``path``; with ``complete``, one whose run finished, else OutputError
    (``why``: what needs it complete, for the message)."""
    if not os.path.exists(path):
        raise OutputError(f"{path}: no such file or folder")
    if not is_store(path):
        kind = "a folder" if os.path.isdir(path) else "a file"
        raise OutputError(f"{path}: {kind}, not a Zarr store (no .zgroup or zarr.json in it)")
    try:
        record = read_record(path)
    except (OSError, ValueError) as err:
        raise OutputError(f"{path}: cannot read the output store ({type(err).__name__}: {err})") from err
    if record is None:
        raise OutputError(f"{path}: has no '{ATTRIBUTE}' attribute; it was not written by fcnpipe run")
    if complete and not record.complete:
        raise OutputError(f"{path}: is incomplete (the run did not finish); {why or 'rerun it first'}")
    group = zarr.open_group(path, mode="r")
    return StoreReader(
        path=path, record=record, probabilities=_levels(group, "", path), labels=_levels(group, LABEL_GROUP, path)
    )


def _levels(group: Any, node: str, path: str) -> tuple[Any, ...]:
    """The arrays ``0``, ``1``, ... of ``node`` ("" = root), in order, up to the first missing one."""
    try:
        parent = group[node] if node else group
    except KeyError as err:
        raise OutputError(f"{path}: has no {node} group") from err
    names = set(parent.array_keys())
    levels: list[Any] = []
    while str(len(levels)) in names:
        levels.append(parent[str(len(levels))])
    if not levels:
        raise OutputError(f"{path}: has no level 0 in {node or 'its root'}")
    return tuple(levels)
