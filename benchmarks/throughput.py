"""End-to-end throughput and peak memory of ``fcnpipe run``, against the model alone.

For each image size N (default 4096, 16384, 32768) this script

1. makes, once, a synthetic N x N RGB uint8 TIFF with 512 x 512 JPEG tiles (smooth coloured regions
   plus noise, written tile by tile from a generator so the image is never in memory) and a
   reference-FCN state_dict (``ReferenceFCN(3, 3)``, seed 0), cached in the work folder;
2. runs the real CLI as a subprocess (``python -m pipeline run IMAGE --model SD.pt -o OUT.zarr``)
   under a small helper process that reports the child's wall time and peak RSS
   (``getrusage(RUSAGE_CHILDREN).ru_maxrss``, exact, per measurement), and reads the in-process
   ``compute`` time from the store's ``fcnpipe.timings_s`` attribute;
3. times the same network alone on in-memory random batches of the same shape (tile + 2 x halo,
   the default batch), with the same workers x torch threads as the run (``thread_plan``), the
   workers calling one shared :class:`pipeline.model.Predictor` concurrently from threads, right
   before and right after the run (their mean is reported; on a shared VM the speed drifts);
4. prints a table and writes it as JSON to ``--out``.

Run on demand (not in CI)::

    .venv/bin/python benchmarks/throughput.py [--sizes 4096 16384 32768] [--tile 512] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tifffile
import torch
import zarr

from pipeline import __version__
from pipeline.checkpoint import load_model
from pipeline.cluster import available_cores, thread_plan
from pipeline.config import TilingConfig
from pipeline.model import Predictor, ReferenceFCN, set_torch_threads
from pipeline.receptive import halo_for, measure_receptive_radius, measure_stride

FILE_TILE = 512
# Runs argv[2:] and writes {"wall_s", "maxrss_kib", "rc"} to argv[1]; a fresh process per run so
# RUSAGE_CHILDREN holds exactly that one child (ru_maxrss is in KiB on Linux).
HELPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
json.dump({"wall_s": wall, "maxrss_kib": peak, "rc": rc}, open(sys.argv[1], "w"))
"""


