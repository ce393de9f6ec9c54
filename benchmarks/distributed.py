"""Throughput of ``fcnpipe run`` on this machine's threads and on a local Dask cluster of 1 and 2 processes.

The same image, network and tile as ``throughput.py`` (a synthetic JPEG-tiled RGB TIFF, the reference
FCN), run end to end as a subprocess three ways: ``--scheduler threads`` (the default), and
``--scheduler processes --workers 1`` / ``2`` (a ``distributed.LocalCluster`` started for the run,
one Dask thread per process, torch threads = cores / processes). Prints a table with wall time, the
run's own compute time, Mpx/s and peak RSS of the fcnpipe process (the workers are its children:
their memory is not in it, see the note printed), and writes ``distributed.json`` to ``--out``.

Run on demand (not in CI)::

    .venv/bin/python benchmarks/distributed.py [--size 8192] [--tile 512] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os

from _common import environment, make_inputs, run_cli

WAYS = {
    "threads": ["--scheduler", "threads"],
    "1 process": ["--scheduler", "processes", "--workers", "1"],
    "2 processes": ["--scheduler", "processes", "--workers", "2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="image side in pixels")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--work", default="/tmp/fcnpipe-bench", help="cache of inputs")
    parser.add_argument("--out", default=None, help="results folder (default WORK/results)")
    args = parser.parse_args()
    out = args.out or os.path.join(args.work, "results")
    os.makedirs(out, exist_ok=True)
    image, model = make_inputs(args.work, args.size)
    megapixels = args.size**2 / 1e6
    rows = []
    for name, flags in WAYS.items():
        store = os.path.join(args.work, f"distributed_{args.size}.zarr")
        log = os.path.join(out, f"distributed_{name.replace(' ', '_')}.log")
        result = run_cli(image, model, store, args.tile, log, extra=flags)
        compute = result["timings_s"]["compute"]
        rows.append(
            {
                "way": name,
                "wall_s": result["wall_s"],
                "compute_s": compute,
                "e2e_mpx_s": megapixels / result["wall_s"],
                "compute_mpx_s": megapixels / compute,
                "peak_rss_mib": result["maxrss_kib"] / 1024,
            }
        )
    print(f"{args.size}^2 ({megapixels:.1f} Mpx), tile {args.tile}, reference FCN, {os.cpu_count()} cores")
    print(f"{'way':<12} {'wall s':>7} {'compute s':>9} {'e2e Mpx/s':>9} {'compute Mpx/s':>13} {'client RSS MiB':>14}")
    for r in rows:
        print(
            f"{r['way']:<12} {r['wall_s']:>7.1f} {r['compute_s']:>9.1f} {r['e2e_mpx_s']:>9.2f} "
            f"{r['compute_mpx_s']:>13.2f} {r['peak_rss_mib']:>14.0f}"
        )
    print("note: with processes the network runs in the workers; the RSS column is the client process only")
    with open(os.path.join(out, "distributed.json"), "w") as fh:
        json.dump({"environment": environment(), "size": args.size, "tile": args.tile, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
