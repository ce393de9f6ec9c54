"""Every real third-party TIFF in ../shared/data/real either runs end to end or fails in one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.store.layout import LABELS, NODATA_LABEL, PROBABILITIES

READABLE = [
    # (file, extra flags, model input channels, expected (Y, X))
    ("RGB.byte.tif", [], 3, (718, 791)),
    ("mosaic_cog1.tif", [], 3, (790, 779)),
    ("mosaic_cog1.tif", ["--level", "2"], 3, (198, 195)),
    ("cogeo.tif", [], 3, (1024, 1024)),
    ("model_transformation.tif", [], 64, (10, 10)),
    ("east_coast_phase3_2023_AY31_1000_3335.tif", ["--level", "4"], 3, (900, 600)),
    ("CMU-1-Small-Region.svs", [], 3, (2967, 2220)),
    ("hubmap_multi-channel_pyramid.ome.tif", [], 3, (167, 439)),
    ("hubmap_multi-channel_pyramid.ome.tif", ["--level", "7"], 3, (1, 3)),
    ("ScanImageBigTIFFv57.tif", [], 2, (64, 64)),
    ("sparse.tiff", ["--series", "1", "--level", "2"], 3, (512, 512)),
    ("test3-TRITC-2-560.ndpi", ["--level", "2"], 3, (1216, 992)),
]


@pytest.mark.parametrize(
    ("name", "flags", "channels", "shape"), READABLE, ids=[f"{n}{''.join(f)}" for n, f, _, _ in READABLE]
)
def test_readable_file_runs_end_to_end(
    real_data: Path,
    make_model: Callable[..., Path],
    tmp_path: Path,
    name: str,
    flags: list[str],
    channels: int,
    shape: tuple[int, int],
) -> None:
    out = tmp_path / "out.zarr"
    model = make_model(in_channels=channels, num_classes=3)
    result = CliRunner().invoke(
        cli, ["run", str(real_data / name), "-m", str(model), "-o", str(out), "--dtype", "float32", *flags]
    )
    assert result.exit_code == 0, result.output
    store = zarr.open_group(str(out), mode="r")
    probs = store[PROBABILITIES]
    assert probs.shape == (3, *shape)
    assert store[LABELS].shape == shape
    window = (slice(0, min(256, shape[0])), slice(0, min(256, shape[1])))
    sums = probs[(slice(None), *window)].sum(axis=0)
    has_data = store[LABELS][window] != NODATA_LABEL
    np.testing.assert_allclose(sums[has_data], 1.0, atol=1e-5)
    assert np.isnan(sums[~has_data]).all()  # no data: NaN, the fill value
    assert store.attrs["fcnpipe"]["complete"] is True


BROKEN = [
    ("corrupt.tif", "truncated or corrupt"),
    ("unreadable.svs", "cannot read pixels"),
    ("ycbcr-cat.tif", "chroma subsampling"),
]


@pytest.mark.parametrize(("name", "message"), BROKEN, ids=[n for n, _ in BROKEN])
def test_broken_file_fails_in_one_line_and_nothing_looks_complete(
    real_data: Path, make_model: Callable[..., Path], tmp_path: Path, name: str, message: str
) -> None:
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(cli, ["run", str(real_data / name), "-m", str(make_model()), "-o", str(out)])
    assert result.exit_code == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("fcnpipe:")]
    assert len(error_lines) == 1 and name in error_lines[0] and message in error_lines[0]
    assert "Traceback" not in result.output
    if out.exists():  # a failure mid-run leaves a store that says it is incomplete
        assert zarr.open_group(str(out), mode="r").attrs["fcnpipe"]["complete"] is False


def test_ndpi_levels_read_as_tifffile_decodes_them(real_data: Path) -> None:
    """Each NDPI level is one JPEG strip read as restart-marker tiles, which need the strip's JPEG
    header: the tiled reader decodes them with it, to tifffile's own pixels."""
    import tifffile

    from pipeline.source.pixels import read_window
    from pipeline.source.tiff import open_source

    path = real_data / "test3-TRITC-2-560.ndpi"
    with tifffile.TiffFile(path) as tif:
        for level in range(4):
            info = open_source(path, level=level)
            _, height, width = info.shape
            box = (height // 3, height // 3 + 100, width // 4, width // 4 + 300)  # across tile rows
            expected = tif.series[0].levels[level].asarray()[box[0] : box[1], box[2] : box[3]]
            np.testing.assert_array_equal(read_window(info.ref, box), np.moveaxis(expected, -1, 0))
