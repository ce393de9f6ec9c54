"""Previews: thumbnails read in pieces equal strided reads, and the PNG shows what the labels say."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import zarr

from pipeline.errors import ConfigError
from pipeline.preview import label_thumbnail, source_thumbnail, to_rgb8, write_preview
from pipeline.source import open_source
from pipeline.synthetic import make_synthetic_slide

COLORS = [(0, 0, 0), (230, 25, 75), (0, 130, 200)]


@pytest.mark.parametrize(
    ("shape", "chunks", "max_size"),
    [
        ((100, 70), (16, 16), 1024),
        ((1000, 300), (64, 48), 100),
        ((999, 1001), (100, 100), 64),
        ((513, 2000), (7, 500), 37),
        ((300, 300), (300, 300), 299),
    ],
    ids=["no-subsampling", "stride-10", "stride-larger-than-chunk", "odd-chunks", "one-chunk"],
)
def test_label_thumbnail_equals_a_strided_read(
    tmp_path: Path, shape: tuple[int, int], chunks: tuple[int, int], max_size: int
) -> None:
    data = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    array = zarr.create_array(tmp_path / "a.zarr", shape=shape, chunks=chunks, dtype="uint8")
    array[:] = data
    stride = -(-max(shape) // max_size)
    thumbnail = label_thumbnail(array, max_size)
    assert max(thumbnail.shape) <= max_size
    assert np.array_equal(thumbnail, data[::stride, ::stride])
    assert np.array_equal(label_thumbnail(data, max_size), data[::stride, ::stride])  # NumPy: 1024 px blocks


def test_source_thumbnail_reads_the_right_pyramid_level(tmp_path: Path) -> None:
    slide = make_synthetic_slide(tmp_path / "s.tif", tmp_path / "m.tif", size=1000, tile=128)
    info = open_source(slide.image_path)
    level1 = source_thumbnail(info, max_size=500)  # level 1 is exactly 500 px
    assert level1.shape == (3, 500, 500) and level1.dtype == np.uint8
    level0_strided = source_thumbnail(info, max_size=600)  # only level 0 is large enough: stride 2
    assert level0_strided.shape == (3, 500, 500)
    small = source_thumbnail(info, max_size=100)  # level 3 (125 px) with stride 2
    assert small.shape == (3, 63, 63)
    assert np.abs(small.astype(int) - level1[:, ::8, ::8].astype(int)).mean() < 12  # the same picture


@pytest.mark.parametrize(
    ("data", "kwargs"),
    [
        (np.arange(64 * 80, dtype=np.uint16).reshape(64, 80), {}),
        (np.linspace(-1, 1, 2 * 64 * 80, dtype=np.float32).reshape(2, 64, 80), {"photometric": "minisblack"}),
        (np.random.default_rng(1).integers(0, 255, (64, 80, 4), dtype=np.uint8), {"extrasamples": [0]}),
    ],
    ids=["grey-uint16", "two-channel-float", "four-channel"],
)
def test_source_thumbnail_is_three_channel_uint8(
    make_tiff: Callable[..., Path], data: np.ndarray, kwargs: dict[str, object]
) -> None:
    thumbnail = source_thumbnail(open_source(make_tiff(data, **kwargs)), max_size=40)
    assert thumbnail.shape == (3, 32, 40) and thumbnail.dtype == np.uint8
    assert thumbnail.max() == 255 or data.dtype == np.uint8


def test_to_rgb8_channels_and_scaling() -> None:
    grey = np.array([[[10, 20], [30, 50]]], dtype=np.int32)
    assert to_rgb8(grey).tolist() == [[[0, 64], [128, 255]]] * 3
    four = np.arange(16, dtype=np.uint8).reshape(4, 2, 2)
    assert np.array_equal(to_rgb8(four), four[:3])
    flat = np.full((1, 2, 2), 7.0)
    assert not to_rgb8(flat).any()


@pytest.mark.parametrize("label_shape", [(40, 60), (20, 30), (80, 120)], ids=["same-size", "smaller", "larger"])
def test_preview_shows_the_thumbnail_beside_the_label_colours(tmp_path: Path, label_shape: tuple[int, int]) -> None:
    thumbnail = np.random.default_rng(2).integers(0, 255, (3, 40, 60), dtype=np.uint8)
    labels = np.zeros(label_shape, np.uint8)
    height, width = label_shape
    labels[: height // 2, : width // 2] = 1  # top-left quarter
    labels[height // 2 :, width // 2 :] = 2  # bottom-right quarter
    write_preview(tmp_path / "p.png", thumbnail, labels, COLORS)
    png = imagecodecs.png_decode((tmp_path / "p.png").read_bytes())
    assert png.shape == (40, 2 * 60 + 8, 3)
    assert np.array_equal(png[:, :60], np.moveaxis(thumbnail, 0, -1))
    assert (png[:, 60:68] == 255).all()
    right = png[:, 68:]
    assert (right[:20, :30] == COLORS[1]).all()
    assert (right[20:, 30:] == COLORS[2]).all()
    assert (right[:20, 30:] == COLORS[0]).all()


def test_preview_marks_labels_without_a_colour(tmp_path: Path) -> None:
    labels = np.full((4, 4), 7, np.uint8)
    write_preview(tmp_path / "p.png", np.zeros((3, 4, 4), np.uint8), labels, COLORS)
    png = imagecodecs.png_decode((tmp_path / "p.png").read_bytes())
    assert (png[:, -4:] == (255, 0, 255)).all()


def test_preview_rejects_a_non_rgb_thumbnail(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\(3, h, w\) uint8"):
        write_preview(tmp_path / "p.png", np.zeros((1, 4, 4), np.uint8), np.zeros((4, 4), np.uint8), COLORS)
