"""Labelled patches read lazily from image / mask TIFF pairs, and the scores of predictions on them.

The data side of training (``pipeline.training.train`` is the torch side): pair and check the files,
cut each image once into training rows and validation rows, draw random stride-aligned boxes, and
read only those boxes with :func:`pipeline.source.tiff.read_window`, so an image of any size costs a
few patches of memory. :func:`confusion` and :func:`iou_per_class` score a prediction against
labels, for validation and for the demo's whole-slide score.

>>> split_rows(1000, 0.2)
((0, 800), (800, 1000))
>>> boxes = random_boxes(np.random.default_rng(0), (0, 800), 1000, patch=64, stride=32, count=100)
>>> all(y0 % 32 == x0 % 32 == 0 and y1 <= 800 and x1 <= 1000 for y0, y1, x0, x1 in boxes)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError, SourceError
from pipeline.model.network import Normalization, default_classes
from pipeline.source.pixels import SourceRef, read_window
from pipeline.source.tiff import SourceInfo, open_source

Box = tuple[int, int, int, int]
"""``(y0, y1, x0, x1)``: half-open pixel ranges."""
MAX_CLASS_WEIGHT = 20.0
"""Cap of a balanced class weight: a handful of pixels of a rare class must not dominate the loss."""
Patch = tuple[np.ndarray, float, np.ndarray]
"""A patch as read: ``(C, p, p)`` pixels of the file's dtype, the divisor that scales them to
``[0, 1]``, and ``(p, p)`` labels."""


@dataclass(frozen=True)
class TrainingPair:
    """An image and its mask, opened but not read, and the rows each role may use."""

    image: SourceRef
    mask: SourceRef
    scale: float
    """Divisor that maps the image's dtype to ``[0, 1]``, as the default normalisation does."""
    width: int
    train_rows: tuple[int, int]
    val_rows: tuple[int, int]


def open_pairs(images: Sequence[str], masks: Sequence[str]) -> list[tuple[SourceInfo, SourceInfo]]:
    """Open (read no pixels of) each image and its mask; check that they fit together.

    A mask must be one channel of integers of its image's ``(Y, X)`` size, and every image must
    have the first one's channels: otherwise a SourceError naming the file (and, for a size
    mismatch, both files).
    """
    if not images or len(images) != len(masks):
        raise ConfigError(f"Expected one mask per image. Got {len(images)} images and {len(masks)} masks.")
    infos = [(open_source(image), open_source(mask)) for image, mask in zip(images, masks, strict=True)]
    channels = infos[0][0].shape[0]
    for image, mask in infos:
        if mask.shape[0] != 1 or not np.issubdtype(mask.dtype, np.integer):
            raise SourceError(
                f"{mask.path}: has {mask.shape[0]} channels of {mask.dtype}; a mask is one channel of class indices"
            )
        if mask.shape[1:] != image.shape[1:]:
            (my, mx), (iy, ix) = mask.shape[1:], image.shape[1:]
            raise SourceError(
                f"{mask.path}: is {mx} x {my} px but its image {image.path} is {ix} x {iy} px (width x height)"
            )
        if image.shape[0] != channels:
            raise SourceError(f"{image.path}: has {image.shape[0]} channels but {infos[0][0].path} has {channels}")
    return infos


def split_pair(image: SourceInfo, mask: SourceInfo, patch: int, stride: int, val_fraction: float) -> TrainingPair:
    """The pair with its rows split by :func:`split_rows`; each region must hold a whole patch."""
    _, height, width = image.shape
    train_rows, val_rows = split_rows(height, val_fraction, stride)
    if min(train_rows[1] - train_rows[0], val_rows[1] - val_rows[0], width) < patch:
        raise ConfigError(
            f"{image.path}: {height} x {width} px cannot hold {patch} px patches in both its training rows "
            f"{train_rows[0]}-{train_rows[1]} and its validation rows {val_rows[0]}-{val_rows[1]}; use a smaller patch"
        )
    return TrainingPair(image.ref, mask.ref, Normalization().scale_for(image.dtype), width, train_rows, val_rows)


