"""Training: the reference FCN learns the synthetic classes from arrays, and any architecture from TIFF
pairs read patch by patch, reproducibly, within its budget, never training on validation rows."""

from __future__ import annotations

import math
import re
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from pipeline.errors import ConfigError, SourceError
from pipeline.model.checkpoint import load_model, save_checkpoint
from pipeline.model.network import ModelSpec, ReferenceFCN
from pipeline.model.predictor import Predictor
from pipeline.source.tiff import open_source
from pipeline.training.sampling import draw, split_pair, split_rows
from pipeline.training.synthetic import CLASS_COLORS, CLASS_NAMES, SyntheticSlide, make_synthetic_slide
from pipeline.training.train import train_from_tiffs, train_reference_fcn

FAST = {"seconds": math.inf, "steps": 150, "patch": 32, "batch": 8, "threads": 1}
FAST_TIFFS = {"patch": 32, "batch": 8, "threads": 1, "val_patches": 16}


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    """A 512 x 512 synthetic slide and its mask, written as TIFFs."""
    folder = tmp_path_factory.mktemp("slide")
    return make_synthetic_slide(folder / "s.tif", folder / "m.tif", size=512, tile=128, seed=0)


@pytest.fixture(scope="module")
def slide(slide_files: SyntheticSlide) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic slide as ``(3, Y, X)`` pixels and ``(Y, X)`` ground truth."""
    return np.moveaxis(tifffile.imread(slide_files.image_path), -1, 0), tifffile.imread(slide_files.mask_path)


def predict(module: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        logits = module(torch.from_numpy(image[None].astype(np.float32) / 255))
    out: np.ndarray = logits.argmax(1)[0].numpy()
    return out


@pytest.mark.parametrize("seed", [pytest.param(0, marks=pytest.mark.slow), 1], ids=["seed0", "seed1"])
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


# --- train_from_tiffs -------------------------------------------------------------------------------


def test_from_tiffs_learns_the_classes_and_saves_a_self_describing_checkpoint(
    slide_files: SyntheticSlide, tmp_path: Path
) -> None:
    lines: list[str] = []
    out = tmp_path / "model.pt"
    result = train_from_tiffs(
        [slide_files.image_path],
        [slide_files.mask_path],
        str(out),
        class_names=CLASS_NAMES,
        epochs=2,
        patches_per_epoch=512,
        log=lines.append,
        **FAST_TIFFS,
    )
    assert result.epochs == 2 and len(result.history) == 2 and not result.stopped_early
    assert result.best_mean_iou > 0.8 and result.best_mean_iou == max(e.mean_iou for e in result.history)
    assert all(len(e.ious) == 3 and e.patches == 512 for e in result.history)
    pattern = (
        r"epoch 2/2: loss \d\.\d{3}, val mIoU \d\.\d{3} \(background \d\.\d{3}, stroma \d\.\d{3}, nuclei \d\.\d{3}\)"
    )
    assert any(re.fullmatch(pattern, line) for line in lines), lines
    loaded = load_model(out)
    assert loaded.spec.architecture == "reference_fcn" and loaded.spec.in_channels == 3
    assert loaded.spec.class_names == CLASS_NAMES and loaded.spec.mpp == slide_files.mpp
    assert not (tmp_path / "model.pt.partial").exists()


def test_from_tiffs_trains_a_unet(slide_files: SyntheticSlide, tmp_path: Path) -> None:
    arguments = {"in_channels": 3, "num_classes": 3, "width": 8, "depth": 2}
    out = tmp_path / "unet.pt"
    result = train_from_tiffs(
        [slide_files.image_path],
        [slide_files.mask_path],
        str(out),
        architecture="unet",
        arguments=arguments,
        epochs=1,
        patches_per_epoch=8,
        patch=32,
        batch=4,
        val_patches=4,
        threads=1,
    )
    loaded = load_model(result.path)
    assert loaded.spec.architecture == "unet" and loaded.spec.arguments == arguments
    assert loaded.spec.class_names == ("class_0", "class_1", "class_2")  # classes found in the masks


def test_from_tiffs_same_seed_gives_the_same_checkpoint(slide_files: SyntheticSlide, tmp_path: Path) -> None:
    runs = [
        train_from_tiffs(
            [slide_files.image_path],
            [slide_files.mask_path],
            str(tmp_path / f"{i}.pt"),
            epochs=1,
            patches_per_epoch=16,
            seed=seed,
            **FAST_TIFFS,
        )
        for i, seed in enumerate((5, 5, 6))
    ]
    states = [list(load_model(run.path).module.state_dict().values()) for run in runs]
    assert all(torch.equal(a, b) for a, b in zip(states[0], states[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(states[0], states[2], strict=True))
    assert runs[0].history[0].ious == runs[1].history[0].ious


def test_from_tiffs_stops_at_the_time_budget(slide_files: SyntheticSlide, tmp_path: Path) -> None:
    started = time.perf_counter()
    result = train_from_tiffs(
        [slide_files.image_path],
        [slide_files.mask_path],
        str(tmp_path / "m.pt"),
        epochs=1000,
        patches_per_epoch=64,
        seconds=0.5,
        **FAST_TIFFS,
    )
    assert time.perf_counter() - started < 5.0
    assert result.stopped_early and result.epochs < 1000 and (tmp_path / "m.pt").is_file()


@pytest.mark.slow
def test_from_tiffs_reads_patches_not_images(tmp_path: Path) -> None:
    """A 4096 x 4096 slide (48 MiB of pixels) trains with numpy allocations of a few MiB at most."""
    made = make_synthetic_slide(tmp_path / "s.tif", tmp_path / "m.tif", size=4096, seed=2)
    image_bytes = 3 * 4096 * 4096
    tracemalloc.start()
    try:
        train_from_tiffs(
            [made.image_path],
            [made.mask_path],
            str(tmp_path / "m.pt"),
            epochs=1,
            patches_per_epoch=16,
            class_names=CLASS_NAMES,
            **FAST_TIFFS,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < image_bytes / 8, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    ("height", "fraction", "stride"),
    [(512, 0.2, 1), (1000, 0.25, 32), (777, 0.5, 4), (64, 0.1, 8)],
    ids=["plain", "stride32", "odd-height", "small"],
)
def test_split_rows_partitions_the_rows_on_the_stride(height: int, fraction: float, stride: int) -> None:
    (t0, t1), (v0, v1) = split_rows(height, fraction, stride)
    assert (t0, v1) == (0, height) and t1 == v0 and t1 % stride == 0
    assert abs((v1 - v0) - fraction * height) < stride + 1


@pytest.mark.parametrize(("stride", "patch"), [(1, 63), (4, 64), (32, 96)], ids=["stride1", "stride4", "stride32"])
def test_training_patches_never_touch_validation_pixels(slide_files: SyntheticSlide, stride: int, patch: int) -> None:
    image, mask = open_source(slide_files.image_path), open_source(slide_files.mask_path)
    pair = split_pair(image, mask, patch, stride, val_fraction=0.3)
    rng = np.random.default_rng(0)
    used = {role: np.zeros((512, 512), bool) for role in ("train", "val")}
    for role in used:
        for drawn, (y0, y1, x0, x1) in draw([pair], role, 300, patch, stride, rng):
            assert drawn is pair and y0 % stride == x0 % stride == 0 and (y1 - y0, x1 - x0) == (patch, patch)
            used[role][y0:y1, x0:x1] = True
    assert not (used["train"] & used["val"]).any()
    assert used["train"].mean() > 0.5 and used["val"].any()


def test_from_tiffs_says_which_classes_validation_cannot_score(tmp_path: Path) -> None:
    """A class only in the training rows gets no validation IoU; the log says so instead of hiding it."""
    image, mask = np.full((128, 128, 3), 200, np.uint8), np.zeros((128, 128), np.uint8)
    image[:40, :64], mask[:40, :64] = 50, 1  # class 1 only near the top, far from the validation rows
    tifffile.imwrite(tmp_path / "i.tif", image)
    tifffile.imwrite(tmp_path / "m.tif", mask)
    lines: list[str] = []
    result = train_from_tiffs(
        [str(tmp_path / "i.tif")],
        [str(tmp_path / "m.tif")],
        str(tmp_path / "m.pt"),
        class_names=("glass", "ink"),
        epochs=2,
        patches_per_epoch=8,
        patch=16,
        batch=8,
        threads=1,
        log=lines.append,
    )
    assert "the validation patches hold no ink: no IoU for them, mIoU without them" in lines
    assert all(math.isnan(e.ious[1]) for e in result.history)
    assert result.best_epoch == 2  # equal scores: the longer training is kept


def test_from_tiffs_size_mismatch_names_both_files(slide_files: SyntheticSlide, tmp_path: Path) -> None:
    mask = tmp_path / "small_mask.tif"
    tifffile.imwrite(mask, np.zeros((500, 512), np.uint8))
    with pytest.raises(SourceError, match=rf"{re.escape(str(mask))}: is 512 x 500 px but its image .*s\.tif is 512"):
        train_from_tiffs([slide_files.image_path], [str(mask)], str(tmp_path / "m.pt"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"architecture": "fcn8s", "arguments": {"width": 4}, "patch": 48}, ConfigError, "fcn8s's stride 32.*use 64"),
        ({"architecture": "resnet"}, ConfigError, "Unknown architecture"),
        ({"class_names": ("background", "stroma")}, SourceError, "m.tif: class 2 .* 2 classes"),
        ({"arguments": {"num_classes": 5}}, ConfigError, "num_classes=3"),
        ({"patch": 256}, ConfigError, "s.tif: 512 x 512 px cannot hold 256 px patches"),
        ({"val_fraction": 1.0}, ConfigError, "validation fraction"),
        ({"epochs": 0}, ConfigError, "epochs"),
    ],
    ids=[
        "patch-not-stride-multiple",
        "unknown-architecture",
        "unnamed-class",
        "wrong-class-count",
        "patch-too-big",
        "no-training-rows",
        "no-epochs",
    ],
)
def test_from_tiffs_bad_arguments(
    slide_files: SyntheticSlide, tmp_path: Path, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        train_from_tiffs(
            [slide_files.image_path], [slide_files.mask_path], str(tmp_path / "m.pt"), **{"patch": 64, **kwargs}
        )  # type: ignore[arg-type]


def test_train_command_end_to_end(tmp_path: Path) -> None:
    """``fcnpipe train`` on a synthetic slide writes a checkpoint that ``fcnpipe run`` uses."""
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.training.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(str(tmp_path / "s.tif"), str(tmp_path / "m.tif"), size=512, tile=128, seed=2)
    model = tmp_path / "model.pt"
    args = ["train", slide.image_path, "--masks", slide.mask_path, "-o", str(model), "--epochs", "2"]
    args += ["--patches-per-epoch", "64", "--patch", "64", "--classes", "background,stroma,nuclei"]
    trained = CliRunner().invoke(cli, args)
    assert trained.exit_code == 0, trained.output
    assert "epoch 2/2" in trained.stderr and "val mIoU" in trained.stderr
    assert load_model(model).spec.class_names == ("background", "stroma", "nuclei")
    ran = CliRunner().invoke(cli, ["run", slide.image_path, "-m", str(model), "-o", str(tmp_path / "o.zarr")])
    assert ran.exit_code == 0, ran.output
