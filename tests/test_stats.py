"""Class areas: counted by the run's tasks, right under resume, in physical units, and per region.

Every count is checked against one made independently here: a numpy bincount of the stored
level-0 labels, and a numpy point-in-polygon test of the pixel centres for regions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.compute.tasks import compute_results
from pipeline.config import load_config
from pipeline.run.execute import StoreWriter, execute
from pipeline.run.plan import prepare
from pipeline.store.layout import LABELS
from pipeline.store.reading import open_store, store_stats
from pipeline.store.record import ATTRIBUTE
from tests.conftest import random_image

FIXED = ["--tile", "64", "--workers", "2", "--torch-threads", "1", "--no-progress", "--no-preview"]


def slide(folder: Path, shape: tuple[int, int] = (200, 300), mpp: float = 0.5, seed: int = 1) -> Path:
    """An RGB TIFF of ``mpp`` micrometres per pixel."""
    path = folder / f"slide{seed}.tif"
    resolution = (1e4 / mpp, 1e4 / mpp)
    tifffile.imwrite(
        path,
        random_image((*shape, 3), seed=seed),
        photometric="rgb",
        resolution=resolution,
        resolutionunit="CENTIMETER",
    )
    return path


def geotiff(folder: Path, pixel: float = 10.0, epsg: int = 32633) -> Path:
    """A 120 x 160 UTM GeoTIFF of ``pixel`` m pixels whose top-left 40 x 50 block is no data (0)."""
    data = random_image((120, 160, 3), seed=5)
    data[data == 0] = 1
    data[:40, :50] = 0
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg]
    tags = [
        (33550, "d", 3, (pixel, pixel, 0.0), False),
        (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), False),
        (34735, "H", len(keys), keys, False),
        (42113, "s", 0, "0", True),
    ]
    path = folder / "raster.tif"
    tifffile.imwrite(path, data, photometric="rgb", extratags=tags)
    return path


def run(image: Path, model: Path, store: Path, *more: str) -> str:
    done = CliRunner().invoke(cli, ["run", str(image), "-m", str(model), "-o", str(store), *FIXED, *more])
    assert done.exit_code == 0, done.output
    return done.output


def labels_of(store: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store), mode="r")[LABELS][...])


def stats_json(store: Path, *more: str) -> dict[str, Any]:
    done = CliRunner().invoke(cli, ["stats", str(store), "--json", *more])
    assert done.exit_code == 0, done.output
    loaded: dict[str, Any] = json.loads(done.output)
    return loaded


def test_a_slide_run_records_areas_equal_to_a_bincount_of_its_stored_labels(
    make_model: Callable[..., Path], tmp_path: Path
) -> None:
    store = tmp_path / "s.zarr"
    output = run(slide(tmp_path), make_model(), store)
    labels = labels_of(store)
    counts = np.bincount(labels.ravel(), minlength=256)
    stats = zarr.open_group(str(store), mode="r").attrs[ATTRIBUTE]["stats"]
    classes = stats["classes"]
    assert [classes[f"class_{k}"]["pixels"] for k in range(3)] == counts[:3].tolist()
    assert sum(counts[:3]) == labels.size and min(counts[:3]) > 0  # every pixel labelled; all classes seen
    assert stats["labelled"]["pixels"] == sum(c["pixels"] for c in classes.values()) == labels.size
    assert stats["nodata_pixels"] == 0 and stats["pixel_area"] == 0.25 and stats["pixel_area_unit"] == "µm²"
    for values in classes.values():
        assert values["area_um2"] == values["pixels"] * 0.25
        assert values["area_mm2"] == pytest.approx(values["pixels"] * 0.25e-6)
        assert values["share"] == pytest.approx(values["pixels"] / labels.size)
    assert sum(c["area_mm2"] for c in classes.values()) == pytest.approx(stats["labelled"]["area_mm2"])
    assert stats_json(store) == {"store": str(store), **stats}
    line = next(line for line in output.splitlines() if line.startswith("class  class_1"))
    assert f"{counts[1]:,} px" in line and "mm²" in line and "µm²" in line


def test_a_resumed_run_counts_the_chunks_of_earlier_runs_like_an_uninterrupted_one(
    make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image, model = slide(tmp_path, (256, 320), seed=2), make_model()

    def config(store: Path, resume: bool) -> Any:
        return load_config(
            overrides={
                "input": {"path": str(image)},
                "model": {"path": str(model)},
                "output": {"path": str(store), "resume": resume},
                "tiling": {"tile": 64},
                "compute": {"workers": 2, "torch_threads": 1},
            }
        )

    whole = execute(prepare(config(tmp_path / "whole.zarr", False)))
    store = tmp_path / "resumed.zarr"
    with StoreWriter(prepare(config(store, False))) as writer:  # a run that stops after 3 of its tasks
        tasks = writer.tasks()
        compute_results(tasks[:3], writer.plan.engine, workers=1)
    assert not zarr.open_group(str(store), mode="r").attrs[ATTRIBUTE]["complete"]
    resumed = execute(prepare(config(store, True)))
    assert len(tasks) > 3 and resumed.chunks_resumed > 0 and resumed.chunks_computed > 0
    assert resumed.chunks_resumed + resumed.chunks_computed == resumed.chunks - resumed.chunks_background
    assert resumed.stats == whole.stats
    counts = np.bincount(labels_of(store).ravel(), minlength=256)
    assert [resumed.stats["classes"][f"class_{k}"]["pixels"] for k in range(3)] == counts[:3].tolist()  # type: ignore[index]


def test_a_metric_geotiff_has_areas_in_square_metres_and_hectares_and_no_data_in_no_class(
    make_model: Callable[..., Path], tmp_path: Path
) -> None:
    store = tmp_path / "r.zarr"
    run(geotiff(tmp_path), make_model(), store)
    labels = labels_of(store)
    counts = np.bincount(labels.ravel(), minlength=256)
    stats = stats_json(store)
    assert stats["pixel_area"] == 100.0 and stats["pixel_area_unit"] == "m²"
    assert stats["nodata_pixels"] == counts[255] >= 40 * 50
    assert stats["labelled"]["pixels"] == labels.size - counts[255] == sum(counts[:3])
    for k in range(3):
        values = stats["classes"][f"class_{k}"]
        assert values["pixels"] == counts[k]
        assert values["area_m2"] == counts[k] * 100.0 and values["area_ha"] == pytest.approx(counts[k] * 0.01)


def test_a_store_without_stats_is_counted_on_the_fly(make_model: Callable[..., Path], tmp_path: Path) -> None:
    store = tmp_path / "old.zarr"
    run(slide(tmp_path), make_model(), store)
    recorded = stats_json(store)
    group = zarr.open_group(str(store), mode="r+")
    attribute = dict(group.attrs[ATTRIBUTE])
    del attribute["stats"]  # as an fcnpipe before this one wrote it
    group.attrs[ATTRIBUTE] = attribute
    assert open_store(str(store), complete=True).record.stats is None
    assert store_stats(open_store(str(store), complete=True)) == {k: v for k, v in recorded.items() if k != "store"}
    assert stats_json(store) == recorded


def inside(polygon: list[list[tuple[float, float]]], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd ray casting over every ring of a polygon (outer and holes): where points are inside."""
    result = np.zeros(xs.shape, bool)
    for ring in polygon:
        for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1], strict=True):
            crosses = (y0 > ys) != (y1 > ys)
            with np.errstate(divide="ignore", invalid="ignore"):
                at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
            result ^= crosses & (xs < at)
    return result


