"""Sharded stores (``--shard N``, OME-Zarr 0.5 on Zarr v3): the unsharded store's values in fewer
files, one task a shard, and a killed run resumed to the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import load_config
from pipeline.model.network import ReferenceFCN
from pipeline.run.describe import store_info
from pipeline.run.plan import prepare
from pipeline.store.layout import shard_shape
from pipeline.store.pyramid import level_shapes
from pipeline.tiling import blocks, plan_tiles
from tests.conftest import random_image

SHAPE = (1300, 1100)
"""Two levels: 11 x 9 chunks of 128 px at level 0 (6 x 5 shards of 2 x 2), 6 x 5 at level 1 (3 x 3)."""
FIXED = ["--tile", "128", "--workers", "2", "--torch-threads", "1", "--no-preview", "--no-progress"]
V3 = ["--format", "ome-zarr-0.5"]
ARRAYS = ("0", "1", "labels/argmax/0", "labels/argmax/1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An RGB image, a mask that leaves out whole shards (the top-left 512 px) and parts of others
    (chunk row 6), and a small reference FCN."""
    folder = tmp_path_factory.mktemp("shard-inputs")
    image = folder / "image.tif"
    tifffile.imwrite(image, random_image((*SHAPE, 3), seed=5), photometric="rgb", tile=(256, 256))
    keep = np.ones(SHAPE, np.uint8)
    keep[:512, :512] = 0
    keep[768:896] = 0
    mask = folder / "mask.tif"
    tifffile.imwrite(mask, keep * 255)
    torch.manual_seed(0)
    model = folder / "model.pt"
    torch.save(ReferenceFCN(3, 3, 8).state_dict(), model)
    return image, mask, model


