"""Fit a network to labelled images: patches read lazily from TIFF pairs, or cut from arrays in memory.

The epochs, the budget and the checkpoints of training (:mod:`pipeline.training.sampling` draws and
reads the patches, :mod:`pipeline.model.fit` takes the optimiser's steps). :func:`train_from_tiffs`
trains any architecture a checkpoint can name on images of any size and saves its best epoch;
:func:`train_reference_fcn` fits the reference FCN to arrays in memory. Both scale the input as the
default :class:`pipeline.model.network.Normalization` does (``value / 255`` for uint8), so the checkpoint
predicts on slides what it was trained on, and both leave the 1 px border of each patch out of the
loss and the scores: it sees zero padding that a tiled run, which reads a halo, never sees.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, ModelError, OutputError
from pipeline.files import PARTIAL
from pipeline.model.checkpoint import architectures, build_module, save_checkpoint
from pipeline.model.fit import BORDER, Fitter, predict_labels, reseed, seeded
from pipeline.model.network import REFERENCE_FCN, ModelSpec, Normalization, ReferenceFCN
from pipeline.model.receptive import measure_stride
from pipeline.parse import parse_int, parse_number
from pipeline.training import sampling
from pipeline.training.sampling import Patch, TrainingPair

_LEARNING_RATE = 1e-2
_DEEP_LEARNING_RATE = 1e-3  # Adam at 1e-2 makes networks deeper than the reference FCN diverge
_CLASS_SAMPLE = 64  # training patches whose labels give the class count and the balanced weights

Progress = Callable[[float, float], None]
"""Told ``(done, total)`` after every step: patches trained, or thousandths of a time budget."""


@dataclass(frozen=True)
class EpochResult:
    """One epoch of :func:`train_from_tiffs`."""

    epoch: int
    """1-based."""
    patches: int
    """Patches trained on: ``patches_per_epoch``, or fewer in an epoch the time budget cut short."""
    loss: float
    """Mean weighted cross-entropy of the epoch's steps."""
    ious: tuple[float, ...]
    """Validation IoU per class; NaN for a class in neither the truth nor the prediction."""
    mean_iou: float
    seconds: float
    """Since training started, at the end of this epoch's validation."""


@dataclass(frozen=True)
class TrainResult:
    path: str
    """The checkpoint: the weights of ``best_epoch``."""
    spec: ModelSpec
    epochs: int
    """Epochs run, a last one cut short by the time budget included."""
    history: tuple[EpochResult, ...]
    best_epoch: int
    best_mean_iou: float
    seconds: float
    stopped_early: bool
    """The time budget ended training before ``epochs`` full epochs."""


