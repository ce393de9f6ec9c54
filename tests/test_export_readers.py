"""Each export opened with the tools people view it in: Debian's gdalinfo 3.6, rasterio's GDAL 3.10,
tifffile, tiffslide and OpenSlide 4; what they show (colour interpretation, nodata, class names,
resolution, levels) is what the store holds."""

from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import rasterio
import tifffile
import tiffslide
import torch
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import ConfigError, OutputError
from pipeline.model.network import ReferenceFCN
from pipeline.products.export import export_store
from pipeline.store.layout import LABEL_GROUP, NODATA_LABEL

REAL_DATA = Path(os.environ.get("FCNPIPE_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
GDALINFO_36 = "/usr/bin/gdalinfo"
"""Debian's gdal-bin (bookworm: GDAL 3.6), beside the GDAL that rasterio bundles."""

OME_NS = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _store(folder: Path, name: str) -> Path:
    """``fcnpipe run`` of a real file with a seeded 3-class reference FCN, float32."""
    if not (REAL_DATA / "README.md").is_file():
        pytest.skip(f"real TIFF collection not found at {REAL_DATA} (set FCNPIPE_REAL_DATA)")
    torch.manual_seed(0)
    module = ReferenceFCN(3, 3, 16)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(4.0)
    torch.save(module.state_dict(), folder / "model.pt")
    out = folder / "store.zarr"
    args = ["run", str(REAL_DATA / name), "-m", str(folder / "model.pt"), "-o", str(out), "--dtype", "float32"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def rgb_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Landsat GeoTIFF (718 x 791, EPSG:32618, nodata collar), one level."""
    return _store(tmp_path_factory.mktemp("rgb"), "RGB.byte.tif")


@pytest.fixture(scope="module")
def svs_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Aperio slide (2967 x 2220, 0.499 µm/px), three levels, 9 of 30 chunks skipped as background."""
    return _store(tmp_path_factory.mktemp("svs"), "CMU-1-Small-Region.svs")


def gdalinfo_36(path: Path) -> dict[str, Any]:
    """``gdalinfo -json -mdd all`` of Debian's gdal-bin (GDAL 3.6)."""
    if not os.path.exists(GDALINFO_36):
        pytest.skip(f"{GDALINFO_36} not found: apt-get install gdal-bin (Debian's GDAL 3.6)")
    done = subprocess.run([GDALINFO_36, "-json", "-mdd", "all", str(path)], capture_output=True, text=True, check=True)
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def gdalinfo_310(path: Path) -> dict[str, Any]:
    """The same JSON from the GDAL that rasterio bundles (3.10), through its C API ``GDALInfo``:
    rasterio has no call for category names or raster attribute tables."""
    found = glob.glob(os.path.join(os.path.dirname(rasterio.__file__), os.pardir, "rasterio.libs", "libgdal*.so*"))
    if not found:
        pytest.skip("rasterio's bundled libgdal not found (rasterio is not from a wheel)")
    lib = ctypes.CDLL(found[0])
    lib.GDALInfoOptionsNew.restype = ctypes.c_void_p
    lib.GDALInfoOptionsNew.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p]
    lib.GDALOpen.restype = ctypes.c_void_p
    lib.GDALOpen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.GDALInfo.restype = ctypes.c_void_p
    lib.GDALInfo.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.GDALClose.argtypes = [ctypes.c_void_p]
    lib.GDALInfoOptionsFree.argtypes = [ctypes.c_void_p]
    lib.VSIFree.argtypes = [ctypes.c_void_p]
    with rasterio.Env():  # registers the drivers
        argv = (ctypes.c_char_p * 4)(b"-json", b"-mdd", b"all", None)
        options = lib.GDALInfoOptionsNew(argv, None)
        dataset = lib.GDALOpen(str(path).encode(), 0)
        assert dataset, f"GDAL 3.10 cannot open {path}"
        text = lib.GDALInfo(dataset, options)
        info: dict[str, Any] = json.loads(ctypes.string_at(text).decode())
        lib.VSIFree(text)
        lib.GDALClose(dataset)
        lib.GDALInfoOptionsFree(options)
    return info


def classes_of(store: Path) -> list[dict[str, Any]]:
    classes: list[dict[str, Any]] = zarr.open_group(str(store), mode="r").attrs["fcnpipe"]["model"]["classes"]
    return classes


def stored_labels(store: Path, level: int = 0) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store), mode="r")[f"{LABEL_GROUP}/{level}"])


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_probability_cog_bands_are_grey_named_and_have_nodata_in_both_gdals(
    rgb_store: Path, tmp_path: Path, dtype: str
) -> None:
    out = tmp_path / "p.tif"
    export_store(str(rgb_store), str(out), dtype=dtype)
    names = [c["name"] for c in classes_of(rgb_store)]
    for info in (gdalinfo_36(out), gdalinfo_310(out)):
        bands = info["bands"]
        assert [b["colorInterpretation"] for b in bands] == ["Gray", "Undefined", "Undefined"]  # never Red/Green/Blue
        assert [b["description"] for b in bands] == names
        assert all(b["noDataValue"] == (255 if dtype == "uint8" else "NaN") for b in bands)
        assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    with rasterio.open(out) as cog:
        values = cog.read()
        gaps = (values == 255).all(axis=0) if dtype == "uint8" else np.isnan(values).all(axis=0)
        np.testing.assert_array_equal(gaps, stored_labels(rgb_store) == NODATA_LABEL)  # the collar, and only it
        assert gaps.any() and not gaps.all()


