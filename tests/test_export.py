"""Exports of real stores, read back with the readers people use: rasterio (GDAL) and tifffile."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import load_config
from pipeline.errors import ConfigError, OutputError, SourceError
from pipeline.products.cog import export_cog
from pipeline.products.export import export_store
from pipeline.products.ome_tiff import export_ome_tiff
from pipeline.run.execute import execute
from pipeline.run.plan import prepare
from pipeline.store.layout import LABEL_GROUP, NODATA_LABEL

OME_NS = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}


def run_store(real_data: Path, model: Path, out: Path, name: str, *flags: str) -> Path:
    """``fcnpipe run`` on a real file; the finished store's path."""
    result = CliRunner().invoke(cli, ["run", str(real_data / name), "-m", str(model), "-o", str(out), *flags])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def rgb_store(real_data: Path, make_model: Callable[..., Path], tmp_path: Path) -> Path:
    """Store of the Landsat GeoTIFF (718 x 791, EPSG:32618, nodata collar), float32, one level."""
    model = make_model(in_channels=3, num_classes=3)
    return run_store(real_data, model, tmp_path / "rgb.zarr", "RGB.byte.tif", "--dtype", "float32")


@pytest.fixture
def svs_store(real_data: Path, make_model: Callable[..., Path], tmp_path: Path) -> Path:
    """Store of the Aperio slide (2967 x 2220, 0.499 µm/px), float32, three levels."""
    model = make_model(in_channels=3, num_classes=3)
    return run_store(real_data, model, tmp_path / "svs.zarr", "CMU-1-Small-Region.svs", "--dtype", "float32")


def expected(stored: np.ndarray, dtype: str) -> np.ndarray:
    """What an export of ``stored`` values as ``dtype`` must hold."""
    if stored.dtype == np.uint8:
        if dtype == "uint8":
            return stored
        return np.where(stored == 255, np.float32(np.nan), stored / np.float32(254)).astype(dtype)
    if dtype == "uint8":
        return np.where(np.isnan(stored), 255, np.rint(np.nan_to_num(stored) * 254.0)).astype(np.uint8)
    return stored.astype(dtype)


COG_CASES = [
    # (what, dtype asked, dtype written, bands)
    ("probabilities", None, "float32", 3),
    pytest.param("probabilities", "uint8", "uint8", 3, marks=pytest.mark.slow),
    ("labels", None, "uint8", 1),
]