def train_from_tiffs(
    images: Sequence[str],
    masks: Sequence[str],
    out_path: str,
    *,
    architecture: str = REFERENCE_FCN,
    arguments: dict[str, int] | None = None,
    class_names: Sequence[str] | None = None,
    class_colors: Sequence[tuple[int, int, int]] | None = None,
    epochs: int = 5,
    patches_per_epoch: int = 256,
    patch: int = 128,
    batch: int = 8,
    val_fraction: float = 0.2,
    val_patches: int = 64,
    class_weights: str | Sequence[float] | None = "balanced",
    mpp: float | None = None,
    gsd: float | None = None,
    seed: int = 0,
    seconds: float | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Fit ``architecture`` to ``masks[i]`` of ``images[i]`` and save the best epoch at ``out_path``.

    Each mask is a one-channel TIFF of integer class indices (uint8) of its image's ``(Y, X)``
    size. Images are read only ``patch x patch`` at a time: each step draws ``batch`` patches
    (image chosen in proportion to its area), starting on multiples of the network's stride (the
    phase a tiled run sees; ``patch`` must be a multiple of it). The last ``val_fraction`` of each
    image's rows is kept for validation (:func:`pipeline.training.sampling.split_rows`); after each epoch of
    ``patches_per_epoch`` patches a fixed set of ``val_patches`` patches drawn there once gives
    the IoU per class, logged as one line. The checkpoint is rewritten whenever the mean IoU
    improves (or equals: then longer training wins), so it holds the best epoch's weights, also if
    training is interrupted.

    Classes: ``len(class_names)``; without names, the largest label in ``_CLASS_SAMPLE`` training
    patches plus one (at least 2): a class too rare to be sampled needs its name given, and a
    patch with an unknown label is a SourceError. ``class_weights``: ``"balanced"`` weighs each
    class by ``pixels / (classes * its pixels)`` in that sample, capped at 20 (also for a class
    absent from it); a sequence gives them; None weighs all alike. ``arguments`` go to the
    architecture with ``in_channels`` and ``num_classes`` from the data. Adam's learning rate,
    1e-2 for the reference FCN and 1e-3 for deeper networks, decays to a tenth over ``epochs``
    or ``seconds``, whichever runs out first; ``seconds`` (wall time, validation included) stops
    training after the step during which the time left stopped covering one validation pass.
    ``mpp`` defaults to the first image's, ``gsd`` (ground sample distance, CRS units per pixel) to
    the first image's pixel size for a georeferenced raster: a run then reads rasters at the
    resolution the model learnt (``--gsd``'s default). ``threads``: torch threads while training (restored).
    ``progress(done, total)`` follows the patches, ``log`` receives a line per epoch.
    """
    started, say = time.perf_counter(), log or (lambda _line: None)
    sizes = {"epochs": epochs, "patches_per_epoch": patches_per_epoch, "batch": batch, "val_patches": val_patches}
    _check_arguments(val_fraction, seconds, out_path, patch=patch, **sizes)
    infos = sampling.open_pairs(images, masks)
    in_channels = infos[0][0].shape[0]
    with seeded(seed, threads):
        stride = measure_stride(_build(architecture, arguments, in_channels, 2), in_channels)
        if patch % stride or patch <= 2 * BORDER:
            fix = max(stride, -(-patch // stride) * stride, 2 * BORDER + 1)
            raise ConfigError(
                f"Expected a patch size that is a multiple of {architecture}'s stride {stride}. Got {patch}; use {fix}."
            )
        pairs = [sampling.split_pair(image, mask, patch, stride, val_fraction) for image, mask in infos]
        sample = sampling.draw(pairs, "train", _CLASS_SAMPLE, patch, stride, np.random.default_rng([seed, 2]))
        counts = sampling.label_counts(sample, len(class_names) if class_names else None)
        classes = sampling.name_classes(class_names, class_colors, counts)
        dtypes = {str(image.dtype) for image, _ in infos}
        spec = _spec(architecture, arguments, in_channels, classes, mpp or infos[0][0].mpp)
        spec = replace(spec, gsd=gsd or ground_sample_distance(infos[0][0].pixel_size))
        spec = replace(spec, input_dtype=dtypes.pop() if len(dtypes) == 1 else None)  # what a run checks
        weights = sampling.loss_weights(counts, spec.num_classes, class_weights, absent=sampling.MAX_CLASS_WEIGHT)
        val_picks = sampling.draw(pairs, "val", val_patches, patch, stride, np.random.default_rng([seed, 1]))
        val_set = [sampling.read_patch(pair, box, spec.num_classes) for pair, box in val_picks]
        seen = set(np.unique(np.concatenate([labels.ravel() for _, _, labels in val_set])).tolist())
        if missing := [name for k, name in enumerate(spec.class_names) if k not in seen]:
            say(f"the validation patches hold no {', '.join(missing)}: no IoU for them, mIoU without them")
        plan = _Plan(pairs, patch, stride, batch, patches_per_epoch, epochs, spec, out_path, progress, say)
        rate = _LEARNING_RATE if architecture == REFERENCE_FCN else _DEEP_LEARNING_RATE
        reseed(seed)  # the initial weights depend on the seed alone
        steps = epochs * -(-patches_per_epoch // batch)
        trainer = Fitter(build_module(spec), weights, rate, seconds or math.inf, steps, started)
        history = _run_epochs(trainer, plan, val_set, np.random.default_rng([seed, 0]))
    best = max(history, key=lambda e: (e.mean_iou, e.epoch))
    stopped = len(history) < epochs or history[-1].patches < patches_per_epoch
    if stopped:
        say(f"stopped in epoch {len(history)}/{epochs}: the {seconds:g} s time budget ran out")
    say(f"kept epoch {best.epoch} (val mIoU {best.mean_iou:.3f}) in {out_path}")
    seconds_taken = time.perf_counter() - started
    return TrainResult(out_path, spec, len(history), tuple(history), best.epoch, best.mean_iou, seconds_taken, stopped)


def ground_sample_distance(pixel_size: tuple[float, float] | None) -> float | None:
    """One ground sample distance from a raster's ``(x, y)`` pixel size: their mean (they are equal
    but for rounding in nearly every raster); None without a georeference.

    >>> ground_sample_distance((30.0, 30.0)), ground_sample_distance(None)
    (30.0, None)
    """
    return None if pixel_size is None else (abs(pixel_size[0]) + abs(pixel_size[1])) / 2


def _spec(
    architecture: str,
    arguments: dict[str, int] | None,
    in_channels: int,
    classes: tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]],
    mpp: float | None,
) -> ModelSpec:
    """What the checkpoint says: the architecture's arguments with the data's channels and classes."""
    names, colors = classes
    for key, value in (("in_channels", in_channels), ("num_classes", len(names))):
        if (arguments or {}).get(key, value) != value:
            raise ConfigError(f"Expected {key}={value} (from the data) in the arguments. Got {(arguments or {})[key]}.")
    arguments = {**(arguments or {}), "in_channels": in_channels, "num_classes": len(names)}
    return ModelSpec(architecture, arguments, in_channels, len(names), names, colors, Normalization(), mpp)


def _build(architecture: str, arguments: dict[str, int] | None, in_channels: int, num_classes: int) -> Any:
    """``architecture(**arguments)`` with the data's ``in_channels`` and ``num_classes``."""
    known = architectures()
    if architecture not in known:
        raise ConfigError(f"Unknown architecture {architecture!r}. Expected one of {', '.join(sorted(known))}.")
    given = {**(arguments or {}), "in_channels": in_channels, "num_classes": num_classes}
    try:
        return known[architecture](**given)
    except (TypeError, ModelError) as err:
        raise ConfigError(f"Bad arguments {given} for {architecture}: {err}") from err


