"""The store's arrays: created once, then written and read one chunk at a time, as files.

Level-0 chunks are the tile cores of :mod:`pipeline.tiling` and each coarser chunk is made from
the 2 x 2 chunks above it, so every task writes whole chunks that no other task touches, and
nothing ever holds a whole map. Chunks are encoded here and written as files (a zarr
``__setitem__`` cost several times the encoding), each whole or not at all
(:func:`pipeline.files.atomic_write`). Blended runs keep their scratch arrays here too.

A sharded store (``output.shard``, Zarr v3) holds each level in shards of N x N chunks, and a task
writes whole shards only (:class:`ShardWriter`): its chunks are appended to a temporary file as
they are made, the shard's index closes it, and a rename puts it in place, so a kill leaves the
shard as it was, never half of it. Zarr has no lock for concurrent writes into one shard
(zarr-python#3514), so the tasks are cut along the shards (:func:`pipeline.tiling.blocks`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numcodecs
import numpy as np
import zarr
import zarr.codecs

from pipeline import files
from pipeline.errors import OutputError, option
from pipeline.store.layout import (
    BLOSC,
    LABEL_GROUP,
    NODATA_LABEL,
    NODATA_UINT8,
    OutputRef,
    ShardFile,
    bitshuffle,
    check_chunk,
    chunk_path,
    encode_chunk,
    nodata_value,
    quantize,
    shard_shape,
    stored_chunk,
    zarr_store,
)
from pipeline.store.pyramid import mean_2x2, subsample_2x2
from pipeline.tiling import Box, cells_under


def compressor(zarr_format: int, bitshuffle: bool) -> dict[str, Any]:
    if zarr_format == 2:
        return {"compressors": BLOSC[bitshuffle], "chunk_key_encoding": _V2_KEYS}
    codec = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle" if bitshuffle else "shuffle")
    return {"compressors": codec}


_V2_KEYS = {"name": "v2", "separator": "/"}


def create_store(
    path: str,
    classes: int,
    levels: Sequence[tuple[int, int]],
    tile: int,
    dtype: str,
    overwrite: bool,
    zarr_format: int = 2,
    token: str = "",
    final_path: str | None = None,
    shard: int = 0,
) -> None:
    """Create the group and the empty arrays of every level at ``path``; an existing folder there
    is refused, or deleted first with ``overwrite``.

    ``levels`` are the ``(Y, X)`` shapes of level 0, 1, ... (see :func:`pipeline.store.pyramid.level_shapes`).
    The arrays created are the handles of ``OutputRef(final_path or path, dtype, token, shard)`` for
    this process's tasks (:func:`_arrays`), which then need not open them again; ``final_path`` is
    where a store built in a staging folder (:func:`staged_store`) will be. ``shard``: chunks per
    shard side at every level (:func:`pipeline.store.layout.shard_shape`; Zarr format 3 only), 0: none.
    """
    if shard and zarr_format != 3:  # the config refuses it first: never a user's mistake here
        raise ValueError(f"shards need Zarr format 3, not {zarr_format}")
    if files.exists(path):
        if not overwrite:
            raise OutputError(f"{path}: already exists; {option('output.overwrite')} to replace it")
        files.remove_tree(path)
    named = final_path or path
    if classes >= NODATA_LABEL:
        raise OutputError(f"{named}: {classes} classes do not fit the uint8 label map (at most {NODATA_LABEL - 1})")
    try:
        group = zarr.open_group(zarr_store(path), mode="w-", zarr_format=zarr_format)  # type: ignore[arg-type]
        labels = group.require_group(LABEL_GROUP)
        v3 = zarr_format == 3
        for level, (height, width) in enumerate(levels):
            chunks = (min(tile, height), min(tile, width))
            shards = shard_shape((height, width), chunks, shard) if shard else None
            probabilities = group.create_array(
                str(level),
                shape=(classes, height, width),
                chunks=(classes, *chunks),
                shards=None if shards is None else (classes, *shards),
                dtype=dtype,
                fill_value=nodata_value(dtype),
                attributes=_fill_attribute(v3, dtype),
                dimension_names=("c", "y", "x") if v3 else None,
                **compressor(zarr_format, bitshuffle(dtype)),
            )
            label_array = labels.create_array(
                str(level),
                shape=(height, width),
                chunks=chunks,
                shards=shards,
                dtype="uint8",
                fill_value=NODATA_LABEL,
                attributes=_fill_attribute(v3, "uint8"),
                dimension_names=("y", "x") if v3 else None,
                **compressor(zarr_format, bitshuffle=True),
            )
            _keep_arrays(OutputRef(named, dtype, token, shard), level, (probabilities, label_array))
    except OSError as err:
        raise OutputError(f"{named}: cannot create the output store ({err.strerror or err})") from err


def _fill_attribute(v3: bool, dtype: str) -> dict[str, Any]:
    """``_FillValue`` for a Zarr v3 array of uint8: xarray takes a v2 array's fill value as missing,
    a v3 array's only from this attribute. Float arrays need none: their no data is NaN already."""
    return {"_FillValue": NODATA_UINT8} if v3 and dtype == "uint8" else {}


