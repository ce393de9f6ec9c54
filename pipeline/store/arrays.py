"""The output store: Zarr arrays created once, then written one chunk at a time.

Layout of the group at the output path (OME-Zarr; Zarr format 2 for OME-NGFF 0.4, 3 for 0.5):

* ``0``, ``1``, ...: probabilities, shape ``(C, Y, X)`` halving level by level, chunks
  ``(C, tile, tile)``; float32/float16, or uint8 holding ``round(p * 254)``;
* ``labels/argmax/0``, ``1``, ...: the argmax of the full-precision probabilities, ``(Y, X)``
  uint8, :data:`NODATA_LABEL` where the source has no data;
* ``x``, ``y`` (and the same in ``labels/argmax``): pixel-centre coordinates, for a GeoTIFF input.

No data (a chunk the mask skipped, a pixel the source marks as no data) is the arrays' fill value,
and nothing else is: NaN for float probabilities, 255 for uint8 probabilities and labels
(:func:`nodata_value`). A probability of 0 is a value like any other, so readers that take the fill
value as missing (xarray's ``_FillValue``, GDAL's NoData, QGIS) hide only what has no data.

Level-0 chunks are the tile cores of :mod:`pipeline.tiling` and each coarser chunk is made from
the 2 x 2 chunks above it, so every task writes whole chunks that no other task touches, and
nothing ever holds a whole map. This module owns zarr for writing.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numcodecs
import numpy as np
import zarr
import zarr.codecs

from pipeline.errors import ConfigError, OutputError
from pipeline.store.pyramid import mean_2x2, subsample_2x2
from pipeline.tiling import cells_under

STORE_FORMAT = 2
"""The layout and encoding of the stored values; raised whenever a byte of the same run would change
(2: uint8 probabilities hold round(p * 254), no data is the fill value). Part of the fingerprint, so a
store of another format is never resumed or reused."""
PROBABILITIES = "0"
LABEL_GROUP = "labels/argmax"
LABELS = f"{LABEL_GROUP}/0"
NODATA_LABEL = 255
"""Label where there is no data (alpha 0, GDAL_NODATA, a chunk without foreground); at most 254 classes."""
UINT8_SCALE = 254
"""uint8 probabilities hold ``round(p * 254)``, so that 255 is free to mean no data, as in the labels."""
NODATA_UINT8 = 255


def nodata_value(dtype: Any) -> float | int:
    """The value of no data in an array of stored probabilities (its fill value): 255 or NaN.

    >>> nodata_value("uint8"), nodata_value("float32")
    (255, nan)
    """
    return NODATA_UINT8 if np.dtype(dtype) == np.uint8 else float("nan")


def is_nodata(values: np.ndarray) -> np.ndarray:
    """Where stored values (probabilities or labels) are no data.

    >>> is_nodata(np.array([0, 255], np.uint8)).tolist(), is_nodata(np.array([0.0, np.nan])).tolist()
    ([False, True], [False, True])
    """
    if values.dtype == np.uint8:
        is_fill: np.ndarray = values == NODATA_UINT8
        return is_fill
    is_nan: np.ndarray = np.isnan(values)
    return is_nan


@dataclass(frozen=True, slots=True)
class OutputRef:
    """What a task needs to write: small and picklable."""

    path: str
    dtype: str
    """``float32``, ``float16`` or ``uint8`` for the probabilities."""
    token: str = ""
    """Unique per created store: handles cached for an earlier store at the same path are not reused."""


def beside(store: str | os.PathLike[str], suffix: str) -> str:
    """A file beside ``store``, named after it: ``.zarr`` replaced by ``suffix`` (preview, log).

    >>> beside("/data/slide1.zarr/", ".preview.png"), beside("out", ".log")
    ('/data/slide1.preview.png', 'out.log')
    """
    path = os.path.normpath(os.fspath(store))
    return (path[:-5] if path.lower().endswith(".zarr") else path) + suffix


_TIFF_NAMES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".btf", ".tf8")
_OTHER_FILES = (".png", ".jpg", ".jpeg", ".svs", ".ndpi", ".h5", ".hdf5", ".nc", ".npy", ".geojson", ".gpkg", ".json")


def check_store_path(path: str) -> None:
    """Refuse an output path whose name says it is a file of another kind: a run writes a Zarr store,
    which is a folder (``OUT.zarr``), and a folder named ``out.tif`` misleads every tool after it.

    >>> check_store_path("maps/s1.zarr"), check_store_path("maps/s1")
    (None, None)
    >>> try:
    ...     check_store_path("s1.tif")
    ... except ConfigError as err:
    ...     print(str(err).split("; ")[1])
    run with -o s1.zarr, then fcnpipe export s1.zarr -o s1.tif
    """
    name = os.path.basename(os.path.normpath(path))
    lower = name.lower()
    for suffix in _TIFF_NAMES:
        if lower.endswith(suffix):
            stem = os.path.join(os.path.dirname(path), name[: -len(suffix)] + ".zarr")
            raise ConfigError(
                f"{path}: fcnpipe run writes a Zarr store (a folder, e.g. {stem}), not a TIFF; "
                f"run with -o {stem}, then fcnpipe export {stem} -o {path}"
            )
    for suffix in _OTHER_FILES:
        if lower.endswith(suffix):
            raise ConfigError(
                f"{path}: fcnpipe run writes a Zarr store (a folder), not a {suffix} file; name it "
                f"{os.path.join(os.path.dirname(path), name[: -len(suffix)])}.zarr"
            )


def is_store(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in (".zgroup", "zarr.json"))


def is_empty_folder(path: str) -> bool:
    """A folder with nothing in it (a store never begun): replacing it loses nothing."""
    return os.path.isdir(path) and not os.listdir(path)


CREATING, REMOVING = ".creating-", ".removing-"
"""Infixes of the hidden folders beside a store: one being built, an old one being deleted."""


def _beside_hidden(path: str, infix: str, token: str) -> str:
    folder, name = os.path.split(os.path.normpath(path))
    return os.path.join(folder, f".{name}{infix}{token}")


@contextmanager
def staged_store(path: str, token: str) -> Iterator[str]:
    """A folder to build a new store in, which replaces ``path`` whole when the block ends.

    A store never exists half-made at ``path``: it is built in a hidden folder beside it, then
    renamed into place (an existing store at ``path`` is first renamed aside, then deleted), so a
    kill or a full disk at any moment of the creation leaves either what was there before or the
    whole new store; the hidden folders a kill leaves behind are removed by the next run
    (:func:`remove_leftovers`). On an error the staging folder is removed.
    """
    staging = _beside_hidden(path, CREATING, token)
    try:
        try:
            yield staging
            if os.path.lexists(path):
                old = _beside_hidden(path, REMOVING, token)
                os.rename(path, old)
                os.rename(staging, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(staging, path)
        except OSError as err:
            raise OutputError(f"{path}: cannot create the output store ({err.strerror or err})") from err
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def remove_leftovers(path: str) -> int:
    """Remove the hidden folders that runs killed while creating or replacing ``path`` left beside
    it; return how many. Only for a process that holds the store's lock."""
    folder, name = os.path.split(os.path.normpath(path))
    removed = 0
    for entry in os.listdir(folder or "."):
        if entry.startswith((f".{name}{CREATING}", f".{name}{REMOVING}")):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
            removed += 1
    return removed


