"""Every command of README's "Open the result" runs, with the real tool, on real stores.

The README's shell and Python blocks of that section are read from the file itself, so a command
changed there is tested as written; a command this test does not know how to check fails it.
``SLIDE.zarr`` is the Aperio SVS run, ``scene.zarr`` the Landsat GeoTIFF run (both in the default
format, OME-Zarr 0.4), both made in the test's folder, where the commands run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.model.network import ReferenceFCN
from tests.conftest import REAL_DATA, debian_tool

README = Path(__file__).resolve().parents[1] / "README.md"
CLASSES = 3


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section("Open the result"), flags=re.S)


def commands() -> list[str]:
    lines = [line.split("  #")[0].strip() for block in blocks("sh") for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``SLIDE.zarr`` and ``scene.zarr`` in a fresh folder."""
    if not (REAL_DATA / "README.md").is_file():
        pytest.skip(f"real TIFF collection not found at {REAL_DATA}")
    here = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    torch.save(ReferenceFCN(3, CLASSES, 8).state_dict(), here / "m.pt")
    for source, name in (("CMU-1-Small-Region.svs", "SLIDE.zarr"), ("RGB.byte.tif", "scene.zarr")):
        args = ["run", str(REAL_DATA / source), "-m", str(here / "m.pt"), "-o", str(here / name), "--no-progress"]
        result = CliRunner().invoke(cli, [*args, "--no-preview"])
        assert result.exit_code == 0, result.output
    return here


def gdal_36(folder: Path, args: list[str]) -> dict[str, object]:
    done = subprocess.run([debian_tool("gdalinfo"), "-json", *args], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info: dict[str, object] = json.loads(done.stdout)
    return info


def check_gdalinfo(folder: Path, args: list[str]) -> None:
    """Debian's GDAL 3.6: the size, the CRS and the one band the string names."""
    info = gdal_36(folder, args)
    assert info["size"] == [791, 718]
    assert 'ID["EPSG",32618]' in str(info["coordinateSystem"])
    assert len(info["bands"]) == 1  # type: ignore[arg-type]
    with rasterio.open(REAL_DATA / "RGB.byte.tif") as source:
        # GDAL 3.6 derives it from the x/y coordinates: exact to the last bit or two (3.10 is exact).
        assert info["geoTransform"] == pytest.approx(list(source.transform.to_gdal()), rel=1e-13)


def check_rio_info(folder: Path, args: list[str]) -> None:
    """rasterio's GDAL 3.10: every class a band, the CRS, nodata."""
    rio = Path(sys.executable).with_name("rio")
    done = subprocess.run([str(rio), *args], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert (info["count"], info["width"], info["height"], info["crs"]) == (CLASSES, 791, 718, "EPSG:32618")
    assert info["nodata"] == 255


def check_export(folder: Path, args: list[str]) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    out = folder / args[args.index("-o") + 1]
    if out.name.endswith(".overlay.tif"):  # OpenSlide itself (openslide-bin): a pyramid in the class colours
        import openslide

        with openslide.OpenSlide(out) as slide:
            assert slide.level_dimensions == ((2220, 2967), (1110, 1484), (555, 742))
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.499, rel=1e-12)
        return
    with rasterio.open(out) as dataset:
        assert dataset.count == CLASSES and dataset.crs.to_epsg() == 32618
        assert dataset.descriptions == tuple(f"class_{i}" for i in range(CLASSES))


def check_napari(folder: Path, path: str) -> None:
    """napari-ome-zarr's reader, as napari calls it, without a window: a channel per class, the labels."""
    from napari_ome_zarr import napari_get_reader

    reader = napari_get_reader(str(folder / path))
    assert reader is not None
    layers = {kind: (data, meta) for data, meta, kind in reader(str(folder / path))}
    image, labels = layers["image"], layers["labels"]
    assert [level.shape for level in image[0]] == [(3, 2967, 2220), (3, 1484, 1110), (3, 742, 555)]
    assert image[1]["name"] == [f"CMU-1-Small-Region.svs: class_{i}" for i in range(CLASSES)]
    assert image[1]["scale"] == [0.499, 0.499] and image[1]["units"] == ("micrometer", "micrometer")
    assert labels[1]["properties"]["name"] == ["class_0", "class_1", "class_2", "no data"]
    assert labels[1]["colormap"][255] == [0.0, 0.0, 0.0, 0.0]
    assert all(sum(labels[1]["colormap"][value][:3]) > 0.5 for value in range(CLASSES))  # no black class


def test_every_shell_command_of_open_the_result_works(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)  # the commands name the stores relative to where they run
    checked = []
    for command in commands():
        words = [word for part in command.split("&&") for word in shlex.split(part)]
        if words[:2] == ["pip", "install"]:
            check_napari(folder, words[-1])
        elif words[0] == "gdalinfo":
            check_gdalinfo(folder, words[1:])
        elif words[:2] == ["rio", "info"]:
            check_rio_info(folder, words[1:])
        elif words[:2] == ["fcnpipe", "export"]:
            check_export(folder, words[1:])
        else:
            pytest.fail(f"README command not checked by this test: {command}")
        checked.append(words[0])
    assert checked.count("gdalinfo") >= 2 and "rio" in checked and "fcnpipe" in checked and "pip" in checked


def test_the_python_of_open_the_result_runs(folder: Path) -> None:
    (code,) = blocks("python")
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "EPSG:32618"
    assert "300.04" in done.stdout


def test_gdal_sees_no_store_of_format_0_5_as_the_readme_says(folder: Path) -> None:
    """README tells GIS users to keep the default format: neither GDAL reads a Zarr v3 store."""
    out = folder / "v3.zarr"
    args = ["run", str(REAL_DATA / "RGB.byte.tif"), "-m", str(folder / "m.pt"), "-o", str(out), "--no-progress"]
    result = CliRunner().invoke(cli, [*args, "--no-preview", "--format", "ome-zarr-0.5"])
    assert result.exit_code == 0, result.output
    done = subprocess.run([debian_tool("gdalinfo"), f'ZARR:"{out}":/0:0'], capture_output=True, text=True)
    assert done.returncode != 0
    with pytest.raises(rasterio.errors.RasterioIOError, match="codec"):
        rasterio.open(f'ZARR:"{out}":/0')
    assert "Unsupported codec: bytes" in section("Open the result")