def synthetic_tiles(n: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Row-major ``(512, 512, 3)`` uint8 tiles of a slide-like image: blobs on a pale background + noise."""
    rng = np.random.default_rng(seed)
    blobs = [(rng.uniform(0, n), rng.uniform(0, n), rng.uniform(0.05, 0.25) * n, rng.uniform(40, 220, 3))
             for _ in range(8)]  # fmt: skip
    background = np.array([235.0, 215.0, 225.0], dtype=np.float32)
    side = np.arange(FILE_TILE, dtype=np.float32)
    for y0 in range(0, n, FILE_TILE):
        for x0 in range(0, n, FILE_TILE):
            yy, xx = (y0 + side)[:, None], (x0 + side)[None, :]
            img = np.broadcast_to(background, (FILE_TILE, FILE_TILE, 3)).copy()
            for cy, cx, radius, colour in blobs:
                weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / np.float32(radius * radius))[..., None]
                img += weight * (colour.astype(np.float32) - img)
            img += rng.normal(0.0, 8.0, img.shape).astype(np.float32)
            yield np.clip(img, 0, 255).astype(np.uint8)


def make_inputs(work: str, n: int) -> tuple[str, str]:
    """The cached TIFF and state_dict for size ``n`` (made atomically, skipped when present)."""
    os.makedirs(work, exist_ok=True)
    model_path = os.path.join(work, "reference_fcn_3x3.pt")
    if not os.path.exists(model_path):
        torch.manual_seed(0)
        torch.save(ReferenceFCN(3, 3).state_dict(), model_path + ".part")
        os.replace(model_path + ".part", model_path)
    image_path = os.path.join(work, f"slide_{n}_jpeg.tif")
    if not os.path.exists(image_path):
        started = time.perf_counter()
        print(f"making {image_path} ...", file=sys.stderr, flush=True)
        tifffile.imwrite(image_path + ".part", synthetic_tiles(n), shape=(n, n, 3), dtype="uint8",
                         tile=(FILE_TILE, FILE_TILE), compression="jpeg", photometric="rgb", bigtiff=True)  # fmt: skip
        os.replace(image_path + ".part", image_path)
        print(f"  made in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return image_path, model_path


def run_cli(image: str, model: str, out: str, tile: int, log: str) -> dict[str, Any]:
    """One end-to-end ``fcnpipe run`` in a fresh helper process: wall time, peak RSS, stored timings."""
    cli = [sys.executable, "-m", "pipeline", "run", image, "--model", model, "-o", out,
           "--tile", str(tile), "--overwrite", "--no-progress"]  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        report = fh.name
    try:
        with open(log, "w") as err:
            subprocess.run([sys.executable, "-c", HELPER, report, *cli], stdout=err, stderr=err, check=True)
        with open(report) as fh:
            measured: dict[str, Any] = json.load(fh)
    finally:
        os.unlink(report)
    if measured["rc"] != 0:
        with open(log) as fh:
            raise RuntimeError(f"fcnpipe run failed (exit {measured['rc']}):\n{fh.read()[-3000:]}")
    record = zarr.open_group(out, mode="r").attrs["fcnpipe"]
    if not record.get("complete"):
        raise RuntimeError(f"{out}: not marked complete")
    measured["timings_s"] = dict(record["timings_s"])
    return measured


def model_only(model_path: str, tile: int, batch: int, workers: int, threads: int,
               min_mpx: float, min_s: float) -> dict[str, float]:  # fmt: skip
    """Mpx/s of the network alone: ``workers`` threads calling one Predictor on random batches."""
    set_torch_threads(threads)
    module = load_model(model_path).module
    stride = measure_stride(module, 3)
    halo = halo_for(measure_receptive_radius(module, 3, stride), stride)
    predictor = Predictor(module, torch.device("cpu"))
    side = tile + 2 * halo
    rng = np.random.default_rng(0)
    batches = [rng.random((batch, 3, side, side), dtype=np.float32) for _ in range(workers)]
    mpx_per_call = batch * tile * tile / 1e6  # output (core) pixels, as the pipeline counts them
    calls = [0]
    lock = threading.Lock()
    started = [0.0]

    def loop(index: int) -> None:
        while True:
            predictor(batches[index])
            with lock:
                calls[0] += 1
                if calls[0] * mpx_per_call >= min_mpx and time.perf_counter() - started[0] >= min_s:
                    return

    with ThreadPoolExecutor(workers) as pool:
        for _ in range(2):  # warm-up: allocator, oneDNN primitives, thread pools
            list(pool.map(predictor, batches))
        started[0] = time.perf_counter()
        list(pool.map(loop, range(workers)))
        seconds = time.perf_counter() - started[0]
    mpx = calls[0] * mpx_per_call
    return {"mpx": mpx, "seconds": seconds, "mpx_per_s": mpx / seconds, "input_side": side, "halo": halo}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768], help="image sides N")
    parser.add_argument("--tile", type=int, default=TilingConfig().tile, help="pipeline tile core (px)")
    parser.add_argument("--work", default="/tmp/fcnpipe-bench", help="cache for inputs and outputs")
    parser.add_argument("--out", default=None, help="folder for results.json (default: WORK/results)")
    parser.add_argument("--model-mpx", type=float, default=64.0, help="model-only: at least this many Mpx")
    parser.add_argument("--model-seconds", type=float, default=10.0, help="model-only: and at least this long")
    parser.add_argument("--keep", action="store_true", help="keep the output stores (can be many GB)")
    args = parser.parse_args(argv)
    out_dir = args.out or os.path.join(args.work, "results")
    os.makedirs(out_dir, exist_ok=True)
    batch = TilingConfig().batch
    cores = available_cores()
    workers, threads = thread_plan(cores, None, None, "cpu")
    print(f"{cores} cores: {workers} workers x {threads} torch threads, tile {args.tile}, batch {batch}",
          file=sys.stderr, flush=True)  # fmt: skip

    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        image, model = make_inputs(args.work, n)
        store = os.path.join(args.work, f"out_{n}.zarr")
        # The model alone right before and right after the run: on a shared VM the speed drifts.
        print(f"N={n}: model only, then fcnpipe run, then model only ...", file=sys.stderr, flush=True)
        before = model_only(model, args.tile, batch, workers, threads, args.model_mpx, args.model_seconds)
        e2e = run_cli(image, model, store, args.tile, os.path.join(out_dir, f"run_{n}.log"))
        if not args.keep:
            shutil.rmtree(store)
        after = model_only(model, args.tile, batch, workers, threads, args.model_mpx, args.model_seconds)
        model_rate = (before["mpx_per_s"] + after["mpx_per_s"]) / 2
        drift = abs(before["mpx_per_s"] - after["mpx_per_s"]) / model_rate
        if drift > 0.2:
            print(f"N={n}: WARNING model-only speed drifted {drift:.0%} ({before['mpx_per_s']:.2f} before, "
                  f"{after['mpx_per_s']:.2f} after): the machine is noisy, rerun", file=sys.stderr)  # fmt: skip
        mpx = n * n / 1e6
        e2e_rate = mpx / e2e["wall_s"]
        rows.append({
            "size": n, "mpx": mpx, "input_bytes": os.path.getsize(image),
            "e2e_s": e2e["wall_s"], "e2e_mpx_per_s": e2e_rate,
            "setup_s": e2e["timings_s"]["setup"], "compute_s": e2e["timings_s"]["compute"],
            "compute_mpx_per_s": mpx / e2e["timings_s"]["compute"],
            "model_mpx_per_s": model_rate, "model_only": {"before": before, "after": after, "drift": drift},
            "ratio": e2e_rate / model_rate, "peak_rss_mib": e2e["maxrss_kib"] / 1024,
        })  # fmt: skip
        print(f"N={n}: {e2e['wall_s']:.1f} s, {e2e_rate:.2f} Mpx/s, peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB",
              file=sys.stderr, flush=True)  # fmt: skip

    header = ("size", "Mpx", "e2e s", "compute s", "e2e Mpx/s", "model Mpx/s", "ratio", "peak RSS MiB")
    lines = ["{:>7} {:>8} {:>8} {:>10} {:>10} {:>12} {:>6} {:>13}".format(*header)]
    for r in rows:
        lines.append(f"{r['size']:>7} {r['mpx']:>8.1f} {r['e2e_s']:>8.1f} {r['compute_s']:>10.1f} "
                     f"{r['e2e_mpx_per_s']:>10.2f} {r['model_mpx_per_s']:>12.2f} {r['ratio']:>6.2f} "
                     f"{r['peak_rss_mib']:>13.0f}")  # fmt: skip
    ordered = sorted(rows, key=lambda r: r["size"])
    small, large = ordered[0], ordered[-1]
    growth = large["peak_rss_mib"] / small["peak_rss_mib"]
    steps = [b["peak_rss_mib"] / a["peak_rss_mib"] for a, b in itertools.pairwise(ordered)]
    grows = growth > 1.25 and (not steps or steps[-1] > 1.15)  # still growing at the last step
    verdict = (f"peak RSS {'GROWS with size' if grows else 'levels off'}: x{growth:.2f} from N={small['size']} "
               f"to N={large['size']} ({large['mpx'] / small['mpx']:.0f}x the pixels); "
               f"step by step: {', '.join(f'x{s:.2f}' for s in steps) or '-'}")  # fmt: skip
    print("\n".join([*lines, verdict]))
    result = {
        "fcnpipe_version": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "machine": platform.machine(), "cores": cores, "workers": workers, "torch_threads": threads,
        "tile": args.tile, "batch": batch, "compression": "jpeg", "rows": rows,
        "rss_growth": growth, "rss_steps": steps, "table": lines, "verdict": verdict,
    }  # fmt: skip
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {os.path.join(out_dir, 'results.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
