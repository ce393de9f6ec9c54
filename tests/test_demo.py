"""The demo end to end, small: slide -> training -> full pipeline -> IoU and preview."""

from __future__ import annotations

import math
from pathlib import Path

import imagecodecs
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.demo import run_demo


def test_demo_learns_the_synthetic_classes(tmp_path: Path) -> None:
    result = run_demo(str(tmp_path), size=1024, seed=1, progress=False, train_seconds=math.inf, train_steps=50)
    assert set(result.ious) == {"background", "stroma", "nuclei"}
    assert result.mean_iou >= 0.9, result.ious
    assert result.training is not None and [e.patches for e in result.training.history] == [80] * 5  # 50 x 8 patches
    store = zarr.open_group(result.store_path, mode="r")
    assert store.attrs["fcnpipe"]["complete"] is True
    assert store.attrs["fcnpipe"]["model"]["classes"][2]["name"] == "nuclei"
    preview = imagecodecs.png_decode(Path(result.preview_path).read_bytes())
    assert preview.ndim == 3 and preview.shape[2] == 3 and preview.shape[1] > preview.shape[0]


def test_demo_command_prints_scores(tmp_path: Path) -> None:
    args = ["demo", "-o", str(tmp_path), "--size", "512", "--train-seconds", "3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for word in ("IoU background", "IoU stroma", "IoU nuclei", "mean IoU", "preview"):
        assert word in result.stdout
    assert "training the reference FCN" in result.stderr