_BLOSC = {
    False: numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),  # float probabilities
    True: numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE),  # uint8 values, labels
}
"""Blosc LZ4 at level 5, at GB/s, far below the network's cost. Byte shuffle groups the bytes of
float32/float16 values; one-byte values are bit-shuffled instead (byte shuffle does nothing to them):
a 512 x 512 uint8 probability chunk compressed 6.5x in 0.19 ms, against 2.3x in 0.76 ms unshuffled."""


def _bitshuffle(dtype: Any) -> bool:
    """Values of one byte (uint8 probabilities, labels) are bit-shuffled, wider ones byte-shuffled."""
    return bool(np.dtype(dtype).itemsize == 1)


def _compressor(zarr_format: int, bitshuffle: bool) -> dict[str, Any]:
    if zarr_format == 2:
        return {"compressors": _BLOSC[bitshuffle], "chunk_key_encoding": _V2_KEYS}
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
) -> None:
    """Create the group and the empty arrays of every level at ``path``; an existing folder there
    is refused, or deleted first with ``overwrite``.

    ``levels`` are the ``(Y, X)`` shapes of level 0, 1, ... (see :func:`pipeline.store.pyramid.level_shapes`).
    The arrays created are the handles of ``OutputRef(final_path or path, dtype, token)`` for this
    process's tasks (:func:`_arrays`), which then need not open them again; ``final_path`` is where
    a store built in a staging folder (:func:`staged_store`) will be.
    """
    if os.path.lexists(path):
        if not overwrite:
            raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
        shutil.rmtree(path)
    named = final_path or path
    if classes >= NODATA_LABEL:
        raise OutputError(f"{named}: {classes} classes do not fit the uint8 label map (at most {NODATA_LABEL - 1})")
    try:
        group = zarr.open_group(path, mode="w-", zarr_format=zarr_format)  # type: ignore[arg-type]
        labels = group.require_group(LABEL_GROUP)
        v3 = zarr_format == 3
        for level, (height, width) in enumerate(levels):
            chunks = (min(tile, height), min(tile, width))
            probabilities = group.create_array(
                str(level), shape=(classes, height, width), chunks=(classes, *chunks), dtype=dtype,
                fill_value=nodata_value(dtype), attributes=_fill_attribute(v3, dtype),
                dimension_names=("c", "y", "x") if v3 else None, **_compressor(zarr_format, _bitshuffle(dtype)),
            )  # fmt: skip
            label_array = labels.create_array(
                str(level), shape=(height, width), chunks=chunks, dtype="uint8", fill_value=NODATA_LABEL,
                attributes=_fill_attribute(v3, "uint8"),
                dimension_names=("y", "x") if v3 else None, **_compressor(zarr_format, bitshuffle=True),
            )  # fmt: skip
            _keep_arrays(OutputRef(named, dtype, token), level, (probabilities, label_array))
    except OSError as err:
        raise OutputError(f"{named}: cannot create the output store ({err.strerror or err})") from err


