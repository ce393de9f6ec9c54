"""``fcnpipe inspect`` (a TIFF or a store), ``inspect-model`` and ``plan``: the text and the ``--json``
document say the same, on the real third-party files of ../shared/data/real."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.model.network import ReferenceFCN
from pipeline.training.synthetic import make_synthetic_slide


def invoke(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def document(*args: object) -> dict[str, Any]:
    """The ``--json`` output of ``fcnpipe ARGS``: one strict JSON document on stdout."""
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    parsed: dict[str, Any] = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    return parsed


def sizes(series: dict[str, Any]) -> list[tuple[int, int]]:
    return [(level["width"], level["height"]) for level in series["levels"]]


def test_svs_json_names_its_series_and_gives_only_the_baseline_the_slides_scale(real_data: Path) -> None:
    info = document("inspect", real_data / "CMU-1-Small-Region.svs")
    assert (info["kind"], info["format"], info["file_size_bytes"]) == ("tiff", "Aperio SVS", 1_938_955)
    assert [s["name"] for s in info["series"]] == ["baseline", "thumbnail", "label", "macro"]
    baseline, *associated = info["series"]
    assert sizes(baseline) == [(2220, 2967)] and (baseline["block_width"], baseline["block_height"]) == (240, 240)
    assert baseline["micrometres_per_pixel"] == pytest.approx(0.499) and not baseline["associated"]
    assert [sizes(s) for s in associated] == [[(574, 768)], [(387, 463)], [(1280, 431)]]
    assert all(s["associated"] and s["micrometres_per_pixel"] is None for s in associated)


def test_ndpi_and_ome_json_levels_are_width_and_height(real_data: Path) -> None:
    ndpi = document("inspect", real_data / "test3-TRITC-2-560.ndpi")
    assert ndpi["format"] == "Hamamatsu NDPI" and [s["name"] for s in ndpi["series"]] == ["baseline", "macro", "map"]
    assert sizes(ndpi["series"][0]) == [(3968, 4864), (1984, 2432), (992, 1216), (496, 608)]
    assert ndpi["series"][0]["micrometres_per_pixel"] == pytest.approx(0.22817, rel=1e-4)
    assert ndpi["series"][1]["associated"] and ndpi["series"][1]["channels"] == 3
    ome = document("inspect", real_data / "hubmap_multi-channel_pyramid.ome.tif")
    (series,) = ome["series"]
    assert ome["format"] == "OME-TIFF (BigTIFF)" and series["axes"] == "CYX" and series["channels"] == 3
    assert len(series["levels"]) == 8 and sizes(series)[0] == (439, 167) and sizes(series)[7] == (3, 1)
    assert series["micrometres_per_pixel"] is None and series["crs"] is None


def test_geotiff_json_has_crs_units_bounds_corners_and_nodata(real_data: Path) -> None:
    info = document("inspect", real_data / "RGB.byte.tif")
    (image,) = info["series"]
    assert (info["format"], image["name"], image["crs"], image["crs_units"]) == (
        "GeoTIFF",
        "image",
        "EPSG:32618",
        "metre",
    )
    assert image["nodata"] == 0 and image["pixel_is_point"] is False
    assert (image["pixel_width"], image["pixel_height"]) == pytest.approx((300.0379, 300.0418), rel=1e-5)
    corners = image["corners"]
    assert corners["bounds"] == pytest.approx([101985.0, 2611485.0, 339315.0, 2826915.0], abs=1e-3)
    assert corners["upper_left"] == pytest.approx([101985.0, 2826915.0])
    assert corners["lower_right"] == pytest.approx([339315.0, 2611485.0], abs=1e-3)
    assert image["transform"][2] == 101985.0 and image["transform"][5] == 2826915.0


def test_a_gdal_internal_mask_is_the_mask_of_its_image(real_data: Path) -> None:
    info = document("inspect", real_data / "cogeo.tif")
    image, mask = info["series"]
    assert (image["name"], image["mask_series"], image["mask_of"]) == ("image", 1, None)
    assert (mask["name"], mask["mask_of"], mask["dtype"]) == ("mask", 0, "bool")
    assert sizes(mask) == sizes(image) and len(sizes(image)) == 7 and image["crs_units"] == "metre"
    text = invoke("inspect", real_data / "cogeo.tif").stdout
    assert "series 1 (mask): the GDAL internal mask of series 0" in text and "generic" not in text
    assert "nodata: where its internal mask (series 1) is 0" in text


def test_text_sizes_are_width_x_height_with_units_and_plurals(real_data: Path) -> None:
    svs = invoke("inspect", real_data / "CMU-1-Small-Region.svs")
    assert svs.exit_code == 0, svs.output
    lines = svs.stdout.splitlines()
    assert lines[0].endswith("Aperio SVS, 1,938,955 bytes, 4 series")
    assert "series 0 (baseline): axes YXS, 3 channels, uint8, JPEG, tiles 240x240 px, 1 level" in lines
    assert "  level 0: 2220 x 2967 px (width x height, downsample 1)" in lines
    assert sum("0.499 micrometres per pixel" in line for line in lines) == 1  # the baseline's alone
    assert "1 levels" not in svs.stdout and "1 channels" not in svs.stdout
    geo = invoke("inspect", real_data / "RGB.byte.tif").stdout.splitlines()
    assert "  crs: EPSG:32618, units metre" in geo
    assert "  pixel size: 300.038 x 300.042 metre (width x height) at level 0" in geo
    assert "  bounds: left 101985, bottom 2611485, right 339315, top 2826915 (metre)" in geo
    assert "  upper left  (101985, 2826915)" in geo and "  nodata: 0 (GDAL_NODATA tag)" in geo
    assert not any("CRS units" in line for line in geo)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_bad_paths_are_one_line_and_a_nonzero_exit(real_data: Path, tmp_path: Path, as_json: bool) -> None:
    flag = ["--json"] if as_json else []
    cases = [
        (real_data / "corrupt.tif", "corrupt.tif: truncated or corrupt"),
        (tmp_path / "gone.zarr", "gone.zarr: no such file or folder"),
        (tmp_path, "is a directory, not a TIFF file or a Zarr store"),
    ]
    for path, message in cases:
        result = invoke("inspect", path, *flag)
        assert result.exit_code == 1 and result.stdout == "", result.output
        (line,) = result.stderr.splitlines()
        assert line.startswith("fcnpipe: error: ") and message in line and "Traceback" not in result.output
    assert invoke("inspect", "--jsn", real_data / "RGB.byte.tif").exit_code == 2  # a usage error, as Click's


def run_store(tmp_path: Path, size: int = 1024) -> tuple[Path, Path, Path]:
    """A synthetic slide, a seeded reference FCN and the store ``fcnpipe run`` wrote of them."""
    slide = make_synthetic_slide(tmp_path / "slide.tif", tmp_path / "mask.tif", size=size, seed=3)
    torch.manual_seed(0)
    model = tmp_path / "m.pt"
    torch.save(ReferenceFCN(3, 3, 8).state_dict(), model)
    store = tmp_path / "out.zarr"
    args = ["run", slide.image_path, "-m", model, "-o", store, "--tile", "128", "--no-preview", "-q"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return Path(slide.image_path), model, store


def test_inspect_describes_a_complete_store(tmp_path: Path) -> None:
    image, model, store = run_store(tmp_path)
    info = document("inspect", store)
    assert (info["kind"], info["status"], info["format"], info["zarr_format"]) == (
        "fcnpipe store",
        "complete",
        "ome-zarr-0.4",
        2,
    )
    chunks = info["chunks"]
    assert chunks["total"] == 64 and 0 < chunks["background"] < 64
    assert chunks["on_disk"] == 64 - chunks["background"]  # every chunk with foreground, none else
    assert [c["name"] for c in info["classes"]] == ["class_0", "class_1", "class_2"]
    assert all(c["color"].startswith("#") and len(c["color"]) == 7 for c in info["classes"])
    assert [(lv["width"], lv["height"]) for lv in info["levels"]] == [(1024, 1024)]
    assert info["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert info["input"]["path"] == str(image.resolve()) and info["input"]["width"] == 1024
    assert info["timings_s"]["total"] > 0 and len(info["fingerprint_sha256"]) == 64
    text = invoke("inspect", store).stdout.splitlines()
    assert text[0] == f"{store}: fcnpipe store, complete"
    assert text[1].startswith(f"chunks   {chunks['on_disk']} of 64 chunks (128 x 128 px) on disk")
    assert "level 0  1024 x 1024 px (width x height)" in text
    assert any(line.startswith("classes  3: class_0 #") for line in text)
    assert any(info["model"]["sha256"] in line for line in text)


@pytest.mark.slow
def test_inspect_says_a_killed_run_left_an_unfinished_store(tmp_path: Path) -> None:
    """A run SIGKILLed at its 5th label chunk write (tests/dying.py): inspect says unfinished, how far
    it got and how to go on."""
    image, model, store = run_store(tmp_path)
    killed = tmp_path / "killed.zarr"
    fault = {"FCNPIPE_FAULT": "kill", "FCNPIPE_FAULT_AT": "5", "FCNPIPE_FAULT_TARGET": "killed.zarr/labels/argmax/"}
    env = {**os.environ, **fault}
    command = [sys.executable, str(Path(__file__).with_name("dying.py")), "run", str(image), "-m", str(model)]
    command += ["-o", str(killed), "--tile", "128", "--no-preview", "--workers", "1", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0, done.stderr
    with warnings.catch_warnings():  # nothing but the description: zarr's word on the resume state neither
        warnings.simplefilter("error")
        info = document("inspect", killed)
    assert info["status"] == "unfinished" and info["finished"] is None
    assert 0 < info["chunks"]["on_disk"] < document("inspect", store)["chunks"]["on_disk"]
    first = invoke("inspect", killed).stdout.splitlines()[0]
    assert first.startswith(f"{killed}: fcnpipe store, unfinished") and "--resume" in first


def test_inspect_model_json_and_a_state_dict_of_another_architecture(
    make_model: Callable[..., Path], tmp_path: Path
) -> None:
    model = make_model(in_channels=3, num_classes=2)
    info = document("inspect-model", model)
    assert (info["architecture"], info["in_channels"], len(info["classes"])) == ("reference_fcn", 3, 2)
    assert (info["receptive_radius_px"], info["receptive_field_px"], info["stride_px"], info["halo_px"]) == (1, 3, 1, 1)
    assert info["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest() and info["parameters"] > 0
    text = invoke("inspect-model", model).stdout
    assert "stride           1 px" in text and "input            3 channels" in text
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 2, 1)).state_dict(), other)
    for flags in ([], ["--json"]):
        result = invoke("inspect-model", other, *flags)
        assert result.exit_code == 1 and result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert "another architecture" in line and "--factory package.module:function" in line


@pytest.mark.slow
def test_plan_json_and_text_say_what_a_run_would_do_and_that_nothing_is_written(
    real_data: Path, make_model: Callable[..., Path], tmp_path: Path
) -> None:
    model = make_model()
    args = ["plan", real_data / "RGB.byte.tif", "-m", model, "--workers", "2", "--torch-threads", "1"]
    info = document(*args)
    assert info["input"]["width"] == 791 and info["input"]["height"] == 718 and info["input"]["channels"] == 3
    assert info["output"]["path"] is None and info["output"]["written"] is False
    assert info["output"]["levels"] == [{"width": 791, "height": 718}]
    assert info["scale"]["crs"] == "EPSG:32618" and info["scale"]["crs_units"] == "metre"
    assert info["compute"] == {"device": "cpu", "worker_threads": 2, "torch_threads_each": 1}
    assert info["chunks"]["total"] == 4 and info["estimate"]["tile_s"] > 0
    lines = {line.split()[0]: line for line in invoke(*args).stdout.splitlines()}
    assert lines["input"].endswith("level 0: 791 x 718 px (width x height), 3 channels, uint8 (0.6 Mpx)")
    assert lines["compute"] == "compute cpu, 2 worker threads, 1 torch thread each, in this process"
    assert lines["output"].startswith("output  no -o given (plan writes nothing): 3 classes x 791 x 718 px")
    assert lines["output"].endswith(", 1 level") and "(not written)" not in lines["output"]
    assert lines["scale"].startswith("scale   EPSG:32618, 300.038 x 300.042 metre per pixel (width x height)")
    named = tmp_path / "out.zarr"
    output = invoke(*args, "-o", named).stdout
    assert f"output  {named} (plan writes nothing)" in output and not named.exists()
    assert document(*args, "-o", named)["output"]["path"] == str(named)
