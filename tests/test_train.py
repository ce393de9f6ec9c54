"""Training the reference FCN: it learns the synthetic classes, reproducibly, within its budget."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from pipeline.checkpoint import load_model, save_checkpoint
from pipeline.errors import ConfigError
from pipeline.model import ModelSpec, Predictor, ReferenceFCN
from pipeline.synthetic import CLASS_COLORS, CLASS_NAMES, make_synthetic_slide
from pipeline.train import train_reference_fcn

FAST = {"seconds": math.inf, "steps": 150, "patch": 32, "batch": 8, "threads": 1}


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """A 512 x 512 synthetic slide as ``(3, Y, X)`` pixels and ``(Y, X)`` ground truth."""
    folder = tmp_path_factory.mktemp("slide")
    made = make_synthetic_slide(folder / "s.tif", folder / "m.tif", size=512, tile=128, seed=0)
    return np.moveaxis(tifffile.imread(made.image_path), -1, 0), tifffile.imread(made.mask_path)


def predict(module: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        logits = module(torch.from_numpy(image[None].astype(np.float32) / 255))
    out: np.ndarray = logits.argmax(1)[0].numpy()
    return out


@pytest.mark.parametrize("seed", [0, 1], ids=["seed0", "seed1"])
def test_learns_the_classes_of_a_held_out_crop(slide: tuple[np.ndarray, np.ndarray], seed: int) -> None:
    image, labels = slide
    module = train_reference_fcn(image[:, :, :256], labels[:, :256], 3, seed=seed, **FAST)
    predicted, truth = predict(module, image[:, :, 256:]), labels[:, 256:]
    assert (predicted == truth).mean() > 0.9
    for k in range(3):  # class weighting: the small nuclei class is found too
        assert ((predicted == k) & (truth == k)).sum() / (truth == k).sum() > 0.8, CLASS_NAMES[k]


def test_same_seed_and_steps_give_the_same_weights(slide: tuple[np.ndarray, np.ndarray]) -> None:
    image, labels = slide
    runs = [train_reference_fcn(image, labels, 3, seed=s, **{**FAST, "steps": 5}) for s in (3, 3, 4)]
    states = [list(m.state_dict().values()) for m in runs]
    assert all(torch.equal(a, b) for a, b in zip(states[0], states[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(states[0], states[2], strict=True))


def test_returns_an_eval_module_and_leaves_torch_as_it_was(slide: tuple[np.ndarray, np.ndarray]) -> None:
    image, labels = slide
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    module = train_reference_fcn(image, labels, 3, **{**FAST, "steps": 2})
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched
    assert torch.get_num_threads() == threads
    assert isinstance(module, ReferenceFCN) and not module.training


def test_stops_at_the_time_budget(slide: tuple[np.ndarray, np.ndarray]) -> None:
    image, labels = slide
    started = time.perf_counter()
    train_reference_fcn(image, labels, 3, seconds=0.5, patch=32, batch=4, threads=1)
    assert time.perf_counter() - started < 5.0


def test_checkpoint_predicts_what_was_trained(slide: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """The default normalisation of a checkpoint (value / 255) is the one training used."""
    image, labels = slide
    module = train_reference_fcn(image, labels, 3, **{**FAST, "steps": 20})
    spec = ModelSpec(
        "reference_fcn", {"in_channels": 3, "num_classes": 3, "hidden": 64}, 3, 3, CLASS_NAMES, CLASS_COLORS
    )
    save_checkpoint(tmp_path / "m.pt", module, spec)
    loaded = load_model(tmp_path / "m.pt")
    scale = loaded.spec.normalization.scale_for(image.dtype)
    probs = Predictor(loaded.module, torch.device("cpu"))(image[None].astype(np.float32) / scale)
    assert np.array_equal(probs[0].argmax(0), predict(module, image))


@pytest.mark.parametrize(
    ("image_shape", "labels_shape", "classes", "kwargs", "match"),
    [
        ((3, 64, 64), (64, 60), 3, {}, "same Y, X"),
        ((3, 20, 20), (20, 20), 3, {"patch": 32}, "smaller than"),
        ((3, 64, 64), (64, 64), 2, {}, "num_classes"),
        ((3, 64, 64), (64, 64), 3, {"class_weights": "inverse"}, "class_weights"),
        ((3, 64, 64), (64, 64), 3, {"class_weights": [1.0, 2.0]}, "class weights"),
        ((3, 64, 64), (64, 64), 3, {"steps": 0}, "steps"),
    ],
    ids=["shape-mismatch", "crop-too-small", "label-out-of-range", "unknown-weights", "wrong-weight-count", "no-steps"],
)
def test_bad_arguments_raise_config_error(
    image_shape: tuple[int, ...], labels_shape: tuple[int, ...], classes: int, kwargs: dict[str, object], match: str
) -> None:
    image = np.zeros(image_shape, np.uint8)
    labels = np.arange(math.prod(labels_shape)).reshape(labels_shape).astype(np.uint8) % 3
    with pytest.raises(ConfigError, match=match):
        train_reference_fcn(image, labels, classes, patch=kwargs.pop("patch", 32), **kwargs)  # type: ignore[arg-type]
