"""Polygons of the label map: chunk by chunk equals the whole map at once (rasterio / GDAL), and
the files QuPath and GIS tools read back."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import tifffile
import torch
import zarr
from click.testing import CliRunner
from rasterio.features import shapes
from rasterio.transform import Affine

from pipeline.cli import cli
from pipeline.model.network import ReferenceFCN
from pipeline.store.layout import LABEL_GROUP
from pipeline.store.record import read_record, write_record
from pipeline.vector.polygons import regions, tidy
from tests.conftest import debian_tool, random_image

ByLabel = dict[int, list[Any]]


def whole_image(labels: np.ndarray, connectivity: int) -> ByLabel:
    """rasterio's polygons of the whole map at once, per label (no data left out), made valid: GDAL
    writes a ring that touches itself where OGC wants a hole that touches the shell."""
    found: ByLabel = {}
    for geometry, value in shapes(labels, connectivity=connectivity):
        if int(value) != 255:
            found.setdefault(int(value), []).append(shapely.make_valid(shapely.geometry.shape(geometry)))
    return found


def chunked(labels: Any, connectivity: int, chunk: tuple[int, int] | None) -> ByLabel:
    found: ByLabel = {}
    for region in regions(labels, connectivity=connectivity, chunk=chunk):
        found.setdefault(region.label, []).append(region.geometry)
    return found


def assert_same_polygons(expected: ByLabel, got: ByLabel) -> None:
    """The same polygons per label: one to one, each pair topologically equal (symmetric
    difference of area 0), whatever the order of regions and vertices."""
    assert sorted(got) == sorted(expected)
    for label, wanted in expected.items():
        mine = got[label]
        assert len(mine) == len(wanted), f"label {label}: {len(mine)} polygons, whole image {len(wanted)}"
        assert all(shapely.is_valid(mine))
        tree = shapely.STRtree(wanted)
        for geometry in mine:
            candidates = [wanted[i] for i in tree.query(geometry.representative_point(), predicate="intersects")]
            matching = [g for g in candidates if shapely.equals(g, geometry)]
            assert len(matching) == 1, f"label {label}: {geometry.wkt[:120]} is no polygon of the whole image"
            assert shapely.symmetric_difference(matching[0], geometry).area == 0


def blob_map(height: int, width: int, seed: int) -> np.ndarray:
    """Random labels 0-2 smoothed into blobs, with some no data: many regions, holes, islands."""
    rng = np.random.default_rng(seed)
    noise = rng.random((height // 3 + 2, width // 3 + 2))
    big = np.kron(noise, np.ones((3, 3)))[:height, :width] + 0.4 * rng.random((height, width))
    labels = np.digitize(big, [0.5, 0.9]).astype(np.uint8)
    labels[rng.random((height, width)) < 0.03] = 255
    return labels


@pytest.mark.parametrize("connectivity", [4, 8], ids=["4-connected", "8-connected"])
@pytest.mark.parametrize("chunk", [(5, 7), (16, 16), (13, 64), (64, 3)], ids=lambda c: f"chunk{c[0]}x{c[1]}")
@pytest.mark.parametrize("shape", [(37, 53), (64, 41)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_chunked_polygons_equal_the_whole_image(
    shape: tuple[int, int], chunk: tuple[int, int], connectivity: int
) -> None:
    labels = blob_map(*shape, seed=shape[0] + chunk[1])
    assert_same_polygons(whole_image(labels, connectivity), chunked(labels, connectivity, chunk))


@pytest.mark.parametrize("connectivity", [4, 8], ids=["4-connected", "8-connected"])
def test_chunks_with_nothing_kept_are_passed_over(connectivity: int) -> None:
    """Whole chunks of no data, or of a class left out (background, by default in exports), hold
    no polygon, and the regions around them are still those of the whole map."""
    labels = blob_map(50, 70, seed=3)
    labels[:16, :16] = 255  # a chunk of no data
    labels[16:32, 32:48] = 0  # a chunk all of class 0, which is left out below
    found: ByLabel = {}
    for region in regions(labels, connectivity=connectivity, keep=[1, 2], chunk=(16, 16)):
        found.setdefault(region.label, []).append(region.geometry)
    expected = {k: v for k, v in whole_image(labels, connectivity).items() if k in (1, 2)}
    assert_same_polygons(expected, found)


@pytest.mark.parametrize("connectivity", [4, 8], ids=["4-connected", "8-connected"])
def test_salt_and_pepper_with_diagonal_contacts_everywhere(connectivity: int) -> None:
    labels = np.random.default_rng(3).integers(0, 3, (29, 31)).astype(np.uint8)
    assert_same_polygons(whole_image(labels, connectivity), chunked(labels, connectivity, (4, 6)))


def test_a_snake_through_many_chunks_is_one_polygon() -> None:
    labels = np.zeros((41, 41), np.uint8)
    labels[1::4, 1:-1] = 1
    for row in range(1, 37, 4):  # join the rows at alternate ends: one path through every chunk
        labels[row : row + 5, 1 if row % 8 == 5 else 39] = 1
    got = chunked(labels, 4, (6, 6))
    assert len(got[1]) == 1 and got[1][0].geom_type == "Polygon"
    assert got[1][0].area == int((labels == 1).sum())
    assert_same_polygons(whole_image(labels, 4), got)


@pytest.mark.parametrize("connectivity", [4, 8], ids=["4-connected", "8-connected"])
def test_regions_meeting_at_a_chunk_corner(connectivity: int) -> None:
    labels = np.zeros((8, 12), np.uint8)  # 4 x 4 chunks: corners at (4, 4) and (4, 8)
    labels[2:6, 2:6] = 1  # a square over four chunks
    labels[3, 7], labels[4, 8] = 2, 2  # across the corner (4, 8): one diagonal of one class
    labels[3, 8], labels[4, 7] = 3, 3  # and the other diagonal of another, in three chunks
    got = chunked(labels, connectivity, (4, 4))
    assert len(got[1]) == 1 and got[1][0].area == 16 and got[1][0].geom_type == "Polygon"
    assert len(got[2]) == len(got[3]) == (1 if connectivity == 8 else 2)
    assert_same_polygons(whole_image(labels, connectivity), got)


def test_holes_and_islands_in_holes_that_close_across_chunks() -> None:
    labels = np.zeros((20, 20), np.uint8)
    labels[2:18, 2:18] = 1
    labels[4:16, 4:16] = 2  # the hole of the ring
    labels[7:13, 7:13] = 1  # an island of class 1 in it
    labels[9:11, 9:11] = 0  # and a hole in the island
    got = chunked(labels, 4, (6, 7))
    assert_same_polygons(whole_image(labels, 4), got)
    ring, island = sorted(got[1], key=lambda g: -g.area)
    assert len(ring.interiors) == 1 and len(island.interiors) == 1
    assert ring.area == 16 * 16 - 12 * 12 and island.area == 36 - 4


def test_areas_equal_pixel_counts_and_pieces_need_no_straight_vertices() -> None:
    labels = blob_map(50, 70, seed=9)
    got = chunked(labels, 4, (8, 9))
    for label, polygons in got.items():
        assert sum(g.area for g in polygons) == int((labels == label).sum())
    tidied = tidy(np.array(got[1], dtype=object))
    assert all(shapely.equals(tidied, got[1]))
    expected = sum(shapely.get_num_coordinates(g) for g in whole_image(labels, 4)[1])
    assert int(shapely.get_num_coordinates(tidied).sum()) <= expected


def test_a_zarr_array_is_read_by_its_own_chunks(tmp_path: Path) -> None:
    labels = blob_map(45, 38, seed=2)
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=labels.shape, chunks=(10, 12), dtype="uint8")
    array[:] = labels
    assert_same_polygons(whole_image(labels, 8), chunked(array, 8, None))


# ---- stores and files -------------------------------------------------------------------------

NAMES = ["background", "tumour", "stroma"]
COLORS = [[200, 200, 200], [230, 40, 40], [40, 160, 60]]


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def relabelled(store: Path, labels: np.ndarray, **spatial: Any) -> Path:
    """``store`` with ``labels`` as its level-0 label map, the classes :data:`NAMES` and ``spatial``
    merged into its record."""
    group = zarr.open_group(str(store), mode="r+")
    group[f"{LABEL_GROUP}/0"][:] = labels
    record = read_record(str(store))
    model = {**record.model, "classes": [{"name": n, "color": c} for n, c in zip(NAMES, COLORS, strict=True)]}
    write_record(str(store), dataclasses.replace(record, model=model, spatial={**record.spatial, **spatial}))
    return store


@pytest.fixture(scope="module")
def slide_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished store of a 48 x 60 px slide, its labels replaced by a map of blobs."""
    folder = tmp_path_factory.mktemp("slide")
    tifffile.imwrite(folder / "slide.tif", random_image((48, 60, 3)), photometric="rgb")
    torch.manual_seed(0)
    torch.save(ReferenceFCN(3, 3, 8).state_dict(), folder / "m.pt")
    run("run", str(folder / "slide.tif"), "-m", str(folder / "m.pt"), "-o", str(folder / "s.zarr"), "-q")
    return relabelled(folder / "s.zarr", blob_map(48, 60, seed=5))


