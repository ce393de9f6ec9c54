"""Foreground masks: the chunks a run computes are exactly those with tissue, data or a user's mark."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import zarr
from PIL import Image
from rasterio.transform import Affine

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.run.execute import execute
from pipeline.run.plan import prepare
from pipeline.source import mask as mask_module
from pipeline.source.foreground import (
    affordable_level,
    block_mean,
    chunk_mask_from_pixels,
    mask_level,
    otsu_threshold,
    saturation,
    tissue_pixels,
)
from pipeline.source.mask import ChunkMask, foreground_mask
from pipeline.source.pixels import read_masked
from pipeline.source.tiff import SourceInfo, open_source
from pipeline.store.layout import NODATA_LABEL
from pipeline.tiling import grid_shape
from tests.conftest import random_image

PINK, PURPLE = (232, 160, 198), (92, 58, 150)


def chunks_with(pixels: np.ndarray, tile: int) -> np.ndarray:
    """Ground truth: ``(rows, cols)`` bool, whether each ``tile x tile`` chunk of ``pixels`` has a True pixel."""
    height, width = pixels.shape
    rows, cols = grid_shape(height, width, tile)
    return np.array(
        [[pixels[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile].any() for c in range(cols)] for r in range(rows)]
    )


def reference_chunk_mask(fg: np.ndarray, shape: tuple[int, int], tile: int, margin: int) -> np.ndarray:
    """chunk_mask_from_pixels written as the obvious loop, with exact fractions."""
    (height, width), (fy, fx) = shape, fg.shape
    rows, cols = grid_shape(height, width, tile)
    keep = np.zeros((rows, cols), bool)
    for r in range(rows):
        y0, y1 = r * tile, min((r + 1) * tile, height)
        ly0, ly1 = max(0, math.floor(y0 * fy / height) - margin), min(fy, math.ceil(y1 * fy / height) + margin)
        for c in range(cols):
            x0, x1 = c * tile, min((c + 1) * tile, width)
            lx0, lx1 = max(0, math.floor(x0 * fx / width) - margin), min(fx, math.ceil(x1 * fx / width) + margin)
            keep[r, c] = fg[ly0:ly1, lx0:lx1].any()
    return keep


def write_slide(path: Path, rgb: np.ndarray, levels: int, tile: int = 256) -> Path:
    """A tiled RGB TIFF with ``levels - 1`` SubIFD levels, each the 2 x 2 mean of the one before (as scanners do)."""
    with tifffile.TiffWriter(path) as tif:
        options = {"tile": (tile, tile), "photometric": "rgb"}
        tif.write(rgb, subifds=levels - 1, **options)
        level = rgb
        for _ in range(levels - 1):
            level = np.moveaxis(block_mean(np.moveaxis(level, -1, 0), 2), 0, -1).round().astype(np.uint8)
            tif.write(level, subfiletype=1, **options)
    return path


def white(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Glass: every channel independently 240-255."""
    return np.random.default_rng(seed).integers(240, 256, (*shape, 3), dtype=np.uint8)


