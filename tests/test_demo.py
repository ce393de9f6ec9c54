"""The demo end to end, small: slide -> training -> full pipeline -> IoU and preview."""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import pytest
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.training.demo import run_demo


@pytest.mark.slow
def test_demo_learns_the_synthetic_classes(tmp_path: Path) -> None:
    result = run_demo(str(tmp_path), size=1024, seed=1, progress=None, train_steps=50)
    assert set(result.ious) == {"background", "stroma", "nuclei"}
    assert result.mean_iou >= 0.9, result.ious
    assert result.training is not None and [e.patches for e in result.training.history] == [80] * 5  # 50 x 8 patches
    store = zarr.open_group(result.store_path, mode="r")
    assert store.attrs["fcnpipe"]["complete"] is True
    assert store.attrs["fcnpipe"]["model"]["classes"][2]["name"] == "nuclei"
    preview = imagecodecs.png_decode(Path(result.preview_path).read_bytes())
    assert preview.ndim == 3 and preview.shape[2] == 3 and preview.shape[1] > preview.shape[0]


@pytest.mark.slow
def test_demo_command_prints_scores(tmp_path: Path) -> None:
    args = ["demo", "-o", str(tmp_path), "--size", "512", "--train-steps", "20"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for word in ("IoU background", "IoU stroma", "IoU nuclei", "mean IoU", "preview", "sha256", "(20 steps)"):
        assert word in result.stdout
    assert "training the reference FCN for 20 steps of 8 patches" in result.stderr


@pytest.mark.slow
def test_the_demo_trains_the_same_checkpoint_every_time(tmp_path: Path) -> None:
    """A fixed, seeded amount of training on a fixed thread count: the same bytes on a second run
    (the CI machine's load moves only the time it takes), so stores made with the demo's model
    resume with the next demo's. A wall-clock budget gave a different model each run."""
    import torch

    threads = torch.get_num_threads()
    first = run_demo(str(tmp_path / "a"), size=512, seed=3, progress=None, train_steps=12)
    torch.set_num_threads(1)  # the caller's threads must not matter
    try:
        second = run_demo(str(tmp_path / "b"), size=512, seed=3, progress=None, train_steps=12)
    finally:
        torch.set_num_threads(threads)
    assert first.model_sha256 == second.model_sha256 and len(first.model_sha256) == 64
    assert first.ious == second.ious
    other = run_demo(str(tmp_path / "c"), size=512, seed=4, progress=None, train_steps=12)
    assert other.model_sha256 != first.model_sha256
