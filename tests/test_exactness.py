"""Any FCN, stitched exactly: tiled output equals one whole-image pass for every shipped network.

The whole-image reference pads the image with zeros at the bottom and right to a multiple of the
network's stride (the one documented padding), runs one forward pass and crops back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from pipeline.cli.report import plan_lines
from pipeline.compute.tasks import pad_to_stride
from pipeline.config import load_config
from pipeline.model.architectures import FCN8s, UNet
from pipeline.model.checkpoint import load_model, save_checkpoint
from pipeline.model.network import REFERENCE_FCN, ModelSpec, ReferenceFCN, default_classes
from pipeline.model.predictor import Predictor, select_device
from pipeline.model.receptive import measure_stride
from pipeline.run.execute import run_pipeline
from pipeline.run.plan import RunPlan, prepare
from pipeline.source.pixels import read_window
from pipeline.source.tiff import open_source
from pipeline.store.layout import LABELS, PROBABILITIES
from tests.conftest import random_image

NETWORKS: dict[str, Callable[[], tuple[nn.Module, str, dict[str, int]]]] = {
    "reference": lambda: (ReferenceFCN(3, 3, 16), REFERENCE_FCN, {"in_channels": 3, "num_classes": 3, "hidden": 16}),
    "fcn8s": lambda: (FCN8s(3, 3, 8), "fcn8s", {"in_channels": 3, "num_classes": 3, "width": 8}),
    "unet": lambda: (UNet(3, 3, 8, 3), "unet", {"in_channels": 3, "num_classes": 3, "width": 8, "depth": 3}),
}


def save(tmp_path: Path, name: str) -> Path:
    """The network ``name`` with seeded weights, as an fcnpipe checkpoint (or TorchScript)."""
    torch.manual_seed(0)
    factory = NETWORKS["unet" if name == "torchscript-unet" else name]
    module, architecture, arguments = factory()
    module.eval()
    path = tmp_path / f"{name}.pt"
    if name == "torchscript-unet":
        torch.jit.save(torch.jit.trace(module, torch.rand(1, 3, 64, 64)), path)
        return path
    names, colors = default_classes(3)
    spec = ModelSpec(architecture, arguments, 3, 3, names, colors)
    save_checkpoint(path, module, spec)
    return path


def whole_image(image: Path, model: Path, tta: bool = False) -> np.ndarray:
    info = open_source(image)
    loaded = load_model(model)
    x = read_window(info.ref, (0, info.shape[1], 0, info.shape[2])).astype(np.float32) / np.float32(255)
    stride = measure_stride(loaded.module, 3)
    probs = Predictor(loaded.module, select_device("cpu"), tta=tta)(pad_to_stride(x, stride)[np.newaxis])[0]
    return probs[:, : info.shape[1], : info.shape[2]]


def run(
    image: Path, model: Path, out: Path, tile: int, forward_tile: int | None = None, **compute: object
) -> zarr.Group:
    config = load_config(
        overrides={
            "input": {"path": str(image)},
            "model": {"path": str(model), **({"tta": "flips"} if compute.pop("tta", False) else {})},
            "tiling": {"tile": tile, "batch": 2, "forward_tile": forward_tile},
            "output": {"path": str(out), "dtype": "float32"},
            "compute": {"progress": False, **compute},
        }
    )
    run_pipeline(config)
    return zarr.open_group(str(out), mode="r")


CASES = [
    ("reference", (97, 131), 32),
    ("reference", (203, 157), 48),
    ("fcn8s", (203, 157), 64),
    ("fcn8s", (150, 97), 96),
    ("unet", (203, 157), 64),
    ("unet", (99, 130), 40),
    ("torchscript-unet", (203, 157), 64),
]


QUICK = {("reference", (97, 131)), ("reference", (203, 157))}
"""The cases of the quick loop (``-m "not slow"``); the deep networks' cases run in the full suite.