def paint(rgb: np.ndarray, where: np.ndarray, colour: tuple[int, int, int], seed: int = 1) -> None:
    noise = np.random.default_rng(seed).integers(-10, 11, (int(where.sum()), 3))
    rgb[where] = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 2048 x 3072 slide (4 levels) on white glass, and its level-0 tissue pixels.

    Tissue edges keep clear of chunk edges (256 px) they do not cross, except the middle block,
    which reaches only 4 px into chunk column 6: that chunk has tissue and must be kept.
    """
    height, width = 2048, 3072
    rgb = white((height, width))
    yy, xx = np.mgrid[:height, :width]
    tissue = np.zeros((height, width), bool)
    tissue[300:700, 100:900] = True
    tissue[1100:1400, 1200:1540] = True
    tissue |= (yy - 1500) ** 2 + (xx - 2500) ** 2 < 150**2
    paint(rgb, tissue, PINK)
    nuclei = tissue & ((yy // 12) % 3 == 0) & ((xx // 12) % 3 == 0)
    paint(rgb, nuclei, PURPLE, seed=2)
    return write_slide(tmp_path_factory.mktemp("slide") / "slide.tif", rgb, levels=4), tissue


# --- pure functions ---------------------------------------------------------------------------------------------


def test_otsu_finds_a_threshold_between_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.2, 0.03, 30_000), rng.normal(0.7, 0.05, 5_000)]).clip(0, 1)
    assert 0.3 < otsu_threshold(values) < 0.6


def test_otsu_of_a_constant_leaves_nothing_above() -> None:
    values = np.full((10, 10), 0.3)
    assert not (values > otsu_threshold(values)).any()
    with pytest.raises(ValueError, match="empty"):
        otsu_threshold(np.array([]))


@pytest.mark.parametrize(
    ("colour", "expected"),
    [((255, 255, 255), 0.0), ((255, 0, 0), 1.0), ((128, 128, 128), 0.0), ((0, 0, 0), 0.0), ((200, 100, 50), 0.75)],
    ids=["white", "red", "grey", "black", "orange"],
)
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_saturation_of_known_colours(colour: tuple[int, int, int], expected: float, dtype: str) -> None:
    scale = {"uint8": 1, "uint16": 257, "float32": 1 / 255}[dtype]
    rgb = (np.asarray(colour, np.float64) * scale).astype(dtype).reshape(3, 1, 1)
    result = saturation(np.broadcast_to(rgb, (3, 2, 4)))
    assert result.dtype == np.float32 and result.shape == (2, 4)
    np.testing.assert_allclose(result, expected, atol=1e-6)


def test_tissue_pixels_split_tissue_from_glass() -> None:
    rgb = white((40, 60))
    tissue = np.zeros((40, 60), bool)
    tissue[10:30, 20:50] = True
    paint(rgb, tissue, PINK)
    fg, threshold = tissue_pixels(np.moveaxis(rgb, -1, 0), None)
    assert 0.04 <= threshold <= 0.15
    np.testing.assert_array_equal(fg, tissue)
    fg, threshold = tissue_pixels(np.moveaxis(rgb, -1, 0), 0.5)
    assert threshold == 0.5 and not fg.any()  # pink is about 0.31


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [(PINK, PURPLE, True), ((240, 240, 240), (250, 250, 250), False)],
    ids=["stain", "glass"],
)
def test_the_clamp_keeps_a_one_class_image_whole(
    left: tuple[int, int, int], right: tuple[int, int, int], expected: bool
) -> None:
    """Otsu splits pale from dark stain (~0.45) and grey from grey (~0.01); the clamp overrules both."""
    rgb = np.zeros((64, 64, 3), np.uint8)
    halves = np.zeros((64, 64), bool)
    halves[:, :32] = True
    rng = np.random.default_rng(0)
    for where, colour in ((halves, left), (~halves, right)):
        rgb[where] = np.asarray(colour) + rng.integers(-2, 3, (int(where.sum()), 3))
    fg, threshold = tissue_pixels(np.moveaxis(rgb, -1, 0), None)
    assert threshold == (0.15 if expected else 0.04)
    assert fg.all() if expected else not fg.any()


def test_block_touching_known_chunks_keeps_exactly_them() -> None:
    shape, tile = (1000, 1300), 256  # 4 x 6 chunks, the last row and column partial
    fg = np.zeros(shape, bool)
    fg[300:400, 520:530] = True  # inside chunk (1, 2), away from its edges
    fg[999, 1299] = True  # the last pixel: chunk (3, 5)
    expected = np.zeros((4, 6), bool)
    expected[1, 2] = expected[3, 5] = True
    np.testing.assert_array_equal(chunk_mask_from_pixels(fg, shape, tile, margin=0), expected)
    np.testing.assert_array_equal(chunk_mask_from_pixels(fg, shape, tile, margin=1), expected)


def test_margin_keeps_the_neighbours_of_a_pixel_on_a_chunk_corner() -> None:
    fg = np.zeros((1000, 1300), bool)
    fg[511, 767] = True  # last row of chunk row 1, last column of chunk column 2
    assert list(zip(*np.nonzero(chunk_mask_from_pixels(fg, fg.shape, 256, margin=0)), strict=True)) == [(1, 2)]
    kept = chunk_mask_from_pixels(fg, fg.shape, 256, margin=1)
    assert list(zip(*np.nonzero(kept), strict=True)) == [(1, 2), (1, 3), (2, 2), (2, 3)]


def test_a_smaller_foreground_image_maps_by_fraction_of_the_extent() -> None:
    fg = np.zeros((250, 325), bool)  # a quarter of 1000 x 1300
    fg[100:110, 200:210] = True  # grid rows 400-440, columns 800-840: chunk (1, 3)
    kept = chunk_mask_from_pixels(fg, (1000, 1300), 256)
    assert list(zip(*np.nonzero(kept), strict=True)) == [(1, 3)]


@pytest.mark.parametrize(
    ("fg_shape", "grid", "tile", "margin"),
    [
        ((77, 101), (1000, 1300), 256, 1),
        ((250, 325), (1000, 1300), 100, 0),
        ((64, 48), (4096, 3000), 128, 2),
        ((300, 300), (100, 100), 32, 1),  # a foreground image finer than the grid
        ((5, 7), (999, 1001), 64, 1),  # fewer low-resolution pixels than chunks
    ],
    ids=["odd", "quarter", "tall", "finer", "coarse"],
)
def test_vectorised_mask_equals_the_obvious_loop(
    fg_shape: tuple[int, int], grid: tuple[int, int], tile: int, margin: int
) -> None:
    fg = np.random.default_rng(sum(fg_shape)).random(fg_shape) > 0.995
    expected = reference_chunk_mask(fg, grid, tile, margin)
    np.testing.assert_array_equal(chunk_mask_from_pixels(fg, grid, tile, margin), expected)


def test_chunk_mask_of_a_200_by_200_grid_is_fast() -> None:
    import time

    fg = np.random.default_rng(0).random((3200, 3200)) > 0.9999
    start = time.perf_counter()
    kept = chunk_mask_from_pixels(fg, (102_400, 102_400), 512)
    assert kept.shape == (200, 200) and time.perf_counter() - start < 1.0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="tile size"):
        chunk_mask_from_pixels(np.ones((4, 4), bool), (8, 8), 0)
    with pytest.raises(ConfigError, match="margin"):
        chunk_mask_from_pixels(np.ones((4, 4), bool), (8, 8), 2, margin=-1)
    with pytest.raises(ValueError, match="2-D"):
        chunk_mask_from_pixels(np.ones((3, 4, 4), bool), (8, 8), 2)


def test_chunk_mask_reports_what_it_skips() -> None:
    keep = np.array([[True, False], [False, False]])
    chunk_mask = ChunkMask(keep, "test")
    keep[1, 1] = True  # the mask holds its own copy
    assert chunk_mask.skipped_fraction == 0.75
    assert chunk_mask.kept(0, 0) and not chunk_mask.kept(1, 1)
    with pytest.raises(IndexError, match="outside the 2 x 2 chunk grid"):
        chunk_mask.kept(2, 0)
    with pytest.raises(ValueError, match="read-only"):
        chunk_mask.keep[0, 1] = True
    with pytest.raises(ValueError, match="bool"):
        ChunkMask(np.zeros((2, 2), np.uint8), "test")


def test_level_choice() -> None:
    levels = [(8192, 8192), (2048, 2048), (512, 512), (128, 128)]
    assert mask_level(levels, (8192, 8192), 512) == 3  # 8 px per chunk
    assert mask_level(levels, (8192, 8192), 64) == 2  # 4 px per chunk
    assert mask_level(levels[1:], (2048, 2048), 2) == 0  # none has 4: the finest
    assert affordable_level(levels[:1], (8192, 8192), 512) is None  # only 64 Mpx: too costly for a mask
    assert mask_level(levels[:1], (8192, 8192), 512) == 0


# --- a tissue mask from a slide ---------------------------------------------------------------------------------


def test_slide_keeps_exactly_the_chunks_with_tissue(slide: tuple[Path, np.ndarray]) -> None:
    path, tissue = slide
    source = open_source(path)
    chunk_mask = foreground_mask("auto", source, (2048, 3072), 256)
    assert chunk_mask is not None
    assert chunk_mask.method.startswith("tissue: saturation > ")
    assert "level 3 (384 x 256 px, averaged in 2 x 2 blocks)" in chunk_mask.method
    truth = chunks_with(tissue, 256)
    assert truth[4, 6] and not truth[4, 7]  # the block 4 px into chunk column 6
    np.testing.assert_array_equal(chunk_mask.keep, truth)
    assert chunk_mask.skipped_fraction == pytest.approx(1 - truth.mean())


def test_slide_read_at_level_1_keeps_the_same_chunks(slide: tuple[Path, np.ndarray]) -> None:
    path, tissue = slide
    source = open_source(path, level=1)  # the run's grid is level 1; chunks of 128 px there are 256 px at level 0
    chunk_mask = foreground_mask("auto", source, source.shape[1:], 128)
    assert chunk_mask is not None
    np.testing.assert_array_equal(chunk_mask.keep, chunks_with(tissue, 256))


def test_given_threshold_is_used(slide: tuple[Path, np.ndarray]) -> None:
    path, _ = slide
    source = open_source(path)
    high = foreground_mask("auto", source, (2048, 3072), 256, threshold=0.9)
    assert high is not None and "saturation > 0.900 (given)" in high.method and not high.keep.any()
    with pytest.raises(ConfigError, match=r"Expected a number in \[0, 1\] for 'mask.threshold'"):
        load_config(overrides={"mask": {"threshold": 1.5}})  # the config checks it; the mask trusts it


@pytest.mark.parametrize("tissue", [True, False], ids=["all-tissue", "all-glass"])
def test_one_class_slide_keeps_every_chunk_or_none(tmp_path: Path, tissue: bool) -> None:
    rgb = white((1024, 1536))
    if tissue:
        paint(rgb, np.ones((1024, 1536), bool), PINK)
        paint(rgb, (np.arange(1024) // 100 % 2 == 0)[:, None] & np.ones((1, 1536), bool), PURPLE)
    source = open_source(write_slide(tmp_path / "one.tif", rgb, levels=3))
    chunk_mask = foreground_mask("auto", source, (1024, 1536), 256)
    assert chunk_mask is not None and "clamped" in chunk_mask.method
    assert chunk_mask.keep.all() if tissue else not chunk_mask.keep.any()


def test_none_and_images_without_rgb_or_no_data(make_tiff: Callable[..., Path], tmp_path: Path) -> None:
    rgb = open_source(make_tiff(random_image((64, 64, 3)), photometric="rgb"))
    assert foreground_mask("none", rgb, (64, 64), 16) is None
    grey = open_source(make_tiff(random_image((64, 64))))
    assert foreground_mask("auto", grey, (64, 64), 16) is None  # tissue detection needs RGB
    with rasterio.open(
        tmp_path / "geo.tif",
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=3,
        dtype="uint8",
        crs="EPSG:3857",
        transform=Affine(10, 0, 0, 0, -10, 0),
    ) as dst:
        dst.write(random_image((3, 64, 64)))
    geotiff = open_source(tmp_path / "geo.tif")
    assert geotiff.georeference is not None
    assert foreground_mask("auto", geotiff, (64, 64), 16) is None  # every pixel of a raster without no-data is data


# --- a no-data mask ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gdal-nodata", "alpha"])
def test_chunks_entirely_in_the_no_data_collar_are_skipped(make_tiff: Callable[..., Path], kind: str) -> None:
    height, width, tile = 512, 640, 64
    data = np.zeros((height, width), bool)
    data[100:400, 150:500] = True  # chunk rows 1-6, columns 2-7; the collar's edges keep clear of chunk edges
    rgb = np.where(data[..., None], np.random.default_rng(0).integers(1, 256, (height, width, 3)), 0).astype(np.uint8)
    if kind == "alpha":
        image = make_tiff(np.dstack([rgb, data * np.uint8(255)]), photometric="rgb", extrasamples=["unassalpha"])
    else:
        image = make_tiff(rgb, photometric="rgb", extratags=[(42113, "s", 0, "0", True)])
    chunk_mask = foreground_mask("auto", open_source(image), (height, width), tile)
    assert chunk_mask is not None
    assert chunk_mask.method == (
        f"no-data: {'alpha band' if kind == 'alpha' else 'GDAL_NODATA 0'} on level 0 (640 x 512 px)"
    )
    np.testing.assert_array_equal(chunk_mask.keep, chunks_with(data, tile))


@pytest.mark.parametrize(("name", "tile"), [("RGB.byte.tif", 64), ("mosaic_cog1.tif", 64)])
def test_real_nodata_collar_never_skips_a_chunk_with_data(real_data: Path, name: str, tile: int) -> None:
    source = open_source(real_data / name)
    _, height, width = source.shape
    chunk_mask = foreground_mask("auto", source, (height, width), tile)
    assert chunk_mask is not None and chunk_mask.method.startswith("no-data: GDAL_NODATA 0 on level")
    _, valid = read_masked(source.ref, (0, height, 0, width))
    assert valid is not None
    truth = chunks_with(valid, tile)
    assert not (truth & ~chunk_mask.keep).any()  # no chunk with data is skipped
    extra = chunk_mask.keep & ~truth  # and a chunk kept without data borders one with data
    padded = np.pad(truth, 1)
    near = np.zeros_like(truth)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            near |= padded[dy : dy + truth.shape[0], dx : dx + truth.shape[1]]
    assert not (extra & ~near).any()
    assert 0.15 < chunk_mask.skipped_fraction < 0.5 and not chunk_mask.kept(0, 0)


def test_real_transparent_raster_keeps_nothing_from_its_overview(real_data: Path) -> None:
    source = open_source(real_data / "east_coast_phase3_2023_AY31_1000_3335.tif")  # 14400 x 9600, alpha 0 everywhere
    chunk_mask = foreground_mask("auto", source, source.shape[1:], 512)
    assert chunk_mask is not None
    assert chunk_mask.method == "no-data: alpha band on level 4 (600 x 900 px)"
    assert chunk_mask.skipped_fraction == 1.0


def test_real_slide_skips_its_glass(real_data: Path) -> None:
    source = open_source(real_data / "CMU-1-Small-Region.svs")  # one level, 2967 x 2220, tissue in the middle
    chunk_mask = foreground_mask("auto", source, source.shape[1:], 256)
    assert chunk_mask is not None and "averaged in 16 x 16 blocks" in chunk_mask.method
    assert chunk_mask.keep[3:9, 3:6].all()  # the tissue
    assert 0.2 < chunk_mask.skipped_fraction < 0.5


# --- a user mask ------------------------------------------------------------------------------------------------


@pytest.fixture
def source(make_tiff: Callable[..., Path]) -> SourceInfo:
    """Any input: a user mask does not look at it."""
    return open_source(make_tiff(random_image((32, 32, 3)), photometric="rgb"))


def test_user_png_of_another_size(tmp_path: Path, source: SourceInfo) -> None:
    marks = np.zeros((250, 325), np.uint8)  # a quarter of the 1000 x 1300 grid
    marks[100:110, 200:210] = 255  # chunk (1, 3)
    Image.fromarray(marks).save(tmp_path / "mask.png")
    chunk_mask = foreground_mask("image", source, (1000, 1300), 256, image=str(tmp_path / "mask.png"))
    assert chunk_mask is not None and chunk_mask.method == f"user mask: {tmp_path / 'mask.png'} (325 x 250 px)"
    assert list(zip(*np.nonzero(chunk_mask.keep), strict=True)) == [(1, 3)]


def test_user_tiff_pyramid_reads_a_coarse_level(tmp_path: Path, source: SourceInfo) -> None:
    marks = np.zeros((2000, 2600), np.uint8)  # twice the grid, with a coarser level
    marks[800:880, 1600:1680] = 1  # grid rows 400-440, columns 800-840: chunk (1, 3)
    with tifffile.TiffWriter(tmp_path / "mask.ome.tif", ome=True) as tif:  # as QuPath exports label pyramids
        tif.write(marks, tile=(256, 256), subifds=1)
        tif.write(marks[::8, ::8], tile=(256, 256), subfiletype=1)
    chunk_mask = foreground_mask("image", source, (1000, 1300), 256, image=str(tmp_path / "mask.ome.tif"))
    assert chunk_mask is not None and "(level 1, 325 x 250 px)" in chunk_mask.method
    assert list(zip(*np.nonzero(chunk_mask.keep), strict=True)) == [(1, 3)]


def test_large_user_tiff_is_reduced_band_by_band(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: SourceInfo
) -> None:
    monkeypatch.setattr(mask_module, "MAX_PIXELS", 10_000)  # 500 x 650 becomes 84 x 109 cells of about 6 x 6
    monkeypatch.setattr(mask_module, "_BAND_PIXELS", 20_000)  # read 30 rows at a time: cells straddle bands
    marks = np.zeros((500, 650), np.uint8)
    marks[450, 3] = 7  # one pixel: grid row 900, column 6 -> chunk (3, 0)
    marks[10, 600] = 7  # grid row 20, column 1200 -> chunk (0, 4)
    tifffile.imwrite(tmp_path / "big.tif", marks)
    chunk_mask = foreground_mask("image", source, (1000, 1300), 256, image=str(tmp_path / "big.tif"))
    assert chunk_mask is not None and "109 x 84 px" in chunk_mask.method
    assert list(zip(*np.nonzero(chunk_mask.keep), strict=True)) == [(0, 4), (3, 0)]


def test_bad_user_masks_name_the_file(tmp_path: Path, source: SourceInfo) -> None:
    missing = tmp_path / "nowhere.png"
    with pytest.raises(ConfigError, match=rf"^{missing}: no such mask file$"):
        foreground_mask("image", source, (100, 100), 32, image=str(missing))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'notes.png'}: cannot read the mask: "):
        foreground_mask("image", source, (100, 100), 32, image=str(tmp_path / "notes.png"))
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\xff" * 20)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'broken.tif'}: cannot read the mask: "):
        foreground_mask("image", source, (100, 100), 32, image=str(tmp_path / "broken.tif"))
    Image.fromarray(np.ones((100, 150), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(ConfigError, match=r"mask is 150 x 100 px but the image grid is 100 x 100 px \(width"):
        foreground_mask("image", source, (100, 100), 32, image=str(tmp_path / "wide.png"))


# --- a masked run -----------------------------------------------------------------------------------------------


def test_masked_run_computes_only_tissue_chunks_and_matches_the_unmasked_run(
    slide: tuple[Path, np.ndarray], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    path, tissue = slide
    model = make_model()
    stores, results = {}, {}
    for mode in ("auto", "none"):
        stores[mode] = tmp_path / f"{mode}.zarr"
        config = load_config(
            overrides={
                "input": {"path": str(path)},
                "model": {"path": str(model)},
                "output": {"path": str(stores[mode])},
                "mask": {"mode": mode},
                "tiling": {"tile": 256},
                "compute": {"workers": 2, "torch_threads": 1},
            }
        )
        results[mode] = execute(prepare(config))
    expected = chunks_with(tissue, 256)
    masked, full = results["auto"], results["none"]
    assert expected.mean() < 0.3  # the slide is more than 70% glass
    assert masked.chunks_computed == expected.sum() and masked.chunks_background == (~expected).sum()
    assert full.chunks_computed == expected.size and full.chunks_background == 0
    assert masked.chunks_computed < full.chunks_computed / 2  # less than half the model work
    counts = f"{masked.chunks_computed} of {full.chunks_computed} chunks"
    print(f"masked: {counts}, {masked.seconds:.2f} s against {full.seconds:.2f} s")
    a, b = zarr.open_group(stores["auto"], mode="r"), zarr.open_group(stores["none"], mode="r")
    for row, col in np.ndindex(*expected.shape):
        window = (slice(row * 256, (row + 1) * 256), slice(col * 256, (col + 1) * 256))
        probs, labels = a["0"][(slice(None), *window)], a["labels/argmax/0"][window]
        if expected[row, col]:
            assert probs.tobytes() == b["0"][(slice(None), *window)].tobytes()
            assert labels.tobytes() == b["labels/argmax/0"][window].tobytes()
        else:  # not computed, not stored: the fill values stand for it
            assert (probs == 255).all() and (labels == NODATA_LABEL).all()  # no data in uint8
            assert not (stores["auto"] / "0" / "0" / str(row) / str(col)).exists()
    assert (stores["none"] / "0" / "0" / "0" / "0").exists()
    assert masked.record.mask is not None and masked.record.mask["chunks_skipped"] == (~expected).sum()


@pytest.mark.parametrize(
    ("shape", "dtype", "factor"),
    [
        ((3, 517, 301), np.uint8, 32),
        ((1, 64, 64), np.uint8, 8),
        ((4, 100, 101), np.uint16, 16),
        ((2, 33, 35), np.uint8, 64),
    ],
)
def test_block_means_of_integer_pixels_are_the_float32_sums_exactly(shape, dtype, factor) -> None:
    """The integer path of block_mean (interleaved pixels, summed as integers) gives the bytes of
    summing in float32, partial edge blocks included, so no mask decision moves."""
    rng = np.random.default_rng(1)
    image = np.moveaxis(rng.integers(0, np.iinfo(dtype).max + 1, (*shape[1:], shape[0]), dtype=dtype), -1, 0)
    _, height, width = shape
    rows, cols = np.arange(0, height, factor), np.arange(0, width, factor)
    sums = np.add.reduceat(np.add.reduceat(image, rows, axis=1, dtype=np.float32), cols, axis=2)
    counts = np.outer(np.diff(rows, append=height), np.diff(cols, append=width)).astype(np.float32)
    found = block_mean(image, factor)
    assert found.dtype == np.float32 and found.tobytes() == (sums / counts).tobytes()
