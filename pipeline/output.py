"""The output store: Zarr arrays created once, then written one tile core (= one chunk) at a time.

Layout of the group at the output path (Zarr format 2, ``/`` chunk keys, Blosc):

* ``0``: probabilities, shape ``(C, Y, X)``, chunks ``(C, tile, tile)``, float32/float16, or uint8
  holding ``round(p * 255)``;
* ``labels/argmax/0``: the argmax of the full-precision probabilities, shape ``(Y, X)``, uint8.

Chunks are the tile cores of :mod:`pipeline.tiling`, so every task writes whole chunks that no
other task touches, and nothing ever holds the whole map. This module owns zarr for writing.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from typing import Any

import numcodecs
import numpy as np
import zarr

from pipeline.errors import OutputError

PROBABILITIES = "0"
LABELS = "labels/argmax/0"
_CHUNK_KEYS = {"name": "v2", "separator": "/"}


@dataclass(frozen=True, slots=True)
class OutputRef:
    """What a task needs to write: small and picklable."""

    path: str
    dtype: str
    """``float32``, ``float16`` or ``uint8`` for the probabilities."""
    token: str = ""
    """Unique per created store: handles cached for an earlier store at the same path are not reused."""


def is_store(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in (".zgroup", "zarr.json"))


def check_target(path: str, overwrite: bool) -> None:
    """Refuse an existing output without ``overwrite``, and anything but a Zarr store even with it."""
    if os.path.lexists(path):
        if not overwrite:
            raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
        if not is_store(path):
            raise OutputError(f"{path}: exists and is not a Zarr store; refusing to delete it")


def create_store(path: str, shape: tuple[int, int, int], tile: int, dtype: str, overwrite: bool) -> zarr.Group:
    """Create the group and its empty arrays; refuse to replace anything without ``overwrite``.

    Even with ``overwrite`` only a Zarr store is ever deleted, never an arbitrary folder.
    """
    check_target(path, overwrite)
    if os.path.lexists(path):
        shutil.rmtree(path)
    channels, height, width = shape
    if channels > 255:
        raise OutputError(f"{path}: {channels} classes do not fit the uint8 label map (at most 255)")
    try:
        group = zarr.open_group(path, mode="w-", zarr_format=2)
        group.create_array(
            PROBABILITIES,
            shape=shape,
            chunks=(channels, min(tile, height), min(tile, width)),
            dtype=dtype,
            fill_value=0,
            compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
            chunk_key_encoding=_CHUNK_KEYS,
        )
        group.create_array(
            LABELS,
            shape=(height, width),
            chunks=(min(tile, height), min(tile, width)),
            dtype="uint8",
            fill_value=0,
            compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE),
            chunk_key_encoding=_CHUNK_KEYS,
        )
    except OSError as err:
        raise OutputError(f"{path}: cannot create the output store ({err.strerror or err})") from err
    return group


def quantize(probs: np.ndarray, dtype: str) -> np.ndarray:
    """Probabilities in [0, 1] as stored: unchanged, float16, or ``round(p * 255)`` as uint8."""
    if dtype == "uint8":
        return np.rint(probs * 255.0).astype(np.uint8)
    return probs.astype(dtype, copy=False)


_local = threading.local()


def _arrays(out: OutputRef) -> tuple[Any, Any]:
    """This thread's handles on the two arrays, opened once per store."""
    cache: dict[OutputRef, tuple[Any, Any]] = getattr(_local, "cache", None) or {}
    _local.cache = cache
    if out not in cache:
        group = zarr.open_group(out.path, mode="r+")
        cache.clear()  # one store at a time per thread is plenty
        cache[out] = (group[PROBABILITIES], group[LABELS])
    return cache[out]


def write_core(out: OutputRef, core: tuple[int, int, int, int], probs: np.ndarray, labels: np.ndarray) -> None:
    """Write one tile core: ``probs`` ``(C, y1 - y0, x1 - x0)`` float32, ``labels`` their argmax."""
    y0, y1, x0, x1 = core
    probabilities, label_map = _arrays(out)
    try:
        probabilities[:, y0:y1, x0:x1] = quantize(probs, out.dtype)
        label_map[y0:y1, x0:x1] = labels
    except OSError as err:
        raise OutputError(f"{out.path}: cannot write chunk at rows {y0}-{y1}, columns {x0}-{x1} ({err})") from err