def qupath_problems(document: Any, names: list[str]) -> list[str]:
    """What QuPath 0.4-0.6's GeoJSON import would refuse or misread in ``document``."""
    problems = []
    if document.get("type") != "FeatureCollection" or not isinstance(document.get("features"), list):
        return ["not a FeatureCollection with a list of features"]
    for n, feature in enumerate(document["features"]):
        properties = feature.get("properties") or {}
        classification = properties.get("classification") or {}
        geometry = feature.get("geometry") or {}
        checks = {
            "type Feature": feature.get("type") == "Feature",
            "a UUID id": isinstance(feature.get("id"), str) and str(uuid.UUID(feature["id"])) == feature["id"],
            "an objectType": properties.get("objectType") in ("annotation", "detection"),
            "a known class": classification.get("name") in names,
            "an [r, g, b] colour": isinstance(classification.get("color"), list)
            and len(classification["color"]) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in classification["color"]),
            "a (Multi)Polygon": geometry.get("type") in ("Polygon", "MultiPolygon"),
            "no one-polygon MultiPolygon": not (
                geometry.get("type") == "MultiPolygon" and len(geometry["coordinates"]) == 1
            ),
        }
        problems += [f"feature {n}: not {what}" for what, ok in checks.items() if not ok]
        rings = geometry.get("coordinates") or []
        rings = [r for p in rings for r in p] if geometry.get("type") == "MultiPolygon" else rings
        problems += [f"feature {n}: an open or short ring" for r in rings if len(r) < 4 or r[0] != r[-1]]
        if not shapely.geometry.shape(geometry).is_valid:
            problems.append(f"feature {n}: invalid geometry")
    return problems


