"""Blended tiling: weights that sum to one, exactness where it must hold, and the error it buys."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.compute.blend import (
    FLOOR,
    Blend,
    blend_chunk,
    build_blend_tasks,
    build_merge_tasks,
    check_blend,
    parity,
    predict_blended,
    weight_box,
    window_weights,
)
from pipeline.compute.engine import THREADS
from pipeline.compute.job import Job
from pipeline.compute.tasks import build_tasks, compute_tasks, pad_to_stride
from pipeline.errors import ConfigError
from pipeline.model.checkpoint import load_model
from pipeline.model.predictor import Predictor, select_device
from pipeline.source.pixels import read_window
from pipeline.source.tiff import open_source
from pipeline.store.arrays import BLEND_GROUP, PARITIES, create_blend_arrays, create_store, remove_blend_arrays
from pipeline.store.layout import LABELS, NODATA_LABEL, PROBABILITIES, OutputRef
from pipeline.tiling import Tile, batched, plan_tiles
from tests.conftest import random_image
from tests.test_exactness import save
from tests.test_exactness import whole_image as whole_image_pass


@dataclass(frozen=True)
class Net:
    """A saved network and its stride, as measure_stride finds it (tests/test_exactness.py checks U-Net's 8)."""

    path: Path
    stride: int


@pytest.fixture
def reference(tmp_path: Path) -> Net:
    return Net(save(tmp_path, "reference"), 1)


@pytest.fixture
def unet(tmp_path: Path) -> Net:
    return Net(save(tmp_path, "unet"), 8)


def whole_image(image: Path, net: Net) -> np.ndarray:
    """One forward pass over the image padded to the stride, as in tests/test_exactness.py."""
    info = open_source(image)
    x = read_window(info.ref, (0, info.shape[1], 0, info.shape[2])).astype(np.float32) / np.float32(255)
    predictor = Predictor(load_model(net.path).module, select_device("cpu"))
    return predictor(pad_to_stride(x, net.stride)[np.newaxis])[0][:, : info.shape[1], : info.shape[2]]


def _job(image: Path, net: Net, out: Path, tile: int) -> tuple[Job, tuple[int, int]]:
    """An empty float32 store at ``out`` and the Job that fills it; and the image's ``(Y, X)``."""
    info = open_source(image)
    loaded = load_model(net.path)
    shape = info.shape[1:]
    create_store(str(out), loaded.spec.num_classes, [shape], tile, "float32", overwrite=True)
    job = Job(
        source=info.ref,
        resampling=None,
        source_shape=shape,
        output=OutputRef(str(out), "float32", token=uuid.uuid4().hex),
        model_path=str(net.path),
        model_sha256=loaded.sha256,
        model_factory=None,
        device="cpu",
        stride=net.stride,
        precision="float32",
        tta=False,
        torch_threads=1,
        scale=255.0,
        mean=None,
        std=None,
    )
    return job, shape


def _blended(image: Path, net: Net, out: Path, tile: int, halo: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of a blended run."""
    job, shape = _job(image, net, out, tile)
    blend = check_blend(tile, halo, job.stride, mode)
    tiles = plan_tiles(*shape, tile, halo, job.stride)
    predict_blended(job, tiles, classes=3, image_shape=shape, blend=blend, batch=2, workers=2, engine=THREADS)
    store = zarr.open_group(str(out), mode="r")
    return store[PROBABILITIES][:], store[LABELS][:]


def _plain(image: Path, net: Net, out: Path, tile: int, halo: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of plain tiling with ``halo``."""
    job, shape = _job(image, net, out, tile)
    compute_tasks(build_tasks(job, plan_tiles(*shape, tile, halo, job.stride), 2), THREADS, workers=2)
    store = zarr.open_group(str(out), mode="r")
    return store[PROBABILITIES][:], store[LABELS][:]


def _weight_maps(shape: tuple[int, int], blend: Blend) -> tuple[list[tuple[Tile, np.ndarray]], np.ndarray]:
    """Every tile's ``(Y, X)`` weight over the image, and their sum."""
    maps = []
    for t in plan_tiles(*shape, blend.tile, blend.halo):
        w1y, w2x = window_weights(t, shape, blend)
        assert (w1y.size, w2x.size) == t.window_shape
        full = np.zeros(shape)
        wy0, wy1, wx0, wx1 = t.window
        full[wy0:wy1, wx0:wx1] = w1y[:, None] * w2x[None, :]
        maps.append((t, full))
    return maps, sum((m for _, m in maps), np.zeros(shape))


WEIGHT_CASES = [
    ((61, 45), 16, 8, "gaussian"),
    ((61, 45), 16, 8, "cosine"),
    ((100, 37), 32, 6, "cosine"),
    ((33, 65), 16, 3, "gaussian"),
    ((10, 7), 16, 4, "cosine"),  # one tile, smaller than a core: every side on the border
    ((50, 50), 16, 0, "gaussian"),
    ((61, 45), 16, 8, "none"),
]


@pytest.mark.parametrize(
    ("shape", "tile", "halo", "mode"), WEIGHT_CASES, ids=[f"{h}x{w}-t{t}-n{n}-{m}" for (h, w), t, n, m in WEIGHT_CASES]
)
def test_normalised_weights_sum_to_one_everywhere(shape: tuple[int, int], tile: int, halo: int, mode: str) -> None:
    blend = check_blend(tile, halo, 1, mode)
    maps, total = _weight_maps(shape, blend)
    assert total.min() > 0  # edges and corners included: the division is always defined
    normalised = sum((m / total for _, m in maps), np.zeros(shape))
    np.testing.assert_allclose(normalised, 1.0, rtol=0, atol=1e-12)
    for t, full in maps:
        y0, y1, x0, x1 = t.core
        assert full[y0:y1, x0:x1].min() >= (1.0 if mode == "none" else FLOOR**2)  # its own core always counts
        assert full.max() <= 1.0
        by0, by1, bx0, bx1 = weight_box(t, shape, blend)
        assert full[by0:by1, bx0:bx1].min() > 0 or mode == "none"
        assert full.sum() == pytest.approx(full[by0:by1, bx0:bx1].sum())  # nothing outside the written box


def test_weights_taper_to_zero_inside_and_stay_flat_at_the_border() -> None:
    blend = check_blend(32, 8, 1, "cosine")
    tiles = {(t.row, t.col): t for t in plan_tiles(96, 96, 32, 8)}
    w1y, w2x = window_weights(tiles[1, 0], (96, 96), blend)
    assert w1y[:4].max() == 0 and w1y[-4:].max() == 0  # the outer halo / 2 faces neighbours: unused
    assert w1y[4] > 0 and w1y[4] < 0.01  # then a taper from (nearly) zero: no step, no seam
    assert w2x[0] == 1.0  # the left image border: flat, not down-weighted
    np.testing.assert_allclose(w1y, w1y[::-1])  # an interior window is symmetric


@pytest.mark.slow
def test_exact_when_half_the_halo_covers_the_receptive_field(
    make_tiff: Callable[..., Path], tmp_path: Path, reference: Net
) -> None:
    """Reference FCN, radius 1: windows use no pixel within N // 2 = 1 of their inner edges."""
    image = make_tiff(random_image((61, 45, 3), seed=4), photometric="rgb")
    expected = whole_image(image, reference)
    for mode in ("gaussian", "cosine"):
        probs, labels = _blended(image, reference, tmp_path / f"{mode}.zarr", 16, 2, mode)
        assert np.abs(probs - expected).max() < 1e-5, mode
        assert (labels == expected.argmax(axis=0)).mean() > 0.999


def test_exact_for_unet_when_half_the_halo_is_the_exact_halo(
    make_tiff: Callable[..., Path], tmp_path: Path, unet: Net
) -> None:
    """U-Net (stride 8, exact halo 48 for stride-aligned windows): N = 96, so N // 2 = 48."""
    image = make_tiff(random_image((203, 157, 3), seed=5), photometric="rgb")
    probs, _ = _blended(image, unet, tmp_path / "o.zarr", 192, 96, "gaussian")
    assert np.abs(probs - whole_image(image, unet)).max() < 1e-5


def test_mode_none_is_plain_tiling_bit_for_bit(make_tiff: Callable[..., Path], tmp_path: Path, unet: Net) -> None:
    image = make_tiff(random_image((99, 130, 3), seed=6), photometric="rgb")
    blended = _blended(image, unet, tmp_path / "b.zarr", 32, 8, "none")
    plain = _plain(image, unet, tmp_path / "p.zarr", 32, 8)
    np.testing.assert_array_equal(blended[0], plain[0])
    np.testing.assert_array_equal(blended[1], plain[1])


def _seam_jump(error: np.ndarray, tile: int) -> float:
    """Mean over rows of the largest (over classes) jump of the error across vertical core boundaries."""
    jumps = np.abs(np.diff(error, axis=2)).max(axis=0)
    return float(jumps[:, tile - 1 :: tile].mean())


@pytest.mark.slow
def test_blending_beats_plain_tiling_below_the_exact_halo(
    make_tiff: Callable[..., Path], tmp_path: Path, unet: Net
) -> None:
    """U-Net (receptive radius 51, exact halo 48), tile 64, halos 8 to 32: errors against the whole image."""
    image = make_tiff(random_image((203, 157, 3), seed=360), photometric="rgb")
    expected = whole_image(image, unet)
    print("\nU-Net, tile 64: |p - whole image| by halo and mode")
    for halo in (8, 16, 32):
        errors = {}
        for mode in ("none", "gaussian", "cosine"):
            probs, _ = _blended(image, unet, tmp_path / f"{halo}-{mode}.zarr", 64, halo, mode)
            error = probs - expected
            errors[mode] = (float(np.abs(error).max()), float(np.abs(error).mean()))
            print(
                f"  halo {halo:2d} {mode:8s} max {errors[mode][0]:.4f}  mean {errors[mode][1]:.5f}  "
                f"seam jump {_seam_jump(error, 64):.4f}"
            )
        for mode in ("gaussian", "cosine"):
            assert errors[mode][0] < errors["none"][0], (halo, mode)
            assert errors[mode][1] < errors["none"][1], (halo, mode)


def test_no_two_phase_one_tasks_write_one_chunk_and_the_arrays_go(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image = make_tiff(random_image((61, 45, 3), seed=7), photometric="rgb")
    out = tmp_path / "o.zarr"
    job, shape = _job(image, Net(make_model(), 1), out, 16)
    blend = check_blend(16, 8, job.stride, "gaussian")  # halo = tile / 2: same-parity windows touch
    tiles = plan_tiles(*shape, 16, 8, job.stride)
    chunk = blend_chunk(16, 8)
    claimed: dict[tuple[str, int, int], int] = {}
    for task, group in enumerate(batched(tiles, 2)):
        for t in group:
            y0, y1, x0, x1 = weight_box(t, shape, blend)
            for cy in range(y0 // chunk, (y1 - 1) // chunk + 1):
                for cx in range(x0 // chunk, (x1 - 1) // chunk + 1):
                    assert claimed.setdefault((parity(t), cy, cx), task) == task, (t, cy, cx)
    create_blend_arrays(str(out), 3, shape, blend.chunk)
    compute_tasks(build_blend_tasks(job, tiles, shape, blend, 2), THREADS, workers=2)
    for name in PARITIES:
        folder = out / BLEND_GROUP / name / "weight"
        written = {tuple(int(i) for i in key.split(".")) for key in os.listdir(folder) if not key.startswith(".")}
        assert written == {(cy, cx) for p, cy, cx in claimed if p == name}  # the keys zarr wrote are those
    compute_tasks(build_merge_tasks(job, tiles, 2), THREADS, workers=2)
    remove_blend_arrays(str(out))
    assert not (out / BLEND_GROUP).exists()
    assert BLEND_GROUP not in zarr.open_group(str(out), mode="r")


def test_no_data_stays_no_data(make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path) -> None:
    rgba = random_image((40, 52, 4), seed=8)
    rgba[..., 3] = 255
    rgba[5:30, 10:20, 3] = 0
    image = make_tiff(rgba, photometric="rgb", extrasamples=["unassalpha"])
    model = Net(make_model(), 1)
    plain_probs, plain_labels = _plain(image, model, tmp_path / "p.zarr", 16, 1)
    probs, labels = _blended(image, model, tmp_path / "b.zarr", 16, 4, "cosine")
    np.testing.assert_array_equal(labels == NODATA_LABEL, rgba[..., 3] == 0)
    np.testing.assert_array_equal(labels, plain_labels)
    np.testing.assert_allclose(probs, plain_probs, atol=1e-5)  # radius 1 <= halo // 2: exact here too


REFUSALS = [
    (64, 40, 8, "gaussian", "more than half the tile size 64.*at most 32 or a tile of at least 80"),
    (64, 12, 8, "cosine", "not a multiple of the network's stride 8.*use 8 or 16"),
    (64, 16, 8, "linear", "Expected one of none, gaussian, cosine for 'blend mode'. Got 'linear'"),
    (15, 4, 1, "cosine", "even tile size.*Got 15 instead; use 16"),
    (60, 8, 8, "cosine", "Tile size 60 is not a multiple of the network's stride 8; use 64"),
    (64, -8, 8, "cosine", "non-negative integer for 'halo'. Got -8"),
]


@pytest.mark.parametrize(
    ("tile", "halo", "stride", "mode", "message"), REFUSALS, ids=[f"t{t}-n{n}-s{s}-{m}" for t, n, s, m, _ in REFUSALS]
)
def test_bad_blends_are_refused(tile: int, halo: int, stride: int, mode: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_blend(tile, halo, stride, mode)


@pytest.mark.slow
def test_cli_halo_and_blend_through_the_pipeline(make_tiff: Callable[..., Path], tmp_path: Path) -> None:
    """``--halo N --blend gaussian`` below the exact halo: approximate, said so, closer than no blending."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    image = make_tiff(random_image((150, 140, 3), seed=11), photometric="rgb")
    model = save(tmp_path, "unet")
    expected = whole_image_pass(image, model)
    errors = {}
    for mode in ("none", "gaussian"):
        out = tmp_path / f"{mode}.zarr"
        args = ["run", str(image), "-m", str(model), "-o", str(out), "--tile", "64", "--halo", "16", "--blend", mode]
        args += ["--dtype", "float32"]  # the network's values, to compare with the whole-image pass
        result = CliRunner().invoke(cli, [*args, "--no-preview"])
        assert result.exit_code == 0, result.output
        assert "below the exact 48 px halo: approximate" in result.stderr
        probs = zarr.open_group(str(out), mode="r")["0"][:]
        errors[mode] = float(np.abs(probs - expected).mean())
        assert not (out / "_blend").exists()
    assert errors["gaussian"] < errors["none"]
