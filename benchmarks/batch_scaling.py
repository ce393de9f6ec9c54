"""Thousands of inputs: does ``fcnpipe batch`` cost the same per input at 100, 1,000 and 2,000?

Makes N small synthetic RGB TIFFs (``--side`` px square, default 128: one chunk, one task each) and a
network whose cost is negligible (``ReferenceFCN(3, 3, hidden=1)``, a state_dict), then runs
``python -m pipeline batch @list.txt -m MODEL -o OUT --mask none --no-preview --no-progress`` as a
subprocess for each N, in a fresh output folder, and measures

* its wall time, and seconds per input;
* the client's peak RSS: ``VmHWM`` of the fcnpipe process itself, read from ``/proc`` every 0.2 s
  (the last reading before it exits; its own high-water mark, whatever its children use), and the
  ``ru_maxrss`` that ``os.wait4`` returns (the largest of it and the children it waited for: with
  ``--scheduler processes`` that includes the Dask workers);
* the size of ``manifest.json``, ``manifest.csv`` and ``report.html`` at the end;
* the time per input of the first and of the last 10% of inputs (at least 48), from the moments the
  inputs ended (the ``done ...`` lines of ``fcnpipe-batch.log``, stamped to the millisecond; the
  slope of a least-squares line through them): if the last is slower, something in the batch loop
  costs more as inputs end; if both grow with N, something costs O(N) per input from the start.

It then checks the manifest: every input listed once, all ``done`` (``already complete`` again).

Run on demand (not in CI)::

    .venv/bin/python benchmarks/batch_scaling.py [--sizes 100 1000 2000] [--quick] [--scheduler threads processes]

``--quick`` is ``--sizes 50 200``; ``--again`` runs each command a second time on the folder it
completed, as a restart would (every input ``already complete``). Inputs are cached in ``--work``
(default ``/tmp/fcnpipe-bench/batch``); the results go to ``--out`` (default ``WORK/results``) as
``batch_scaling.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import tifffile
import torch

from pipeline.model.network import ReferenceFCN

FIXED = ["--mask", "none", "--no-preview", "--no-progress"]
ENDED = ("done ", "already complete ", "failed ")
"""How the log line of an input that ended starts (:func:`pipeline.cli.report.batch_item_line`)."""


def make_inputs(work: str, count: int, side: int) -> tuple[list[str], str]:
    """``count`` ``side`` x ``side`` RGB TIFFs (cached) and the tiny network's state_dict."""
    folder = os.path.join(work, f"inputs_{side}")
    os.makedirs(folder, exist_ok=True)
    model = os.path.join(work, "reference_fcn_hidden1.pt")
    if not os.path.exists(model):
        torch.manual_seed(0)
        torch.save(ReferenceFCN(3, 3, hidden=1).state_dict(), model + ".part")
        os.replace(model + ".part", model)
    paths = [os.path.join(folder, f"in_{i:05d}.tif") for i in range(count)]
    rng = np.random.default_rng(0)
    for path in paths:
        if not os.path.exists(path):
            image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            tifffile.imwrite(path + ".part", image, photometric="rgb")
            os.replace(path + ".part", path)
    return paths, model


def _hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_batch(command: list[str], log: str) -> dict[str, Any]:
    """Run ``command``; its wall time, exit code, the client's VmHWM and wait4's ru_maxrss (KiB)."""
    readings: list[int] = []
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out)
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                value = _hwm_kib(process.pid)
                if value is not None:
                    readings.append(value)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": wall,
        "rc": process.returncode,
        "client_hwm_kib": max(readings, default=0),
        "tree_maxrss_kib": usage.ru_maxrss,
    }


def ended_at(log: str, skip: int = 0) -> list[float]:
    """Seconds (epoch) at which each input ended, from ``fcnpipe-batch.log`` after its first
    ``skip`` bytes (an earlier run's), in order."""
    moments = []
    with open(log, encoding="utf-8") as file:
        file.seek(skip)
        for line in file:
            parts = line.split(" ", 3)  # date, time,ms, level, message
            if len(parts) == 4 and parts[3].startswith(ENDED):
                stamp = datetime.datetime.strptime(f"{parts[0]} {parts[1]}", "%Y-%m-%d %H:%M:%S,%f")
                moments.append(stamp.timestamp())
    return moments


