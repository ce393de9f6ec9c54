"""Lazy reading: every layout comes back as (C, Y, X), opening reads no pixels, bad files say why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from pipeline.cli.report import file_lines as describe_file
from pipeline.errors import SourceError
from pipeline.source.pixels import SourceRef, read_window
from pipeline.source.tiff import open_source
from tests.conftest import random_image

LAYOUTS: dict[str, tuple[tuple[int, ...], str, dict[str, Any], int]] = {
    # name: (shape as written, dtype, imwrite kwargs, channels read back)
    "rgb-tiled-deflate": ((70, 90, 3), "uint8", {"tile": (32, 32), "compression": "zlib", "photometric": "rgb"}, 3),
    "rgb-stripped-lzw": ((70, 90, 3), "uint8", {"rowsperstrip": 7, "compression": "lzw", "photometric": "rgb"}, 3),
    "rgb-jpeg-tiles": ((64, 80, 3), "uint8", {"tile": (16, 16), "compression": "jpeg", "photometric": "rgb"}, 3),
    "rgb-jpeg2000-tiles": (
        (64, 80, 3),
        "uint8",
        {"tile": (32, 32), "compression": "jpeg2000", "photometric": "rgb", "compressionargs": {"level": 0}},
        3,
    ),
    "uint16-tiled-lzw": (
        (50, 60, 2),
        "uint16",
        {"tile": (16, 16), "compression": "lzw", "photometric": "minisblack", "planarconfig": "contig"},
        2,
    ),
    "planar-separate-uint16": ((4, 50, 60), "uint16", {"planarconfig": "separate", "photometric": "minisblack"}, 4),
    "grey-float32": ((41, 39), "float32", {"photometric": "minisblack"}, 1),
    "rgba-alpha-dropped": ((30, 40, 4), "uint8", {"photometric": "rgb", "extrasamples": ["unassalpha"]}, 3),
    "bigtiff-tiled": ((50, 70, 3), "uint8", {"bigtiff": True, "tile": (16, 16), "photometric": "rgb"}, 3),
}


def _as_cyx(data: np.ndarray, channels: int, planar: bool) -> np.ndarray:
    if data.ndim == 2:
        return data[np.newaxis]
    return data[:channels] if planar else np.moveaxis(data, -1, 0)[:channels]


@pytest.mark.parametrize("name", LAYOUTS)
def test_windows_match_the_written_pixels(make_tiff: Callable[..., Path], name: str) -> None:
    shape, dtype, kwargs, channels = LAYOUTS[name]
    data = random_image(shape, dtype)
    if name == "rgb-jpeg-tiles":  # JPEG keeps smooth content, not noise
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        data = np.stack([yy * 3, xx * 3, (yy + xx) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    info = open_source(make_tiff(data, **kwargs))
    expected = _as_cyx(data, channels, planar=kwargs.get("planarconfig") == "separate")
    assert info.shape == expected.shape
    assert info.dtype == np.dtype(dtype)
    assert info.alpha_dropped == (name == "rgba-alpha-dropped")
    for box in [
        (0, expected.shape[1], 0, expected.shape[2]),
        (3, 20, 5, 33),
        (expected.shape[1] - 1, expected.shape[1], 0, 1),
    ]:
        window = read_window(info.ref, box)
        if name == "rgb-jpeg-tiles":  # lossy: close, not equal
            assert np.abs(window.astype(int) - expected[:, box[0] : box[1], box[2] : box[3]]).mean() < 4
        else:
            np.testing.assert_array_equal(window, expected[:, box[0] : box[1], box[2] : box[3]])


def test_pyramid_levels_and_resolution_tags(tmp_path: Path) -> None:
    path = tmp_path / "pyramid.tif"
    base = random_image((256, 192, 3))
    with tifffile.TiffWriter(path) as tif:
        options = {"tile": (64, 64), "photometric": "rgb", "resolutionunit": "CENTIMETER"}
        tif.write(base, subifds=2, resolution=(1e4 / 0.25, 1e4 / 0.25), **options)
        tif.write(base[::2, ::2], subfiletype=1, resolution=(1e4 / 0.5, 1e4 / 0.5), **options)
        tif.write(base[::4, ::4], subfiletype=1, resolution=(1e4, 1e4), **options)
    info = open_source(path, level=2)
    assert [level.shape for level in info.levels] == [(256, 192), (128, 96), (64, 48)]
    assert info.shape == (3, 64, 48)
    assert info.mpp == pytest.approx(1.0)  # 0.25 um at level 0, times the downsample of 4
    np.testing.assert_array_equal(read_window(info.ref, (0, 64, 0, 48)), np.moveaxis(base[::4, ::4], -1, 0))
    with pytest.raises(SourceError, match="has 3 levels"):
        open_source(path, level=3)


def _bytes_read() -> int:
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io to count bytes read")
def test_opening_reads_no_pixels_and_a_window_reads_only_its_tiles(tmp_path: Path) -> None:
    path = tmp_path / "big.tif"
    tile = np.full((256, 256, 3), 7, dtype=np.uint8)
    # 4096 x 4096 x 3 uncompressed = 48 MiB of tile data, written tile by tile.
    tifffile.imwrite(path, (tile for _ in range(256)), shape=(4096, 4096, 3), dtype="uint8", tile=(256, 256))
    before = _bytes_read()
    info = open_source(path)
    after_open = _bytes_read()
    window = read_window(info.ref, (1000, 1010, 2000, 2010))
    after_read = _bytes_read()
    assert info.shape == (3, 4096, 4096)
    assert after_open - before < 256 * 1024, "opening read pixel data"
    assert (window == 7).all()
    assert after_read - after_open < 2 * 256 * 256 * 3 + 256 * 1024, "a 10 x 10 window read more than its tile"


def test_real_svs_is_described_without_decoding(real_data: Path) -> None:
    info = open_source(real_data / "CMU-1-Small-Region.svs")
    assert info.shape == (3, 2967, 2220)
    assert info.mpp == pytest.approx(0.499)
    assert info.compression == "JPEG" and info.chunk_shape == (240, 240)
    lines = describe_file(real_data / "CMU-1-Small-Region.svs")
    assert any("0.499 micrometres per pixel" in line for line in lines)
    assert any("tiles 240x240" in line for line in lines)


def test_real_geotiff_reports_crs_and_pixel_size(real_data: Path) -> None:
    info = open_source(real_data / "RGB.byte.tif")
    assert info.crs == "EPSG:32618"
    assert info.pixel_size == pytest.approx((300.0379, 300.0418), rel=1e-5)
    assert info.mpp is None
    text = "\n".join(describe_file(real_data / "RGB.byte.tif"))
    assert "EPSG:32618" in text and "300.038" in text


def test_real_corrupt_tile_is_reported_lazily(real_data: Path) -> None:
    """unreadable.svs opens (the directory is fine); reading its broken JPEG tile names the file."""
    info = open_source(real_data / "unreadable.svs")
    with pytest.raises(SourceError, match=r"unreadable\.svs: cannot read pixels .*rows 0-16"):
        read_window(info.ref, (0, 16, 0, 16))


BROKEN = {
    "missing": (lambda p: None, "no such file"),
    "empty": (lambda p: p.write_bytes(b""), "file is empty"),
    "not-a-tiff": (lambda p: p.write_bytes(b"%PDF-1.4 not an image at all"), "not a TIFF file"),
    "directory": (lambda p: p.mkdir(), "is a directory"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_inputs_name_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.tif"
    BROKEN[case][0](path)
    with pytest.raises(SourceError, match=BROKEN[case][1]) as caught:
        open_source(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_truncated_file_is_refused_before_any_work(make_tiff: Callable[..., Path]) -> None:
    path = make_tiff(random_image((128, 128, 3)), tile=(32, 32), photometric="rgb")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="truncated"):
        open_source(path)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("corrupt.tif", "truncated or corrupt"),
        ("ycbcr-cat.tif", "chroma subsampling"),
    ],
)
def test_real_broken_files_fail_at_open(real_data: Path, name: str, message: str) -> None:
    with pytest.raises(SourceError, match=message) as caught:
        open_source(real_data / name)
    assert name in str(caught.value)


REAL_TIFFS = [
    "CMU-1-Small-Region.svs",
    "RGB.byte.tif",
    "ScanImageBigTIFFv57.tif",
    "cogeo.tif",
    "east_coast_phase3_2023_AY31_1000_3335.tif",
    "hubmap_multi-channel_pyramid.ome.tif",
    "model_transformation.tif",
    "mosaic_cog1.tif",
    "sparse.tiff",
    "test3-TRITC-2-560.ndpi",
]


def _through_zarr(view: object, ref: SourceRef, box: tuple[int, int, int, int]) -> np.ndarray:
    """What tifffile's own Zarr view holds in ``box`` of ``ref``'s level, as ``(C, Y, X)``."""
    y0, y1, x0, x1 = box
    index: list[object] = []
    for axis in ref.axes:
        if axis == "Y":
            index.append(slice(y0, y1))
        elif axis == "X":
            index.append(slice(x0, x1))
        elif axis == ref.channel_axis:
            index.append(slice(0, ref.channels))
        else:
            index.append(0)
    data = np.asarray(view[tuple(index)])  # type: ignore[index]
    kept = [a for a in ref.axes if a in "YX" or a == ref.channel_axis]
    if ref.channel_axis is None:
        return data[np.newaxis]
    return np.transpose(data, [kept.index(ref.channel_axis), kept.index("Y"), kept.index("X")])


@pytest.mark.parametrize("name", REAL_TIFFS)
def test_every_level_of_every_real_file_reads_as_tifffile_decodes_it(real_data: Path, name: str) -> None:
    """The contract of the pixel reader, on every series and level of every real file: a window,
    with and without the decoded-tile cache, equals what tifffile's Zarr view decodes (tiles and
    strips; JPEG, YCbCr, LZW, Deflate, WebP, none; interleaved and planar samples; one page per
    channel (OME), time and channel pages (ScanImage); a 20480 x 20480 COG whose tiles are all
    missing; NDPI restart-marker strips), whatever the window's size and place, edges included."""
    from dataclasses import replace

    import zarr

    rng = np.random.default_rng(3)
    path = real_data / name
    with tifffile.TiffFile(path) as tif:
        levels = [(s, lv) for s, series in enumerate(tif.series) for lv in range(len(series.levels))]
    read = 0
    for series, level in levels:
        info = open_source(path, series=series, level=level)
        _, height, width = info.shape
        with tifffile.imread(path, aszarr=True, series=series, level=level) as store:
            view = zarr.open_array(store, mode="r")
            boxes = [(0, height, 0, width)] if height * width <= 2**20 else []
            boxes += [(max(0, height - 7), height, max(0, width - 300), width)]
            for _ in range(3):
                y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
                boxes.append(
                    (y0, min(height, y0 + int(rng.integers(1, 700))), x0, min(width, x0 + int(rng.integers(1, 700))))
                )
            for cache in (False, True):
                ref = replace(info.ref, cache_tiles=cache)
                for box in boxes:
                    np.testing.assert_array_equal(
                        read_window(ref, box), _through_zarr(view, ref, box), f"{series=} {level=} {box=}"
                    )
                    read += 1
    assert read >= 8 * len(levels)
