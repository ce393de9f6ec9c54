"""The store opens in the real downstream readers: OME-Zarr validators and readers, GDAL, xarray."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from click.testing import CliRunner
from rasterio.transform import Affine

from pipeline.cli import cli
from pipeline.store.layout import LABELS, NODATA_LABEL, PROBABILITIES
from pipeline.store.pyramid import level_shapes, mean_2x2
from tests.conftest import random_image


def run(image: Path, model: Path, out: Path, *flags: str) -> zarr.Group:
    result = CliRunner().invoke(
        cli, ["run", str(image), "-m", str(model), "-o", str(out), "--dtype", "float32", *flags]
    )
    assert result.exit_code == 0, result.output
    return zarr.open_group(str(out), mode="r")


@pytest.fixture(scope="module")
def svs_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The SVS run once per OME-NGFF version (3 levels, 0.499 µm/px)."""
    from tests.conftest import REAL_DATA

    if not (REAL_DATA / "README.md").is_file():
        pytest.skip(f"real TIFF collection not found at {REAL_DATA}")
    import torch

    from pipeline.model.network import ReferenceFCN

    folder = tmp_path_factory.mktemp("svs")
    torch.manual_seed(0)
    model = folder / "m.pt"
    torch.save(ReferenceFCN(3, 3, 8).state_dict(), model)
    stores = {}
    for version in ("0.4", "0.5"):
        out = folder / f"svs-{version}.zarr"
        run(REAL_DATA / "CMU-1-Small-Region.svs", model, out, "--format", f"ome-zarr-{version}", "--dtype", "uint8")
        stores[version] = out
    return stores


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_models_validate_image_labels_and_label_image(svs_stores: dict[str, Path], version: str) -> None:
    from ome_zarr_models import open_ome_zarr

    group = zarr.open_group(str(svs_stores[version]), mode="r")
    module = f"ome_zarr_models.v{version.replace('.', '')}"
    assert type(open_ome_zarr(group)).__module__.startswith(module)
    assert type(open_ome_zarr(group)).__name__ == "Image"
    assert type(open_ome_zarr(group["labels"])).__name__ == "Labels"
    assert type(open_ome_zarr(group["labels/argmax"])).__name__ == "ImageLabel"


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ngff_zarr_strict_schemas_accept_image_and_label_image(svs_stores: dict[str, Path], version: str) -> None:
    """ngff-zarr's strict schemas (they ask for what the spec recommends, e.g. ``multiscales[].type``)."""
    import ngff_zarr

    group = zarr.open_group(str(svs_stores[version]), mode="r")
    image = {key: value for key, value in group.attrs.items() if key != "fcnpipe"}
    ngff_zarr.validate(image, version=version, model="image", strict=True)
    ngff_zarr.validate(dict(group["labels/argmax"].attrs), version=version, model="label", strict=True)
    multiscales = (image if version == "0.4" else image["ome"])["multiscales"]  # type: ignore[index]
    assert [m["type"] for m in multiscales] == ["local_mean"]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_reader_finds_levels_scale_and_label_colours(svs_stores: dict[str, Path], version: str) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(svs_stores[version])))())
    image, label = nodes[0], next(n for n in nodes if n.metadata.get("name") == "argmax")
    assert [d.shape for d in image.data] == [(3, 2967, 2220), (3, 1484, 1110), (3, 742, 555)]
    assert [d.shape for d in label.data] == [(2967, 2220), (1484, 1110), (742, 555)]
    scales = [t[0]["scale"] for t in image.metadata["coordinateTransformations"]]
    assert scales == [[1.0, 0.499, 0.499], [1.0, 0.998, 0.998], [1.0, 1.996, 1.996]]
    assert image.metadata["channel_names"] == ["class_0", "class_1", "class_2"]
    assert set(label.metadata["color"]) == {0, 1, 2, NODATA_LABEL}
    assert label.metadata["color"][NODATA_LABEL][3] == 0  # no data is transparent


def test_svs_scale_is_in_micrometres(svs_stores: dict[str, Path]) -> None:
    attrs = zarr.open_group(str(svs_stores["0.4"]), mode="r").attrs
    multiscale = attrs["multiscales"][0]
    assert multiscale["axes"][1] == {"name": "y", "type": "space", "unit": "micrometer"}
    assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.499, 0.499]
    assert attrs["fcnpipe"]["spatial"]["mpp"] == pytest.approx(0.499)


