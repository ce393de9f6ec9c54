"""The GPU benchmark, in one go: the network alone, a null network and ``fcnpipe run`` end to end on
one device, with the device's utilisation, for the reference FCN and the U-Net.

Made to run on a GPU machine that starts bare (nothing cached), in under 8 minutes on one GPU with
16 cores (``--quick``: under 3), and on a CPU for a smoke check (``--device cpu``). It

1. makes the inputs in parallel on every core (cached in ``--work``): for each side N (``--sizes``,
   default 16384 and 32768; ``--quick``: 8192) a JPEG-tiled RGB slide whose 512² file tiles are each
   one of ``_common``'s synthetic slides (seed = the tile's index: a mosaic, so that the tiles can be
   made at once; ``_common.make_inputs`` makes a slide tile after tile, minutes for 32768²); the
   reference FCN and U-Net as fcnpipe checkpoints (``_common.write_checkpoint``), the near-null
   ``ReferenceFCN(3, 3, hidden=1)`` (``shards.null_model``);
2. times each network alone, once (it does not depend on the image): on device tensors (forward pass
   and softmax, synchronised at the end) at each of ``--precisions``, channels-last as the run (also
   contiguous with ``--contiguous``, also through ``torch.compile`` with ``--compile``); and through the
   run's own ``Predictor`` from the run's worker threads on host arrays (``ceiling.network_alone``:
   the transfers both ways and the finiteness check included) at each of ``--e2e-precisions``;
3. for each size: decodes every file tile once on all cores (``throughput.decode_only``), then runs
   ``fcnpipe run --device D --precision P`` (``_common.run_cli``: ``--mask none --no-preview``, here
   ``--dtype uint8``) with the null network and with each architecture at each of ``--e2e-precisions``;
   ``--batch`` (``--forward-batch``) and ``--decode-threads`` (``--workers``) are passed on when given;
4. samples the device's utilisation and memory every 0.2 s during each measurement
   (``torch.cuda.utilization``, else ``nvidia-smi``; ``-`` where neither answers);
5. prints a table of the networks alone and one per size, with the issue's GPU targets, and writes
   ``gpu.json`` to ``--out``.

A run that the time already spent and the runs made so far say would end past ``--budget`` seconds is
skipped and listed as such, so one invocation ends in time whatever the machine.

    python benchmarks/gpu.py                       # one GPU: 16384² and 32768², < 8 min
    python benchmarks/gpu.py --quick               # 8192², float32 and float16, < 3 min
    python benchmarks/gpu.py --device cpu --quick --sizes 2048   # smoke check on a CPU, < 2 min
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: fcnpipe may not be installed
import numpy as np
import torch
from _common import FILE_TILE, environment, synthetic_tiles, write_checkpoint
from ceiling import (
    Network,
    alone_row,
    cell,
    e2e,
    format_table,
    network_alone,
    open_network,
    run_row,
    stage,
    verdict,
    write_slide,
)
from shards import null_model
from throughput import decode_only

from pipeline.compute.engine import available_cores, thread_plan
from pipeline.model.predictor import PRECISIONS, set_torch_threads

ARCHS = {"reference": "reference_fcn", "unet": "unet", "fcn8s": "fcn8s"}
"""Names here -> the architecture an fcnpipe checkpoint names."""
NEEDED = ("tifffile", "imagecodecs", "zarr", "numcodecs", "dask", "click", "yaml", "tqdm", "PIL", "fsspec")
"""What ``fcnpipe run`` imports beyond torch and numpy (a bare GPU image lacks several: carry wheels)."""
GPU_TARGET = 0.8
"""Issue 20: on a GPU, reference FCN end to end >= 0.8 x min(network alone, decoding on all cores)."""
UNET_TARGET = 0.9
"""Issue 20: the U-Net end to end stays >= 0.9 x the network alone."""


# --- inputs -------------------------------------------------------------------------------------------------------


def mosaic_tile(index: int) -> np.ndarray:
    """File tile ``index`` of a mosaic slide: ``_common``'s synthetic 512² slide of seed ``index``."""
    return next(synthetic_tiles(FILE_TILE, seed=index))


def tiles_ahead(pool: Any, count: int, step: int) -> Iterator[np.ndarray]:
    """Tiles ``0 .. count - 1`` made by ``pool`` ``step`` at a time, the next batch made while this one
    is written (so at most two batches are held)."""
    pending = pool.map_async(mosaic_tile, range(min(step, count)))
    for start in range(step, count + step, step):
        done = pending.get()
        if start < count:
            pending = pool.map_async(mosaic_tile, range(start, min(count, start + step)))
        yield from done