POLYGONS = {
    "triangle": [[(10.3, 5.2), (250.7, 40.1), (90.4, 180.6)]],
    "square with a hole": [
        [(150.2, 20.1), (290.3, 20.4), (290.1, 150.2), (150.4, 150.3)],
        [(180.7, 50.2), (240.2, 60.1), (200.1, 120.3)],
    ],
    "past the edge": [[(-40.5, 150.5), (120.2, 130.4), (60.3, 260.7)]],
}


def qupath(
    path: Path, polygons: dict[str, list[list[tuple[float, float]]]], shift: tuple[float, float] = (0, 0)
) -> Path:
    """A QuPath GeoJSON export: annotations with a classification, in level-0 pixels."""
    features = [
        {
            "type": "Feature",
            "id": f"id-{i}",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x + shift[0], y + shift[1]] for x, y in ring + ring[:1]] for ring in rings],
            },
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [255, 0, 0]}},
        }
        for i, (name, rings) in enumerate(polygons.items())
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def independent(labels: np.ndarray, rings: list[list[tuple[float, float]]]) -> list[int]:
    ys, xs = np.mgrid[0 : labels.shape[0], 0 : labels.shape[1]] + 0.5
    return np.bincount(labels[inside(rings, xs, ys)], minlength=256)[:3].tolist()  # type: ignore[no-any-return]


