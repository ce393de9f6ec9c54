"""Previews: thumbnails read in pieces equal strided reads, and the PNG shows what the labels say."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import OutputError
from pipeline.products.preview import (
    INCOMPLETE_COLOR,
    LABEL_ALPHA,
    colorize,
    label_summary,
    label_thumbnail,
    render_legend,
    resize_nearest,
    source_thumbnail,
    to_rgb8,
    write_store_preview,
)
from pipeline.source.tiff import open_source
from pipeline.training.synthetic import make_synthetic_slide

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
    summary_thumbnail, counts = label_summary(array, max_size)
    assert np.array_equal(summary_thumbnail, thumbnail)
    assert np.array_equal(counts, np.bincount(data.ravel(), minlength=256))  # every pixel, not just the sampled


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
def test_labels_are_resized_to_the_thumbnail_and_coloured(label_shape: tuple[int, int]) -> None:
    labels = np.zeros(label_shape, np.uint8)
    height, width = label_shape
    labels[: height // 2, : width // 2] = 1  # top-left quarter
    labels[height // 2 :, width // 2 :] = 2  # bottom-right quarter
    right = colorize(resize_nearest(labels, 40, 60), COLORS)
    assert right.shape == (40, 60, 3) and right.dtype == np.uint8
    assert (right[:20, :30] == COLORS[1]).all()
    assert (right[20:, 30:] == COLORS[2]).all()
    assert (right[:20, 30:] == COLORS[0]).all()


def test_labels_without_a_colour_are_magenta() -> None:
    assert (colorize(np.full((4, 4), 7, np.uint8), COLORS) == (255, 0, 255)).all()


# --- write_store_preview: real stores written by `fcnpipe run` ------------------------------------


def run_store(image: Path, model: Path, out: Path) -> Path:
    """``fcnpipe run IMAGE -m MODEL -o OUT``; the store's path."""
    result = CliRunner().invoke(cli, ["run", str(image), "-m", str(model), "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def read_png(path: str | Path) -> np.ndarray:
    png: np.ndarray = imagecodecs.png_decode(Path(path).read_bytes())
    return png


def class_colors(store: Path) -> np.ndarray:
    classes = zarr.open_group(store, mode="r").attrs["fcnpipe"]["model"]["classes"]
    return np.array([c["color"] for c in classes], np.uint8)


def blend(thumbnail: np.ndarray, labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """What the right panel should be: ``(h, w, 3)``, computed here from the documented rule."""
    image = np.moveaxis(thumbnail, 0, -1)
    known = labels != 255
    mixed = image.astype(np.float64) * (1 - LABEL_ALPHA) + colors[np.where(known, labels, 0)] * LABEL_ALPHA
    return np.where(known[..., None], np.rint(mixed).astype(np.uint8), image)


def has_square(image: np.ndarray, color: Sequence[int], side: int = 8) -> bool:
    """Whether ``image`` ``(H, W, 3)`` holds a ``side x side`` square of exactly ``color`` (a swatch)."""
    mask = np.all(image == np.asarray(color, np.uint8), axis=-1).astype(np.int64)
    sums = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    windows = sums[side:, side:] - sums[:-side, side:] - sums[side:, :-side] + sums[:-side, :-side]
    return bool((windows == side * side).any())


def drop_chunks(store: Path, array: str) -> None:
    """Delete every stored chunk of ``array`` (Zarr v2, "/" keys): it reads as all fill value (255)."""
    for entry in (store / array).iterdir():
        if not entry.name.startswith("."):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def test_store_preview_blends_labels_over_the_geotiff_and_keeps_its_nodata_collar(
    real_data: Path, make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image = real_data / "RGB.byte.tif"
    store = run_store(image, make_model(), tmp_path / "rgb.zarr")
    assert write_store_preview(store, tmp_path / "p.png") == str(tmp_path / "p.png")
    png = read_png(tmp_path / "p.png")
    thumbnail = source_thumbnail(open_source(image))  # 718 x 791 < 1024: level 0, stride 1
    labels = np.asarray(zarr.open_group(store, mode="r")["labels/argmax/0"])
    _, h, w = thumbnail.shape
    assert labels.shape == (h, w) == (718, 791)
    assert png.shape[1] == 2 * w + 8 and h < png.shape[0] < 2 * h  # panels, then the legend below
    assert np.array_equal(png[:h, :w], np.moveaxis(thumbnail, 0, -1))
    assert (png[:h, w : w + 8] == 255).all()
    nodata = labels == 255
    assert nodata[0, 0] and nodata.mean() > 0.2 and not nodata.all()  # the collar, and data inside it
    right = png[:h, w + 8 :]
    assert np.array_equal(right, blend(thumbnail, labels, class_colors(store)))
    assert np.array_equal(right[nodata], np.moveaxis(thumbnail, 0, -1)[nodata])  # the collar as in the input
    legend = png[h:]
    assert all(has_square(legend, color) for color in class_colors(store))
    assert not has_square(legend, INCOMPLETE_COLOR)


def test_background_is_drawn_as_the_input_like_no_data_and_the_legend_says_so(
    real_data: Path, make_model: Callable[..., Path], tmp_path: Path
) -> None:
    """A class named background is not coloured: inside computed chunks it looks as the skipped
    chunks and the nodata collar do (the input), so no staircase follows the chunk grid."""
    image, model = real_data / "RGB.byte.tif", make_model()
    first = np.asarray(zarr.open_group(run_store(image, model, tmp_path / "a.zarr"), mode="r")["labels/argmax/0"])
    common = int(np.argmax(np.bincount(first[first < 255], minlength=3)))  # name the commonest class background
    names = ["water", "land", "roads"]
    names[common] = "background"
    store = tmp_path / "rgb.zarr"
    args = ["run", str(image), "-m", str(model), "-o", str(store), "--no-progress", "--classes", ",".join(names)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    write_store_preview(store, tmp_path / "p.png")
    png = read_png(tmp_path / "p.png")
    thumbnail = np.moveaxis(source_thumbnail(open_source(image)), 0, -1)
    labels = np.asarray(zarr.open_group(store, mode="r")["labels/argmax/0"])
    (h, w), colors = labels.shape, class_colors(store)
    right = png[:h, w + 8 :]
    background, coloured = labels == common, (labels != common) & (labels != 255)
    assert background.sum() > 1000 and coloured.sum() > 1000
    assert np.array_equal(right[background], thumbnail[background])
    expected = blend(thumbnail.transpose(2, 0, 1), labels, colors)
    assert np.array_equal(right[coloured], expected[coloured])
    legend = png[h:]
    others = [colors[i] for i in range(3) if i != common and (labels == i).any()]
    assert others and all(has_square(legend, color) for color in others)
    assert not has_square(legend, colors[common])  # the swatch is drawn as the class is: not coloured


def test_store_preview_of_the_svs_reads_only_a_small_level(
    real_data: Path, make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image = real_data / "CMU-1-Small-Region.svs"
    store = run_store(image, make_model(), tmp_path / "svs.zarr")
    group = zarr.open_group(store, mode="r")
    assert [group[f"labels/argmax/{i}"].shape for i in range(3)] == [(2967, 2220), (1484, 1110), (742, 555)]
    level2 = np.asarray(group["labels/argmax/2"])
    for level in ("0", "1"):  # were they read, the preview would show no labels at all
        drop_chunks(store, f"labels/argmax/{level}")
    png = read_png(write_store_preview(store, tmp_path / "p.png", max_size=400))
    thumbnail = source_thumbnail(open_source(image), max_size=400)
    _, h, w = thumbnail.shape
    assert (h, w) == (371, 278) and png.shape[1] >= 2 * w + 8
    assert 0.5 < (level2 != 255).mean() < 1  # tissue; the glass around it is not computed (--mask auto)
    assert np.array_equal(png[:h, w + 8 : 2 * w + 8], blend(thumbnail, level2[::2, ::2], class_colors(store)))
    assert all(has_square(png[h:], color) for color in class_colors(store))


def test_store_preview_of_an_unfinished_run_says_incomplete_and_shows_what_is_predicted(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    data = np.random.default_rng(3).integers(0, 255, (1100, 300, 3), dtype=np.uint8)
    image = make_tiff(data, photometric="rgb")
    store = run_store(image, make_model(), tmp_path / "run.zarr")
    complete = read_png(write_store_preview(store, tmp_path / "complete.png", max_size=512))
    # A run stopped before its pyramid: level 1 never written, and not marked complete.
    drop_chunks(store, "labels/argmax/1")
    group = zarr.open_group(store, mode="r+")
    group.attrs["fcnpipe"] = {**group.attrs["fcnpipe"], "complete": False}
    partial = read_png(write_store_preview(store, tmp_path / "partial.png", max_size=512))
    thumbnail = source_thumbnail(open_source(image), max_size=512)  # stride 3: 367 x 100
    _, h, w = thumbnail.shape
    level0 = np.asarray(group["labels/argmax/0"])
    assert np.array_equal(partial[:h, w + 8 : 2 * w + 8], blend(thumbnail, level0[::3, ::3], class_colors(store)))
    assert has_square(partial[h:], INCOMPLETE_COLOR) and not has_square(complete[h:], INCOMPLETE_COLOR)
    assert partial.shape[0] > complete.shape[0]  # one more legend line


def test_store_preview_without_its_input_shows_the_labels_alone(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    data = np.random.default_rng(4).integers(1, 255, (200, 300, 3), dtype=np.uint8)
    data[:50] = 0  # GDAL_NODATA 0: no labels there
    image = make_tiff(data, photometric="rgb", extratags=[(42113, "s", 0, "0", True)])
    store = run_store(image, make_model(), tmp_path / "run.zarr")
    os.remove(image)  # e.g. the store was copied to another machine
    png = read_png(write_store_preview(store, tmp_path / "p.png"))
    labels = np.asarray(zarr.open_group(store, mode="r")["labels/argmax/0"])
    assert (labels[:50] == 255).all() and (labels[50:] != 255).all()
    expected = np.where((labels == 255)[..., None], np.uint8(255), class_colors(store)[np.minimum(labels, 2)])
    assert np.array_equal(png[:200, :300], expected)  # full colours on white, no thumbnail panel
    assert png.shape[0] > 200 and (png[:200, 300:] == 255).all()  # one panel: nothing beside it


def test_store_preview_rejects_what_is_not_an_fcnpipe_store(tmp_path: Path) -> None:
    plain = tmp_path / "plain.zarr"
    zarr.open_group(plain, mode="w")
    tiff = tmp_path / "image.tif"
    tifffile.imwrite(tiff, np.zeros((4, 4), np.uint8))
    said = {"missing.zarr": "no such file or folder", "plain.zarr": "has no 'fcnpipe' attribute"}
    for path in (tmp_path / "missing.zarr", plain, tiff):
        with pytest.raises(OutputError, match=said.get(path.name, "a file, not a Zarr store")) as info:
            write_store_preview(path, tmp_path / "p.png")
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    assert not (tmp_path / "p.png").exists()


def test_legend_puts_many_classes_in_columns() -> None:
    colors = [(i * 8, 255 - i * 8, 100) for i in range(30)]
    entries = [(color, f"class {i}  3.3%") for i, color in enumerate(colors)]
    wide = render_legend(2000, 16, "title", entries)
    narrow = render_legend(100, 16, "title", entries)
    assert wide.shape[1] == 2000 and wide.shape[0] < narrow.shape[0] / 3
    assert narrow.shape[1] > 100  # as wide as its text needs
    assert all(has_square(wide, color) and has_square(narrow, color) for color in colors)
