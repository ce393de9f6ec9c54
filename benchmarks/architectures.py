"""Speed of each shipped architecture: the model alone, end to end, and what batching and channels-last buy.

For the reference FCN (``ReferenceFCN(3, 3)``), FCN-8s (``FCN8s(3, 3)``) and U-Net (``UNet(3, 3)``), all
with their default widths, seeded weights, at one tile size (default: the pipeline's), this script

1. writes an fcnpipe checkpoint (:func:`pipeline.model.checkpoint.save_checkpoint`) and loads it back as a run
   does, measures its stride, receptive radius and exact halo (as ``fcnpipe run`` does);
2. times the network alone on in-memory random float32 batches of the run's forward window
   (``batch x 3 x (forward + 2 halo)²``, ``forward`` the tile or the pieces the run predicts it in,
   :func:`pipeline.run.execute.forward_tile_for`), counted in output (core) pixels, with the run's workers x torch
   threads (``thread_plan``), the workers calling the model concurrently from threads, after warm-up:
   batch 1 against the default batch (both through :class:`pipeline.model.predictor.Predictor`, channels-last),
   then contiguous (the module called directly under ``torch.inference_mode``, softmax included)
   against channels-last (the Predictor), each pair in A B B A order so linear drift cancels;
3. runs ``python -m pipeline run IMAGE --model CKPT -o OUT.zarr --overwrite --no-progress --no-preview
   --mask none`` as a subprocess (``_common.run_cli``, which also measures its peak RSS) on a synthetic
   ``size x size`` RGB JPEG-tiled TIFF (``_common.make_inputs``, cached in ``--work``) between the two
   pairs, and reads the store's ``fcnpipe.timings_s``;
4. prints one table and writes it, with every measurement, as JSON to ``--out``.

Run on demand (not in CI)::

    .venv/bin/python benchmarks/architectures.py [--size 4096] [--tile 512] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import environment, geometry, make_inputs, run_cli, write_checkpoint
from torch import nn

from pipeline.compute.engine import available_cores, thread_plan
from pipeline.config import TilingConfig
from pipeline.model.checkpoint import load_model
from pipeline.model.predictor import Predictor, set_torch_threads
from pipeline.run.plan import forward_tile_for

ARCHITECTURES = ("reference_fcn", "fcn8s", "unet")
Forward = Callable[[np.ndarray], np.ndarray]


def contiguous(module: nn.Module) -> Forward:
    """Like :class:`Predictor` (softmax, float32 numpy out) but on contiguous tensors and weights."""
    net = copy.deepcopy(module).to(memory_format=torch.contiguous_format).eval()

    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = torch.softmax(net(torch.from_numpy(batch)), dim=1).contiguous().numpy()
            return out

    return forward


def rate(forward: Forward, batches: list[np.ndarray], tile: int, seconds: float) -> dict[str, float]:
    """Mpx/s (core pixels) of ``len(batches)`` threads each calling ``forward`` on its own batch.

    Each thread warms up with one call, then calls until ``seconds`` have passed; the total is the sum
    of each thread's own pixels over its own time, so a slow last call of one thread costs nothing.
    """
    mpx_per_call = batches[0].shape[0] * tile * tile / 1e6
    results: list[tuple[int, float]] = []
    barrier = threading.Barrier(len(batches))

    def loop(batch: np.ndarray) -> None:
        forward(batch)  # warm-up: allocator, oneDNN primitives, thread pools
        barrier.wait()
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            forward(batch)
            calls += 1
        results.append((calls, time.perf_counter() - started))

    threads = [threading.Thread(target=loop, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"mpx_per_s": sum(c * mpx_per_call / s for c, s in results), "calls": sum(c for c, _ in results)}


def ab(variants: dict[str, tuple[Forward, list[np.ndarray]]], tile: int, seconds: float) -> dict[str, float]:
    """Two variants in A B B A order, ``seconds / 2`` each time: the mean Mpx/s of each."""
    a, b = variants
    speeds: dict[str, list[float]] = {a: [], b: []}
    for name in (a, b, b, a):
        forward, batches = variants[name]
        speeds[name].append(rate(forward, batches, tile, seconds / 2)["mpx_per_s"])
    return {name: float(np.mean(s)) for name, s in speeds.items()}


def bench(name: str, image: str, args: argparse.Namespace, out_dir: str, plan: tuple[int, int]) -> dict[str, Any]:
    """Every measurement of one architecture (see the module doc)."""
    checkpoint, arguments = write_checkpoint(args.work, name)
    loaded = load_model(checkpoint)
    module = loaded.module
    stride, radius, halo = geometry(module)
    forward = forward_tile_for(TilingConfig(tile=args.tile), loaded, halo, stride, "cpu", blended=False) or args.tile
    window = forward + 2 * halo
    batch = TilingConfig().batch
    workers, _ = plan
    rng = np.random.default_rng(0)
    full = [rng.random((batch, 3, window, window), dtype=np.float32) for _ in range(workers)]
    # the run's windows are channels-last in memory (pipeline.compute.tasks.normalize): so are the
    # Predictor's inputs here, and the contiguous module gets contiguous ones
    interleaved = [np.ascontiguousarray(b.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) for b in full]
    single = [b[:1] for b in interleaved]
    plain = contiguous(module)  # before the Predictor turns the module channels-last, in place
    predictor = Predictor(module, torch.device("cpu"))
    print(f"{name}: stride {stride}, radius {radius}, halo {halo}, window {window}", file=sys.stderr, flush=True)
    batching = ab({"batch_1": (predictor, single), "batch_n": (predictor, interleaved)}, forward, args.seconds)
    e2e = run_cli(
        image, checkpoint, os.path.join(args.work, f"{name}.zarr"), args.tile, os.path.join(out_dir, f"run_{name}.log")
    )
    layout = ab({"contiguous": (plain, full), "channels_last": (predictor, interleaved)}, forward, args.seconds)
    # The default configuration was measured before the run (batch_n) and after it (channels_last).
    model = (batching["batch_n"] + layout["channels_last"]) / 2
    drift = abs(batching["batch_n"] - layout["channels_last"]) / model
    if drift > 0.2:
        print(
            f"{name}: WARNING model-only speed drifted {drift:.0%} across the run: noisy machine, rerun",
            file=sys.stderr,
        )
    e2e_rate = args.size * args.size / 1e6 / e2e["wall_s"]
    return {
        "architecture": name,
        "arguments": arguments,
        "stride": stride,
        "radius": radius,
        "halo": halo,
        "forward_tile": forward,
        "window": window,
        "batch": batch,
        "model_mpx_per_s": model,
        "model_drift": drift,
        "e2e_s": e2e["wall_s"],
        "timings_s": e2e["timings_s"],
        "e2e_mpx_per_s": e2e_rate,
        "ratio": e2e_rate / model,
        "peak_rss_mib": e2e["maxrss_kib"] / 1024,
        **{f"{k}_mpx_per_s": v for k, v in (batching | layout).items()},
        "batching_gain": batching["batch_n"] / batching["batch_1"],
        "channels_last_gain": layout["channels_last"] / layout["contiguous"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="image side N (the image is N x N)")
    parser.add_argument("--tile", type=int, default=TilingConfig().tile, help="pipeline tile core (px)")
    parser.add_argument("--work", default="/tmp/fcnpipe-bench", help="cache for the image, checkpoints, stores")
    parser.add_argument("--out", default="/tmp/fcnpipe-bench/architectures", help="folder for results.json")
    parser.add_argument("--seconds", type=float, default=8.0, help="model-only seconds per variant")
    parser.add_argument("--only", nargs="+", choices=ARCHITECTURES, default=ARCHITECTURES, help="a subset")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    image, _ = make_inputs(args.work, args.size)
    cores = available_cores()
    workers, threads = thread_plan(cores, None, None, "cpu")
    set_torch_threads(threads)
    print(
        f"{cores} cores: {workers} workers x {threads} torch threads, tile {args.tile}, "
        f"batch {TilingConfig().batch}, image {args.size}²",
        file=sys.stderr,
        flush=True,
    )
    rows = [bench(name, image, args, args.out, (workers, threads)) for name in args.only]

    header = (
        "architecture",
        "stride",
        "radius",
        "halo",
        "window",
        "model Mpx/s",
        "e2e Mpx/s",
        "ratio",
        "batch-1 Mpx/s",
        "batch-N Mpx/s",
        "contiguous Mpx/s",
        "channels-last Mpx/s",
    )
    lines = ["{:<13} {:>6} {:>6} {:>4} {:>6} {:>11} {:>9} {:>5} {:>13} {:>13} {:>16} {:>19}".format(*header)]
    for r in rows:
        lines.append(
            f"{r['architecture']:<13} {r['stride']:>6} {r['radius']:>6} {r['halo']:>4} {r['window']:>6} "
            f"{r['model_mpx_per_s']:>11.2f} {r['e2e_mpx_per_s']:>9.2f} {r['ratio']:>5.2f} "
            f"{r['batch_1_mpx_per_s']:>13.2f} {r['batch_n_mpx_per_s']:>13.2f} "
            f"{r['contiguous_mpx_per_s']:>16.2f} {r['channels_last_mpx_per_s']:>19.2f}"
        )
    gains = [
        f"{r['architecture']}: batch {r['batch']} vs 1 x{r['batching_gain']:.2f}, channels-last vs "
        f"contiguous x{r['channels_last_gain']:.2f}, e2e {r['e2e_s']:.1f} s, timings_s {r['timings_s']}"
        for r in rows
    ]
    print("\n".join([*lines, "", *gains]))
    result = {
        **environment(),
        "cores": cores,
        "workers": workers,
        "torch_threads": threads,
        "size": args.size,
        "tile": args.tile,
        "batch": TilingConfig().batch,
        "seconds": args.seconds,
        "rows": rows,
        "table": lines,
    }
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