@pytest.mark.parametrize(("what", "dtype", "written", "bands"), COG_CASES, ids=["float32", "uint8", "labels"])
def test_cog_keeps_the_georeference_and_values_and_has_overviews(
    real_data: Path, rgb_store: Path, tmp_path: Path, what: str, dtype: str | None, written: str, bands: int
) -> None:
    (tmp_path / "exports").mkdir()
    out = tmp_path / "exports" / "map.tif"
    export_cog(str(rgb_store), str(out), what=what, dtype=dtype)
    store = zarr.open_group(str(rgb_store), mode="r")
    classes = store.attrs["fcnpipe"]["model"]["classes"]
    with rasterio.open(real_data / "RGB.byte.tif") as source, rasterio.open(out) as cog:
        assert cog.crs == source.crs and cog.crs.to_epsg() == 32618
        assert cog.transform == source.transform  # exactly: GDAL writes the doubles back unchanged
        assert cog.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"  # GDAL's own COG layout marker
        assert cog.overviews(1) == [2]  # 791 px wide: one internal overview below the 512 px block
        assert cog.profile["tiled"] and cog.block_shapes[0] == (512, 512)
        assert cog.compression is not None and cog.compression.value == "DEFLATE"
        assert cog.count == bands and set(cog.dtypes) == {written}
        values = cog.read()
        if what == "labels":
            stored = np.asarray(store[f"{LABEL_GROUP}/0"])
            assert cog.nodata == NODATA_LABEL and (stored == NODATA_LABEL).any()  # the nodata collar
            np.testing.assert_array_equal(values[0], stored)
            colormap = cog.colormap(1)
            assert [colormap[i][:3] for i in range(len(classes))] == [tuple(c["color"]) for c in classes]
        else:
            np.testing.assert_array_equal(values, expected(np.asarray(store["0"]), written))
            assert cog.descriptions == tuple(c["name"] for c in classes)
            # no data (the collar) is the nodata value, and only it: 0 is a probability, not a gap
            labels = np.asarray(store[f"{LABEL_GROUP}/0"])
            if written == "uint8":
                assert cog.nodata == 255 and (values == 0).any()
                gaps = (values == 255).all(axis=0)
            else:
                assert np.isnan(cog.nodata)
                gaps = np.isnan(values).all(axis=0)
            np.testing.assert_array_equal(gaps, labels == NODATA_LABEL)
            assert gaps.any() and not gaps.all()
            assert cog.scales == ((1 / 254,) * 3 if written == "uint8" else (1.0,) * 3)
    # the temporary folder is gone; labels have GDAL's sidecar with their class names
    assert sorted(os.listdir(out.parent)) == ["map.tif"] + (["map.tif.aux.xml"] if what == "labels" else [])


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_cog_of_a_slide_has_no_crs_and_records_the_pixel_size(svs_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "slide.tif"
    export_store(str(svs_store), str(out), kind="cog", what="labels")
    with rasterio.open(out) as cog:
        assert cog.crs is None
        assert cog.overviews(1) == [2, 4, 8]
        assert float(cog.tags()["TIFFTAG_XRESOLUTION"]) == pytest.approx(1e4 / 0.499)  # pixels per cm
        labels = zarr.open_group(str(svs_store), mode="r")[f"{LABEL_GROUP}/0"]
        np.testing.assert_array_equal(cog.read(1, window=((0, 600), (1000, 1600))), labels[0:600, 1000:1600])


@pytest.mark.slow
@pytest.mark.parametrize("what", ["probabilities", "labels"])
def test_ome_tiff_holds_the_store_pyramid_class_names_and_micrometres(
    svs_store: Path, tmp_path: Path, what: str
) -> None:
    out = tmp_path / "slide.ome.tif"
    export_ome_tiff(str(svs_store), str(out), what=what)
    store = zarr.open_group(str(svs_store), mode="r")
    levels = store if what == "probabilities" else store[LABEL_GROUP]
    stored = [levels[str(i)] for i in range(3)]
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert series.axes == ("CYX" if what == "probabilities" else "YX")
        assert [level.shape for level in series.levels] == [array.shape for array in stored]
        for level, array in zip(series.levels, stored, strict=True):
            np.testing.assert_array_equal(level.asarray(), np.asarray(array))
        page = tif.pages[0]
        assert (page.tilelength, page.tilewidth) == (512, 512)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        pixels = ET.fromstring(tif.ome_metadata).find("ome:Image/ome:Pixels", OME_NS)
    assert pixels is not None
    assert float(pixels.attrib["PhysicalSizeX"]) == 0.499 and pixels.attrib["PhysicalSizeXUnit"] == "µm"
    assert float(pixels.attrib["PhysicalSizeY"]) == 0.499
    names = [channel.attrib["Name"] for channel in pixels.findall("ome:Channel", OME_NS)]
    classes = [c["name"] for c in store.attrs["fcnpipe"]["model"]["classes"]]
    assert names == (classes if what == "probabilities" else ["class"])


def test_uint8_zarr_v3_store_exports_to_float32_and_as_stored(
    real_data: Path, make_model: Callable[..., Path], tmp_path: Path
) -> None:
    flags = ("--dtype", "uint8", "--format", "ome-zarr-0.5")
    store = run_store(real_data, make_model(), tmp_path / "u8.zarr", "RGB.byte.tif", *flags)
    stored = np.asarray(zarr.open_group(str(store), mode="r")["0"])
    export_store(str(store), str(tmp_path / "p.tif"), kind="cog", dtype="float32")
    export_store(str(store), str(tmp_path / "p.ome.tif"), kind="ome-tiff")
    with rasterio.open(tmp_path / "p.tif") as cog:
        np.testing.assert_array_equal(cog.read(), expected(stored, "float32"))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "p.ome.tif"), stored)


def mark_incomplete(store: Path) -> Path:
    """What a run killed before its last write leaves: ``complete: false``."""
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["fcnpipe"] = {**group.attrs["fcnpipe"], "complete": False}
    return store


@pytest.mark.parametrize("kind", ["cog", pytest.param("ome-tiff", marks=pytest.mark.slow)])
def test_an_incomplete_store_is_refused(rgb_store: Path, tmp_path: Path, kind: str) -> None:
    out = tmp_path / ("map.ome.tif" if kind == "ome-tiff" else "map.tif")
    with pytest.raises(OutputError, match="incomplete") as raised:
        export_store(str(mark_incomplete(rgb_store)), str(out), kind=kind)
    assert str(rgb_store) in str(raised.value) and "\n" not in str(raised.value)
    assert not out.exists()


