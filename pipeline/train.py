"""Fit the reference FCN on random patches of one labelled crop, within a time budget.

This is the module that owns torch for fitting (``pipeline.model`` owns it for inference). It is
deliberately small: enough to give the demo a network that actually separates the synthetic
classes, not a training framework. The input is scaled exactly as the default
:class:`pipeline.model.Normalization` scales it (``value / 255`` for uint8, no mean or std), so a
checkpoint saved with the default normalisation predicts on whole slides what it was trained on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.model import Normalization, ReferenceFCN

_LEARNING_RATE = 1e-2
_FINAL_LEARNING_RATE = 1e-3
_MAX_CLASS_WEIGHT = 20.0  # a handful of pixels of a rare class must not dominate the loss


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
    progress: bool = False,
) -> nn.Module:
    """A :class:`~pipeline.model.ReferenceFCN` fitted to ``labels`` of ``image``; in eval mode, on the CPU.

    ``image`` is ``(C, Y, X)`` (uint8, or any dtype: it is divided by the dtype's maximum) and
    ``labels`` ``(Y, X)`` uint8 class indices, both at least ``patch`` pixels on each side. Each
    step draws ``batch`` random ``patch x patch`` crops and takes one Adam step on the cross-entropy
    of their interior (the 1 px border sees zero padding that a tiled run, which reads a halo, never
    sees). Training stops after ``seconds`` of wall time or ``steps`` steps, whichever comes first;
    with ``steps`` and ``seconds=math.inf`` the result depends on ``seed`` only. The learning rate
    decays linearly over whichever budget runs out first.

    ``class_weights``: ``"balanced"`` weighs each class by ``pixels / (classes * its pixels)``
    (capped at 20) so that small structures such as nuclei count; a sequence gives them directly;
    None weighs all classes equally. ``threads``: torch intra-op threads while training (restored
    afterwards); None keeps the process setting. One thread is faster than several when the cores
    are busy with something else: small convolutions suffer badly from oversubscription.
    """
    _check_inputs(image, labels, num_classes, patch, batch, seconds, steps)
    weights = _class_weights(labels, num_classes, class_weights)
    with torch.random.fork_rng(devices=[]):  # seed the initial weights without touching the caller's RNG
        torch.manual_seed(seed)
        module = ReferenceFCN(image.shape[0], num_classes, hidden)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    try:
        scale = np.float32(Normalization().scale_for(image.dtype))
        x_all = torch.from_numpy(np.ascontiguousarray(image, np.float32) / scale)
        y_all = torch.from_numpy(np.ascontiguousarray(labels, np.int64))
        _fit(module, x_all, y_all, weights, _Budget(seconds, steps), patch, batch, seed, progress)
    finally:
        torch.set_num_threads(previous)
    return module.eval()


@dataclass(frozen=True)
class _Budget:
    seconds: float
    steps: int | None

    def fraction(self, elapsed: float, step: int) -> float:
        """How much is spent, 0 to 1 or more: the larger of the time and step fractions.

        >>> _Budget(40.0, 100).fraction(10.0, 50), _Budget(float("inf"), 100).fraction(10.0, 25)
        (0.5, 0.25)
        """
        by_time = elapsed / self.seconds if self.seconds > 0 else 0.0
        by_steps = step / self.steps if self.steps is not None else 0.0
        return max(by_time, by_steps)


def _fit(
    module: nn.Module,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    weights: np.ndarray,
    budget: _Budget,
    patch: int,
    batch: int,
    seed: int,
    progress: bool,
) -> None:
    """The loop over ``(C, Y, X)`` scaled input and ``(Y, X)`` int64 labels: random patches,
    weighted cross-entropy, Adam with a linearly decaying learning rate."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=_LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss(weight=torch.from_numpy(weights))
    module.train()
    bar = _progress_bar(budget, progress)
    started, step, done = time.perf_counter(), 0, 0.0
    while done < 1.0:
        xb, yb = _sample(x_all, y_all, patch, batch, rng)
        for group in optimizer.param_groups:
            group["lr"] = _LEARNING_RATE + (_FINAL_LEARNING_RATE - _LEARNING_RATE) * done
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(module(xb)[:, :, 1:-1, 1:-1], yb[:, 1:-1, 1:-1])
        loss.backward()
        optimizer.step()
        step += 1
        done = budget.fraction(time.perf_counter() - started, step)
        if bar is not None:
            bar.update(round(min(done, 1.0) * 1000) - bar.n)
            bar.set_postfix(step=step, loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()


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


def _class_weights(labels: np.ndarray, num_classes: int, mode: str | Sequence[float] | None) -> np.ndarray:
    """Loss weight per class, float32 ``(num_classes,)``. Absent classes get weight 0."""
    if mode is None:
        return np.ones(num_classes, np.float32)
    if isinstance(mode, str):
        if mode != "balanced":
            raise ConfigError(f"Expected 'balanced', a list of weights or None for class_weights. Got {mode!r}.")
        counts = np.bincount(labels.ravel(), minlength=num_classes).astype(np.float64)
        present = counts > 0
        weights = np.zeros(num_classes)
        weights[present] = counts.sum() / (present.sum() * counts[present])
        return np.minimum(weights, _MAX_CLASS_WEIGHT).astype(np.float32)
    weights = np.asarray(mode, np.float32)
    if weights.shape != (num_classes,) or (weights < 0).any():
        raise ConfigError(f"Expected {num_classes} non-negative class weights. Got {list(mode)} instead.")
    return weights


def _sample(
    x_all: torch.Tensor, y_all: torch.Tensor, patch: int, batch: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random crops: ``(B, C, patch, patch)`` float32 and ``(B, patch, patch)`` int64."""
    height, width = y_all.shape
    ys = rng.integers(0, height - patch + 1, batch)
    xs = rng.integers(0, width - patch + 1, batch)
    xb = torch.stack([x_all[:, y : y + patch, x : x + patch] for y, x in zip(ys, xs, strict=True)])
    yb = torch.stack([y_all[y : y + patch, x : x + patch] for y, x in zip(ys, xs, strict=True)])
    return xb, yb


def _progress_bar(budget: _Budget, enabled: bool) -> Any:
    """A tqdm bar in thousandths of the budget (time or steps), shown only on a terminal."""
    if not enabled:
        return None
    from tqdm import tqdm

    label = f"training ({budget.seconds:g} s)" if budget.steps is None else f"training ({budget.steps} steps)"
    return tqdm(total=1000, desc=label, disable=None, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