def per_input(moments: list[float], share: float = 0.1, least: int = 48) -> tuple[float, float]:
    """Seconds per input over the first and over the last ``share`` of the inputs to end (at least
    ``least`` inputs, three waves of 16, at most half of them): the least-squares slope of the
    moments the inputs ended against their rank, which the bursts of a wave's ends do not bias.
    """
    k = min(max(least, int(len(moments) * share)), len(moments) // 2)
    if k < 2:
        return float("nan"), float("nan")
    first, last = moments[:k], moments[-k:]
    return float(np.polyfit(range(k), first, 1)[0]), float(np.polyfit(range(k), last, 1)[0])


def check_manifest(outdir: str, inputs: list[str], status: str) -> str:
    """``"ok"`` if the manifest lists every input once, each with ``status``; else what is wrong."""
    with open(os.path.join(outdir, "manifest.json"), encoding="utf-8") as file:
        rows = json.load(file)["inputs"]
    listed = [row["input"] for row in rows]
    if sorted(listed) != sorted(inputs):
        return f"{len(listed)} rows for {len(inputs)} inputs"
    wrong = [row for row in rows if row["status"] != status]
    return "ok" if not wrong else f"{len(wrong)} not {status}, e.g. {wrong[0]['input']}: {wrong[0]['status']}"


def measure(
    count: int, inputs: list[str], model: str, scheduler: str, work: str, extra: list[str], again: bool = False
) -> dict[str, Any]:
    """One ``fcnpipe batch`` of the first ``count`` inputs into a fresh folder; ``again``: the same
    command once more, into the folder the last one completed (every input already complete)."""
    outdir = os.path.join(work, f"out_{scheduler}_{count}")
    if not again:
        shutil.rmtree(outdir, ignore_errors=True)
        os.makedirs(outdir)
    listed = os.path.join(work, f"list_{count}.txt")
    with open(listed, "w") as file:
        file.write("".join(f"{path}\n" for path in inputs[:count]))
    command = [sys.executable, "-m", "pipeline", "batch", f"@{listed}", "-m", model, "-o", outdir, *FIXED]
    command += ["--scheduler", scheduler, *extra]
    what = f"{scheduler}_{count}" + ("_again" if again else "")
    print(f"N={count} {what}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    log = os.path.join(outdir, "fcnpipe-batch.log")
    skip = os.path.getsize(log) if again else 0  # the log is appended to
    result = run_batch(command, os.path.join(work, f"batch_{what}.stderr"))
    if result["rc"] != 0:
        raise RuntimeError(f"fcnpipe batch exited {result['rc']}: see {work}/batch_{what}.stderr")
    moments = ended_at(log, skip)
    first, last = per_input(moments)
    sizes = {
        name: os.path.getsize(os.path.join(outdir, name)) for name in ("manifest.json", "manifest.csv", "report.html")
    }
    status = "already complete" if again else "done"
    return {
        "scheduler": scheduler + (" again" if again else ""),
        "inputs": count,
        **result,
        "s_per_input": result["wall_s"] / count,
        "first_10pct_s_per_input": first,
        "last_10pct_s_per_input": last,
        "bytes": sizes,
        "manifest": check_manifest(outdir, [os.path.abspath(p) for p in inputs[:count]], status),
        "outdir": outdir,
        "ended_s": [round(m - moments[0], 3) for m in moments],
    }


HEADER = (
    f"{'scheduler':<16} {'N':>5} {'wall s':>7} {'s/input':>8} {'client MiB':>10} {'tree MiB':>8} "
    f"{'manifest KiB':>12} {'report KiB':>10} {'first 10% s':>11} {'last 10% s':>10} {'last/first':>10}  manifest"
)


def line(r: dict[str, Any]) -> str:
    return (
        f"{r['scheduler']:<16} {r['inputs']:>5} {r['wall_s']:>7.1f} {r['s_per_input']:>8.3f} "
        f"{r['client_hwm_kib'] / 1024:>10.0f} {r['tree_maxrss_kib'] / 1024:>8.0f} "
        f"{r['bytes']['manifest.json'] / 1024:>12.0f} {r['bytes']['report.html'] / 1024:>10.0f} "
        f"{r['first_10pct_s_per_input']:>11.3f} {r['last_10pct_s_per_input']:>10.3f} "
        f"{r['last_10pct_s_per_input'] / r['first_10pct_s_per_input']:>10.2f}  {r['manifest']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 2000], help="numbers of inputs")
    parser.add_argument("--quick", action="store_true", help="--sizes 50 200")
    parser.add_argument("--side", type=int, default=128, help="side of each input in pixels")
    parser.add_argument("--scheduler", nargs="+", default=["threads"], help="threads and/or processes")
    parser.add_argument("--again", action="store_true", help="then the same command again: a restart's cost")
    parser.add_argument("--work", default="/tmp/fcnpipe-bench/batch", help="cache of inputs, outputs")
    parser.add_argument("--out", default=None, help="results folder (default WORK/results)")
    parser.add_argument("--keep", action="store_true", help="keep each N's output folder")
    parser.add_argument("extra", nargs="*", help="more fcnpipe batch flags, after --")
    args = parser.parse_args()
    sizes = [50, 200] if args.quick else args.sizes
    out = args.out or os.path.join(args.work, "results")
    os.makedirs(out, exist_ok=True)
    inputs, model = make_inputs(args.work, max(sizes), args.side)
    rows = []
    for scheduler in args.scheduler:
        for count in sizes:
            for again in (False, True) if args.again else (False,):
                rows.append(measure(count, inputs, model, scheduler, args.work, args.extra, again))
                print(line(rows[-1]), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(rows[-1]["outdir"])
    print(f"{args.side}x{args.side} RGB inputs, ReferenceFCN(3, 3, hidden=1), {os.cpu_count()} cores")
    print(HEADER)
    for r in rows:
        print(line(r))
    print(
        "client MiB: VmHWM of the fcnpipe process; tree MiB: wait4's ru_maxrss (it or a child it waited for); "
        "first/last 10% s: seconds per input, slope of the inputs' ends in the log; "
        "again: the same command on the completed folder"
    )
    path = os.path.join(out, "batch_scaling.json")
    with open(path, "w") as file:
        json.dump({"side": args.side, "rows": rows}, file, indent=1)
    print(path)


if __name__ == "__main__":
    main()
