"""The whole job on a synthetic slide: make it, train the reference FCN, run the pipeline, score it.

:func:`run_demo` writes into one folder: ``slide.tif`` (tiled JPEG pyramid), ``slide_mask.tif``
(ground truth), ``model.pt`` (an fcnpipe checkpoint), ``prediction.zarr`` (the pipeline's output)
and ``preview.png``. Scoring compares ``labels/argmax/0`` of the output with the ground truth one
band of chunk rows at a time, so, like the run itself, it never holds a whole map.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import zarr

from pipeline.checkpoint import save_checkpoint
from pipeline.config import load_config
from pipeline.model import REFERENCE_FCN, ModelSpec
from pipeline.output import LABELS
from pipeline.preview import write_store_preview
from pipeline.run import run_pipeline
from pipeline.source import SourceRef, open_source, read_window
from pipeline.synthetic import Box, SyntheticSlide, make_synthetic_slide
from pipeline.train import train_reference_fcn

TRAIN_CROP = 1024
"""Side of the square the network is trained on, in pixels."""
HIDDEN = 64


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


def run_demo(
    workdir: str,
    size: int = 8192,
    seed: int = 0,
    progress: bool = True,
    train_seconds: float = 45.0,
    log: Callable[[str], None] | None = None,
    train_steps: int | None = None,
) -> DemoResult:
    """Synthesize a ``size x size`` slide in ``workdir``, train, run the pipeline, score, preview.

    ``progress`` shows tqdm bars for training and prediction (on a terminal only); ``log`` receives
    one line as each step starts. ``train_steps`` caps training at that many steps (reproducible,
    for tests) as well as ``train_seconds``. Files in ``workdir`` from an earlier demo are replaced.
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
        box = choose_training_crop(mask_ref, size, min(TRAIN_CROP, size), len(slide.class_names))
        say(f"training the reference FCN for {train_seconds:g} s on rows {box[0]}-{box[1]}, columns {box[2]}-{box[3]}")
        train_checkpoint(slide, box, model_path, seed=seed, seconds=train_seconds, steps=train_steps, progress=progress)
    say(f"running the pipeline on the whole slide into {store}")
    with _timer(timings, "predict"):
        store = predict_slide(slide.image_path, model_path, store, progress=progress)
    say("scoring against the ground truth")
    with _timer(timings, "score"):
        predicted = zarr.open_group(store, mode="r")[LABELS]
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
    )


def train_checkpoint(
    slide: SyntheticSlide,
    box: Box,
    model_path: str,
    *,
    seed: int,
    seconds: float,
    progress: bool,
    steps: int | None = None,
) -> None:
    """Train the reference FCN on ``box`` of ``slide`` and save it as an fcnpipe checkpoint.

    The checkpoint names the classes, their colours and the slide's resolution, and keeps the
    default normalisation (``value / 255``) that :func:`~pipeline.train.train_reference_fcn` used.
    """
    image = read_window(open_source(slide.image_path).ref, box)
    labels = read_window(open_source(slide.mask_path).ref, box)[0]
    classes = len(slide.class_names)
    module = train_reference_fcn(
        image, labels, classes, seconds=seconds, steps=steps, hidden=HIDDEN, seed=seed, progress=progress
    )
    spec = ModelSpec(
        architecture=REFERENCE_FCN,
        arguments={"in_channels": image.shape[0], "num_classes": classes, "hidden": HIDDEN},
        in_channels=image.shape[0],
        num_classes=classes,
        class_names=slide.class_names,
        class_colors=slide.class_colors,
        mpp=slide.mpp,
    )
    save_checkpoint(model_path, module, spec)


def predict_slide(slide_path: str, model_path: str, store: str, *, progress: bool) -> str:
    """Run the full pipeline with default settings, replacing ``store``; return its absolute path."""
    config = load_config(
        overrides={
            "input": {"path": slide_path},
            "model": {"path": model_path},
            "output": {"path": store, "overwrite": True},
            "compute": {"progress": progress},
        }
    )
    _, height, width = open_source(slide_path).shape
    with _pixel_progress(height * width, progress) as on_progress:
        return run_pipeline(config, on_progress=on_progress).output_path


def choose_training_crop(mask: SourceRef, size: int, crop: int, num_classes: int) -> Box:
    """The ``crop x crop`` box, among a 3 x 3 grid of candidates, whose rarest class is least rare.

    Reads only the candidates' ground truth. Ties go to the earlier candidate, the centre first,
    so a slide with tissue in the middle trains on the middle.
    """
    centre = (size - crop) // 2
    starts = [centre, *sorted({(size - crop) // 4, 3 * (size - crop) // 4} - {centre})]
    best, best_score = (0, crop, 0, crop), -1.0
    for y0 in starts:
        for x0 in starts:
            box = (y0, y0 + crop, x0, x0 + crop)
            counts = np.bincount(read_window(mask, box)[0].ravel(), minlength=num_classes)
            score = float(counts[:num_classes].min()) / counts.sum()
            if score > best_score:
                best, best_score = box, score
    return best


def confusion_by_bands(predicted: zarr.Array, truth: SourceRef, num_classes: int) -> np.ndarray:
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


def confusion(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts of (predicted, true) class pairs; classes ``>= K`` are ignored.

    >>> confusion(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3).tolist()
    [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    """
    p, t = predicted.ravel().astype(np.int64), truth.ravel().astype(np.int64)
    keep = (p < num_classes) & (t < num_classes)
    flat = np.bincount(p[keep] * num_classes + t[keep], minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def iou_per_class(counts: np.ndarray) -> np.ndarray:
    """Intersection over union of each class from a confusion matrix; NaN where the union is empty.

    >>> iou_per_class(np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]])).round(3).tolist()
    [1.0, 0.5, 0.5]
    """
    intersection = np.diag(counts).astype(np.float64)
    union = counts.sum(axis=0) + counts.sum(axis=1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / union, np.nan)


@contextmanager
def _timer(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[name]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - started, 3)


@contextmanager
def _pixel_progress(total_pixels: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """An ``on_progress(pixels)`` callback that drives a megapixel tqdm bar (on a terminal only)."""
    from tqdm import tqdm

    with tqdm(
        total=round(total_pixels / 1e6, 2),
        desc="predicting",
        unit="Mpx",
        disable=None if enabled else True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} Mpx [{elapsed}<{remaining}]",
    ) as bar:
        yield lambda pixels: bar.update(pixels / 1e6)
