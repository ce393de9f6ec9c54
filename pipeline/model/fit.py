"""Fitting a network: the torch side of training, behind plain numpy arrays.

:mod:`pipeline.training` draws the patches and keeps the epochs; what needs torch (the optimiser
step, the validation forward pass, the seeded state) is here, so that torch stays this package's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

BORDER = 1
"""Pixels of each patch edge left out of the loss and the scores: they see zero padding that a
tiled run, which reads a halo, never sees."""
FINAL_FRACTION = 0.1
"""The learning rate decays linearly to this fraction of its start."""


class Fitter:
    """Adam on the weighted cross-entropy of patch interiors, within a budget of ``seconds`` of wall
    time from ``started`` or ``steps`` steps, whichever runs out first; the learning rate decays
    linearly from ``rate`` to a tenth of it as the budget is spent. :attr:`reserve`: seconds counted
    as spent already (the next validation pass), so that a time budget covers that too."""

    def __init__(
        self, module: Any, weights: np.ndarray, rate: float, seconds: float, steps: int | None, started: float
    ) -> None:
        self.module: nn.Module = module.train()
        self.rate, self.seconds, self.max_steps = rate, seconds, steps
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=rate)
        self.loss_fn = nn.CrossEntropyLoss(weight=torch.from_numpy(weights))
        self.started, self.steps, self.done, self.reserve = started, 0, 0.0, 0.0

    def step(self, xb: np.ndarray, yb: np.ndarray) -> float:
        """One step on ``(B, C, p, p)`` scaled float32 input and ``(B, p, p)`` int64 labels; the loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.rate + (self.rate * FINAL_FRACTION - self.rate) * self.done
        self.optimizer.zero_grad(set_to_none=True)
        inner = slice(BORDER, -BORDER)
        loss = self.loss_fn(
            self.module(torch.from_numpy(xb))[:, :, inner, inner], torch.from_numpy(yb)[:, inner, inner]
        )
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        elapsed = time.perf_counter() - self.started + self.reserve
        by_time = elapsed / self.seconds if self.seconds > 0 else 0.0
        self.done = max(by_time, self.steps / self.max_steps if self.max_steps else 0.0)  # budget spent, 0 to 1+
        return float(loss.item())

    @property
    def spent(self) -> bool:
        return self.done >= 1.0


def predict_labels(module: Any, xb: np.ndarray) -> np.ndarray:
    """``(B, p, p)`` argmax classes of ``module`` on ``(B, C, p, p)`` scaled input, in eval mode
    (the module's mode is restored after)."""
    training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            labels: np.ndarray = module(torch.from_numpy(xb)).argmax(1).numpy()
    finally:
        module.train(training)
    return labels


@contextmanager
def seeded(seed: int, threads: int | None) -> Iterator[None]:
    """Torch seeded with ``seed`` and using ``threads`` intra-op threads inside the block; the caller's
    random stream and thread count are restored after it. A fixed count gives the same weights on
    any machine (the sums of a convolution's backward pass are split by thread)."""
    previous = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if threads is not None:
            torch.set_num_threads(max(1, threads))
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def reseed(seed: int) -> None:
    """Seed torch's random stream again (the initial weights depend on the seed alone)."""
    torch.manual_seed(seed)