def test_region_areas_equal_a_numpy_point_in_polygon_count_of_the_pixel_centres(
    make_model: Callable[..., Path], tmp_path: Path
) -> None:
    store = tmp_path / "s.zarr"
    run(slide(tmp_path, (200, 300)), make_model(), store)
    labels = labels_of(store)
    found = stats_json(store, "--regions", str(qupath(tmp_path / "a.geojson", POLYGONS)))["regions"]
    assert [r["name"] for r in found] == list(POLYGONS)
    for region, rings in zip(found, POLYGONS.values(), strict=True):
        expected = independent(labels, rings)
        assert [region["classes"][f"class_{k}"]["pixels"] for k in range(3)] == expected
        assert region["labelled"]["pixels"] == region["pixels"] == sum(expected) > 1000
        assert region["classes"]["class_0"]["area_um2"] == expected[0] * 0.25
    text = CliRunner().invoke(cli, ["stats", str(store), "--regions", str(tmp_path / "a.geojson")]).output
    assert "region 0 triangle:" in text and "mm²" in text


def test_regions_of_a_window_run_are_placed_by_the_window_offset(
    make_model: Callable[..., Path], tmp_path: Path
) -> None:
    store = tmp_path / "w.zarr"
    run(slide(tmp_path, (300, 400)), make_model(), store, "--window", "64", "32", "300", "200")
    labels = labels_of(store)
    shifted = qupath(tmp_path / "w.geojson", POLYGONS, shift=(64, 32))  # level-0 pixels of the whole slide
    found = stats_json(store, "--regions", str(shifted))["regions"]
    for region, rings in zip(found, POLYGONS.values(), strict=True):
        assert [region["classes"][f"class_{k}"]["pixels"] for k in range(3)] == independent(labels, rings)


def test_a_geopackage_in_the_rasters_crs_is_mapped_through_the_inverse_transform(
    make_model: Callable[..., Path], tmp_path: Path
) -> None:
    import pyogrio.raw
    import shapely

    store = tmp_path / "r.zarr"
    run(geotiff(tmp_path), make_model(), store)
    labels = labels_of(store)
    pixels = [[(20.3, 10.2), (150.6, 30.1), (70.2, 110.7)]]  # in grid pixels: x = 500000 + 10 col, y = 4e6 - 10 row
    crs = [[(500000 + 10 * x, 4000000 - 10 * y) for x, y in ring] for ring in pixels]
    path = tmp_path / "fields.gpkg"
    wkb = np.array([shapely.to_wkb(shapely.Polygon(crs[0]))], dtype=object)
    pyogrio.raw.write(
        path, wkb, [np.array(["field 1"], dtype=object)], ["name"], geometry_type="Polygon", crs="EPSG:32633"
    )
    (region,) = stats_json(store, "--regions", str(path))["regions"]
    expected = independent(labels, pixels)
    assert region["name"] == "field 1"
    assert [region["classes"][f"class_{k}"]["pixels"] for k in range(3)] == expected
    assert region["nodata_pixels"] > 0 and region["labelled"]["area_ha"] == pytest.approx(sum(expected) * 0.01)
    pyogrio.raw.write(tmp_path / "other.gpkg", wkb, [], [], geometry_type="Polygon", crs="EPSG:4326")
    refused = CliRunner().invoke(cli, ["stats", str(store), "--regions", str(tmp_path / "other.gpkg")])
    assert refused.exit_code == 2 and "reproject" in refused.output
