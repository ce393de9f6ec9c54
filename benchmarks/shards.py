"""Files in a store with and without shards: ``fcnpipe run --format ome-zarr-0.5 [--shard N]`` on an
N x N slide, every file of each store counted.

The slide is ``_common.make_inputs``'s synthetic JPEG-tiled TIFF (cached in ``--work``); the network is
a near-null ``ReferenceFCN(3, 3, hidden=1)`` (seed 0), so that the run's time is the pipeline's own
(reading, writing, the pyramid) and a 32768² slide takes about a minute a run on 2 cores. Every chunk
is computed (``--mask none``), so every chunk and every shard holds data: the counts are exactly
what the arithmetic of the levels says (:func:`expected_files`), which each run is checked against.
Each run's wall time and peak RSS come from ``_common.measured``; the stores are deleted after
counting (``--keep`` keeps them).

Run: ``.venv/bin/python benchmarks/shards.py [--size 32768] [--shards 8 16] [--tile 512] [--work DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from typing import Any

import torch
from _common import make_inputs, measured

from pipeline.model.network import ReferenceFCN
from pipeline.store.pyramid import level_shapes


def expected_files(size: int, tile: int, shard: int) -> dict[str, int]:
    """Chunk (or shard) files and ``zarr.json`` files of an ``size x size`` store in ``tile`` chunks,
    in shards of ``shard x shard`` chunks (0: none), every chunk holding data."""
    data = 0
    levels = level_shapes(size, size)
    for height, width in levels:
        rows, cols = math.ceil(height / tile), math.ceil(width / tile)
        if shard:
            rows, cols = math.ceil(rows / shard), math.ceil(cols / shard)
        data += 2 * rows * cols  # probabilities and labels
    return {"data": data, "metadata": 3 + 2 * len(levels), "levels": len(levels)}  # root, labels, labels/argmax


def count_files(store: str) -> dict[str, int]:
    """``{"data", "metadata"}``: the files of ``store``, ``zarr.json`` apart from the rest."""
    metadata = data = 0
    for _, _, names in os.walk(store):
        metadata += sum(name == "zarr.json" for name in names)
        data += sum(name != "zarr.json" for name in names)
    return {"data": data, "metadata": metadata}


def null_model(work: str) -> str:
    """A ``ReferenceFCN(3, 3, hidden=1)`` state_dict: one hidden channel, next to no compute."""
    path = os.path.join(work, "null_fcn_3x3_hidden1.pt")
    if not os.path.exists(path):
        torch.manual_seed(0)
        torch.save(ReferenceFCN(3, 3, hidden=1).state_dict(), path + ".part")
        os.replace(path + ".part", path)
    return path


def run(image: str, model: str, store: str, tile: int, shard: int, log: str) -> dict[str, Any]:
    """One ``fcnpipe run`` into ``store``, measured, its files counted."""
    command = [sys.executable, "-m", "pipeline", "run", image, "--model", model, "-o", store, "--tile", str(tile)]
    command += ["--format", "ome-zarr-0.5", "--overwrite", "--no-progress", "--no-preview", "--mask", "none"]
    command += ["--shard", str(shard)] if shard else []
    result = measured(command, log, f"fcnpipe run --shard {shard}")
    with open(os.path.join(store, "zarr.json"), encoding="utf-8") as file:
        timings = json.load(file)["attributes"]["fcnpipe"]["timings_s"]
    return {**result, "shard": shard, "files": count_files(store), "timings_s": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32768, help="slide side in pixels")
    parser.add_argument("--shards", type=int, nargs="+", default=[8, 16], help="chunks per shard side to try")
    parser.add_argument("--tile", type=int, default=512, help="tile = chunk side in pixels")
    parser.add_argument("--work", default="/tmp/fcnpipe-shards", help="cache for inputs and outputs")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    args = parser.parse_args(argv)
    image, _ = make_inputs(args.work, args.size)
    model = null_model(args.work)
    results = []
    for shard in [0, *args.shards]:
        store = os.path.join(args.work, f"slide_{args.size}_shard{shard}.zarr")
        done = run(image, model, store, args.tile, shard, store.replace(".zarr", ".log"))
        expected = expected_files(args.size, args.tile, shard)
        if done["files"] != {k: expected[k] for k in ("data", "metadata")}:
            raise RuntimeError(f"{store}: {done['files']} files, the arithmetic says {expected}")
        results.append(done)
        if not args.keep:
            shutil.rmtree(store)
    print(f"{args.size}² px, {args.tile} px chunks, {expected_files(args.size, args.tile, 0)['levels']} levels:")
    print(f"{'shard':>12} {'data files':>11} {'zarr.json':>10} {'wall s':>8} {'pyramid s':>10} {'peak MiB':>9}")
    for r in results:
        files, timings = r["files"], r["timings_s"]
        name = f"{r['shard']} x {r['shard']}" if r["shard"] else "none"
        print(
            f"{name:>12} {files['data']:>11,} {files['metadata']:>10} {r['wall_s']:>8.1f} "
            f"{timings['pyramid']:>10.1f} {r['maxrss_kib'] / 1024:>9.0f}"
        )
    with open(os.path.join(args.work, "shards.json"), "w", encoding="utf-8") as file:
        json.dump({"size": args.size, "tile": args.tile, "runs": results}, file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