def encoded_size(stored: np.ndarray, labels: np.ndarray) -> int:
    """Bytes one chunk of probabilities as stored (:func:`quantize`) and its ``labels`` take on disk."""
    return sum(len(BLOSC[bitshuffle(v.dtype)].encode(np.ascontiguousarray(v))) for v in (stored, labels))


_HANDLES_KEPT = 32
"""Array handles kept per process (two per level and store): a batch's stores, a few levels each."""

_handles: OrderedDict[tuple[OutputRef, int], tuple[Any, Any]] = OrderedDict()

_handles_lock = threading.Lock()


def _arrays(out: OutputRef, level: int) -> tuple[Any, Any]:
    """The probability and label arrays of ``level``, opened once per process and shared by its
    threads. Only their metadata is used (chunks, dtype, fill value, chunk keys): chunks are
    written as files (:func:`_put_chunk`). Opening a level reads its metadata from disk, which cost
    3-13 ms a thread, more than writing a whole task's chunks; the process that creates the store
    keeps the arrays it created (:func:`create_store`) and opens nothing."""
    with _handles_lock:
        found = _handles.get((out, level))
    if found is None:  # two threads may both open it: the same metadata either way
        files.register(out.path, out.storage)  # a worker process writing to object storage
        group = zarr.open_group(zarr_store(out.path, read_only=True), mode="r")
        found = (group[str(level)], group[f"{LABEL_GROUP}/{level}"])
        _keep_arrays(out, level, found)
    return found


def clear_handles() -> None:
    """Forget every array handle this process keeps (:func:`pipeline.compute.state.reset`)."""
    with _handles_lock:
        _handles.clear()


def _keep_arrays(out: OutputRef, level: int, arrays: tuple[Any, Any]) -> None:
    with _handles_lock:
        _handles[(out, level)] = arrays
        _handles.move_to_end((out, level))
        while len(_handles) > _HANDLES_KEPT:
            _handles.popitem(last=False)


def write_core(
    out: OutputRef, core: tuple[int, int, int, int], probs: np.ndarray, labels: np.ndarray, empty: np.ndarray | None
) -> None:
    """Write one level-0 tile core: ``probs`` ``(C, y1 - y0, x1 - x0)`` float32, ``labels`` their
    argmax; pixels where ``empty`` (``(y, x)`` bool, or None) is true are written as no data."""
    stored = quantize(probs, out.dtype)
    if empty is not None:
        stored[:, empty] = nodata_value(out.dtype)
        labels[empty] = NODATA_LABEL
    write_stored(out, 0, core, stored, labels)


def write_stored(
    out: OutputRef, level: int, core: tuple[int, int, int, int], probs: np.ndarray, labels: np.ndarray
) -> None:
    """Write the one chunk of each array of ``level`` that ``core`` is: ``probs`` already as stored
    (:func:`quantize`), and ``labels``. As files, without zarr's array machinery: a zarr
    ``__setitem__`` cost 2-3 ms per chunk, several times the encoding. Unsharded stores only: a
    sharded one is written a whole shard at a time (:class:`ShardWriter`)."""
    y0, y1, x0, x1 = core
    try:
        for array, values in zip(_arrays(out, level), (probs, labels), strict=True):
            _put_chunk(out.path, array, core, values)
    except OSError as err:
        raise OutputError(
            f"{out.path}: cannot write level {level} at rows {y0}-{y1}, columns {x0}-{x1} ({err.strerror or err})"
        ) from err


