"""Try a region first: --window / --bbox run a part of the image, exactly as a full run computes it.

The halo of a window's edge tiles reads the real pixels around the window, tiles start at the
window's corner (its offsets are multiples of the network's stride), and the output is
georeferenced (or scaled) where the window lies: its values equal that window of a full run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
import torch
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.model.architectures import UNet
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.network import ModelSpec, default_classes
from pipeline.products.preview import source_thumbnail, write_store_preview
from pipeline.source.tiff import open_source

FIXED = ["--no-progress", "--no-preview", "--dtype", "float32", "--mask", "none", "--torch-threads", "1"]


def run(image: Path, model: Path, out: Path, *flags: str) -> zarr.Group:
    result = CliRunner().invoke(cli, ["run", str(image), "-m", str(model), "-o", str(out), *FIXED, *flags])
    assert result.exit_code == 0, result.output
    return zarr.open_group(str(out), mode="r")


def unet(path: Path) -> Path:
    torch.manual_seed(0)
    module = UNet(3, 3, width=8, depth=3)
    names, colors = default_classes(3)
    spec = ModelSpec("unet", {"in_channels": 3, "num_classes": 3, "width": 8, "depth": 3}, 3, 3, names, colors)
    save_checkpoint(path, module, spec)
    return path


def assert_window_of(full: zarr.Group, part: zarr.Group, col: int, row: int, width: int, height: int) -> None:
    expected = full["0"][:, row : row + height, col : col + width]
    assert part["0"].shape == expected.shape
    np.testing.assert_allclose(part["0"][:], expected, rtol=0, atol=1e-5)
    labels, full_labels = part["labels/argmax/0"][:], full["labels/argmax/0"][row : row + height, col : col + width]
    assert (labels != full_labels).mean() < 1e-3  # only where two classes tie to float rounding


def test_a_window_equals_that_window_of_a_full_run_and_is_georeferenced_there(
    real_data: Path, make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image, model = real_data / "RGB.byte.tif", make_model()
    full = run(image, model, tmp_path / "full.zarr", "--tile", "128")
    window = (100, 200, 300, 250)  # col_off row_off width height, as gdal's -srcwin
    part = run(image, model, tmp_path / "part.zarr", "--tile", "128", "--window", *map(str, window))
    assert_window_of(full, part, *window)
    with rasterio.open(image) as source:
        expected = source.transform @ rasterio.Affine.translation(100, 200)
    with rasterio.open(f'ZARR:"{tmp_path / "part.zarr"}":/0:0') as opened:
        assert opened.transform.almost_equals(expected, precision=1e-9) and opened.crs.to_epsg() == 32618
        assert (opened.width, opened.height) == (300, 250)
    assert part.attrs["fcnpipe"]["spatial"]["window"] == list(window)
    planned = CliRunner().invoke(cli, ["plan", str(image), "-m", str(model), "--window", *map(str, window), "--json"])
    assert json.loads(planned.stdout)["input"]["window"] == list(window)
    # the same window as a bbox in the CRS (metres): every pixel it touches
    x0, y1 = expected @ (0, 0)
    x1, y0 = expected @ (300, 250)
    inset = 1.0  # metres inside the pixel edges, so that the neighbours are not touched
    bbox = [str(v) for v in (x0 + inset, y0 + inset, x1 - inset, y1 - inset)]
    boxed = run(image, model, tmp_path / "box.zarr", "--tile", "128", "--bbox", *bbox)
    assert boxed.attrs["fcnpipe"]["spatial"]["window"] == list(window)
    np.testing.assert_array_equal(boxed["0"][:], part["0"][:])


def test_a_window_of_a_strided_network_starts_on_its_stride(make_tiff: Callable[..., Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = make_tiff(rng.integers(0, 255, (300, 260, 3), dtype=np.uint8))
    model = unet(tmp_path / "unet.pt")
    full = run(image, model, tmp_path / "full.zarr", "--tile", "64")
    part = run(image, model, tmp_path / "part.zarr", "--tile", "64", "--window", "40", "96", "150", "130")
    assert_window_of(full, part, 40, 96, 150, 130)
    args = ["plan", str(image), "-m", str(model), "--window", "41", "96", "150", "130"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2
    assert "not multiples of the network's stride 8" in refused.output and "start it at 40 96" in refused.output
    outside = CliRunner().invoke(cli, ["plan", str(image), "-m", str(model), "--window", "200", "0", "100", "10"])
    assert outside.exit_code == 2 and "reaches beyond the 260 x 300 px (width x height)" in outside.output


def test_a_slide_bbox_in_micrometres_keeps_the_scale_and_previews_its_part_of_the_input(
    real_data: Path, make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image, model = real_data / "CMU-1-Small-Region.svs", make_model()
    mpp = 0.499
    store = tmp_path / "corner.zarr"
    part = run(image, model, store, "--bbox", str(100 * mpp), str(50 * mpp), str(600 * mpp), str(450 * mpp))
    assert part.attrs["fcnpipe"]["spatial"]["window"] == [100, 50, 500, 400]
    assert part["0"].shape == (3, 400, 500)
    scale = part.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [1.0, mpp, mpp]
    write_store_preview(store, tmp_path / "p.png")
    import imagecodecs

    png = imagecodecs.png_decode((tmp_path / "p.png").read_bytes())
    thumbnail = source_thumbnail(open_source(image), 1024, (50, 450, 100, 600))
    assert thumbnail.shape == (3, 400, 500)
    assert np.array_equal(png[:400, :500], np.moveaxis(thumbnail, 0, -1))  # the window of the input, not all of it


def test_window_and_bbox_are_refused_together_and_malformed(real_data: Path, make_model: Callable[..., Path]) -> None:
    image, model = str(real_data / "RGB.byte.tif"), str(make_model())
    both = CliRunner().invoke(
        cli, ["plan", image, "-m", model, "--window", "0", "0", "9", "9", "--bbox", "0", "0", "1", "1"]
    )
    assert both.exit_code == 2 and "not both" in both.output
    inverted = CliRunner().invoke(cli, ["plan", image, "-m", model, "--bbox", "5", "0", "1", "1"])
    assert inverted.exit_code == 2 and "--bbox" in inverted.output
    missed = CliRunner().invoke(cli, ["plan", image, "-m", model, "--bbox", "0", "0", "1", "1"])
    assert missed.exit_code == 2 and "misses the image" in missed.output
