"""The whole job on a synthetic slide: make it, train the reference FCN, run the pipeline, score it.

:func:`run_demo` writes into one folder: ``slide.tif`` (tiled JPEG pyramid), ``slide_mask.tif``
(ground truth), ``model.pt`` (an fcnpipe checkpoint), ``prediction.zarr`` (the pipeline's output)
and ``preview.png``. Training goes through :func:`pipeline.training.train.train_from_tiffs`, the way a user
trains on their own slides: random patches read lazily from the whole slide, the last rows kept
for validation. Scoring compares ``labels/argmax/0`` of the output with the ground truth one band
of chunk rows at a time, so, like the run itself, it never holds a whole map.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.model.checkpoint import file_sha256
from pipeline.model.network import REFERENCE_FCN
from pipeline.products.preview import write_store_preview
from pipeline.run.execute import execute
from pipeline.run.plan import prepare
from pipeline.source.pixels import SourceRef, read_window
from pipeline.source.tiff import open_source
from pipeline.store.reading import open_store
from pipeline.training.sampling import confusion, iou_per_class
from pipeline.training.synthetic import SyntheticSlide, make_synthetic_slide
from pipeline.training.train import Progress, TrainResult, train_from_tiffs

HIDDEN = 64
PATCH = 128
"""Side of the training patches in pixels (smaller on slides under ``4 * PATCH``)."""
BATCH = 8
EPOCHS = 5
VAL_FRACTION = 0.25
TRAIN_STEPS = 300
"""Steps of ``BATCH`` patches the demo trains for: a fixed amount of work, not of time, so that the
same code gives the same checkpoint on any machine however busy it is."""
TRAIN_THREADS = 2
"""Torch threads of the demo's training, whatever the machine has: the sums inside a convolution's
backward pass are split by thread, and another split rounds differently in the last bit."""


@dataclass(frozen=True)
class DemoResult:
    slide_path: str
    mask_path: str
    model_path: str
    store_path: str
    preview_path: str
    ious: dict[str, float]
    """Intersection over union per class name (NaN for a class in neither map)."""
    mean_iou: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step: ``synthesize``, ``train``, ``predict``, ``score``, ``preview``."""
    training: TrainResult | None = None
    """Per-epoch losses and validation IoU of the training."""
    model_sha256: str = ""
    """Of the checkpoint: the same on every run of the same code and seed."""


def run_demo(
    workdir: str,
    size: int = 8192,
    seed: int = 0,
    progress: DemoProgress | None = None,
    log: Callable[[str], None] | None = None,
    train_steps: int = TRAIN_STEPS,
) -> DemoResult:
    """Synthesize a ``size x size`` slide in ``workdir``, train, run the pipeline, score, preview.

    ``progress(step, done, total)`` follows the training (``"training"``, patches) and the
    prediction (``"predicting"``, megapixels); ``log`` receives
    one line as each step starts and each training epoch ends. Training is ``train_steps`` steps of
    ``BATCH`` patches on :data:`TRAIN_THREADS` threads, seeded by ``seed``: the same slide, the
    same checkpoint bytes and the same scores on every run of the same code, on any machine
    however busy (to the last bit on one kind of CPU). Files in ``workdir`` from an earlier demo
    are replaced.
    """
    say = log or (lambda _line: None)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    os.makedirs(workdir, exist_ok=True)
    slide_path, mask_path, model_path, store, preview = (
        os.path.join(workdir, name)
        for name in ("slide.tif", "slide_mask.tif", "model.pt", "prediction.zarr", "preview.png")
    )
    say(f"making a {size} x {size} synthetic slide and its ground truth")
    with _timer(timings, "synthesize"):
        slide = make_synthetic_slide(slide_path, mask_path, size=size, seed=seed)
        mask_ref = open_source(slide.mask_path).ref
    with _timer(timings, "train"):
        say(
            f"training the reference FCN for {train_steps} steps of {BATCH} patches on the whole slide "
            f"(last {VAL_FRACTION:.0%} of rows: validation)"
        )
        training = train_model(slide, model_path, seed, train_steps, _phase(progress, "training"), say)
    say(f"running the pipeline on the whole slide into {store}")
    with _timer(timings, "predict"):
        store = predict_slide(slide.image_path, model_path, store, progress=_phase(progress, "predicting"))
    say("scoring against the ground truth")
    with _timer(timings, "score"):
        predicted = open_store(store, complete=True).labels[0]
        ious = iou_per_class(confusion_by_bands(predicted, mask_ref, len(slide.class_names)))
    with _timer(timings, "preview"):
        write_store_preview(store, preview)
    return DemoResult(
        slide_path=slide.image_path,
        mask_path=slide.mask_path,
        model_path=model_path,
        store_path=store,
        preview_path=preview,
        ious={name: float(value) for name, value in zip(slide.class_names, ious, strict=True)},
        mean_iou=float(np.nanmean(ious)) if not np.isnan(ious).all() else float("nan"),
        seconds=time.perf_counter() - started,
        timings=timings,
        training=training,
        model_sha256=file_sha256(model_path),
    )


