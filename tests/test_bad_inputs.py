"""Inputs whose numbers would be meaningless, and files that are not what they claim: each ends in a
correct run with one warning naming the file and the tag, or in one clean error line, through
``fcnpipe`` as a process: never an internal error, a traceback or a store marked complete."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.network import REFERENCE_FCN, ModelSpec, ReferenceFCN, default_classes
from tests.conftest import random_image

pytestmark = pytest.mark.slow  # real processes, seconds each; the quick loop is -m 'not slow'

QUIET = ["--no-preview", "--no-progress"]


def fcnpipe(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "pipeline", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def messages(done: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr's ``fcnpipe:`` lines, after checking that nothing else but the plan is there."""
    assert done.returncode != 70 and "Traceback" not in done.stderr, done.stderr
    assert "Warning" not in done.stderr and "tifffile" not in done.stderr, done.stderr  # numpy's, tifffile's
    return [line for line in done.stderr.splitlines() if line.startswith("fcnpipe:")]


def complete(store: Path) -> bool:
    return store.exists() and bool(zarr.open_group(store, mode="r").attrs.get("fcnpipe", {}).get("complete"))


def reference(folder: Path, channels: int = 3, classes: int = 3, name: str = "m.pt") -> Path:
    torch.manual_seed(0)
    path = folder / name
    torch.save(ReferenceFCN(channels, classes, 8).state_dict(), path)
    return path


def test_an_orthomosaic_whose_nodata_does_not_fit_its_pixels_runs_with_one_warning(
    real_data: Path, tmp_path: Path
) -> None:
    """RGBA uint8 in LZW strips (as the LINZ aerial file is) with GDAL_NODATA -10000, as a drone
    orthomosaic was: the tag is ignored with one line naming the file and the tag."""
    with tifffile.TiffFile(real_data / "CMU-1-Small-Region.svs") as tif:
        rgb = tif.series[0].asarray()[:600, :500]
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=-1)
    image = tmp_path / "ortho.tif"
    tifffile.imwrite(
        image,
        rgba,
        photometric="rgb",
        extrasamples=[2],
        compression="lzw",
        rowsperstrip=32,
        extratags=[(42113, "s", 0, "-10000", True)],
    )
    store = tmp_path / "ortho.zarr"
    done = fcnpipe("run", image, "-m", reference(tmp_path), "-o", store, *QUIET)
    assert done.returncode == 0, done.stderr
    assert messages(done) == [
        f"fcnpipe: warning: {image}: its GDAL_NODATA tag '-10000' does not fit its uint8 pixels (0 to 255); "
        "ignored (every pixel is read as data)"
    ]
    assert complete(store) and zarr.open_group(store, mode="r")["0"].shape == (3, 600, 500)
    assert "parsing GDAL_NODATA tag raised" in (tmp_path / "ortho.log").read_text()  # tifffile's, in the log


def test_non_finite_pixels_are_no_data_counted_in_the_summary(tmp_path: Path) -> None:
    data = random_image((64, 80, 3), "float32", seed=4)
    data[10:20, 30:40] = np.nan
    data[50, 5] = np.inf
    image = tmp_path / "float.tif"
    tifffile.imwrite(image, data, photometric="rgb")
    store = tmp_path / "float.zarr"
    done = fcnpipe("run", image, "-m", reference(tmp_path), "-o", store, "--dtype", "float32", "--mask", "none", *QUIET)
    assert done.returncode == 0, done.stderr
    assert messages(done) == [] and "nodata 101 px of the computed chunks hold no data" in done.stderr
    group = zarr.open_group(store, mode="r")
    probs, labels = group["0"][:], group["labels/argmax/0"][:]
    empty = ~np.isfinite(data).all(axis=-1)
    np.testing.assert_array_equal(labels == 255, empty)
    assert np.isnan(probs[:, empty]).all() and np.isfinite(probs[:, ~empty]).all()
    np.testing.assert_allclose(probs[:, ~empty].sum(axis=0), 1.0, atol=1e-5)  # the neighbours too


def test_settings_that_make_the_numbers_meaningless_are_refused_at_once(tmp_path: Path) -> None:
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, random_image((40, 40, 3)), photometric="rgb")
    model = reference(tmp_path)
    huge = tmp_path / "huge.yaml"
    huge.write_text("tiling:\n  tile: 100000000000000000000\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    for flags, needle in (
        (["--std", "0,0,0"], "--std: Expected positive numbers"),  # a flag's value: the flag is named
        (["--mean", "nan,0,0"], "--mean: Expected finite numbers"),
        (["-c", huge], "Expected at most 8192 for 'tiling.tile'. Got 100000000000000000000 instead."),
        (["--tile", "100000000"], "--tile: Expected at most 8192"),
        (["-c", binary], f"{binary}: not a YAML config: not UTF-8 text"),
    ):
        started = time.monotonic()
        done = fcnpipe("run", image, "-m", model, "-o", tmp_path / "o.zarr", *flags, *QUIET)
        assert done.returncode == 2 and messages(done) == [
            f"fcnpipe: error: {done.stderr.split('error: ', 1)[1].strip()}"
        ]
        assert needle in done.stderr and time.monotonic() - started < 30
        assert not (tmp_path / "o.zarr").exists()


