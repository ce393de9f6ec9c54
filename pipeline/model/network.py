"""What a network is: the reference FCN, and the description every model file is loaded into.

:class:`ModelSpec` is everything about a network but its weights (architecture and arguments,
channels, classes and colours, input normalisation, training resolution and pixel type), enough
to rebuild it and to run it; :class:`LoadedModel` is a spec with its module and file. Loading and
saving are :mod:`pipeline.model.checkpoint`'s, running :mod:`pipeline.model.predictor`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError

REFERENCE_FCN = "reference_fcn"

_PALETTE = [
    (86, 180, 233),
    (0, 158, 115),
    (240, 200, 0),
    (0, 114, 178),
    (230, 120, 0),
    (0, 210, 210),
    (180, 0, 0),
    (120, 220, 60),
    (140, 90, 20),
    (0, 70, 90),
    (190, 190, 0),
    (255, 90, 0),
]
"""Default class colours: saturated, none black, white or grey (a nodata collar or the glass), none
near H&E's eosin pink or haematoxylin purple (so an overlay stands out on a stained slide)."""


class ReferenceFCN(nn.Module):
    """``Conv2d(in, hidden, 3, padding=1) -> ReLU -> Conv2d(hidden, classes, 1)``; returns logits.

    Input ``(B, in_channels, H, W)``, output ``(B, num_classes, H, W)``; softmax over dim 1 gives
    probabilities. Receptive field 3 x 3, so a halo of 1 pixel makes tiling exact.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x)))


@dataclass(frozen=True)
class Normalization:
    """``x / scale``, then ``(x - mean) / std`` per channel. ``scale=None``: the dtype's maximum."""

    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def scale_for(self, dtype: np.dtype[Any]) -> float:
        """The divisor for ``dtype``: 255 for uint8, 65535 for uint16, 127 for int8, 1 for floats."""
        if self.scale is not None:
            return self.scale
        if np.issubdtype(dtype, np.integer):
            return float(np.iinfo(dtype).max)
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "mean": _list(self.mean), "std": _list(self.std)}


def _list(values: tuple[float, ...] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a network except its weights: enough to rebuild it and to run it."""

    architecture: str
    arguments: dict[str, int]
    in_channels: int
    num_classes: int
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    normalization: Normalization = field(default_factory=Normalization)
    mpp: float | None = None
    """Micrometres per pixel of the training images (slides), if known."""
    gsd: float | None = None
    """Ground sample distance of the training images (rasters, CRS units per pixel), if known."""
    input_dtype: str | None = None
    """The pixel type of the training images (``uint8``, ``uint16``, ...), if known: the value range
    the network learnt, with the normalisation, to expect. A run on another refuses by default."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "arguments": dict(self.arguments),
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "classes": [
                {"name": n, "color": list(c)} for n, c in zip(self.class_names, self.class_colors, strict=True)
            ],
            "normalization": self.normalization.to_dict(),
            "mpp": self.mpp,
            "gsd": self.gsd,
            "input_dtype": self.input_dtype,
        }


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    spec: ModelSpec
    sha256: str
    path: str


def with_classes(spec: ModelSpec, names: tuple[str, ...] | None, colors: tuple[str, ...] | None) -> ModelSpec:
    """``spec`` with class names and ``"#RRGGBB"`` colours replaced where given (one per class)."""
    for what, values in (("class_names", names), ("class_colors", colors)):
        if values is not None and len(values) != spec.num_classes:
            raise ConfigError(f"model.{what} has {len(values)} entries but the model has {spec.num_classes} classes")
    rgb = None if colors is None else tuple((int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)) for c in colors)
    return replace(spec, class_names=names or spec.class_names, class_colors=rgb or spec.class_colors)


def default_classes(num_classes: int) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """Names ``class_0 ...`` and a fixed palette (:data:`_PALETTE`), for a bare state_dict."""
    names = tuple(f"class_{i}" for i in range(num_classes))
    colors = tuple(_PALETTE[i % len(_PALETTE)] for i in range(num_classes))
    return names, colors
