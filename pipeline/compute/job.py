"""What a task carries and what it returns: small, picklable values, never a file or a model.

A task is a :class:`Job` (everything the tasks of one store share: the source's path and level,
the model file's path and hash, the device, the output store) and a list of tiles; it returns a
:class:`TaskStats` (pixels written, per class too, seconds per stage), or a :class:`TaskFailure` when it was run
guarded. Nothing proportional to the image ever lives in the graph or in the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.source.pixels import SourceRef
from pipeline.source.resample import Resampling
from pipeline.store.layout import OutputRef
from pipeline.tiling import Tile


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """Everything a task needs besides its tiles."""

    source: SourceRef
    resampling: Resampling | None
    """How the level read maps onto the network's grid (None: pixel for pixel)."""
    source_shape: tuple[int, int]
    """``(Y, X)`` of the level read."""
    origin: tuple[int, int] = (0, 0)
    """Where the output's pixel (0, 0) is in the grid read (a window run): tiles' windows are read there."""
    output: OutputRef
    model_path: str
    model_sha256: str
    model_factory: str | None
    device: str
    stride: int
    """The network's total downsampling: windows are padded to multiples of it."""
    precision: str
    tta: bool
    torch_threads: int
    """Intra-op threads of each forward pass. Part of the job because the float result of a
    convolution can differ in the last bit with the thread count: the same count everywhere gives
    the same bytes on threads, processes and clusters."""
    scale: float
    """Input values are divided by this (the dtype's maximum by default)."""
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    level1: bool = False
    """Tasks own 2 x 2 blocks of tiles and also write the pyramid level-1 chunk they make up."""
    mark_behind: bool = False
    """Record finished tasks from this process's background thread (:data:`pipeline.compute.state.MARK_BEHIND`): for
    tasks run on threads here, whose run waits for it before completing the store."""
    forward_batch: int = 1
    """Windows per forward pass: on a CPU 1 (a batch of 4 held 4 x 270 MB of the reference FCN's
    hidden activations per worker, for no speed), on a GPU more, to fill the device."""
    forward_tile: int = 0
    """Cut each tile's core into pieces of this side, one forward pass each (0: the whole tile).
    See :func:`pipeline.tiling.forward_size`: on a CPU, passes whose activations glibc reuses."""
    halo: int = 0
    """The halo read around each piece (the run's halo)."""


@dataclass(frozen=True, slots=True)
class TaskStats:
    """What a level-0 task returns: pixels written, and where its time went (seconds)."""

    token: str
    """The :attr:`OutputRef.token` of the store written."""
    pixels: int
    chunks: int
    """Level-0 chunks written (one per core)."""
    read_s: float
    """Reading, decoding, resampling and normalising the windows."""
    predict_s: float
    """The network, softmax, argmax and quantising (:func:`predict_tiles`)."""
    write_s: float
    """Compressing and writing the chunks (pyramid level 1 included)."""
    nodata_pixels: int = 0
    """Pixels of the cores written as no data (alpha 0, GDAL_NODATA, non-finite values...)."""
    class_pixels: tuple[int, ...] = ()
    """Pixels of the cores written with label 0, 1, ... (no data excluded): the class areas of the
    run add these up, so that they cost no second pass over the labels."""


@dataclass(frozen=True, slots=True)
class TaskFailure:
    """What a guarded task returns instead of raising: one store's failure must not stop the
    tasks of the other stores computed with it (``fcnpipe batch``)."""

    token: str
    """The :attr:`OutputRef.token` of the store whose task failed."""
    message: str
    """The one-line error; empty for a task abandoned because an earlier one of its store failed."""


def task_id(group: Sequence[Tile]) -> str:
    """The name of a task: the row and column of its first tile, stable across runs of one plan.

    >>> task_id([Tile(row=2, col=0, core=(1024, 1536, 0, 512), window=(1023, 1537, 0, 513))])
    'r2c0'
    """
    return f"r{group[0].row}c{group[0].col}"