def run(inputs: tuple[Path, Path, Path], out: Path, *flags: str) -> None:
    image, mask, model = inputs
    result = CliRunner().invoke(cli, ["run", str(image), "-m", str(model), "-o", str(out), "--mask", str(mask), *flags])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def stores(inputs: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same run unsharded and in shards of 2 x 2 chunks."""
    folder = tmp_path_factory.mktemp("shard-stores")
    made = {"plain": folder / "plain.zarr", "sharded": folder / "sharded.zarr"}
    run(inputs, made["plain"], *FIXED, *V3)
    run(inputs, made["sharded"], *FIXED, *V3, "--shard", "2")
    return made


def data_files(store: Path) -> Iterator[Path]:
    """Every file of a store but its metadata (``zarr.json``)."""
    return (p for p in store.rglob("*") if p.is_file() and p.name != "zarr.json")


def test_sharded_store_holds_the_unsharded_values_at_every_level(stores: dict[str, Path]) -> None:
    plain, sharded = (zarr.open_group(stores[name], mode="r") for name in ("plain", "sharded"))
    for name in ARRAYS:
        assert plain[name].shards is None
        assert sharded[name].chunks == plain[name].chunks and sharded[name].shards is not None
        assert sharded[name].shards[-2:] == shard_shape(sharded[name].shape[-2:], sharded[name].chunks[-2:], 2)
        values, expected = sharded[name][...], plain[name][...]
        assert values.dtype == expected.dtype and values.tobytes() == expected.tobytes(), name
    assert (plain["labels/argmax/0"][...] == 255).any()  # the mask left chunks out: shards with gaps
    assert sharded.attrs["fcnpipe"]["stats"] == plain.attrs["fcnpipe"]["stats"]


def test_a_file_per_shard_instead_of_a_file_per_chunk(stores: dict[str, Path]) -> None:
    """Each chunk file of the unsharded store lies in one shard of 2 x 2 chunks: the sharded store
    has a file for each shard that holds any chunk, and nothing else (metadata aside)."""
    chunk_files = [p.relative_to(stores["plain"]).parts for p in data_files(stores["plain"])]
    shards = {(*parts[:-2], int(parts[-2]) // 2, int(parts[-1]) // 2) for parts in chunk_files}
    files = [p.relative_to(stores["sharded"]).parts for p in data_files(stores["sharded"])]
    assert sorted(files) == sorted(tuple(map(str, shard)) for shard in shards)
    assert len(files) < len(chunk_files) / 3
    plain, sharded = store_info(str(stores["plain"])), store_info(str(stores["sharded"]))
    assert sharded["chunks"] == plain["chunks"]  # chunks on disk counted from the shards' indexes
    assert [level["shard_width"] for level in sharded["levels"]] == [256, 256]


def test_every_shard_is_written_by_exactly_one_task(inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The plan's level-0 tasks own whole shards, each its own; the pyramid's tasks likewise at
    every level (``fcnpipe.compute.tasks.build_reduce_tasks`` groups by :func:`blocks`)."""
    image, _, model = inputs
    shard = 3  # odd, so that shards and 2 x 2 blocks do not line up
    output = {"path": str(tmp_path / "o.zarr"), "format": "ome-zarr-0.5", "shard": shard}
    sections = {"input": {"path": str(image)}, "model": {"path": str(model)}, "output": output}
    plan = prepare(load_config([], {**sections, "tiling": {"tile": 128}, "mask": {"mode": "none"}}))
    assert not plan.level1  # a level-1 shard spans four tasks' shards: made with the pyramid
    side = shard_shape(plan.grid.shape, (128, 128), shard)
    owners: dict[tuple[int, int], str] = {}
    for group in plan.groups():
        places = {(t.core[0] // side[0], t.core[2] // side[1]) for t in group}
        assert len(places) == 1  # one task, one shard
        (place,) = places
        assert place not in owners
        owners[place] = f"r{group[0].row}c{group[0].col}"
    rows, cols = -(-plan.grid.shape[0] // side[0]), -(-plan.grid.shape[1] // side[1])
    assert sorted(owners) == [(r, c) for r in range(rows) for c in range(cols)]  # and every shard has one
    assert sorted(t.core for g in plan.groups() for t in g) == sorted(t.core for t in plan.tiles)
    for height, width in level_shapes(8000, 5000)[1:]:
        side = shard_shape((height, width), (min(128, height), min(128, width)), shard)
        groups = list(blocks(plan_tiles(height, width, 128, 0), shard))
        shards_of = [{(t.core[0] // side[0], t.core[2] // side[1]) for t in group} for group in groups]
        assert all(len(s) == 1 for s in shards_of) and len({min(s) for s in shards_of}) == len(groups)


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_to_the_same_bytes(
    inputs: tuple[Path, Path, Path], stores: dict[str, Path], tmp_path: Path
) -> None:
    """Killed just before its task r4c4 renames its level-0 label shard into place (its probability
    shard is in place, the task has no marker); a half-written label shard is then left where the
    shard goes, as a writer without a rename would leave it. Resumed, the task is computed again and
    every file equals the uninterrupted run's."""
    image, mask, model = inputs
    store = tmp_path / "killed.zarr"
    label_shard = store / "labels/argmax/0/c/2/2"
    env = {**os.environ, "FCNPIPE_FAULT": "kill", "FCNPIPE_FAULT_AT": "2", "FCNPIPE_FAULT_TARGET": f"{label_shard}."}
    dying = [sys.executable, str(Path(__file__).with_name("dying.py")), "run", image, "-m", model, "-o", store]
    command = [*map(str, dying), "--mask", str(mask), *FIXED, *V3, "--shard", "2"]
    done = subprocess.run(command, env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    (partial,) = label_shard.parent.glob("2.*.partial")  # the whole shard, written but not renamed
    assert (store / "0/c/0/2/2").is_file() and not (store / ".fcnpipe/done/r4c4").exists()
    label_shard.write_bytes(partial.read_bytes()[: partial.stat().st_size // 2])
    run(inputs, store, *FIXED, *V3, "--shard", "2", "--resume")
    reference = stores["sharded"]
    names = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    for name in names:
        if name != Path("zarr.json"):  # the root's record holds times and a resume count
            assert (store / name).read_bytes() == (reference / name).read_bytes(), name
    record, expected = (zarr.open_group(p, mode="r").attrs["fcnpipe"] for p in (store, reference))
    assert record["resumed"] == 1 and record["stats"] == expected["stats"]


def test_sharded_store_is_valid_ome_zarr_0_5(stores: dict[str, Path]) -> None:
    from ome_zarr_models import open_ome_zarr

    group = zarr.open_group(str(stores["sharded"]), mode="r")
    assert type(open_ome_zarr(group)).__module__.startswith("ome_zarr_models.v05")
    assert type(open_ome_zarr(group["labels/argmax"])).__name__ == "ImageLabel"


def one_error(inputs: tuple[Path, Path, Path], tmp_path: Path, *flags: str) -> str:
    image, _, model = inputs
    out = tmp_path / "o.zarr"
    result = CliRunner().invoke(cli, ["run", str(image), "-m", str(model), "-o", str(out), *flags])
    assert result.exit_code == 2 and not out.exists(), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_shard_with_ome_zarr_0_4_is_refused_in_one_line(inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    assert one_error(inputs, tmp_path, "--shard", "4") == (
        "fcnpipe: error: Expected output.format ome-zarr-0.5 with output.shard (shards are Zarr v3's). "
        "Got ome-zarr-0.4 (Zarr v2) instead; pass --format ome-zarr-0.5 to shard the store"
    )


@pytest.mark.parametrize("value", ["0", "-3"], ids=["zero", "negative"])
def test_shard_must_be_a_positive_integer(inputs: tuple[Path, Path, Path], tmp_path: Path, value: str) -> None:
    line = one_error(inputs, tmp_path, *V3, "--shard", value)
    assert line == f"fcnpipe: error: --shard: Expected a positive integer. Got {value} instead."


def test_shard_with_blending_is_refused(inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    line = one_error(inputs, tmp_path, *V3, "--shard", "2", "--tile", "128", "--halo", "0", "--blend", "cosine")
    assert "output.shard cannot be used with tiling.blend" in line