def test_levels_are_means_and_labels_are_subsamples(svs_stores: dict[str, Path]) -> None:
    group = zarr.open_group(str(svs_stores["0.4"]), mode="r")
    for level in (1, 2):
        above, below = group[str(level - 1)][:], group[str(level)][:]
        np.testing.assert_array_equal(below, mean_2x2(above, "uint8"))
        labels_above = group[f"labels/argmax/{level - 1}"][:]
        np.testing.assert_array_equal(group[f"labels/argmax/{level}"][:], labels_above[::2, ::2])
    assert level_shapes(2967, 2220)[-1] == (742, 555)


def test_geotiff_georeference_reaches_gdal_and_rioxarray(
    real_data: Path, make_model: Callable[..., Path], tmp_path: Path
) -> None:
    import pyproj
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr

    image = real_data / "RGB.byte.tif"
    out = tmp_path / "rgb.zarr"
    run(image, make_model(), out)
    with rasterio.open(image) as source:
        crs, transform = source.crs, source.transform
    for array in (PROBABILITIES, LABELS):
        with rasterio.open(f'ZARR:"{out}":/{array}') as opened:
            assert opened.crs == crs and opened.crs.to_epsg() == 32618
            assert opened.transform.almost_equals(transform, precision=1e-9)
            assert opened.shape == (718, 791)
    probabilities = xr.open_zarr(out, consolidated=False)["0"]
    # CF 1.8 grid mapping, for CF readers other than GDAL and rioxarray
    cf = probabilities.coords["spatial_ref"].attrs
    assert cf["grid_mapping_name"] == "transverse_mercator" and cf["longitude_of_central_meridian"] == -75.0
    assert pyproj.CRS.from_wkt(cf["crs_wkt"]).to_epsg() == 32618
    assert probabilities.attrs["grid_mapping"] == "spatial_ref"
    assert probabilities.rio.crs.to_epsg() == 32618
    assert probabilities.rio.transform() == transform  # exact: from the grid mapping's GeoTransform
    labels = xr.open_zarr(out, group="labels/argmax", consolidated=False)["0"]
    assert labels.rio.crs.to_epsg() == 32618 and labels.rio.transform() == transform


def test_nodata_collar_gets_no_prediction(real_data: Path, make_model: Callable[..., Path], tmp_path: Path) -> None:
    store = run(real_data / "RGB.byte.tif", make_model(), tmp_path / "rgb.zarr")
    with rasterio.open(real_data / "RGB.byte.tif") as source:
        empty = (source.read() == 0).all(axis=0)
    labels, probs = store[LABELS][:], store[PROBABILITIES][:]
    assert 0.1 < empty.mean() < 0.9  # the collar is real and large
    np.testing.assert_array_equal(labels == NODATA_LABEL, empty)
    assert np.isnan(probs[:, empty]).all()  # no data: NaN, the arrays' fill value
    np.testing.assert_allclose(probs[:, ~empty].sum(axis=0), 1.0, atol=1e-5)