Their tiling is also checked quickly in test_receptive.py."""


def _params(rows: list[tuple[Any, ...]], name: Callable[[tuple[Any, ...]], str]) -> list[Any]:
    return [
        pytest.param(*row, id=name(row), marks=() if (row[0], row[1]) in QUICK else pytest.mark.slow) for row in rows
    ]


@pytest.mark.parametrize(("name", "shape", "tile"), _params(CASES, lambda r: f"{r[0]}-{r[1][0]}x{r[1][1]}-tile{r[2]}"))
def test_stitched_equals_whole_image(
    make_tiff: Callable[..., Path], tmp_path: Path, name: str, shape: tuple[int, int], tile: int
) -> None:
    image = make_tiff(random_image((*shape, 3), seed=sum(shape)), photometric="rgb")
    model = save(tmp_path, name)
    store = run(image, model, tmp_path / "out.zarr", tile)
    expected = whole_image(image, model)
    probs = store[PROBABILITIES][:]
    assert probs.shape == (3, *shape)
    error = np.abs(probs - expected).max()
    print(f"{name} {shape} tile {tile}: max |stitched - whole image| = {error:.1e}")
    assert error < 1e-4
    agree = store[LABELS][:] == expected.argmax(axis=0)
    assert agree.mean() > 0.999  # argmax may differ only where two classes tie within 1e-4


PIECES = [
    ("reference", (97, 131), 32, 16),
    ("reference", (203, 157), 48, 32),  # pieces of 32 and 16 px
    ("fcn8s", (203, 157), 128, 64),
    ("unet", (203, 157), 64, 24),  # pieces of 24, 24 and 16 px
    ("torchscript-unet", (99, 130), 64, 32),
]


@pytest.mark.parametrize(
    ("name", "shape", "tile", "forward_tile"),
    _params(PIECES, lambda r: f"{r[0]}-{r[1][0]}x{r[1][1]}-tile{r[2]}-in{r[3]}"),
)
def test_tiles_predicted_in_pieces_equal_whole_image(
    make_tiff: Callable[..., Path], tmp_path: Path, name: str, shape: tuple[int, int], tile: int, forward_tile: int
) -> None:
    image = make_tiff(random_image((*shape, 3), seed=sum(shape) + 1), photometric="rgb")
    model = save(tmp_path, name)
    store = run(image, model, tmp_path / "out.zarr", tile, forward_tile)
    assert store.attrs["fcnpipe"]["config"]["tiling"]["forward_tile"] == forward_tile
    error = np.abs(store[PROBABILITIES][:] - whole_image(image, model)).max()
    print(f"{name} {shape} tile {tile} in passes of {forward_tile}: max |stitched - whole image| = {error:.1e}")
    assert error < 1e-4


def test_plan_reports_measured_field_and_stride(make_tiff: Callable[..., Path], tmp_path: Path) -> None:
    image = make_tiff(random_image((64, 64, 3)), photometric="rgb")
    config = load_config(
        overrides={
            "input": {"path": str(image)},
            "model": {"path": str(save(tmp_path, "unet"))},
            "output": {"path": str(tmp_path / "o.zarr"), "dtype": "float32"},
        }
    )
    plan = prepare(config)
    assert plan.stride == 8
    from pipeline.model.receptive import halo_for, measure_halo

    # the one exact halo: the least that makes stride-aligned tiling exact, below the radius rounded up
    assert plan.halo == plan.exact_halo == measure_halo(plan.model.module, 3, plan.stride) == 48
    assert plan.halo % plan.stride == 0 and plan.halo < halo_for(plan.radius, plan.stride) == 56
    assert any(f"stride {plan.stride}" in line for line in plan_lines(plan))


@pytest.mark.slow
def test_plan_predicts_tiles_in_passes_whose_activations_stay_in_the_cache(
    make_tiff: Callable[..., Path], tmp_path: Path
) -> None:
    from pipeline.errors import ConfigError

    image = make_tiff(random_image((64, 64, 3)), photometric="rgb")
    wide = tmp_path / "reference64.pt"
    torch.save(ReferenceFCN(3, 3, 64).state_dict(), wide)

    def plan(model: Path, **tiling: object) -> RunPlan:
        overrides = {
            "input": {"path": str(image)},
            "model": {"path": str(model)},
            "tiling": tiling,
            "output": {"path": str(tmp_path / "o.zarr")},
            "compute": {"device": "cpu"},
        }
        return prepare(load_config(overrides=overrides))

    # 64 hidden channels of float32 on 514 x 514 windows are 68 MB a pass, over the 8 MiB that
    # stay in the cache, so each 512 px tile runs as 4 x 4 passes of 130 x 130 (4.3 MB)
    reference = plan(wide)
    assert reference.forward_tile == 128
    assert any("each in 4 x 4 passes of 128 px" in line for line in plan_lines(reference))
    assert plan(wide, tile=128).forward_tile == 0  # 130 x 130 windows fit: whole tiles
    assert plan(wide, tile=1024).forward_tile == 128
    assert plan(wide, forward_tile=256).forward_tile == 256  # as configured
    assert plan(save(tmp_path, "unet")).forward_tile == 0  # 8 channels: whole tiles
    with pytest.raises(ConfigError, match="forward_tile 100 is not a multiple of the network's stride 8; use 104"):
        plan(save(tmp_path, "unet"), forward_tile=100)
    with pytest.raises(ConfigError, match=r"forward_tile cannot be used with tiling\.blend"):
        plan(wide, forward_tile=128, halo=0, blend="gaussian")


@pytest.mark.slow
def test_tile_not_multiple_of_stride_is_refused(make_tiff: Callable[..., Path], tmp_path: Path) -> None:
    from pipeline.errors import ConfigError

    image = make_tiff(random_image((64, 64, 3)), photometric="rgb")
    config = load_config(
        overrides={
            "input": {"path": str(image)},
            "model": {"path": str(save(tmp_path, "fcn8s"))},
            "tiling": {"tile": 50},
            "output": {"path": str(tmp_path / "o.zarr"), "dtype": "float32"},
        }
    )
    with pytest.raises(ConfigError, match="not a multiple of the network's stride 32; use 64"):
        prepare(config)


@pytest.mark.slow
def test_flip_tta_is_exact_too(make_tiff: Callable[..., Path], tmp_path: Path) -> None:
    image = make_tiff(random_image((101, 75, 3), seed=3), photometric="rgb")
    model = save(tmp_path, "unet")
    store = run(image, model, tmp_path / "tta.zarr", 32, tta=True)
    expected = whole_image(image, model, tta=True)
    assert np.abs(store[PROBABILITIES][:] - expected).max() < 1e-4
    pieces = run(image, model, tmp_path / "tta-pieces.zarr", 32, forward_tile=16, tta=True)
    assert np.abs(pieces[PROBABILITIES][:] - expected).max() < 1e-4
    plain = whole_image(image, model)
    assert np.abs(expected - plain).max() > 1e-3  # the flips do change the answer


def test_precision_other_than_float32_needs_cuda(make_tiff: Callable[..., Path], tmp_path: Path) -> None:
    from pipeline.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: half precision is allowed here")
    image = make_tiff(random_image((16, 16, 3)), photometric="rgb")
    config = load_config(
        overrides={
            "input": {"path": str(image)},
            "model": {"path": str(save(tmp_path, "reference"))},
            "compute": {"precision": "float16"},
            "output": {"path": str(tmp_path / "o.zarr"), "dtype": "float32"},
        }
    )
    with pytest.raises(ConfigError, match="float16 needs a CUDA device"):
        prepare(config)


@pytest.mark.slow
def test_inspect_model_prints_the_measured_tiling(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    result = CliRunner().invoke(cli, ["inspect-model", str(save(tmp_path, "torchscript-unet"))])
    assert result.exit_code == 0, result.output
    assert "architecture     torchscript" in result.stdout
    assert "stride           8" in result.stdout
    radius = int(result.stdout.split("receptive radius ")[1].split(" px")[0])
    assert radius == 51 and "halo             48 px read around every tile: the least" in result.stdout