def test_the_store_a_failed_run_leaves_is_refused(
    real_data: Path, make_model: Callable[..., Path], tmp_path: Path
) -> None:
    store = tmp_path / "broken.zarr"
    # fcnpipe run reads a sample and fails before creating the store; the plain functions get further
    config = load_config(
        overrides={
            "input": {"path": str(real_data / "unreadable.svs")},
            "mask": {"mode": "none"},
            "model": {"path": str(make_model())},
            "output": {"path": str(store)},
        }
    )
    with pytest.raises(SourceError, match="cannot read pixels"):
        execute(prepare(config))
    assert store.exists()
    with pytest.raises(OutputError, match=re.escape(f"{store}: is incomplete")):
        export_store(str(store), str(tmp_path / "map.tif"))


def test_what_is_not_an_fcnpipe_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"missing\.zarr: no such file or folder"):
        export_store(str(tmp_path / "missing.zarr"), str(tmp_path / "map.tif"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(OutputError, match="no 'fcnpipe' attribute"):
        export_store(str(tmp_path / "plain.zarr"), str(tmp_path / "map.tif"))


@pytest.mark.parametrize("kind", ["cog", pytest.param("ome-tiff", marks=pytest.mark.slow)])
def test_an_existing_output_is_kept_without_overwrite_and_replaced_with_it(
    rgb_store: Path, tmp_path: Path, kind: str
) -> None:
    out = tmp_path / ("map.ome.tif" if kind == "ome-tiff" else "map.tif")
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match=re.escape(f"{out}: already exists; set overwrite to true")):
        export_store(str(rgb_store), str(out), kind=kind)
    assert out.read_bytes() == b"keep me"
    export_store(str(rgb_store), str(out), kind=kind, overwrite=True)
    with tifffile.TiffFile(out) as tif:
        assert (tif.pages[0].imagelength, tif.pages[0].imagewidth) == (718, 791)
    with pytest.raises(OutputError, match="is a folder"):
        export_store(str(rgb_store), str(rgb_store), kind=kind, overwrite=True)


def test_bad_options_are_refused_before_anything_is_written(rgb_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "map.tif"
    with pytest.raises(
        ConfigError, match=re.escape("Expected one of cog, ome-tiff, overlay for 'kind'. Got 'png' instead.")
    ):
        export_store(str(rgb_store), str(out), kind="png")
    with pytest.raises(ConfigError, match="applies to probabilities only"):
        export_store(str(rgb_store), str(out), what="labels", dtype="float32")
    with pytest.raises(ConfigError, match="for 'dtype'"):
        export_store(str(rgb_store), str(out), dtype="float16")
    with pytest.raises(OutputError, match="cannot write beside it"):
        export_store(str(rgb_store), str(tmp_path / "no" / "such" / "map.tif"))
    assert not out.exists()


def test_cli_export_writes_a_cog_and_refuses_an_existing_file_in_one_line(rgb_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "map.tif"
    args = ["export", str(rgb_store), "-o", str(out), "--what", "labels"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    with rasterio.open(out) as cog:
        assert cog.count == 1 and cog.nodata == NODATA_LABEL
    result = CliRunner().invoke(cli, [*args, "--as", "ome-tiff"])
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"fcnpipe: error: {out}: already exists; pass --overwrite to replace it"
    ]


def test_the_kind_comes_from_the_name_and_a_mismatch_is_refused(rgb_store: Path, tmp_path: Path) -> None:
    """``-o x.ome.tiff`` writes an OME-TIFF without ``--as``; a name that says another kind, or no
    TIFF at all, is refused in one line before anything is written."""
    ome = tmp_path / "x.ome.tiff"
    assert CliRunner().invoke(cli, ["export", str(rgb_store), "-o", str(ome)]).exit_code == 0
    with tifffile.TiffFile(ome) as tif:
        assert tif.is_ome
    for args, message in (
        (["-o", str(tmp_path / "y.ome.tif"), "--as", "cog"], f"name ends in .tif; pass -o {tmp_path / 'y.tif'}"),
        (["-o", str(tmp_path / "y.tif"), "--as", "ome-tiff"], "name ends in .ome.tif; pass -o"),
        (["-o", str(tmp_path / "y.png")], ".tif a Cloud-Optimized GeoTIFF (GIS), .ome.tif an OME-TIFF"),
    ):
        result = CliRunner().invoke(cli, ["export", str(rgb_store), *args])
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr
    assert not any(tmp_path.glob("y.*")) and not any(tmp_path.glob(".y.*"))