def read_geojson(path: Path) -> Any:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as file:
        return json.load(file)


@pytest.mark.parametrize("name", ["regions.geojson", "regions.geojson.gz"])
def test_qupath_geojson_of_a_slide(slide_store: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    output = run("export", str(slide_store), "-o", str(out), "--object-type", "detection")
    document = read_geojson(out)
    assert qupath_problems(document, NAMES) == []
    features = document["features"]
    assert f"({len(features):,} polygons)" in output
    assert {f["properties"]["objectType"] for f in features} == {"detection"}
    labels = blob_map(48, 60, seed=5)
    by_class: ByLabel = {}
    for feature in features:
        label = NAMES.index(feature["properties"]["classification"]["name"])
        assert feature["properties"]["classification"]["color"] == COLORS[label]
        by_class.setdefault(label, []).append(shapely.geometry.shape(feature["geometry"]))
    expected = whole_image(labels, 4)
    del expected[0]  # the background class is skipped by default
    assert_same_polygons(expected, by_class)


def test_class_choice_min_area_and_fill_holes(slide_store: Path, tmp_path: Path) -> None:
    labels = blob_map(48, 60, seed=5)
    everything = whole_image(labels, 4)
    out = tmp_path / "a.geojson"
    run("export", str(slide_store), "-o", str(out), "--class", "background", "--min-area", "6", "--fill-holes")
    features = read_geojson(out)["features"]
    assert {f["properties"]["classification"]["name"] for f in features} == {"background"}
    kept = [g for g in everything[0] if g.area >= 6]
    assert len(features) == len(kept) and any(len(g.interiors) for g in kept)
    got = [shapely.geometry.shape(f["geometry"]) for f in features]
    assert all(len(g.interiors) == 0 for g in got)
    assert sorted(g.area for g in got) == sorted(shapely.Polygon(g.exterior).area for g in kept)
    run("export", str(slide_store), "-o", str(out), "--skip-class", "tumour", "--overwrite")
    assert {f["properties"]["classification"]["name"] for f in read_geojson(out)["features"]} == {
        "background",
        "stroma",
    }


def test_simplify_keeps_shared_edges_shared(slide_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.geojson"
    run("export", str(slide_store), "-o", str(out), "--class", "tumour", "--class", "stroma", "--simplify", "1.5")
    got = [shapely.geometry.shape(f["geometry"]) for f in read_geojson(out)["features"]]
    plain = [g for k in (1, 2) for g in whole_image(blob_map(48, 60, seed=5), 4)[k]]
    assert len(got) == len(plain) and all(shapely.is_valid(got))
    assert sum(shapely.get_num_coordinates(got)) < sum(shapely.get_num_coordinates(plain))
    coverage = shapely.union_all(got)
    assert abs(coverage.area - sum(g.area for g in got)) < 1e-6  # no overlaps, no gaps opened between them
    assert abs(coverage.area - shapely.union_all(plain).area) < 0.05 * coverage.area


def test_coordinates_are_level0_pixels_of_the_slide(slide_store: Path, tmp_path: Path) -> None:
    """A run that read level 1 (6x smaller than level 0), resampled it by 1.5 and computed the window
    at column 8, row 4 of that grid: a grid pixel is 9 level-0 pixels, offset by the window."""
    store = tmp_path / "moved.zarr"
    shutil.copytree(slide_store, store)
    record = read_record(str(store))
    spatial = {**record.spatial, "level_read": 1, "level0_shape": [48 * 6, 60 * 6]}
    write_record(str(store), dataclasses.replace(record, spatial=spatial))
    relabelled(store, blob_map(48, 60, seed=5), resampling=[1.5, 1.5], window=[8, 4, 60, 48])
    out = tmp_path / "l0.geojson"
    run("export", str(store), "-o", str(out), "--class", "tumour")
    got = sorted(shapely.geometry.shape(f["geometry"]).bounds for f in read_geojson(out)["features"])
    scale = 1.5 * 288 / 48  # the resampling times level 0's size over the level read's
    expected = sorted(
        ((x0 + 8) * scale, (y0 + 4) * scale, (x1 + 8) * scale, (y1 + 4) * scale)
        for x0, y0, x1, y1 in (g.bounds for g in whole_image(blob_map(48, 60, seed=5), 4)[1])
    )
    assert got == expected


def test_wrong_options_are_refused_in_one_line(slide_store: Path, tmp_path: Path) -> None:
    cases = [
        (["-o", str(tmp_path / "a.geojson"), "--dtype", "uint8"], "apply to a TIFF export"),
        (["-o", str(tmp_path / "a.tif"), "--fill-holes"], "apply to polygons"),
        (["-o", str(tmp_path / "a.geojson"), "--class", "nerve"], "unknown class 'nerve'"),
        (["-o", str(tmp_path / "a.geojson"), "--min-area", "5m2"], "needs a store whose pixels are in m²"),
        (["-o", str(tmp_path / "a.geojson"), "--min-area", "five"], "Expected an area like"),
        (["-o", str(tmp_path / "a.gpkg"), "--object-type", "detection"], "an object type is QuPath's"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["export", str(slide_store), *args])
        assert result.exit_code != 0 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    (tmp_path / "b.geojson").write_text("{}")
    result = CliRunner().invoke(cli, ["export", str(slide_store), "-o", str(tmp_path / "b.geojson")])
    assert result.exit_code != 0 and "already exists; pass --overwrite" in result.output


@pytest.fixture(scope="module")
def raster_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished store of a 40 x 50 px GeoTIFF in EPSG:32618 (30 m pixels), blob labels."""
    folder = tmp_path_factory.mktemp("raster")
    profile = {"driver": "GTiff", "width": 50, "height": 40, "count": 3, "dtype": "uint8", "crs": "EPSG:32618"}
    with rasterio.open(
        folder / "scene.tif", "w", transform=Affine(30, 0, 500_000, 0, -30, 4_200_000), **profile
    ) as dst:
        dst.write(random_image((3, 40, 50)))
    torch.manual_seed(0)
    torch.save(ReferenceFCN(3, 3, 8).state_dict(), folder / "m.pt")
    run("run", str(folder / "scene.tif"), "-m", str(folder / "m.pt"), "-o", str(folder / "r.zarr"), "-q")
    return relabelled(folder / "r.zarr", blob_map(40, 50, seed=8))


@pytest.mark.parametrize("name", ["regions.gpkg", "regions.fgb"])
@pytest.mark.parametrize("connectivity", ["4", "8"])
def test_gis_files_in_the_crs_read_back(raster_store: Path, tmp_path: Path, name: str, connectivity: str) -> None:
    out = tmp_path / name
    run("export", str(raster_store), "-o", str(out), "--connectivity", connectivity, "--min-area", "1800m2")
    info = pyogrio.read_info(out)
    assert info["crs"] == "EPSG:32618" and info["layer_name"] == "regions"
    meta, _, wkb, fields = pyogrio.raw.read(out)
    geometries = shapely.from_wkb(wkb)
    classes, areas = fields[list(meta["fields"]).index("class")], fields[list(meta["fields"]).index("area")]
    assert set(classes) == {"tumour", "stroma"}
    assert np.allclose(areas, shapely.area(geometries)) and areas.min() >= 1800
    pixel = whole_image(blob_map(40, 50, seed=8), int(connectivity))
    expected = [g for k in (1, 2) for g in pixel[k] if g.area * 900 >= 1800]
    assert len(geometries) == len(expected)
    to_crs = [30.0, 0.0, 0.0, -30.0, 500_000.0, 4_200_000.0]
    assert sorted(shapely.area(geometries)) == pytest.approx(sorted(g.area * 900 for g in expected))
    bounds = shapely.total_bounds(geometries)
    assert list(bounds) == pytest.approx(
        list(shapely.affinity.affine_transform(shapely.union_all(expected), to_crs).bounds)
    )
    ogrinfo = debian_tool("ogrinfo")
    done = subprocess.run([ogrinfo, "-so", "-al", str(out)], capture_output=True, text=True, check=True)
    assert "partially supported" not in done.stderr  # GeoPackage 1.2: what GDAL 3.6 (QGIS LTR) reads fully
    summary = done.stdout
    assert 'ID["EPSG",32618]' in summary and "Feature Count: " + str(len(expected)) in summary
    x0, y0, x1, y1 = bounds
    extent = re.search(r"Extent: \(([-\d.]+), ([-\d.]+)\) - \(([-\d.]+), ([-\d.]+)\)", summary)
    assert extent is not None and [float(v) for v in extent.groups()] == pytest.approx([x0, y0, x1, y1])


def test_geojson_of_a_raster_is_in_its_crs(raster_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.geojson"
    run("export", str(raster_store), "-o", str(out), "--class", "stroma")
    document = read_geojson(out)
    assert document["crs"]["properties"]["name"] == "EPSG:32618"
    x0, _, _, y1 = shapely.total_bounds([shapely.geometry.shape(f["geometry"]) for f in document["features"]])
    assert x0 >= 500_000 and y1 <= 4_200_000
