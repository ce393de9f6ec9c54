"""fcnpipe batch: many inputs, one store each, a manifest, and bad inputs that stop nothing."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.run.batch import expand_inputs, output_paths
from tests.conftest import random_image

FIXED = ["--tile", "64", "--workers", "2", "--torch-threads", "1", "--no-progress", "--no-preview"]


@pytest.fixture
def inputs(make_tiff: Callable[..., Path], real_data: Path, tmp_path: Path) -> dict[str, Path]:
    """Two good images (one in a folder), and the three broken real files."""
    folder = tmp_path / "scans"
    folder.mkdir()
    good = {
        "a": make_tiff(random_image((150, 200, 3), seed=1), "a.tif", photometric="rgb", tile=(64, 64)),
        "b": make_tiff(random_image((90, 130, 3), seed=2), "b.tif", photometric="rgb"),
    }
    shutil.move(good["b"], folder / "b.tif")
    good["b"] = folder / "b.tif"
    broken = {name: real_data / f"{name}" for name in ("corrupt.tif", "unreadable.svs", "ycbcr-cat.tif")}
    return {**good, **broken}


def read_manifest(outdir: Path) -> dict[str, dict[str, object]]:
    data = json.loads((outdir / "manifest.json").read_text())
    return {Path(str(item["input"])).name: item for item in data["inputs"]}


def test_good_inputs_complete_bad_ones_are_reported_and_the_exit_code_says_so(
    inputs: dict[str, Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    outdir = tmp_path / "out"
    model = make_model()
    listed = tmp_path / "more.txt"
    listed.write_text(f"# broken files, one per line\n{inputs['unreadable.svs']}\n\n{inputs['ycbcr-cat.tif']}\n")
    args = [str(inputs["a"]), str(inputs["b"].parent), str(inputs["corrupt.tif"]), f"@{listed}"]
    result = CliRunner().invoke(cli, ["batch", *args, "-m", str(model), "-o", str(outdir), *FIXED])
    assert result.exit_code == 1, result.output
    manifest = read_manifest(outdir)
    assert set(manifest) == {"a.tif", "b.tif", "corrupt.tif", "unreadable.svs", "ycbcr-cat.tif"}
    for name in ("a.tif", "b.tif"):
        assert manifest[name]["status"] == "done" and manifest[name]["reason"] == ""
        store = zarr.open_group(str(manifest[name]["output"]), mode="r")
        assert store.attrs["fcnpipe"]["complete"] is True
    assert manifest["a.tif"]["megapixels"] == pytest.approx(0.03)
    for name, reason in (
        ("corrupt.tif", "truncated or corrupt"),
        ("unreadable.svs", "cannot read pixels"),
        ("ycbcr-cat.tif", "chroma subsampling"),
    ):
        assert manifest[name]["status"] == "failed"
        assert reason in str(manifest[name]["reason"]) and "\n" not in str(manifest[name]["reason"])
        assert str(manifest[name]["input"]) not in str(manifest[name]["reason"])  # the line names it once
        assert result.stderr.count(f"{manifest[name]['input']}") == 1
    with open(outdir / "manifest.csv", newline="") as file:
        rows = {Path(row["input"]).name: row for row in csv.DictReader(file)}
    assert rows["corrupt.tif"]["status"] == "failed" and rows["a.tif"]["status"] == "done"
    assert "2 done, 0 already complete, 3 failed" in result.stderr
    log = (outdir / "fcnpipe-batch.log").read_text()
    assert "failed  " in log and "corrupt.tif" in log

    again = CliRunner().invoke(cli, ["batch", *args, "-m", str(model), "-o", str(outdir), *FIXED])
    assert again.exit_code == 1
    manifest = read_manifest(outdir)
    assert manifest["a.tif"]["status"] == "already complete" and manifest["a.tif"]["reason"] == ""
    assert manifest["corrupt.tif"]["status"] == "failed"


def test_a_batch_store_equals_the_store_of_a_single_run(
    inputs: dict[str, Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    model = make_model()
    outdir = tmp_path / "out"
    args = ["batch", str(inputs["a"]), str(inputs["b"]), "-m", str(model), "-o", str(outdir), *FIXED]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for name in ("a", "b"):
        single = tmp_path / f"{name}.zarr"
        done = CliRunner().invoke(cli, ["run", str(inputs[name]), "-m", str(model), "-o", str(single), *FIXED])
        assert done.exit_code == 0, done.output
        batch_store, run_store = zarr.open_group(outdir / f"{name}.zarr", mode="r"), zarr.open_group(single, mode="r")
        for key in ("0", "labels/argmax/0"):
            assert np.asarray(batch_store[key]).tobytes() == np.asarray(run_store[key]).tobytes(), key


def test_inputs_expand_from_folders_globs_and_lists(tmp_path: Path) -> None:
    for name in ("x.svs", "y.tif", "z.ome.tiff", "notes.txt", ".hidden.tif"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.ndpi").write_bytes(b"")
    listed = tmp_path / "list.txt"
    listed.write_text("y.tif\nmissing.tif\n")
    found = expand_inputs([str(tmp_path), str(tmp_path / "**" / "*.ndpi"), f"@{listed}", str(tmp_path / "q*.tif")])
    names = [Path(p).name for p in found]
    assert names == ["x.svs", "y.tif", "z.ome.tiff", "w.ndpi", "missing.tif", "q*.tif"]  # each once, none dropped
    assert output_paths(found[:3], "out") == ["out/x.zarr", "out/y.zarr", "out/z.zarr"]


def test_no_inputs_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["batch", str(tmp_path), "-m", "m.pt", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"fcnpipe: error: No input files found in {tmp_path}"