def split_rows(height: int, val_fraction: float, stride: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """Training rows ``[0, split)`` and validation rows ``[split, height)``: the last ``val_fraction``.

    ``split`` is rounded down to a multiple of ``stride`` so that validation patches start on the
    network's grid too. Every patch lies inside one region and is read without a halo, so no
    validation pixel is trained on, nor even seen as context. One cut per image, rather than a
    checkerboard of tiles, keeps both regions large enough for whole patches.

    >>> split_rows(1000, 0.25, stride=32)
    ((0, 736), (736, 1000))
    """
    split = round(height * (1.0 - val_fraction)) // stride * stride
    return (0, split), (split, height)


def random_boxes(
    rng: np.random.Generator, rows: tuple[int, int], width: int, patch: int, stride: int, count: int
) -> list[Box]:
    """``count`` random ``patch x patch`` boxes inside ``rows`` and ``[0, width)``, each starting on
    multiples of ``stride`` (the phase a tiled run sees). ``rows[0]`` must be a multiple of it."""
    ys = rows[0] + stride * rng.integers(0, (rows[1] - rows[0] - patch) // stride + 1, count)
    xs = stride * rng.integers(0, (width - patch) // stride + 1, count)
    return [(int(y), int(y) + patch, int(x), int(x) + patch) for y, x in zip(ys, xs, strict=True)]


def draw(
    pairs: Sequence[TrainingPair], role: str, count: int, patch: int, stride: int, rng: np.random.Generator
) -> list[tuple[TrainingPair, Box]]:
    """``count`` random boxes in the ``"train"`` or ``"val"`` rows, each image chosen in proportion
    to the area of those rows (so every pixel is equally likely to be drawn)."""
    regions = [pair.train_rows if role == "train" else pair.val_rows for pair in pairs]
    areas = np.array([(r[1] - r[0]) * pair.width for pair, r in zip(pairs, regions, strict=True)], np.float64)
    picks = rng.choice(len(pairs), size=count, p=areas / areas.sum())
    return [(pairs[i], random_boxes(rng, regions[i], pairs[i].width, patch, stride, 1)[0]) for i in picks]


def read_labels(pair: TrainingPair, box: Box, num_classes: int | None = None) -> np.ndarray:
    """``(p, p)`` labels of ``box``; a label ``>= num_classes`` is a SourceError naming the mask."""
    labels: np.ndarray = read_window(pair.mask, box)[0]
    if num_classes is not None and int(labels.max()) >= num_classes:
        raise SourceError(
            f"{pair.mask.path}: class {int(labels.max())} at rows {box[0]}-{box[1]}, columns {box[2]}-{box[3]}, "
            f"but training has {num_classes} classes; name every class"
        )
    return labels


def read_patch(pair: TrainingPair, box: Box, num_classes: int) -> Patch:
    """The image and labels of ``box`` (only that window is decoded)."""
    labels = read_labels(pair, box, num_classes)
    return read_window(pair.image, box), pair.scale, labels


def label_counts(picks: Sequence[tuple[TrainingPair, Box]], num_classes: int | None = None) -> np.ndarray:
    """Pixels per label in the masks of ``picks``: int64 ``(largest label + 1,)``."""
    return np.bincount(np.concatenate([read_labels(pair, box, num_classes).ravel() for pair, box in picks]))


def name_classes(
    names: Sequence[str] | None, colors: Sequence[tuple[int, int, int]] | None, counts: np.ndarray
) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """Class names and colours: as given, else ``class_0 ...`` (and a fixed palette) for the labels
    ``counts`` found, at least 2."""
    default_names, default_colors = default_classes(len(names) if names else max(2, counts.size))
    chosen = tuple(str(n) for n in names) if names else default_names
    palette = tuple((int(c[0]), int(c[1]), int(c[2])) for c in colors) if colors else default_colors
    if len(chosen) < 2 or len(palette) != len(chosen):
        raise ConfigError(f"Expected at least 2 class names and one colour for each. Got {chosen} and {palette}.")
    return chosen, palette


def loss_weights(counts: np.ndarray, num_classes: int, mode: str | Sequence[float] | None, absent: float) -> np.ndarray:
    """Loss weight per class, float32 ``(num_classes,)``, from pixel ``counts`` per class.

    ``"balanced"``: ``pixels / (classes present * its pixels)``, capped at ``MAX_CLASS_WEIGHT``;
    a class with no pixels gets ``absent``. A sequence: the weights as given. None: all 1.
    """
    if mode is None:
        return np.ones(num_classes, np.float32)
    if isinstance(mode, str):
        if mode != "balanced":
            raise ConfigError(f"Expected 'balanced', a list of weights or None for class_weights. Got {mode!r}.")
        counts = np.pad(counts.astype(np.float64), (0, num_classes - counts.size))
        present = counts > 0
        weights = np.full(num_classes, absent)
        weights[present] = counts.sum() / (present.sum() * counts[present])
        balanced: np.ndarray = np.minimum(weights, MAX_CLASS_WEIGHT).astype(np.float32)
        return balanced
    weights = np.asarray(mode, np.float32)
    if weights.shape != (num_classes,) or (weights < 0).any():
        raise ConfigError(f"Expected {num_classes} non-negative class weights. Got {list(mode)} instead.")
    return weights


def stack(patches: Sequence[Patch]) -> tuple[np.ndarray, np.ndarray]:
    """``(B, C, p, p)`` float32 scaled input and ``(B, p, p)`` int64 labels."""
    images = np.stack([pixels.astype(np.float32) / np.float32(scale) for pixels, scale, _ in patches])
    return images, np.stack([labels for _, _, labels in patches]).astype(np.int64)


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