def mosaic(work: str, n: int, processes: int) -> str:
    """The cached ``n x n`` mosaic slide (``n`` a multiple of 512), made by ``processes`` processes."""
    if n % FILE_TILE:
        raise SystemExit(f"--sizes: {n} is not a multiple of {FILE_TILE}")
    path = os.path.join(work, f"mosaic_{n}_jpeg.tif")
    if not os.path.exists(path):
        started = time.perf_counter()
        with multiprocessing.Pool(processes) as pool:
            write_slide(path, n, tiles_ahead(pool, (n // FILE_TILE) ** 2, 4 * processes))
        print(f"made {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return path


# --- the device's utilisation -------------------------------------------------------------------------------------


Reader = Callable[[], tuple[float | None, float | None]]
"""One sample: utilisation (%) and memory used (MiB), either None where unknown."""


def utilisation_reader(device: torch.device) -> tuple[Reader | None, str]:
    """How to sample ``device``: ``torch.cuda.utilization`` (NVML, through nvidia-ml-py), else
    ``nvidia-smi``; None on a CPU, or where neither answers. With the reader, what it is."""
    if device.type != "cuda":
        return None, "none (not a CUDA device)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    used = getattr(torch.cuda, "device_memory_used", None)

    def from_torch() -> tuple[float | None, float | None]:
        return float(torch.cuda.utilization(index)), None if used is None else used(index) / 2**20

    def from_smi() -> tuple[float | None, float | None]:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        out = subprocess.run([*query, "-i", str(index)], capture_output=True, text=True, timeout=5, check=True)
        busy, memory = out.stdout.strip().splitlines()[0].split(",")
        return float(busy), float(memory)

    candidates: list[tuple[Reader, str]] = [(from_torch, "torch.cuda.utilization")]
    if shutil.which("nvidia-smi"):
        candidates.append((from_smi, "nvidia-smi"))
    for reader, name in candidates:
        try:
            reader()
        except Exception as err:  # no pynvml, no driver access, an old nvidia-smi: try the next
            print(f"utilisation: {name} does not answer ({type(err).__name__}: {err})", file=sys.stderr)
            continue
        return reader, name
    return None, "none (neither torch.cuda.utilization nor nvidia-smi answers)"


class Sampler:
    """The device's utilisation and memory, sampled every ``interval`` s in a thread while a block runs."""

    def __init__(self, reader: Reader | None, interval: float = 0.2) -> None:
        self.reader, self.interval = reader, interval
        self.samples: list[tuple[float | None, float | None]] = []
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        if self.reader is not None:
            self.thread = threading.Thread(target=self.loop, daemon=True)
            self.thread.start()
        return self

    def loop(self) -> None:
        assert self.reader is not None
        while not self.stop.wait(self.interval):
            try:
                self.samples.append(self.reader())
            except Exception:  # a sample that fails is a sample missed, not a failed benchmark
                continue

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def summary(self) -> dict[str, Any] | None:
        busy = [b for b, _ in self.samples if b is not None]
        memory = [m for _, m in self.samples if m is not None]
        if not busy:
            return None
        return {
            "mean_pct": sum(busy) / len(busy),
            "max_pct": max(busy),
            "samples": len(busy),
            "memory_mib_max": max(memory) if memory else None,
        }


# --- the network alone on device tensors --------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_alone(
    net: Network, device: torch.device, precision: str, channels_last: bool, compiled: bool, seconds: float
) -> dict[str, Any]:
    """Mpx/s (core pixels) of ``net``'s forward pass and softmax on a batch already on ``device``,
    repeated for ``seconds`` with one synchronisation at the end: the device's own speed, no
    transfers, no host work."""
    dtype = PRECISIONS[precision]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    module = copy.deepcopy(net.loaded.module).to(device=device, dtype=dtype, memory_format=fmt).eval()
    if compiled:
        module = torch.compile(module)
    side = net.forward + 2 * net.halo
    x = torch.rand(net.batch, net.loaded.spec.in_channels, side, side, device=device)
    x = x.to(dtype=dtype, memory_format=fmt)
    with torch.inference_mode():
        started = time.perf_counter()
        for _ in range(3):  # warm-up: cuDNN's choice of kernels, the allocator, compilation
            torch.softmax(module(x).float(), dim=1)
        synchronize(device)
        warm = time.perf_counter() - started
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            torch.softmax(module(x).float(), dim=1)
            calls += 1
        synchronize(device)
        elapsed = time.perf_counter() - started
    del module, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    mpx = calls * net.batch * net.forward**2 / 1e6
    return {"mpx": mpx, "seconds": elapsed, "mpx_per_s": mpx / elapsed, "warm_up_s": warm, "input_side": side}


# --- the plan of runs and its budget ------------------------------------------------------------------------------


class Budget:
    """Seconds left of ``--budget``, and whether a run predicted to take ``seconds`` still fits."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, time.perf_counter()
        self.skipped: list[str] = []

    def fits(self, what: str, seconds: float | None) -> bool:
        left = self.seconds - (time.perf_counter() - self.started)
        if left > 0 and (seconds is None or seconds <= left):
            return True
        guess = "unknown" if seconds is None else f"about {seconds:.0f} s"
        self.skipped.append(f"{what}: {guess}, {max(left, 0):.0f} s left")
        print(f"skipped {what}: it would take {guess} of the {max(left, 0):.0f} s left", flush=True)
        return False


def predicted(done: list[dict[str, Any]], arch: str, mpx: float, network_rate: float | None) -> float | None:
    """The seconds a run of ``arch`` on ``mpx`` should take: from an earlier run of it (its fixed costs
    plus its compute scaled to the pixels), else from the null run of this size and the network's
    speed alone; None where nothing is known yet (it is run)."""
    same = [r for r in done if r["arch"] == arch]
    if same:
        last = same[-1]
        compute = last["timings_s"]["compute"]
        return last["seconds"] - compute + compute * mpx / last["mpx"]
    null = [r for r in done if r["arch"] == "null" and r["mpx"] == mpx]
    if not null or not network_rate:
        return None
    fixed = null[-1]["seconds"] - null[-1]["timings_s"]["compute"]
    return fixed + mpx / min(network_rate, null[-1]["compute_mpx_per_s"] or network_rate)


# --- main ---------------------------------------------------------------------------------------------------------


def preflight(device_name: str) -> torch.device:
    """The device, or a clear exit: a CUDA device PyTorch cannot see, a package fcnpipe needs missing."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"missing Python packages fcnpipe needs: {', '.join(missing)} (carry them as wheels)")
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {device_name}: PyTorch {torch.__version__} sees no CUDA GPU (--device cpu to check)"
        )
    return torch.device(device_name)


def device_text(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device.type} ({platform.processor() or platform.machine()})"
    props = torch.cuda.get_device_properties(device)
    return f"{device} {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"


def alone_columns() -> list[tuple[str, int, Callable[[dict[str, Any]], Any]]]:
    return [
        ("network", -10, lambda r: r["arch"]),
        ("how", -24, lambda r: r["how"]),
        ("precision", -9, lambda r: r["precision"]),
        ("batch", 5, lambda r: cell(r["batch"])),
        ("window", 6, lambda r: cell(r["input_side"])),
        ("Mpx/s", 9, lambda r: cell(r["mpx_per_s"], 1)),
        ("warm-up s", 9, lambda r: cell(r.get("warm_up_s"), 1)),
        ("util %", 6, lambda r: cell(None if r["util"] is None else r["util"]["mean_pct"], 0)),
        ("max %", 5, lambda r: cell(None if r["util"] is None else r["util"]["max_pct"], 0)),
        ("GPU MiB", 7, lambda r: cell(None if r["util"] is None else r["util"]["memory_mib_max"], 0)),
    ]


def run_columns() -> list[tuple[str, int, Callable[[dict[str, Any]], Any]]]:
    return [
        ("row", -22, lambda r: r["row"]),
        ("precision", -9, lambda r: r["precision"]),
        ("wall s", 7, lambda r: cell(r["seconds"], 1)),
        ("Mpx/s", 8, lambda r: cell(r["mpx_per_s"], 1)),
        ("compute Mpx/s", 13, lambda r: cell(r["compute_mpx_per_s"], 1)),
        ("x decode", 8, lambda r: cell(r["x_decode"], 3)),
        ("x network", 9, lambda r: cell(r["x_network"], 3)),
        ("util %", 6, lambda r: cell(None if r["util"] is None else r["util"]["mean_pct"], 0)),
        ("max %", 5, lambda r: cell(None if r["util"] is None else r["util"]["max_pct"], 0)),
        ("GPU MiB", 7, lambda r: cell(None if r["util"] is None else r["util"]["memory_mib_max"], 0)),
        ("RSS MiB", 7, lambda r: cell(r["peak_rss_mib"], 0)),
        ("read s", 7, stage("read")),
        ("predict s", 9, stage("predict")),
        ("write s", 7, stage("write")),
    ]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (cuda:N) or cpu (a smoke check) [cuda]")
    parser.add_argument("--quick", action="store_true", help="8192², float32 and float16, < 3 min")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides [16384 32768; quick 8192]")
    parser.add_argument("--archs", nargs="+", choices=sorted(ARCHS), default=["reference", "unet"])
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=None, help="network alone")
    parser.add_argument("--e2e-precisions", nargs="+", choices=sorted(PRECISIONS), default=None, help="runs")
    parser.add_argument("--contiguous", action="store_true", help="also the network alone on contiguous tensors")
    parser.add_argument("--compile", action="store_true", help="also the network alone through torch.compile")
    parser.add_argument("--batch", type=int, default=None, help="tiles per forward pass [the run's: 4 on a GPU]")
    parser.add_argument("--decode-threads", type=int, default=None, help="the runs' --workers [the run's]")
    parser.add_argument("--seconds", type=float, default=None, help="each network-alone measurement [3; quick 2]")
    parser.add_argument("--budget", type=float, default=None, help="skip runs that would end later [450; quick 160]")
    parser.add_argument("--work", default="/tmp/fcnpipe-bench/gpu", help="cache for inputs and outputs")
    parser.add_argument("--out", default=None, help="folder for gpu.json and the logs [WORK/results]")
    args = parser.parse_args(argv)
    quick = args.quick
    args.sizes = sorted(set(args.sizes or ([8192] if quick else [16384, 32768])))
    args.precisions = args.precisions or (["float32", "float16"] if quick else ["float32", "float16", "bfloat16"])
    args.e2e_precisions = args.e2e_precisions or (["float32", "float16"] if quick else ["float16"])
    args.seconds = args.seconds or (2.0 if quick else 3.0)
    args.budget = args.budget or (160.0 if quick else 450.0)
    args.out = args.out or os.path.join(args.work, "results")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    root = str(Path(__file__).resolve().parents[1])  # the runs' ``python -m pipeline`` too, from any folder
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    device = preflight(args.device)
    if device.type != "cuda":  # Predictor refuses half precision off CUDA; a CPU would crawl anyway
        dropped = sorted({p for p in [*args.precisions, *args.e2e_precisions] if p != "float32"})
        if dropped:
            print(f"{device.type}: float32 only ({', '.join(dropped)} need CUDA)", file=sys.stderr)
        args.precisions, args.e2e_precisions = ["float32"], ["float32"]
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    budget = Budget(args.budget)
    cores = available_cores()
    workers, torch_threads = thread_plan(cores, args.decode_threads, None, device.type)
    set_torch_threads(torch_threads)
    images = {n: mosaic(args.work, n, cores) for n in args.sizes}  # forked before CUDA starts in this process
    print(
        f"{device_text(device)}; {cores} cores; torch {torch.__version__}; the runs' and the Predictor's workers: "
        f"{workers} x {torch_threads} torch threads; decoding alone on {cores} threads",
        flush=True,
    )
    models = {arch: write_checkpoint(args.work, ARCHS[arch])[0] for arch in args.archs}
    null = null_model(args.work)
    reader, source = utilisation_reader(device)
    print(f"utilisation from {source}", flush=True)

    def sampled(call: Callable[..., dict[str, Any]], *arguments: Any) -> dict[str, Any]:
        with Sampler(reader) as sampler:
            result = call(*arguments)
        return {**result, "util": sampler.summary()}

    alone: list[dict[str, Any]] = []
    nets: dict[str, Network] = {}
    for arch in args.archs:
        net = nets[arch] = open_network(models[arch], FILE_TILE, device.type, args.batch)
        print(f"{arch}: stride {net.stride}, halo {net.halo}, forward passes of {net.forward} px", file=sys.stderr)
        variants = [("device, channels-last", True, False)]
        variants += [("device, contiguous", False, False)] * args.contiguous
        variants += [("device, compiled", True, True)] * args.compile
        for precision in args.precisions:
            for how, channels_last, compiled in variants:
                result = sampled(device_alone, net, device, precision, channels_last, compiled, args.seconds)
                alone.append({**result, "arch": arch, "how": how, "precision": precision, "batch": net.batch})
        for precision in args.e2e_precisions:
            result = sampled(network_alone, net, device, workers, args.seconds, precision)
            how = f"Predictor, {workers} threads"
            alone.append({**result, "arch": arch, "how": how, "precision": precision, "input_side": None})
    print("\nthe networks alone (core Mpx/s; window: the side of each forward pass's input)")
    print("\n".join(format_table(alone, alone_columns())), flush=True)

    def network_rate(arch: str, precision: str, how: str = "device, channels-last") -> float | None:
        found = [r["mpx_per_s"] for r in alone if (r["arch"], r["precision"], r["how"]) == (arch, precision, how)]
        return found[0] if found else None

    sizes = []
    done: list[dict[str, Any]] = []
    extra = ["--dtype", "uint8", "--device", device.type]  # the CLI takes no device index
    extra += ["--forward-batch", str(args.batch)] * (args.batch is not None)
    extra += ["--workers", str(args.decode_threads)] * (args.decode_threads is not None)
    for n, image in images.items():
        mpx = n * n / 1e6
        decode = sampled(decode_only, image, cores, 10.0)
        rows: list[dict[str, Any]] = []
        plan = [("null", null, args.e2e_precisions[0])]
        plan += [(arch, models[arch], p) for arch in args.archs for p in args.e2e_precisions]
        for arch, model, precision in plan:
            guess = predicted(done, arch, mpx, None if arch == "null" else network_rate(arch, precision))
            if not budget.fits(f"{arch} {precision} {n}²", guess):
                continue
            store = os.path.join(args.work, f"gpu_{arch}_{n}.zarr")
            log = os.path.join(args.out, f"gpu_{arch}_{precision}_{n}")
            result = sampled(e2e, image, model, store, log, 1, [*extra, "--precision", precision])
            row = {**run_row(f"{arch} e2e", mpx, result), "arch": arch, "precision": precision}
            network = network_rate(arch, precision) if arch != "null" else None
            row |= {"util": result["util"], "x_decode": row["mpx_per_s"] / decode["mpx_per_s"]}
            row["x_network"] = None if network is None else row["mpx_per_s"] / network
            done.append(row)
            rows.append(row)
            print(f"{arch} {precision} {n}²: {row['seconds']:.1f} s, {row['mpx_per_s']:.1f} Mpx/s", file=sys.stderr)
        decode_row = alone_row(f"decode-only ({cores} thr)", mpx, decode, "read", cores)
        decode_row |= {"precision": "-", "x_decode": 1.0, "x_network": None, "util": decode["util"]}
        lines = [f"\n{n}² ({mpx:.0f} Mpx; x network: against the same network alone on device tensors)"]
        lines += format_table([decode_row, *rows], run_columns())
        for row in rows:
            if row["arch"] == "null":
                lines.append(f"  null e2e / decode-only = {verdict(row['x_decode'], 0.5)}")
                continue
            network = network_rate(row["arch"], row["precision"]) or float("inf")
            bound = min(network, decode["mpx_per_s"])
            target = GPU_TARGET if row["arch"] == "reference" else UNET_TARGET
            base = "min(network alone, decode-only)" if row["arch"] == "reference" else "network alone"
            value = row["mpx_per_s"] / (bound if row["arch"] == "reference" else network)
            lines.append(f"  {row['arch']} {row['precision']} e2e / {base} = {verdict(value, target)}")
        print("\n".join(lines), flush=True)
        sizes.append({"size": n, "mpx": mpx, "input_bytes": os.path.getsize(image), "decode": decode, "runs": rows})
    if budget.skipped:
        print("skipped for the budget: " + "; ".join(budget.skipped))
    elapsed = time.perf_counter() - budget.started
    result = {
        **environment(),
        "device": device_text(device),
        "cores": cores,
        "workers": workers,
        "torch_threads": torch_threads,
        "utilisation_from": source,
        "args": vars(args),
        "alone": alone,
        "sizes": sizes,
        "skipped": budget.skipped,
        "seconds": elapsed,
    }
    path = os.path.join(args.out, "gpu.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    print(f"wrote {path} ({elapsed:.0f} s in all)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
