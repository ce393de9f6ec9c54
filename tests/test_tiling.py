"""Tiles partition the image exactly once, and windows hold exactly the halo the network needs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.tiling import batched, grid_shape, halo_overhead, plan_tiles

CASES = [(5, 7, 4, 1), (1, 1, 8, 2), (97, 131, 32, 1), (64, 64, 64, 3), (100, 33, 10, 0), (17, 300, 16, 40)]


@pytest.mark.parametrize(("height", "width", "tile", "halo"), CASES, ids=[f"{h}x{w}-t{t}-h{a}" for h, w, t, a in CASES])
def test_cores_cover_every_pixel_exactly_once(height: int, width: int, tile: int, halo: int) -> None:
    count = np.zeros((height, width), dtype=np.int32)
    for t in plan_tiles(height, width, tile, halo):
        y0, y1, x0, x1 = t.core
        count[y0:y1, x0:x1] += 1
    assert (count == 1).all()


@pytest.mark.parametrize(("height", "width", "tile", "halo"), CASES, ids=[f"{h}x{w}-t{t}-h{a}" for h, w, t, a in CASES])
def test_window_is_core_plus_halo_clipped_to_image(height: int, width: int, tile: int, halo: int) -> None:
    for t in plan_tiles(height, width, tile, halo):
        y0, y1, x0, x1 = t.core
        wy0, wy1, wx0, wx1 = t.window
        assert (wy0, wy1, wx0, wx1) == (
            max(0, y0 - halo),
            min(height, y1 + halo),
            max(0, x0 - halo),
            min(width, x1 + halo),
        )
        cy0, cy1, cx0, cx1 = t.crop
        assert (cy1 - cy0, cx1 - cx0) == (y1 - y0, x1 - x0)
        assert (wy0 + cy0, wx0 + cx0) == (y0, x0)


def test_cores_are_the_chunk_grid() -> None:
    tiles = plan_tiles(100, 70, 32, 2)
    assert grid_shape(100, 70, 32) == (4, 3)
    assert [(t.row, t.col) for t in tiles] == [(r, c) for r in range(4) for c in range(3)]
    assert all(t.core[0] == t.row * 32 and t.core[2] == t.col * 32 for t in tiles)


def test_stride_alignment_rounds_halo_and_checks_tile() -> None:
    tiles = plan_tiles(64, 64, 16, halo=3, stride=4)
    assert tiles[5].window == (12, 36, 12, 36)  # halo 3 rounded up to 4
    with pytest.raises(ConfigError, match="multiple of the network's stride 4"):
        plan_tiles(64, 64, 18, halo=3, stride=4)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_bad_tile_size_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="positive integer for tile size"):
        plan_tiles(10, 10, bad, 1)  # type: ignore[arg-type]


def test_batches_keep_order_and_overhead_counts_halo() -> None:
    tiles = plan_tiles(10, 10, 5, 1)
    assert [len(b) for b in batched(tiles, 3)] == [2, 2]  # a group never spans two rows
    assert [t for b in batched(tiles, 3) for t in b] == tiles
    wide = plan_tiles(10, 40, 5, 1)
    assert [len(b) for b in batched(wide, 3)] == [3, 3, 2, 3, 3, 2]
    assert halo_overhead(tiles) == pytest.approx(4 * 36 / 100 - 1)
    assert halo_overhead(plan_tiles(10, 10, 5, 0)) == 0.0