def test_slide_cog_marks_skipped_chunks_as_nodata_and_keeps_the_resolution_exact(
    svs_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "slide.tif"
    export_store(str(svs_store), str(out), dtype="uint8")
    labels = zarr.open_group(str(svs_store), mode="r")[f"{LABEL_GROUP}/0"]
    assert labels.nchunks_initialized < labels.nchunks  # background chunks the mask skipped
    chunk = labels.chunks[0]
    with rasterio.open(out) as cog:
        values, valid = cog.read(), cog.read_masks(1)
    skipped = [
        (y, x)
        for y in range(0, labels.shape[0], chunk)
        for x in range(0, labels.shape[1], chunk)
        if (np.asarray(labels[y : y + chunk, x : x + chunk]) == NODATA_LABEL).all()
    ]
    assert skipped
    for y, x in skipped:
        assert (values[:, y : y + chunk, x : x + chunk] == 255).all()
        assert not valid[y : y + chunk, x : x + chunk].any()  # GDAL's mask: no data
    with tifffile.TiffFile(out) as tif:
        num, den = tif.pages[0].tags["XResolution"].value
        assert tif.pages[0].tags["YResolution"].value == (num, den)
        assert tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
    mpp = zarr.open_group(str(svs_store), mode="r").attrs["fcnpipe"]["spatial"]["mpp"]
    assert mpp == 0.499 and 1e4 / (num / den) == pytest.approx(mpp, rel=1e-12)
    info = gdalinfo_36(out)  # still a COG that GDAL reads, after the tags were mended in place
    assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    assert info["metadata"][""]["FCNPIPE_MPP"] == repr(0.499)
    assert gdalinfo_310(out)["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    assert float(openslide.OpenSlide(str(out)).properties["openslide.mpp-x"]) == 0.499


def test_labels_cog_names_the_classes_in_categories_and_a_raster_attribute_table(
    rgb_store: Path, tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "labels.tif"
    export_store(str(rgb_store), str(out), what="labels")
    assert sorted(os.listdir(out.parent)) == ["labels.tif", "labels.tif.aux.xml"]  # no staging folder left
    classes = classes_of(rgb_store)
    names = [c["name"] for c in classes]
    for info in (gdalinfo_36(out), gdalinfo_310(out)):
        band = info["bands"][0]
        assert band["colorInterpretation"] == "Palette" and band["noDataValue"] == NODATA_LABEL
        assert band["categories"] == names
        entries = band["colorTable"]["entries"]
        assert [entries[i] for i in range(len(classes))] == [[*c["color"], 255] for c in classes]
        assert entries[NODATA_LABEL] == [0, 0, 0, 0]
        rat = info["rat"]
        assert [f["name"] for f in rat["fieldDefn"]] == ["Value", "Class", "Red", "Green", "Blue", "Alpha"]
        assert [row["f"] for row in rat["row"]] == [[i, c["name"], *c["color"], 255] for i, c in enumerate(classes)]
    with rasterio.open(out) as cog:
        assert cog.colormap(1)[0][:3] == tuple(classes[0]["color"])
        np.testing.assert_array_equal(cog.read(1), stored_labels(rgb_store))


def test_a_sidecar_is_kept_without_overwrite_and_replaced_or_removed_with_it(rgb_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "map.tif"
    sidecar = tmp_path / "map.tif.aux.xml"
    sidecar.write_text("<PAMDataset/>")
    with pytest.raises(OutputError, match=re.escape(f"{sidecar}: already exists")):
        export_store(str(rgb_store), str(out), what="labels")
    assert not out.exists() and sidecar.read_text() == "<PAMDataset/>"
    export_store(str(rgb_store), str(out), what="labels", overwrite=True)
    assert ET.parse(sidecar).find("PAMRasterBand/CategoryNames") is not None
    export_store(str(rgb_store), str(out), overwrite=True)  # probabilities: no class names to lend them
    assert not sidecar.exists()
    assert "categories" not in gdalinfo_36(out)["bands"][0]


def test_ome_tiff_labels_are_a_palette_image_named_after_the_slide(svs_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels.ome.tif"
    export_store(str(svs_store), str(out), what="labels")
    classes = classes_of(svs_store)
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
        colormap = page.colormap
        assert colormap is not None
        assert [tuple(int(v) // 257 for v in colormap[:, i]) for i in range(3)] == [tuple(c["color"]) for c in classes]
        assert all(level.keyframe.photometric == tifffile.PHOTOMETRIC.PALETTE for level in tif.series[0].levels)
        ome = ET.fromstring(tif.ome_metadata)
    image = ome.find("ome:Image", OME_NS)
    assert image is not None and image.attrib["Name"] == "CMU-1-Small-Region.svs"
    pairs = {m.attrib["K"]: m.text for m in ome.iterfind(".//ome:MapAnnotation/ome:Value/ome:M", OME_NS)}
    assert pairs == {str(i): c["name"] for i, c in enumerate(classes)}
    description = image.find("ome:Description", OME_NS)
    assert description is not None and all(c["name"] in (description.text or "") for c in classes)
    slide = tiffslide.TiffSlide(str(out))
    assert slide.level_count == 3 and float(slide.properties["tiffslide.mpp-x"]) == 0.499
    region = np.asarray(slide.read_region((1000, 0), 0, (600, 600), as_array=True))
    np.testing.assert_array_equal(region.reshape(600, 600), stored_labels(svs_store)[0:600, 1000:1600])


def test_ome_tiff_probabilities_are_named_after_the_slide_and_keep_the_chosen_classes(
    svs_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.ome.tif"
    export_store(str(svs_store), str(out), classes=["class_2", "class_0"])
    with tifffile.TiffFile(out) as tif:
        ome = ET.fromstring(tif.ome_metadata)
        data = tif.series[0].levels[1].asarray()
    image = ome.find("ome:Image", OME_NS)
    assert image is not None and image.attrib["Name"] == "CMU-1-Small-Region.svs"
    assert [c.attrib["Name"] for c in ome.iterfind(".//ome:Channel", OME_NS)] == ["class_2", "class_0"]
    stored = np.asarray(zarr.open_group(str(svs_store), mode="r")["1"])
    np.testing.assert_array_equal(data, stored[[2, 0]])


def test_overlay_is_an_openslide_pyramid_in_the_class_colours(svs_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "slide.overlay.tif"
    assert CliRunner().invoke(cli, ["export", str(svs_store), "-o", str(out)]).exit_code == 0
    classes = classes_of(svs_store)
    labels = stored_labels(svs_store)
    colours = np.zeros((256, 4), np.uint8)
    colours[: len(classes)] = [[*c["color"], 255] for c in classes]  # no data: (0, 0, 0, 0)
    slide = openslide.OpenSlide(str(out))
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert slide.level_count == 3
    assert slide.level_dimensions == ((2220, 2967), (1110, 1484), (555, 742))
    assert float(slide.properties["openslide.mpp-x"]) == 0.499 == float(slide.properties["openslide.mpp-y"])
    region = np.asarray(slide.read_region((0, 0), 0, (2220, 2967)))
    np.testing.assert_array_equal(region, colours[labels])
    assert (labels == NODATA_LABEL).any() and len(np.unique(labels[labels != NODATA_LABEL])) > 1
    coarse = np.asarray(slide.read_region((0, 0), 2, (555, 742)))
    np.testing.assert_array_equal(coarse, colours[stored_labels(svs_store, 2)])
    tiff = tiffslide.TiffSlide(str(out))
    assert tiff.level_count == 3 and tiff.level_dimensions == slide.level_dimensions
    assert float(tiff.properties["tiffslide.mpp-x"]) == 0.499
    middle = np.asarray(tiff.read_region((0, 0), 1, (1110, 1484), as_array=True))
    np.testing.assert_array_equal(middle, colours[stored_labels(svs_store, 1)])


def test_cog_options_creation_nodata_and_classes(rgb_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.tif"
    args = ["export", str(rgb_store), "-o", str(out), "--co", "COMPRESS=ZSTD", "--co", "level=9"]
    args += ["--nodata", "-9999", "--class", "class_2", "--class", "class_0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    stored = np.asarray(zarr.open_group(str(rgb_store), mode="r")["0"])
    with rasterio.open(out) as cog:
        assert cog.compression is not None and cog.compression.value == "ZSTD"
        assert cog.descriptions == ("class_2", "class_0") and cog.nodata == -9999
        values = cog.read()
    expected = np.where(np.isnan(stored[[2, 0]]), np.float32(-9999), stored[[2, 0]])
    np.testing.assert_array_equal(values, expected)
    labels = tmp_path / "l.tif"
    assert (
        CliRunner()
        .invoke(cli, ["export", str(rgb_store), "-o", str(labels), "--what", "labels", "--nodata", "7"])
        .exit_code
        == 0
    )
    with rasterio.open(labels) as cog:
        assert cog.nodata == 7 and cog.colormap(1)[7] == (0, 0, 0, 0)
        np.testing.assert_array_equal(cog.read(1) == 7, stored_labels(rgb_store) == NODATA_LABEL)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "x.tif", "--co", "ZSTD"], "Expected KEY=VALUE for a GDAL creation option. Got 'ZSTD' instead."),
        (["-o", "x.tif", "--co", "NOSUCH=1"], "driver COG does not support creation option NOSUCH"),
        (["-o", "x.tif", "--co", "COMPRESS=NOPE"], "'NOPE' is an unexpected value for COMPRESS"),
        (["-o", "x.ome.tif", "--co", "COMPRESS=ZSTD"], "GDAL creation options apply to a COG only, not to an OME-TIFF"),
        (["-o", "x.overlay.tif", "--nodata", "0"], "a nodata value applies to a COG only"),
        (["-o", "x.tif", "--nodata", "0.5"], "outside [0, 1] for the nodata of probabilities. Got 0.5 instead."),
        (["-o", "x.tif", "--what", "labels", "--nodata", "1"], "from 3 to 255 (not a class index)"),
        (["-o", "x.tif", "--dtype", "uint8", "--nodata", "0"], "from 0 to 254, so their nodata is 255. Got 0"),
        (["-o", "x.tif", "--class", "tumour"], "unknown class 'tumour'; the classes of"),
        (["-o", "x.tif", "--what", "labels", "--class", "class_0"], "the labels always hold every class"),
        (["-o", "x.overlay.tif", "--what", "probabilities"], "an overlay shows the labels"),
        (["-o", "x.tif", "--as", "overlay"], "an overlay's name ends in .overlay.tif; pass -o"),
    ],
    ids=[
        "malformed",
        "unknown-key",
        "bad-value",
        "ome",
        "overlay-nodata",
        "prob-nodata",
        "label-nodata",
        "uint8-nodata",
        "unknown-class",
        "labels-class",
        "overlay-what",
        "overlay-name",
    ],
)
def test_a_bad_option_is_refused_in_one_line_before_anything_is_written(
    rgb_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["export", str(rgb_store), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert os.listdir(tmp_path) == []


def test_the_help_says_which_export_suits_which_viewer() -> None:
    text = " ".join(CliRunner().invoke(cli, ["export", "--help"]).output.split())
    for viewer in ("QGIS", "GDAL", "ArcGIS", "QuPath", "napari", "Bio-Formats", "OpenSlide"):
        assert viewer in text
    for option in ("--co KEY=VALUE", "--nodata", "--class NAME", "overlay"):
        assert option in text


def test_unknown_classes_are_listed(rgb_store: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("are class_0, class_1, class_2")):
        export_store(str(rgb_store), str(tmp_path / "p.tif"), classes=["nope"])


def test_overlay_leaves_the_background_class_transparent_as_the_preview_does(svs_store: Path) -> None:
    from dataclasses import replace

    from pipeline.products.overlay import class_lut
    from pipeline.products.view import open_finished

    view = replace(open_finished(str(svs_store), "labels"), class_names=("Background", "stroma", "nuclei"))
    lut = class_lut(view)
    assert lut[0].tolist() == [0, 0, 0, 0] and lut[255].tolist() == [0, 0, 0, 0]
    assert lut[1].tolist() == [*view.class_colors[1], 255] and lut[2].tolist() == [*view.class_colors[2], 255]