def test_broken_checkpoints_are_refused_naming_the_file(tmp_path: Path) -> None:
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, random_image((40, 40, 3)), photometric="rgb")
    random_zip = tmp_path / "random.pt"
    with zipfile.ZipFile(random_zip, "w") as archive:
        archive.writestr("random/version", "3\n")  # past torch's first checks, into its unpickler
        archive.writestr("random/byteorder", "little")
        archive.writestr("random/data.pkl", os.urandom(3000))
        archive.writestr("random/data/0", os.urandom(3000))
    ints = tmp_path / "ints.pt"
    torch.save({"conv1.weight": 3, "conv1.bias": 4, "conv2.weight": 5, "conv2.bias": 6}, ints)
    nan = tmp_path / "nan.pt"
    module = ReferenceFCN(3, 3, 8)
    with torch.no_grad():
        module.conv1.weight[0, 0, 0, 0] = float("nan")
    torch.save(module.state_dict(), nan)
    many = reference(tmp_path, classes=300, name="many.pt")
    for model, needle in (
        (random_zip, "not a "),  # PyTorch checkpoint / loadable model file, by what torch trips over
        (ints, "'conv1.weight' holds a int, not a tensor of weights"),
        (nan, "its weights hold NaN or infinite values (conv1.weight)"),
        (many, "has 300 classes, but the label map stores one class per pixel in uint8: at most 254"),
    ):
        done = fcnpipe("run", image, "-m", model, "-o", tmp_path / "o.zarr", *QUIET)
        assert done.returncode == 1, done.stderr
        (line,) = messages(done)
        assert line.startswith(f"fcnpipe: error: {model}: ") and needle in line, line
        inspected = CliRunner().invoke(cli, ["inspect-model", str(model)])  # the same loader, in this process
        assert inspected.exit_code == 1 and needle in inspected.stderr, inspected.stderr


def test_a_truncated_file_is_one_line_without_the_readers_messages(real_data: Path, tmp_path: Path) -> None:
    for name, size in (("cogeo.tif", 200), ("CMU-1-Small-Region.svs", 20_000), ("RGB.byte.tif", 16)):
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes((real_data / name).read_bytes()[:size])
        for command in (["inspect", cut], ["run", cut, "-m", reference(tmp_path), "-o", tmp_path / "o.zarr", *QUIET]):
            done = fcnpipe(*command)
            assert done.returncode == 1, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1 and str(cut) in done.stderr, done.stderr


def test_a_model_trained_on_uint8_is_not_run_on_uint16_unless_asked(real_data: Path, tmp_path: Path) -> None:
    names, colors = default_classes(3)
    spec = ModelSpec(
        REFERENCE_FCN, {"in_channels": 3, "num_classes": 3, "hidden": 8}, 3, 3, names, colors, input_dtype="uint8"
    )
    model = tmp_path / "uint8.pt"
    save_checkpoint(model, ReferenceFCN(3, 3, 8), spec)
    image, store = real_data / "mosaic_cog1.tif", tmp_path / "mosaic.zarr"
    refused = fcnpipe("run", image, "-m", model, "-o", store, *QUIET)
    assert refused.returncode == 1 and messages(refused) == [
        f"fcnpipe: error: {image}: has uint16 pixels but the model {model} was trained on uint8: its values would "
        "mean something else to it; convert the image, or pass --allow-other-dtype to run anyway"
    ]
    assert not store.exists()
    allowed = fcnpipe("run", image, "-m", model, "-o", store, "--allow-other-dtype", *QUIET)
    assert allowed.returncode == 0 and complete(store), allowed.stderr


@pytest.mark.parametrize(
    ("name", "flags"), [("hubmap_multi-channel_pyramid.ome.tif", []), ("test3-TRITC-2-560.ndpi", ["--level", "2"])]
)
def test_dark_background_fluorescence_finds_foreground(
    real_data: Path, tmp_path: Path, name: str, flags: list[str]
) -> None:
    store = tmp_path / "f.zarr"
    done = fcnpipe("run", real_data / name, "-m", reference(tmp_path), "-o", store, *flags, *QUIET)
    assert done.returncode == 0 and messages(done) == [], done.stderr
    assert "mask    fluorescence: brightness >" in done.stderr
    line = next(line for line in done.stderr.splitlines() if line.startswith("chunks"))
    assert int(line.split()[1]) > 0  # chunks computed
    labels = zarr.open_group(store, mode="r")["labels/argmax/0"][:]
    assert (labels != 255).mean() > 0.5


def test_a_mask_that_leaves_nothing_says_so_and_how_to_compute_everything(real_data: Path, tmp_path: Path) -> None:
    """The LINZ file is transparent everywhere: nothing to compute, and the run says so."""
    image, store = real_data / "east_coast_phase3_2023_AY31_1000_3335.tif", tmp_path / "blank.zarr"
    done = fcnpipe("run", image, "-m", reference(tmp_path, channels=3), "-o", store, "--level", "3", *QUIET)
    assert done.returncode == 0, done.stderr
    (line,) = messages(done)
    assert line.startswith(f"fcnpipe: warning: {image}: the mask finds no foreground in any of its")
    assert "nothing will be computed" in line and "pass --mask none to compute every chunk" in line