def train_model(
    slide: SyntheticSlide,
    model_path: str,
    seed: int,
    steps: int,
    progress: Progress | None,
    log: Callable[[str], None],
) -> TrainResult:
    """Train the reference FCN on ``slide`` with :func:`~pipeline.training.train.train_from_tiffs`; save it.

    The checkpoint names the slide's classes, their colours and its resolution, and keeps the
    default normalisation (``value / 255``) that training used.
    """
    epochs, per_epoch = training_schedule(steps)
    return train_from_tiffs(
        [slide.image_path],
        [slide.mask_path],
        model_path,
        architecture=REFERENCE_FCN,
        arguments={"hidden": HIDDEN},
        class_names=slide.class_names,
        class_colors=slide.class_colors,
        epochs=epochs,
        patches_per_epoch=per_epoch,
        patch=min(PATCH, slide.size // 4),
        batch=BATCH,
        val_fraction=VAL_FRACTION,
        mpp=slide.mpp,
        seed=seed,
        threads=TRAIN_THREADS,
        progress=progress,
        log=log,
    )


def training_schedule(steps: int) -> tuple[int, int]:
    """``(epochs, patches per epoch)`` for ``steps * BATCH`` patches in ``EPOCHS`` epochs (fewer if
    that is tiny).

    >>> training_schedule(300), training_schedule(2)
    ((5, 480), (2, 8))
    """
    if steps < 1:
        raise ConfigError(f"Expected a positive number of training steps. Got {steps} instead.")
    total = steps * BATCH
    epochs = max(1, min(EPOCHS, total // BATCH))
    return epochs, math.ceil(total / epochs)


def predict_slide(slide_path: str, model_path: str, store: str, *, progress: Progress | None = None) -> str:
    """Run the full pipeline with default settings, replacing ``store``; return its absolute path.
    ``progress(done, total)`` follows the megapixels predicted."""
    config = load_config(
        overrides={
            "input": {"path": slide_path},
            "model": {"path": model_path},
            "output": {"path": store, "overwrite": True},
        }
    )
    plan = prepare(config)
    total, done = plan.megapixels_to_compute, [0.0]

    def on_pixels(pixels: int) -> None:
        done[0] += pixels / 1e6
        if progress is not None:
            progress(min(done[0], total), total)

    return execute(plan, on_pixels).output_path


def confusion_by_bands(predicted: Any, truth: SourceRef, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts, ``[p, t]`` = pixels predicted ``p`` whose true class is ``t``.

    ``predicted`` is a ``(Y, X)`` Zarr array of class indices; ``truth`` a single-channel image of
    the same size. Both are read one band of ``predicted``'s chunk rows at a time.
    """
    height, width = predicted.shape
    band = predicted.chunks[0]
    counts = np.zeros((num_classes, num_classes), np.int64)
    for y0 in range(0, height, band):
        y1 = min(y0 + band, height)
        counts += confusion(np.asarray(predicted[y0:y1]), read_window(truth, (y0, y1, 0, width))[0], num_classes)
    return counts


@contextmanager
def _timer(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[name]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - started, 3)


DemoProgress = Callable[[str, float, float], None]
"""Told ``(step, done, total)``: the demo's ``"training"`` in patches, its ``"predicting"`` in megapixels."""


def _phase(progress: DemoProgress | None, step: str) -> Progress | None:
    """``progress`` for one step of the demo."""
    if progress is None:
        return None
    return lambda done, total: progress(step, done, total)