def _put_chunk(path: str, array: Any, core: tuple[int, int, int, int], values: np.ndarray) -> None:
    """Write the chunk ``values`` at ``core`` (:func:`pipeline.store.layout.encode_chunk`) atomically,
    as a temporary file renamed over the chunk; remove the chunk's file instead where it is all fill
    value."""
    if array.shards is not None:
        raise ValueError(f"{array.path} is sharded: it is written a whole shard at a time (ShardWriter)")
    check_chunk(array, core)
    target = chunk_path(path, array, core)
    data = encode_chunk(array, values)
    if data is None:
        files.delete(target)
        return
    files.put(target, data)


class ShardWriter:
    """The shard of each array of ``level`` that holds ``core``, written whole, chunk by chunk.

    :meth:`write` adds the chunk at a core (each core of the shard at most once, in any order; those
    never written hold no data); leaving the block writes each shard's index and renames it into
    place, so memory holds one chunk, never a shard, and a kill at any moment leaves each shard as it
    was before. On an error the temporary files are removed. :attr:`paths` are the shard files.
    """

    def __init__(self, out: OutputRef, level: int, core: tuple[int, int, int, int]) -> None:
        self.out, self.level = out, level
        self._shards = [ShardFile(out.path, array, core) for array in _arrays(out, level)]
        self.paths = [shard.target for shard in self._shards]

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is not None:
            for shard in self._shards:
                shard.abandon()
            return
        try:
            for shard in self._shards:
                shard.close()
        except OSError as err:
            for shard in self._shards:
                shard.abandon()
            raise OutputError(f"{shard.target}: cannot write this shard ({err.strerror or err})") from err

    def write(self, core: tuple[int, int, int, int], probs: np.ndarray, labels: np.ndarray) -> None:
        """Add the chunk at ``core`` of each array: ``probs`` as stored (:func:`quantize`), ``labels``."""
        try:
            for shard, values in zip(self._shards, (probs, labels), strict=True):
                shard.add(core, values)
        except OSError as err:
            y0, y1, x0, x1 = core
            raise OutputError(
                f"{self.out.path}: cannot write level {self.level} at rows {y0}-{y1}, columns {x0}-{x1} "
                f"({err.strerror or err})"
            ) from err


def chunk_files(out: OutputRef, level: int, core: tuple[int, int, int, int]) -> list[str]:
    """Paths of the probability and label files (chunks, or shards) that hold ``core`` of ``level``.

    Used to flush a task's chunks to disk before it is recorded as finished (:mod:`pipeline.run.resume`).
    """
    return [chunk_path(out.path, array, core) for array in _arrays(out, level)]


def reduce_cores(out: OutputRef, level: int, cores: Sequence[tuple[int, int, int, int]]) -> int:
    """Make ``cores`` of ``level`` (>= 1), each from the 2 x 2 larger region of the stored level
    above: a chunk file each, or in a sharded store the one whole shard they are (all its cores, so
    that one task writes it). Returns the number of pixels written at ``level``."""
    above = _arrays(out, level - 1)
    indexes: dict[str, np.ndarray] = {}  # the level above is complete: its shards' indexes hold

    def reduced(core: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        y0, y1, x0, x1 = core
        probs, labels = (_read_chunks(out.path, array, (2 * y0, 2 * y1, 2 * x0, 2 * x1), indexes) for array in above)
        return mean_2x2(probs, out.dtype)[:, : y1 - y0, : x1 - x0], subsample_2x2(labels)[: y1 - y0, : x1 - x0]

    if not out.shard:
        for core in cores:
            write_stored(out, level, core, *reduced(core))
    else:
        with ShardWriter(out, level, cores[0]) as shard:
            for core in cores:
                shard.write(core, *reduced(core))
    return sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in cores)


