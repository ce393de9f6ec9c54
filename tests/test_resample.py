"""Reading at the model's resolution: the right pyramid level, resampled on a global grid, seam-free."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import rasterio
import tifffile
import torch
import zarr
from click.testing import CliRunner
from rasterio.transform import Affine

from pipeline.cli import cli
from pipeline.model.checkpoint import load_model, save_checkpoint
from pipeline.model.network import REFERENCE_FCN, ModelSpec, ReferenceFCN, default_classes
from pipeline.model.predictor import Predictor, select_device
from pipeline.source.resample import Resampling, area_weights, read_resampled
from pipeline.source.tiff import open_source
from pipeline.store.layout import PROBABILITIES
from tests.conftest import random_image


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.5, 2.0, 3.7], ids=lambda f: f"x{f}")
def test_area_weights_partition_each_output_pixel(factor: float) -> None:
    first, weights = area_weights(3, 11, factor, 40)
    assert first == int(3 * factor)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    assert (weights >= 0).all()


def test_factor_two_is_the_2x2_mean(make_tiff: Callable[..., Path]) -> None:
    data = random_image((20, 30, 3))
    info = open_source(make_tiff(data, photometric="rgb"))
    out, valid = read_resampled(info.ref, (0, 10, 0, 15), Resampling(2.0, 2.0), (20, 30))
    expected = np.moveaxis(data, -1, 0).astype(np.float32).reshape(3, 10, 2, 15, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert valid is None


def _slide(tmp_path: Path) -> Path:
    """A 3-level slide at 0.25, 0.5 and 1.0 micrometres per pixel (TIFF resolution tags)."""
    path = tmp_path / "slide.tif"
    base = random_image((301, 257, 3), seed=5)
    options = {"tile": (64, 64), "photometric": "rgb", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(base, subifds=2, resolution=(4e4, 4e4), **options)
        tif.write(base[::2, ::2], subfiletype=1, resolution=(2e4, 2e4), **options)
        tif.write(base[::4, ::4], subfiletype=1, resolution=(1e4, 1e4), **options)
    return path


def _checkpoint(tmp_path: Path, mpp: float | None = None, gsd: float | None = None) -> Path:
    torch.manual_seed(0)
    names, colors = default_classes(3)
    spec = ModelSpec(
        REFERENCE_FCN, {"in_channels": 3, "num_classes": 3, "hidden": 16}, 3, 3, names, colors, mpp=mpp, gsd=gsd
    )
    path = tmp_path / f"model-{mpp}-{gsd}.pt"
    save_checkpoint(path, ReferenceFCN(3, 3, 16), spec)
    return path


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["run", *args, "--no-preview", "--dtype", "float32"])
    return result.exit_code, result.stderr


def test_model_resolution_picks_the_level_and_resamples_seam_free(tmp_path: Path) -> None:
    slide, model = _slide(tmp_path), _checkpoint(tmp_path, mpp=0.75)
    code, stderr = _run(str(slide), "-m", str(model), "-o", str(tmp_path / "o.zarr"), "--tile", "32")
    assert code == 0, stderr
    assert "0.75 micrometres per pixel, resampled from level 1" in stderr
    store = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    level1 = open_source(slide, level=1)
    assert level1.shape[1:] == (151, 129)
    assert store[PROBABILITIES].shape == (3, 101, 86)  # ceil(151 / 1.5), ceil(129 / 1.5)
    scale = store.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == pytest.approx([1.0, 0.75, 0.75])
    whole, _ = read_resampled(level1.ref, (0, 101, 0, 86), Resampling(1.5, 1.5), (151, 129))
    expected = Predictor(load_model(model).module, select_device("cpu"))((whole / 255)[np.newaxis])[0]
    assert np.abs(store[PROBABILITIES][:] - expected).max() < 1e-5


def test_resolution_of_a_level_reads_it_as_it_is(tmp_path: Path) -> None:
    slide, model = _slide(tmp_path), _checkpoint(tmp_path, mpp=0.5)
    code, stderr = _run(str(slide), "-m", str(model), "-o", str(tmp_path / "o.zarr"))
    assert code == 0, stderr
    assert zarr.open_group(str(tmp_path / "o.zarr"), mode="r")[PROBABILITIES].shape == (3, 151, 129)
    assert "resampled" not in stderr
    code, _ = _run(str(slide), "-m", str(model), "-o", str(tmp_path / "p.zarr"), "--mpp", "1.0")
    assert code == 0 and zarr.open_group(str(tmp_path / "p.zarr"), mode="r")[PROBABILITIES].shape == (3, 76, 65)


def test_raster_read_at_a_ground_sample_distance(make_model: Callable[..., Path], tmp_path: Path) -> None:
    image = tmp_path / "scene.tif"
    transform = Affine(2.0, 0, 1000.0, 0, -2.0, 5000.0)
    profile = {"driver": "GTiff", "width": 90, "height": 60, "count": 3, "dtype": "uint8", "crs": "EPSG:3857"}
    with rasterio.open(image, "w", transform=transform, **profile) as dst:
        dst.write(random_image((3, 60, 90)))
    code, stderr = _run(str(image), "-m", str(make_model()), "-o", str(tmp_path / "o.zarr"), "--gsd", "5")
    assert code == 0, stderr
    with rasterio.open(f'ZARR:"{tmp_path / "o.zarr"}":/0') as opened:
        assert opened.shape == (24, 36)
        assert opened.transform.almost_equals(Affine(5.0, 0, 1000.0, 0, -5.0, 5000.0), precision=1e-9)
        assert opened.crs.to_epsg() == 3857


def test_input_without_resolution(make_tiff: Callable[..., Path], tmp_path: Path) -> None:
    image = make_tiff(random_image((40, 40, 3)), photometric="rgb")
    model = _checkpoint(tmp_path, mpp=0.5)
    code, stderr = _run(str(image), "-m", str(model), "-o", str(tmp_path / "o.zarr"))
    assert code == 0 and "records no microns per pixel: reading level 0 as it is" in stderr
    code, stderr = _run(str(image), "-m", str(model), "-o", str(tmp_path / "p.zarr"), "--mpp", "0.5")
    assert code == 1 and "cannot read it at 0.5 micrometres per pixel" in stderr
    code, stderr = _run(str(image), "-m", str(model), "-o", str(tmp_path / "q.zarr"), "--mpp", "0.5", "--level", "0")
    assert code == 2 and "not both" in stderr


@pytest.mark.slow
def test_a_scan_within_the_tolerance_is_read_as_it_is_and_the_preview_shows_the_input(
    real_data: Path, tmp_path: Path
) -> None:
    """The Aperio scan is 0.499 µm/px and the model 0.5: read pixel for pixel (2967 x 2220, its true
    scale recorded), not resampled by 0.2%. With the tolerance at 0 it is resampled, and the preview
    still shows the input beside the classes."""
    import subprocess
    import sys

    model = _checkpoint(tmp_path, mpp=0.5)
    svs = real_data / "CMU-1-Small-Region.svs"

    def run(out: Path, *flags: str) -> str:
        args = ["run", svs, "-m", model, "-o", out, "--no-progress", "--mask", "none", *flags]
        done = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stderr

    stderr = run(tmp_path / "as-is.zarr", "--no-preview")
    assert "level 0 read as it is: 0.499 micrometres per pixel is within 2% of the model's 0.5" in stderr
    store = zarr.open_group(str(tmp_path / "as-is.zarr"), mode="r")
    assert store[PROBABILITIES].shape == (3, 2967, 2220)
    assert store.attrs["fcnpipe"]["spatial"]["mpp"] == pytest.approx(0.499)
    assert store.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][1:] == [0.499] * 2
    exact = tmp_path / "exact.yaml"
    exact.write_text("input:\n  resolution_tolerance: 0\n")
    stderr = run(tmp_path / "exact.zarr", "-c", str(exact))
    assert "0.5 micrometres per pixel, resampled from level 0" in stderr
    assert zarr.open_group(str(tmp_path / "exact.zarr"), mode="r")[PROBABILITIES].shape == (3, 2962, 2216)
    preview = tmp_path / "exact.preview.png"
    png = imagecodecs.png_decode(preview.read_bytes())
    labels = zarr.open_group(str(tmp_path / "exact.zarr"), mode="r")["labels/argmax/2"]
    assert png.shape[1] >= 2 * labels.shape[1]  # two panels: the input, and the classes over it
