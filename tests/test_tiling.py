"""Tiles partition the image exactly once, and windows hold exactly the halo the network needs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.tiling import batched, forward_size, grid_shape, halo_overhead, plan_tiles, split_core

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
    with pytest.raises(ConfigError, match="positive integer for 'tile size'"):
        plan_tiles(10, 10, bad, 1)  # type: ignore[arg-type]


def test_batches_keep_order_and_overhead_counts_halo() -> None:
    tiles = plan_tiles(10, 10, 5, 1)
    assert [len(b) for b in batched(tiles, 3)] == [2, 2]  # a group never spans two rows
    assert [t for b in batched(tiles, 3) for t in b] == tiles
    wide = plan_tiles(10, 40, 5, 1)
    assert [len(b) for b in batched(wide, 3)] == [3, 3, 2, 3, 3, 2]
    assert halo_overhead(tiles) == pytest.approx(4 * 36 / 100 - 1)
    assert halo_overhead(plan_tiles(10, 10, 5, 0)) == 0.0


PIECE_CASES = [(97, 131, 32, 1, 16), (203, 157, 48, 1, 32), (64, 64, 64, 8, 24), (5, 7, 4, 1, 3), (40, 40, 16, 3, 16)]


@pytest.mark.parametrize(
    ("height", "width", "tile", "halo", "size"),
    PIECE_CASES,
    ids=[f"{h}x{w}-t{t}-h{a}-p{p}" for h, w, t, a, p in PIECE_CASES],
)
def test_pieces_partition_each_core_and_read_their_halo_within_the_image(
    height: int, width: int, tile: int, halo: int, size: int
) -> None:
    for t in plan_tiles(height, width, tile, halo):
        y0, y1, x0, x1 = t.core
        count = np.zeros((y1 - y0, x1 - x0), dtype=np.int32)
        pieces = split_core(t, size, halo)
        for p in pieces:
            py0, py1, px0, px1 = p.core
            count[py0 - y0 : py1 - y0, px0 - x0 : px1 - x0] += 1
            assert (p.row, p.col) == (t.row, t.col)
            assert (py1 - py0, px1 - px0) <= (size, size) and (py0 - y0) % size == 0 and (px0 - x0) % size == 0
            # the piece's window is its core grown by the halo and clipped to the image, as a tile's is
            assert p.window == (max(0, py0 - halo), min(height, py1 + halo), max(0, px0 - halo), min(width, px1 + halo))
        assert (count == 1).all()
        assert len(pieces) == -(-(y1 - y0) // size) * -(-(x1 - x0) // size)


def test_forward_size_fits_the_budget_without_costing_much_halo() -> None:
    # the reference FCN: 64 channels x 4 bytes per pixel, halo 1
    assert forward_size(512, 1, 1, 256, 24 << 20) == 256  # 258^2 x 256 B = 17 MB; 514^2 x 256 B = 68 MB
    assert forward_size(512, 1, 1, 256, 80 << 20) == 512  # the whole tile fits
    assert forward_size(1024, 1, 1, 256, 24 << 20) == 256
    assert forward_size(512, 1, 1, 256, 8 << 20) == 128
    # where no side fits, the smallest whose halo costs at most 5% more: 128 hidden channels
    assert forward_size(512, 1, 1, 512, 8 << 20) == 128  # 130^2 x 512 B = 8.7 MB; 64 px: 6% more pixels
    # the divisor must be a multiple of the stride: 512 / 3 is not a whole number; 96 = 768 / 8 is
    assert forward_size(768, 8, 32, 64, 1 << 20) == 384  # none fits; 96 is not a multiple of 32; 256: >5% more
    assert forward_size(768, 0, 32, 64, 2 << 20) == 128
    # a wide halo: smaller passes would compute far more pixels, so the tile stays whole
    assert forward_size(512, 56, 8, 256, 24 << 20) == 512
    assert forward_size(512, 56, 8, 256, 24 << 20, extra=1.5) == 128  # 256 + 112 px windows are too large