def _read_chunks(
    path: str, array: Any, box: tuple[int, int, int, int], indexes: dict[str, np.ndarray] | None = None
) -> np.ndarray:
    """``array[..., y0:y1, x0:x1]`` (clipped to the array) from the chunk or shard files this module
    wrote, decoded directly: through zarr's array machinery, reading the 2 x 2 chunks under a pyramid
    chunk cost 6 ms, more than making it. ``indexes``: the shard indexes read so far, by file."""
    y0, y1, x0, x1 = box
    height, width = array.shape[-2:]
    y1, x1 = min(y1, height), min(x1, width)
    cy, cx = array.chunks[-2:]
    dtype = np.dtype(array.dtype).newbyteorder("<")
    region = np.empty((*array.shape[:-2], y1 - y0, x1 - x0), dtype)
    for row, col, (a0, a1, b0, b1) in cells_under((y0, y1, x0, x1), (cy, cx)):
        target = region[..., a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
        data = stored_chunk(path, array, row, col, {} if indexes is None else indexes)
        if data is None:  # never written, or all fill value
            target[...] = array.fill_value
            continue
        chunk = np.frombuffer(numcodecs.blosc.decompress(data), dtype).reshape(*array.shape[:-2], cy, cx)
        target[...] = chunk[..., a0 - row * cy : a1 - row * cy, b0 - col * cx : b1 - col * cx]
    return region


def write_reduced(
    out: OutputRef, level: int, core: tuple[int, int, int, int], probs_above: np.ndarray, labels_above: np.ndarray
) -> int:
    """Write ``core`` of ``level`` from the region of the level above it covers, as stored there.

    ``probs_above`` ``(C, <= 2 Y, <= 2 X)`` in the stored dtype and ``labels_above`` are the level
    above's pixels ``[2 y0, 2 y1) x [2 x0, 2 x1)``. Returns the pixels written. Unsharded stores only.
    """
    y0, y1, x0, x1 = core
    probs = mean_2x2(probs_above, out.dtype)[:, : y1 - y0, : x1 - x0]
    write_stored(out, level, core, probs, subsample_2x2(labels_above)[: y1 - y0, : x1 - x0])
    return (y1 - y0) * (x1 - x0)


# --- blended runs' scratch arrays ----------------------------------------------------------------

BLEND_GROUP = "_blend"

PARITIES = ("00", "01", "10", "11")


def create_blend_arrays(path: str, classes: int, shape: tuple[int, int], side: int) -> None:
    """Create (or replace) the empty ``_blend`` arrays in the store at ``path``, in its Zarr format.

    For each parity ``ab``: ``_blend/ab/sum`` ``(classes, Y, X)`` and ``_blend/ab/weight`` ``(Y, X)``,
    float32, fill value 0, chunks ``side`` a side (:func:`pipeline.compute.blend.blend_chunk`).
    """
    height, width = shape
    chunk = (min(side, height), min(side, width))
    try:
        root = zarr.open_group(zarr_store(path), mode="r+")
        group = root.create_group(BLEND_GROUP, overwrite=True)
        for name in PARITIES:
            sub = group.create_group(name)
            sub.create_array(
                "sum", shape=(classes, height, width), chunks=(classes, *chunk), dtype="float32", fill_value=0.0
            )
            sub.create_array("weight", shape=(height, width), chunks=chunk, dtype="float32", fill_value=0.0)
    except OSError as err:
        raise OutputError(f"{path}: cannot create the temporary blend arrays ({err.strerror or err})") from err


def remove_blend_arrays(path: str) -> None:
    """Delete the ``_blend`` group of the store at ``path``, if it is there."""
    files.remove_tree(files.join(path, BLEND_GROUP))


def blend_arrays(path: str) -> dict[str, tuple[Any, Any]]:
    """The ``(sum, weight)`` arrays of each parity of the store at ``path``, to read and write."""
    group = zarr.open_group(zarr_store(path), mode="r+")[BLEND_GROUP]
    return {name: (group[f"{name}/sum"], group[f"{name}/weight"]) for name in PARITIES}


def write_blend(arrays: tuple[Any, Any], box: Box, weighted: np.ndarray, weight: np.ndarray, path: str) -> None:
    """``w * p`` and ``w`` of one window's ``box`` into a parity's arrays (:func:`blend_arrays`)."""
    y0, y1, x0, x1 = box
    sums, weights = arrays
    try:
        sums[:, y0:y1, x0:x1] = weighted
        weights[y0:y1, x0:x1] = weight
    except OSError as err:
        raise OutputError(f"{path}: cannot write blend window at rows {y0}-{y1}, columns {x0}-{x1} ({err})") from err