def test_alpha_zero_gets_no_prediction(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    rgba = random_image((40, 50, 4))
    rgba[..., 3] = 255
    rgba[10:20, 5:30, 3] = 0
    store = run(make_tiff(rgba, photometric="rgb", extrasamples=["unassalpha"]), make_model(), tmp_path / "a.zarr")
    labels = store[LABELS][:]
    assert (labels[10:20, 5:30] == NODATA_LABEL).all()
    assert (labels[rgba[..., 3] == 255] != NODATA_LABEL).all()


def _geotiff(path: Path, transform: Affine, **tags: str) -> Path:
    with rasterio.open(
        path, "w", driver="GTiff", width=60, height=40, count=3, dtype="uint8", crs="EPSG:3857", transform=transform
    ) as dst:
        dst.write(random_image((3, 40, 60)))
        if tags:
            dst.update_tags(**tags)
    return path


@pytest.mark.parametrize("area_or_point", ["Area", "Point"])
def test_pixel_is_area_and_point_keep_gdal_transform(
    make_model: Callable[..., Path], tmp_path: Path, area_or_point: str
) -> None:
    image = _geotiff(tmp_path / "in.tif", Affine(2.5, 0, 1000.0, 0, -2.5, 5000.0), AREA_OR_POINT=area_or_point)
    out = tmp_path / "out.zarr"
    run(image, make_model(), out)
    with rasterio.open(image) as source, rasterio.open(f'ZARR:"{out}":/0') as opened:
        assert source.tags().get("AREA_OR_POINT") == area_or_point
        assert opened.crs == source.crs
        assert opened.transform.almost_equals(source.transform, precision=1e-9)


def test_rotated_geotiff_is_refused_clearly(make_model: Callable[..., Path], tmp_path: Path) -> None:
    image = _geotiff(tmp_path / "rotated.tif", Affine(2.0, 0.5, 1000.0, 0.5, -2.0, 5000.0))
    result = CliRunner().invoke(
        cli, ["run", str(image), "-m", str(make_model()), "-o", str(tmp_path / "o.zarr"), "--dtype", "float32"]
    )
    assert result.exit_code == 1
    assert "rotated or sheared" in result.stderr and str(image) in result.stderr


def test_input_without_resolution_is_in_pixels_and_says_so(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image = make_tiff(random_image((30, 30, 3)), photometric="rgb")
    result = CliRunner().invoke(
        cli, ["run", str(image), "-m", str(make_model()), "-o", str(tmp_path / "o.zarr"), "--dtype", "float32"]
    )
    assert result.exit_code == 0
    assert result.stderr.count("records no pixel size") == 1
    axes = zarr.open_group(str(tmp_path / "o.zarr"), mode="r").attrs["multiscales"][0]["axes"]
    assert all("unit" not in axis for axis in axes)


def test_gdal_internal_mask_gets_no_prediction(make_model: Callable[..., Path], tmp_path: Path) -> None:
    image = tmp_path / "masked.tif"
    profile = {"driver": "GTiff", "width": 64, "height": 48, "count": 3, "dtype": "uint8", "crs": "EPSG:3857"}
    layout = {"tiled": True, "blockxsize": 16, "blockysize": 16, "transform": Affine(2, 0, 100, 0, -2, 900)}
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(image, "w", **profile, **layout) as dst:
        dst.write(random_image((3, 48, 64)))
        mask = np.full((48, 64), 255, np.uint8)
        mask[:10, :20] = 0
        dst.write_mask(mask)
    labels = run(image, make_model(), tmp_path / "o.zarr")[LABELS][:]
    np.testing.assert_array_equal(labels == NODATA_LABEL, mask == 0)


def test_class_names_and_colours_from_the_config(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image = make_tiff(random_image((30, 30, 3)), photometric="rgb")
    flags = ["--classes", "background,stroma,tumour", "--colors", "#000000,#3CB44B,#E6194B"]
    attrs = run(image, make_model(num_classes=3), tmp_path / "o.zarr", *flags).attrs
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["background", "stroma", "tumour"]
    assert [c["color"] for c in attrs["omero"]["channels"]] == ["000000", "3CB44B", "E6194B"]
    label = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")["labels/argmax"].attrs["image-label"]
    assert label["colors"][2] == {"label-value": 2, "rgba": [230, 25, 75, 255]}
    assert label["properties"][1] == {"label-value": 1, "name": "stroma"}
    bad = CliRunner().invoke(
        cli,
        ["run", str(image), "-m", str(make_model(num_classes=3)), "-o", str(tmp_path / "b.zarr"), "--classes", "a,b"],
    )
    assert bad.exit_code == 2 and "model.class_names has 2 entries but the model has 3 classes" in bad.stderr


@pytest.fixture(scope="module")
def confident_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """RGB.byte.tif (a nodata collar) through ``fcnpipe run`` as a process with a model so confident
    that most probabilities are exactly 0: one store per format and dtype."""
    import subprocess
    import sys

    from tests.conftest import REAL_DATA, confident_model

    if not (REAL_DATA / "README.md").is_file():
        pytest.skip(f"real TIFF collection not found at {REAL_DATA}")
    folder = tmp_path_factory.mktemp("zeros")
    model = confident_model(folder / "confident.pt")
    stores = {}
    for version in ("0.4", "0.5"):
        for dtype in ("uint8", "float32"):
            out = folder / f"rgb-{version}-{dtype}.zarr"
            args = ["run", REAL_DATA / "RGB.byte.tif", "-m", model, "-o", out, "--format", f"ome-zarr-{version}"]
            args += ["--dtype", dtype, "--no-preview", "--no-progress"]
            if (version, dtype) == ("0.4", "uint8"):  # the default store, as a user's process makes it
                done = subprocess.run(
                    [sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True
                )
                assert done.returncode == 0, done.stderr
            else:
                result = CliRunner().invoke(cli, [str(a) for a in args])
                assert result.exit_code == 0, result.output
            stores[(version, dtype)] = out
    return stores


def stored_values(store: Path) -> tuple[np.ndarray, np.ndarray]:
    """Level 0's probabilities as stored, and where there is data (label not 255)."""
    group = zarr.open_group(str(store), mode="r")
    return group[PROBABILITIES][:], group[LABELS][:] != NODATA_LABEL


def check_read_back(read: np.ndarray, stored: np.ndarray, valid: np.ndarray) -> None:
    """What a reader returns for ``(C, Y, X)`` stored probabilities: the stored value wherever there is
    data (zero included), and missing (NaN) wherever there is none."""
    assert (stored[:, valid] == 0).sum() > 100_000  # zeros are most of the data: RGB.byte.tif, 383,115 px
    assert not np.isnan(read[:, valid]).any(), f"{np.isnan(read[:, valid]).sum()} valid values read as missing"
    np.testing.assert_array_equal(read[:, valid], stored[:, valid].astype(read.dtype))
    assert np.isnan(read[:, ~valid]).all() and (~valid).sum() > 100_000  # the collar


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_zero_is_a_value_in_xarray_and_rioxarray(
    confident_stores: dict[tuple[str, str], Path], version: str, dtype: str
) -> None:
    import xarray as xr

    store = confident_stores[(version, dtype)]
    stored, valid = stored_values(store)
    dataset = xr.open_zarr(store, consolidated=False)  # default decoding: the fill value is missing
    check_read_back(dataset[PROBABILITIES].values, stored, valid)
    labels = xr.open_zarr(store, group="labels/argmax", consolidated=False)[PROBABILITIES].values
    assert np.isnan(labels[~valid]).all() and not np.isnan(labels[valid]).any()
    if version == "0.4":  # GDAL reads Zarr v2 only: rioxarray's own reader, through it
        import rioxarray

        opened = rioxarray.open_rasterio(f'ZARR:"{store}":/{PROBABILITIES}', masked=True)
        check_read_back(np.asarray(opened.values), stored, valid)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_zero_is_a_value_in_gdal_3_10_and_debian_gdal(
    confident_stores: dict[tuple[str, str], Path], tmp_path: Path, dtype: str
) -> None:
    """rasterio's GDAL and Debian's gdal-bin (GDAL 3.6, as under QGIS LTR) see no data only where
    there is none: their NoData is the fill value, 255 or NaN, never the probability 0."""
    import subprocess

    import tifffile

    from tests.conftest import debian_tool

    store = confident_stores[("0.4", dtype)]
    stored, valid = stored_values(store)
    with rasterio.open(f'ZARR:"{store}":/{PROBABILITIES}') as opened:
        assert opened.count == 3
        assert opened.nodata == 255 if dtype == "uint8" else np.isnan(opened.nodata)
        masked = opened.read(masked=True)
        np.testing.assert_array_equal(masked.mask, np.broadcast_to(~valid, masked.shape))
        np.testing.assert_array_equal(masked.data[:, valid], stored[:, valid])
    translate, info = debian_tool("gdal_translate"), debian_tool("gdalinfo")
    for band in range(3):
        source = f'ZARR:"{store}":/{PROBABILITIES}:{band}'  # GDAL 3.6 needs the class index
        described = subprocess.run([info, source], capture_output=True, text=True, check=True).stdout
        assert ("NoData Value=255" if dtype == "uint8" else "NoData Value=nan") in described, described
        copy = tmp_path / f"band{band}.tif"
        subprocess.run([translate, "-q", source, str(copy)], check=True)
        np.testing.assert_array_equal(tifffile.imread(copy)[valid], stored[band][valid])