@dataclass(frozen=True)
class _Plan:
    """What the epochs need besides the trainer."""

    pairs: list[TrainingPair]
    patch: int
    stride: int
    batch: int
    patches_per_epoch: int
    epochs: int
    spec: ModelSpec
    out_path: str
    progress: Progress | None
    say: Callable[[str], None]


def _run_epochs(trainer: Fitter, plan: _Plan, val_set: list[Patch], rng: np.random.Generator) -> list[EpochResult]:
    """Train and validate epoch by epoch until ``plan.epochs`` or the budget runs out; save improvements."""
    history: list[EpochResult] = []
    for epoch in range(1, plan.epochs + 1):
        loss, patches = _train_epoch(trainer, plan, rng, epoch)
        validated = time.perf_counter()
        ious = _validate(trainer.module, val_set, plan.spec.num_classes, plan.batch)
        trainer.reserve = time.perf_counter() - validated
        mean = float(np.nanmean(ious))
        seconds = time.perf_counter() - trainer.started
        history.append(EpochResult(epoch, patches, loss, tuple(float(v) for v in ious), mean, seconds))
        if mean >= max((e.mean_iou for e in history[:-1]), default=-1.0):  # a tie goes to the longer training
            _save(plan.out_path, trainer.module, plan.spec)
        scores = ", ".join(f"{n} {v:.3f}" for n, v in zip(plan.spec.class_names, ious, strict=True))
        plan.say(f"epoch {epoch}/{plan.epochs}: loss {loss:.3f}, val mIoU {mean:.3f} ({scores})")
        if trainer.spent:
            break
    return history


def _train_epoch(trainer: Fitter, plan: _Plan, rng: np.random.Generator, epoch: int) -> tuple[float, int]:
    """Steps on fresh random training patches until the epoch's patches or the budget run out;
    the mean loss and the number of patches."""
    losses: list[float] = []
    patches = 0
    while patches < plan.patches_per_epoch and not trainer.spent:
        count = min(plan.batch, plan.patches_per_epoch - patches)
        picks = sampling.draw(plan.pairs, "train", count, plan.patch, plan.stride, rng)
        xb, yb = sampling.stack([sampling.read_patch(pair, box, plan.spec.num_classes) for pair, box in picks])
        losses.append(trainer.step(xb, yb))
        patches += count
        if plan.progress is not None:
            plan.progress((epoch - 1) * plan.patches_per_epoch + patches, plan.epochs * plan.patches_per_epoch)
    return float(np.mean(losses)), patches