def _fill_attribute(v3: bool, dtype: str) -> dict[str, Any]:
    """``_FillValue`` for a Zarr v3 array of uint8: xarray takes a v2 array's fill value as missing,
    a v3 array's only from this attribute. Float arrays need none: their no data is NaN already."""
    return {"_FillValue": NODATA_UINT8} if v3 and dtype == "uint8" else {}


def encoded_size(stored: np.ndarray, labels: np.ndarray) -> int:
    """Bytes one chunk of probabilities as stored (:func:`quantize`) and its ``labels`` take on disk."""
    return sum(len(_BLOSC[_bitshuffle(v.dtype)].encode(np.ascontiguousarray(v))) for v in (stored, labels))


def quantize(probs: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Probabilities in [0, 1] as stored: unchanged, float16, or ``round(p * 254)`` as uint8; into
    ``out`` (of that dtype and shape) if given. The probabilities must be finite.

    >>> quantize(np.array([0.0, 0.5, 1.0], np.float32), "uint8").tolist()
    [0, 127, 254]
    """
    if dtype == "uint8":
        scaled: np.ndarray = np.multiply(probs, float(UINT8_SCALE))
        np.rint(scaled, out=scaled)  # in place: each fresh 3 MB temporary costs its page faults
        if out is None:
            return scaled.astype(np.uint8)
        out[...] = scaled
        return out
    if out is None:
        return probs.astype(dtype, copy=False)
    out[...] = probs
    return out


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
        group = zarr.open_group(out.path, mode="r")
        found = (group[str(level)], group[f"{LABEL_GROUP}/{level}"])
        _keep_arrays(out, level, found)
    return found


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
    ``__setitem__`` cost 2-3 ms per chunk, several times the encoding."""
    y0, y1, x0, x1 = core
    try:
        for array, values in zip(_arrays(out, level), (probs, labels), strict=True):
            _put_chunk(out.path, array, core, values)
    except OSError as err:
        raise OutputError(
            f"{out.path}: cannot write level {level} at rows {y0}-{y1}, columns {x0}-{x1} ({err.strerror or err})"
        ) from err


def _chunk_path(path: str, array: Any, core: tuple[int, int, int, int]) -> str:
    y0, _, x0, _ = core
    cy, cx = array.chunks[-2:]
    coords = (y0 // cy, x0 // cx) if array.ndim == 2 else (0, y0 // cy, x0 // cx)
    key = array.metadata.encode_chunk_key(coords)
    return os.path.join(path, *array.path.split("/"), *key.split("/"))


def _put_chunk(path: str, array: Any, core: tuple[int, int, int, int], values: np.ndarray) -> None:
    """Encode ``values`` (the chunk at ``core``, smaller at the array's edges) as zarr stores a chunk:
    the full chunk shape (padded with the fill value), C order, little-endian, then Blosc; write it
    atomically (a temporary file renamed over the chunk). A chunk that is all fill value is not
    stored, as zarr does not store it (``write_empty_chunks=False``)."""
    y0, y1, x0, x1 = core
    cy, cx = array.chunks[-2:]
    assert y0 % cy == 0 and x0 % cx == 0 and y1 - y0 <= cy and x1 - x0 <= cx, "a core is one whole chunk"
    fill = array.fill_value
    target = _chunk_path(path, array, core)
    if _all_fill(values, fill):
        if os.path.exists(target):
            os.unlink(target)
        return
    dtype = np.dtype(array.dtype).newbyteorder("<")
    if values.shape[-2:] != (cy, cx):
        full = np.full((*values.shape[:-2], cy, cx), fill, dtype)
        full[..., : values.shape[-2], : values.shape[-1]] = values
        values = full
    data = _BLOSC[_bitshuffle(dtype)].encode(np.ascontiguousarray(values, dtype))
    temporary = f"{target}.{threading.get_ident()}.partial"
    try:
        _write_file(temporary, data)
    except FileNotFoundError:  # the first chunk of its row: make the folder (not a stat per chunk)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _write_file(temporary, data)
    os.replace(temporary, target)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)


def _all_fill(values: np.ndarray, fill: Any) -> bool:
    """Whether every value is ``fill`` (NaN included); a sparse sample answers the usual "no"
    without a full pass."""
    flat = values.reshape(-1)
    if isinstance(fill, float) and np.isnan(fill):
        return bool(np.isnan(flat[::997]).all() and np.isnan(flat).all())
    return not (flat[::997] != fill).any() and not (flat != fill).any()


def chunk_files(out: OutputRef, level: int, core: tuple[int, int, int, int]) -> list[str]:
    """Paths of the probability and label chunk files that hold ``core`` of ``level``.

    Used to flush a task's chunks to disk before it is recorded as finished (:mod:`pipeline.run.resume`).
    """
    return [_chunk_path(out.path, array, core) for array in _arrays(out, level)]


def reduce_core(out: OutputRef, level: int, core: tuple[int, int, int, int]) -> int:
    """Make ``core`` of ``level`` (>= 1) from the 2 x 2 larger region of the stored level above.

    Returns the number of pixels written at ``level``.
    """
    y0, y1, x0, x1 = core
    box = (2 * y0, 2 * y1, 2 * x0, 2 * x1)
    probs, labels = (_read_chunks(out.path, array, box) for array in _arrays(out, level - 1))
    return write_reduced(out, level, core, probs, labels)


def _read_chunks(path: str, array: Any, box: tuple[int, int, int, int]) -> np.ndarray:
    """``array[..., y0:y1, x0:x1]`` (clipped to the array) from the chunk files this module wrote,
    decoded directly: through zarr's array machinery, reading the 2 x 2 chunks under a pyramid
    chunk cost 6 ms, more than making it."""
    y0, y1, x0, x1 = box
    height, width = array.shape[-2:]
    y1, x1 = min(y1, height), min(x1, width)
    cy, cx = array.chunks[-2:]
    dtype = np.dtype(array.dtype).newbyteorder("<")
    region = np.empty((*array.shape[:-2], y1 - y0, x1 - x0), dtype)
    for row, col, (a0, a1, b0, b1) in cells_under((y0, y1, x0, x1), (cy, cx)):
        target = region[..., a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
        try:
            with open(_chunk_path(path, array, (row * cy, 0, col * cx, 0)), "rb") as file:
                data = file.read()
        except FileNotFoundError:  # never written, or all fill value
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
    above's pixels ``[2 y0, 2 y1) x [2 x0, 2 x1)``. Returns the pixels written.
    """
    y0, y1, x0, x1 = core
    probs = mean_2x2(probs_above, out.dtype)[:, : y1 - y0, : x1 - x0]
    write_stored(out, level, core, probs, subsample_2x2(labels_above)[: y1 - y0, : x1 - x0])
    return (y1 - y0) * (x1 - x0)


def write_georeference_arrays(path: str, group_path: str, xs: np.ndarray, ys: np.ndarray, crs: dict[str, Any]) -> None:
    """Coordinates and a CF grid mapping beside the arrays of ``group_path``, as GIS readers expect.

    ``x`` and ``y`` hold pixel-centre coordinates: with ``_ARRAY_DIMENSIONS`` on the data arrays
    that is how GDAL finds the transform (xarray's convention for Zarr format 2). ``spatial_ref``
    is a scalar CF grid-mapping variable whose attributes ``crs`` gives (``spatial_ref``,
    ``GeoTransform``), as rioxarray reads them.
    """
    group = zarr.open_group(path, mode="r+")
    target = group if group_path in ("", "/") else group[group_path]
    zarr_format = group.metadata.zarr_format
    for name, values in (("x", xs), ("y", ys)):
        options = {"dimension_names": [name]} if zarr_format == 3 else {}
        array = target.create_array(
            name, shape=values.shape, chunks=values.shape, dtype="float64", fill_value=0.0,
            **_compressor(zarr_format, bitshuffle=False), **options,
        )  # fmt: skip
        array[:] = values
        if zarr_format == 2:
            array.attrs["_ARRAY_DIMENSIONS"] = [name]
    mapping = target.create_array("spatial_ref", shape=(), dtype="int32", fill_value=0)
    mapping.attrs.update({**crs, **({"_ARRAY_DIMENSIONS": []} if zarr_format == 2 else {})})


def update_attributes(path: str, node: str, attributes: dict[str, Any]) -> None:
    """Merge ``attributes`` into the attributes of the group or array at ``node`` ("" = root)."""
    group = zarr.open_group(path, mode="r+")
    target = group if node in ("", "/") else group[node]
    target.attrs.update(attributes)
