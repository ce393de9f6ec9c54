"""The synthetic slide: a tiled JPEG pyramid whose ground truth matches its colours, made tile by tile."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.errors import ConfigError
from pipeline.source.pixels import read_window
from pipeline.source.tiff import open_source
from pipeline.training.synthetic import CLASS_NAMES, make_synthetic_slide, pyramid_shapes


@pytest.mark.parametrize(
    ("size", "tile", "levels"),
    [(256, 128, 2), (1000, 256, 3), (700, 512, 2)],
    ids=["tile-multiple", "not-a-tile-multiple", "one-partial-tile"],
)
def test_slide_is_a_tiled_jpeg_pyramid(tmp_path: Path, size: int, tile: int, levels: int) -> None:
    slide = make_synthetic_slide(tmp_path / "s.tif", tmp_path / "m.tif", size=size, tile=tile)
    with tifffile.TiffFile(slide.image_path) as tif:
        series = tif.series[0]
        assert [level.shape for level in series.levels] == [(*shape, 3) for shape in slide.levels]
        assert len(series.levels) == levels
        for level in series.levels:
            page = level.keyframe
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (tile, tile)
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert level.dtype == np.uint8
    with tifffile.TiffFile(slide.mask_path) as tif:
        page = tif.pages[0]
        assert page.shape == (size, size) and page.is_tiled
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    info = open_source(slide.image_path)
    assert info.shape == (3, size, size) and info.mpp == pytest.approx(0.5)


@pytest.mark.parametrize("size", [256, 1000], ids=["256", "1000"])
def test_ground_truth_has_every_class_and_matches_the_colours(tmp_path: Path, size: int) -> None:
    slide = make_synthetic_slide(tmp_path / "s.tif", tmp_path / "m.tif", size=size, tile=128)
    truth = tifffile.imread(slide.mask_path)
    assert set(np.unique(truth)) == set(range(len(CLASS_NAMES)))
    image = np.moveaxis(read_window(open_source(slide.image_path).ref, (0, size, 0, size)), 0, -1)
    luma = image.astype(np.float64) @ [0.299, 0.587, 0.114]
    medians = [np.median(luma[truth == k]) for k in range(3)]
    assert medians[0] > 230 > medians[1] > 150 > 110 > medians[2]  # background, stroma, nuclei


def test_same_seed_same_slide_other_seed_other_slide(tmp_path: Path) -> None:
    masks = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        slide = make_synthetic_slide(tmp_path / f"{name}.tif", tmp_path / f"{name}m.tif", size=300, tile=128, seed=seed)
        masks.append(tifffile.imread(slide.mask_path))
        if name == "b":
            assert np.array_equal(tifffile.imread(slide.image_path), tifffile.imread(tmp_path / "a.tif"))
    assert np.array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[0], masks[2])


def test_levels_show_the_same_tissue_as_level_zero(tmp_path: Path) -> None:
    slide = make_synthetic_slide(tmp_path / "s.tif", tmp_path / "m.tif", size=1024, tile=256)
    truth = tifffile.imread(slide.mask_path)
    with tifffile.TiffFile(slide.image_path) as tif:
        level1 = tif.series[0].levels[1].asarray()
    tissue1 = level1.astype(np.float64) @ [0.299, 0.587, 0.114] < 225
    tissue0 = truth[1::2, 1::2] > 0  # level-1 pixel centres sit on odd level-0 pixels
    assert (tissue1 == tissue0).mean() > 0.97


@pytest.mark.slow
def test_memory_stays_far_below_the_image(tmp_path: Path) -> None:
    size = 4096
    tracemalloc.start()
    try:
        make_synthetic_slide(tmp_path / "s.tif", tmp_path / "m.tif", size=size, tile=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size * size * 3 / 4  # the RGB image is 48 MB; a few tiles and the noise grids are ~12 MB


@pytest.mark.parametrize(
    ("size", "tile"), [(8, 512), (256, 100), (256, 0), (256, True)], ids=["tiny", "not-16", "zero", "bool"]
)
def test_bad_arguments_raise_config_error(tmp_path: Path, size: int, tile: int) -> None:
    with pytest.raises(ConfigError, match="Expected"):
        make_synthetic_slide(tmp_path / "s.tif", tmp_path / "m.tif", size=size, tile=tile)


def test_pyramid_shapes_halve_until_one_tile() -> None:
    assert pyramid_shapes(8192, 512) == ((8192,) * 2, (4096,) * 2, (2048,) * 2, (1024,) * 2, (512,) * 2)
    assert pyramid_shapes(513, 512) == ((513, 513), (257, 257))