def _validate(module: Any, patches: list[Patch], num_classes: int, batch: int) -> np.ndarray:
    """IoU per class of ``module``'s argmax on the interiors of ``patches``, ``(num_classes,)``."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    inner = slice(BORDER, -BORDER)
    for start in range(0, len(patches), batch):
        xb, yb = sampling.stack(patches[start : start + batch])
        predicted = predict_labels(module, xb)
        counts += sampling.confusion(predicted[:, inner, inner], yb[:, inner, inner], num_classes)
    return sampling.iou_per_class(counts)


def _save(path: str, module: Any, spec: ModelSpec) -> None:
    """Write the checkpoint beside ``path``, then move it there: an interrupted save leaves the last one."""
    partial = f"{path}{PARTIAL}"
    try:
        save_checkpoint(partial, module, spec)
        os.replace(partial, path)
    except OSError as err:
        raise OutputError(f"{path}: cannot write the checkpoint ({err.strerror or err})") from err


def _check_arguments(val_fraction: float, seconds: float | None, out_path: str, **counts: int) -> None:
    for name, value in counts.items():
        parse_int(value, name, minimum=1)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"Expected a validation fraction between 0 and 1. Got {val_fraction!r} instead.")
    if seconds is not None:
        parse_number(seconds, "seconds", positive=True)
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise OutputError(f"{out_path}: folder {folder} does not exist")


def train_reference_fcn(
    image: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    seconds: float = 45.0,
    steps: int | None = None,
    patch: int = 64,
    batch: int = 16,
    hidden: int = 64,
    seed: int = 0,
    class_weights: str | Sequence[float] | None = "balanced",
    threads: int | None = None,
    progress: Progress | None = None,
) -> Any:
    """A :class:`~pipeline.model.network.ReferenceFCN` fitted to ``labels`` of ``image``; in eval mode, on the CPU.

    ``image`` is ``(C, Y, X)`` (any dtype: it is divided by the dtype's maximum) and ``labels``
    ``(Y, X)`` class indices, both in memory and at least ``patch`` pixels on each side. Each step
    draws ``batch`` random ``patch x patch`` crops and takes one Adam step. Training stops after
    ``seconds`` of wall time or ``steps`` steps, whichever comes first; with ``steps`` and
    ``seconds=math.inf`` the result depends on ``seed`` only. ``class_weights`` as for
    :func:`train_from_tiffs`, counted on all of ``labels`` (an absent class weighs 0).
    """
    _check_inputs(image, labels, num_classes, patch, batch, seconds, steps)
    counts = np.bincount(labels.ravel(), minlength=num_classes)
    weights = sampling.loss_weights(counts, num_classes, class_weights, absent=0.0)
    started = time.perf_counter()
    with seeded(seed, threads):
        module = ReferenceFCN(image.shape[0], num_classes, hidden)
        scale = np.float32(Normalization().scale_for(image.dtype))
        x_all = np.ascontiguousarray(image, np.float32) / scale
        y_all = np.ascontiguousarray(labels, np.int64)
        trainer = Fitter(module, weights, _LEARNING_RATE, seconds, steps, started)
        rng = np.random.default_rng(seed)
        while not trainer.spent:
            trainer.step(*_sample(x_all, y_all, patch, batch, rng))
            if progress is not None:
                progress(round(min(trainer.done, 1.0) * 1000), 1000)  # thousandths of the budget
    return module.eval()


def _check_inputs(
    image: np.ndarray, labels: np.ndarray, num_classes: int, patch: int, batch: int, seconds: float, steps: int | None
) -> None:
    if image.ndim != 3 or labels.ndim != 2 or image.shape[1:] != labels.shape:
        raise ConfigError(
            f"Expected a (C, Y, X) image and (Y, X) labels of the same Y, X. Got {image.shape} and {labels.shape}."
        )
    if patch < 3 or batch < 1:
        raise ConfigError(f"Expected patch >= 3 and batch >= 1. Got patch {patch} and batch {batch} instead.")
    if min(labels.shape) < patch:
        raise ConfigError(f"Training crop {labels.shape} is smaller than the {patch} px patch; use a smaller patch.")
    if num_classes < 2:
        raise ConfigError(f"Expected at least 2 classes. Got {num_classes} instead.")
    if int(labels.max()) >= num_classes:
        raise ConfigError(f"Labels go up to {int(labels.max())} but num_classes is {num_classes}; raise num_classes.")
    if not seconds > 0 and steps is None:
        raise ConfigError(f"Expected a positive time budget or a number of steps. Got {seconds} s and no steps.")
    if steps is not None and steps < 1:
        raise ConfigError(f"Expected a positive number of steps. Got {steps} instead.")


def _sample(
    x_all: np.ndarray, y_all: np.ndarray, patch: int, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` random crops of in-memory arrays: ``(B, C, patch, patch)`` float32, ``(B, patch, patch)`` int64."""
    boxes = sampling.random_boxes(rng, (0, y_all.shape[0]), y_all.shape[1], patch, 1, batch)
    xb = np.stack([x_all[:, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])
    return xb, np.stack([y_all[y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])
