"""fcnpipe plan: the estimates it prints are close to what the run then does, and it writes nothing."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import load_config
from pipeline.run.estimate import estimate
from pipeline.run.execute import execute
from pipeline.run.plan import prepare
from pipeline.store.layout import LABELS
from pipeline.training.synthetic import make_synthetic_slide


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_plan_prints_chunks_mask_eta_memory_and_size_and_writes_nothing(
    make_model: Callable[..., Path], tmp_path: Path
) -> None:
    slide = make_synthetic_slide(tmp_path / "slide.tif", tmp_path / "mask.tif", size=2048, seed=1)
    model = make_model()
    store = tmp_path / "out.zarr"
    args = [str(slide.image_path), "-m", str(model), "-o", str(store), "--tile", "256"]
    result = CliRunner().invoke(cli, ["plan", *args])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert lines["tiles"].startswith("tiles   64 of 256 px + 1 px halo")
    assert "tissue: saturation" in lines["mask"] and "chunks have no foreground and are skipped" in lines["mask"]
    assert "ms per tile" in lines["measure"]
    assert "ETA" in lines["expect"] and "peak memory" in lines["expect"] and "on disk" in lines["expect"]
    assert not store.exists() and not os.path.exists(str(store) + ".lock")

    config = load_config(
        overrides={
            "input": {"path": str(slide.image_path)},
            "model": {"path": str(model)},
            "output": {"path": str(store)},
            "tiling": {"tile": 256},
        }
    )
    plan = prepare(config)
    expected = estimate(plan)
    result_run = execute(plan)
    actual = disk_bytes(store)
    assert 0.5 < expected.output_bytes / actual < 2, (expected.output_bytes, actual)  # from one sample
    assert expected.forward_s > 0 and expected.read_s > 0 and expected.encode_s > 0
    # what the plan said it would compute is what the tasks wrote: one labels chunk per computed chunk
    assert 0 < plan.chunks_to_compute == 64 - plan.chunks_background
    assert result_run.chunks_computed == plan.chunks_to_compute
    assert zarr.open_group(store, mode="r")[LABELS].nchunks_initialized == result_run.chunks_computed
