"""The pipeline's ceiling: decoding alone, the network alone, and ``fcnpipe run`` with a near-null and
with the reference network, side by side on the same cores in one run.

For each image side N (``--sizes``, default 4096, 16384 and 32768; ``--quick``: 4096) on the synthetic
JPEG-tiled slide of ``_common.make_inputs`` (cached in ``--work``) it measures, in this order:

1. ``decode-only``: each file tile decoded once by ``--threads`` threads through the run's own tile
   reader (``throughput.decode_only``: :class:`pipeline.source.pixels.Level`, without its cache), the
   least any pipeline must do per pixel;
2. ``reads alone``: the level-0 tasks' read stage and nothing else: :func:`pipeline.compute.tasks.read_windows`
   of every task of the run's plan (:func:`pipeline.run.plan.prepare`, the null network's, every
   chunk), in the run's order on the run's workers: union window with halo, decoded-tile cache,
   normalisation to float32 windows;
3. ``network alone``: ``ReferenceFCN(3, 3)`` on random in-memory batches of the run's forward passes
   (``throughput.model_only``: the run's workers x torch threads calling one ``Predictor``), before
   the two runs below and after them, the mean reported;
4. ``null e2e``: ``fcnpipe run`` with ``ReferenceFCN(3, 3, hidden=1)`` (``shards.null_model``, about 1%
   of the reference's arithmetic): the pipeline's own cost per pixel;
5. ``reference e2e``: ``fcnpipe run`` with the reference FCN.

Both runs are ``_common.run_cli`` (``--mask none --no-preview``, here ``--dtype uint8``): wall time and
peak RSS of a fresh process, and the store's ``timings_s`` (per-stage thread-seconds summed over
tasks; setup, compute, pyramid, total). One table per size, the issue's target ratios under it.
``--fixed-costs`` adds, at 8192² (``--fixed-size``), the reference FCN's seconds outside the tiles'
compute with the CLI's defaults (tissue mask, preview; once more with ``--no-preview`` to price the
preview), and a slide whose tissue covers 30% (a centred square of file tiles, the rest blank glass)
masked against unmasked. ``--threads N`` pins this process, and so the runs it starts, to N of its cores.

    .venv/bin/python benchmarks/ceiling.py [--sizes 4096 16384 32768] [--quick] [--fixed-costs] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import tifffile
import torch
import zarr
from _common import FILE_TILE, environment, geometry, make_inputs, run_cli, synthetic_tiles
from shards import null_model
from throughput import decode_only, model_only

from pipeline import files
from pipeline.compute.engine import available_cores, thread_plan
from pipeline.compute.tasks import read_windows
from pipeline.config import TilingConfig, load_config
from pipeline.model.checkpoint import load_model
from pipeline.model.network import LoadedModel
from pipeline.model.predictor import Predictor, set_torch_threads
from pipeline.products.preview import default_preview_path
from pipeline.run.plan import forward_tile_for, prepare
from pipeline.source.pixels import clear_reader_caches
from pipeline.store.layout import zarr_store

TARGETS = {"null_vs_decode": 0.5, "reference_vs_network": 0.75, "masked_vs_unmasked": 0.5, "fixed_s": 1.5}
"""Issue 20's targets: null e2e >= 0.5 x decode-only; reference e2e >= 0.75 x the network alone;
a 70%-background 8192² slide masked < 0.5 x its unmasked wall time; fixed costs < 1.5 s at 8192²."""
STAGES = ("read", "predict", "write")
PHASES = ("setup", "compute", "pyramid", "total")
GLASS = (242.0, 241.0, 243.0)
"""A blank slide's colour: bright and unsaturated, what the tissue mask calls background."""


# --- the network, measured alone ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """A model file loaded once, with what a run measures of it and the forward passes it would make."""

    path: str
    loaded: LoadedModel
    stride: int
    radius: int
    halo: int
    forward: int
    """Core side of one forward pass: the tile, or the pieces a CPU run cuts it into."""
    batch: int
    """Windows per forward pass, as the run's default (1 on a CPU, 4 on a GPU) or as asked."""


def open_network(path: str, tile: int, device_type: str, batch: int | None = None) -> Network:
    """``path`` loaded as ``fcnpipe run`` loads it, with its stride, radius, halo and forward passes."""
    loaded = load_model(path)
    stride, radius, halo = geometry(loaded.module, loaded.spec.in_channels)
    batch = batch or (1 if device_type == "cpu" else 4)
    tiling = TilingConfig(tile=tile, forward_batch=batch)
    forward = forward_tile_for(tiling, loaded, halo, stride, device_type, blended=False) or tile
    return Network(path, loaded, stride, radius, halo, forward, batch)


def network_alone(
    net: Network, device: torch.device, workers: int, seconds: float, precision: str = "float32", compiled: bool = False
) -> dict[str, Any]:
    """Mpx/s of ``net`` alone through a :class:`Predictor` (``throughput.model_only``: ``workers``
    threads, host arrays in, probabilities out) on a copy of its module (``Predictor`` moves and
    casts the module it is given). ``compiled``: the Predictor's module through ``torch.compile``."""
    predictor = Predictor(copy.deepcopy(net.loaded.module), device, precision)
    if compiled:
        predictor.module = torch.compile(predictor.module)
    result = model_only(predictor, net.forward, net.halo, net.batch, workers, 0.0, seconds)
    return {**result, "batch": net.batch, "workers": workers, "precision": precision, "compiled": compiled}


# --- the pipeline's read stage alone -----------------------------------------------------------------------------


def pulled(items: Sequence[Any], threads: int, work: Callable[[Any], Any], min_s: float) -> tuple[list[Any], float]:
    """``work`` on ``items`` in order by ``threads`` threads, each taking the next item, until all
    are done or ``min_s`` seconds have passed; the items done and the seconds taken. Results are
    dropped as they come (a whole image of windows would not fit in memory)."""
    lock = threading.Lock()
    queue: Iterator[Any] = iter(items)
    done: list[Any] = []
    started = time.perf_counter()

    def loop() -> None:
        while time.perf_counter() - started < min_s:
            with lock:
                item = next(queue, None)
            if item is None:
                return
            work(item)
            with lock:
                done.append(item)

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(loop) for _ in range(threads)]:
            future.result()
    return done, time.perf_counter() - started


def reads_alone(image: str, model: str, tile: int, work: str, min_s: float) -> dict[str, Any]:
    """Mpx/s of the level-0 tasks' read stage alone (:func:`read_windows`), every chunk, on the
    run's workers: the plan is the run's own (:func:`prepare`), so are the windows and their order."""
    store = os.path.join(work, "ceiling_reads.zarr")  # named, never written
    overrides = {"input": {"path": image}, "model": {"path": model}, "output": {"path": store}}
    plan = prepare(load_config(overrides=overrides | {"mask": {"mode": "none"}, "tiling": {"tile": tile}}))
    job = plan.job(plan.output_path, "ceiling")
    clear_reader_caches()  # the decoded-tile cache starts empty, as in a fresh run
    groups, seconds = pulled(plan.groups(), plan.workers, lambda group: read_windows(job, group), min_s)
    clear_reader_caches()
    mpx = sum(tile.core_pixels for group in groups for tile in group) / 1e6
    return {"mpx": mpx, "seconds": seconds, "mpx_per_s": mpx / seconds, "workers": plan.workers, "tasks": len(groups)}


# --- fcnpipe run --------------------------------------------------------------------------------------------------


def e2e(image: str, model: str, store: str, log: str, repeat: int, extra: Sequence[str] = ()) -> dict[str, Any]:
    """``fcnpipe run`` (``_common.run_cli``) ``repeat`` times: the run of median wall time, with every
    run's wall time (``walls_s``) and the highest peak RSS."""
    runs = [run_cli(image, model, store, FILE_TILE, f"{log}_{i}.log", extra=extra) for i in range(repeat)]
    median = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    return {**median, "maxrss_kib": max(r["maxrss_kib"] for r in runs), "walls_s": [r["wall_s"] for r in runs]}


def run_row(name: str, mpx: float, result: dict[str, Any]) -> dict[str, Any]:
    """A table row of one ``fcnpipe run``: Mpx/s over its wall time and over its compute alone,
    its peak RSS, per-stage thread-seconds and its phases."""
    timings = result["timings_s"]
    stages = timings.get("stages")
    return {
        "row": name,
        "mpx": mpx,
        "seconds": result["wall_s"],
        "mpx_per_s": mpx / result["wall_s"],
        "compute_mpx_per_s": mpx / timings["compute"] if timings.get("compute") else None,
        "peak_rss_mib": result["maxrss_kib"] / 1024,
        "thread_s": {k: float(stages[k]) for k in STAGES} if isinstance(stages, dict) else None,
        "phases_s": {k: timings.get(k) for k in PHASES},
        "walls_s": result.get("walls_s"),
        "timings_s": timings,
    }


def alone_row(name: str, mpx: float, result: dict[str, Any], stage: str, threads: int) -> dict[str, Any]:
    """A table row of a measurement alone (decoding, reading, the network), in this process: its
    thread-seconds for the whole image (``threads x image Mpx / rate``) under ``stage``."""
    rate = result["mpx_per_s"]
    return {
        "row": name,
        "mpx": mpx,
        "seconds": mpx / rate,
        "mpx_per_s": rate,
        "compute_mpx_per_s": None,
        "peak_rss_mib": None,
        "thread_s": {k: threads * mpx / rate if k == stage else None for k in STAGES},
        "phases_s": None,
        "measured": result,
    }


# --- the table ----------------------------------------------------------------------------------------------------


Column = tuple[str, int, Callable[[dict[str, Any]], Any]]
"""Header, width (negative: left-aligned) and the cell of a row (None: ``-``)."""


def cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[Column]) -> list[str]:
    """A header line and a line per row, each column padded to its width."""

    def line(cells: Iterable[str]) -> str:
        return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w, _) in zip(cells, columns, strict=True))

    return [line(h for h, _, _ in columns), *(line(get(r) for _, _, get in columns) for r in rows)]


def ratio(row: dict[str, Any], base: float | None) -> float | None:
    return None if not base else row["mpx_per_s"] / base


def stage(name: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: cell(None if r["thread_s"] is None else r["thread_s"][name], 1)


def phase(name: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: cell(None if r["phases_s"] is None else r["phases_s"][name], 2)


def columns(decode: float | None, network: float | None) -> list[Column]:
    """The ceiling table's columns; ``decode`` and ``network``: the Mpx/s the ratios divide by."""
    return [
        ("row", -22, lambda r: r["row"]),
        ("wall s", 7, lambda r: cell(r["seconds"], 2)),
        ("Mpx/s", 7, lambda r: cell(r["mpx_per_s"], 2)),
        ("compute Mpx/s", 13, lambda r: cell(r["compute_mpx_per_s"], 2)),
        ("x decode", 8, lambda r: cell(ratio(r, decode), 3)),
        ("x network", 9, lambda r: cell(ratio(r, network), 3)),
        ("RSS MiB", 7, lambda r: cell(r["peak_rss_mib"], 0)),
        ("read s", 7, stage("read")),
        ("predict s", 9, stage("predict")),
        ("write s", 7, stage("write")),
        *((f"{name} s", len(name) + 2, phase(name)) for name in PHASES),
    ]


def verdict(value: float | None, target: float, above: bool = True, unit: str = "") -> str:
    """``value`` against ``target`` (at least it, or with ``above=False`` under it), met or NOT MET."""
    if value is None:
        return "n/a"
    met = value >= target if above else value < target
    return f"{value:.3f}{unit} (target {'>=' if above else '<'} {target}{unit}: {'met' if met else 'NOT MET'})"


def notes(rows: dict[str, dict[str, Any]], mpx: float) -> list[str]:
    """The targets, the ceiling the decoding allows, and the null run's thread-ms per Mpx by stage."""
    decode, network = rows["decode"]["mpx_per_s"], rows["network"]["mpx_per_s"]
    null, reference = rows["null"], rows["reference"]
    lines = [
        f"  null e2e / decode-only         = {verdict(null['mpx_per_s'] / decode, TARGETS['null_vs_decode'])}",
        f"  reference e2e / network alone  = "
        f"{verdict(reference['mpx_per_s'] / network, TARGETS['reference_vs_network'])}; "
        f"decoding allows at most D / (D + M) = {decode / (decode + network):.3f}",
    ]
    for key in ("null", "reference"):
        row = rows[key]
        if row["thread_s"] is None:
            continue
        per = {k: 1000 * v / mpx for k, v in row["thread_s"].items()}
        phases = row["phases_s"]
        start = row["seconds"] - (phases["total"] or 0.0)
        lines.append(
            f"  {row['row']}: thread-ms per Mpx read {per['read']:.1f}, predict {per['predict']:.1f}, "
            f"write {per['write']:.1f}; outside the compute: start-up {start:.2f} s, setup "
            f"{cell(phases['setup'])} s, pyramid {cell(phases['pyramid'])} s"
        )
    decode_ms = rows["decode"]["thread_s"]["read"] * 1000 / mpx
    reads_ms = rows["reads"]["thread_s"]["read"] * 1000 / mpx
    lines.append(
        f"  alone, thread-ms per Mpx: decoding {decode_ms:.1f}, the tasks' reads {reads_ms:.1f}, "
        f"the network {rows['network']['thread_s']['predict'] * 1000 / mpx:.1f}"
    )
    return lines


# --- one size -----------------------------------------------------------------------------------------------------


def measure_size(n: int, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """Every row of one size's table, side by side."""
    image, reference = make_inputs(args.work, n)
    null = null_model(args.work)
    mpx = n * n / 1e6
    workers, torch_threads = thread_plan(threads, None, None, "cpu")
    set_torch_threads(torch_threads)
    cpu = torch.device("cpu")
    print(f"N={n}: decoding, reads, network, null run, reference run, network ...", file=sys.stderr, flush=True)
    decode = decode_only(image, threads, args.decode_seconds)
    reads = reads_alone(image, null, FILE_TILE, args.work, args.decode_seconds)
    net = open_network(reference, FILE_TILE, "cpu")
    before = network_alone(net, cpu, workers, args.model_seconds)
    log = os.path.join(args.out, f"ceiling_{n}")
    store = os.path.join(args.work, f"ceiling_{n}.zarr")
    null_run = e2e(image, null, store, f"{log}_null", args.repeat, ["--dtype", "uint8"])
    reference_run = e2e(image, reference, store, f"{log}_reference", args.repeat, ["--dtype", "uint8"])
    after = network_alone(net, cpu, workers, args.model_seconds)
    rate = (before["mpx_per_s"] + after["mpx_per_s"]) / 2
    drift = abs(before["mpx_per_s"] - after["mpx_per_s"]) / rate
    rows = {
        "decode": alone_row(f"decode-only ({threads} thr)", mpx, decode, "read", threads),
        "reads": alone_row(f"reads alone ({reads['workers']} thr)", mpx, reads, "read", reads["workers"]),
        "network": alone_row(
            f"network alone ({workers}x{torch_threads})",
            mpx,
            {"mpx_per_s": rate, "before": before, "after": after, "drift": drift},
            "predict",
            workers,
        ),
        "null": run_row("null network e2e", mpx, null_run),
        "reference": run_row("reference FCN e2e", mpx, reference_run),
    }
    lines = [
        f"{n}² ({mpx:.1f} Mpx), {threads} cores: decoding on {threads} threads, the network and the runs on "
        f"{workers} workers x {torch_threads} torch threads; forward passes of {net.forward} px + {net.halo} halo",
        *format_table(rows.values(), columns(decode["mpx_per_s"], rate)),
        *notes(rows, mpx),
    ]
    if drift > 0.2:
        lines.append(f"  WARNING: the network alone drifted {drift:.0%} between before and after: a noisy machine")
    if args.repeat > 1:
        for key in ("null", "reference"):
            walls = ", ".join(f"{w:.2f}" for w in rows[key]["walls_s"])
            lines.append(f"  {rows[key]['row']}: median of {args.repeat} runs, wall {walls} s")
    print("\n".join(lines), flush=True)
    targets = {
        "null_vs_decode": rows["null"]["mpx_per_s"] / decode["mpx_per_s"],
        "reference_vs_network": rows["reference"]["mpx_per_s"] / rate,
        "ceiling": decode["mpx_per_s"] / (decode["mpx_per_s"] + rate),
    }
    return {"size": n, "mpx": mpx, "input_bytes": os.path.getsize(image), "rows": rows, "ratios": targets}


# --- fixed costs and the mask -------------------------------------------------------------------------------------


def write_slide(path: str, n: int, tiles: Iterable[np.ndarray]) -> None:
    """An ``n x n`` RGB JPEG-tiled TIFF of ``tiles`` (row-major 512² uint8), as ``_common`` writes its
    slides, made atomically."""
    options = {"tile": (FILE_TILE, FILE_TILE), "compression": "jpeg", "photometric": "rgb", "bigtiff": True}
    tifffile.imwrite(path + ".part", iter(tiles), shape=(n, n, 3), dtype="uint8", **options)
    os.replace(path + ".part", path)


def background_slide(work: str, n: int, tissue: float = 0.3) -> tuple[str, float]:
    """The synthetic slide of ``_common`` with only a centred square of file tiles (``tissue`` of the
    area, rounded to whole tiles) kept, the rest blank glass with a little noise; cached. With the
    share of the area that is glass."""
    path = os.path.join(work, f"slide_{n}_background_jpeg.tif")
    across = n // FILE_TILE
    side = max(1, round(across * tissue**0.5))
    first = (across - side) // 2
    if os.path.exists(path):
        return path, 1 - side * side / (across * across)
    rng = np.random.default_rng(1)

    def tiles() -> Iterator[np.ndarray]:
        for index, tile in enumerate(synthetic_tiles(n)):
            row, col = divmod(index, across)
            if first <= row < first + side and first <= col < first + side:
                yield tile
            else:
                glass = np.asarray(GLASS, np.float32) + rng.normal(0.0, 2.0, tile.shape).astype(np.float32)
                yield np.clip(glass, 0, 255).astype(np.uint8)

    print(f"making {path} ({side}² of {across}² tiles of tissue) ...", file=sys.stderr, flush=True)
    write_slide(path, n, tiles())
    add_pyramid(path)
    return path, 1 - side * side / (across * across)


def add_pyramid(path: str, levels: int = 3) -> None:
    """Rewrite the slide at ``path`` with ``levels`` halving sub-resolutions, as a scanner writes them:
    the tissue mask reads a level of at most 16 Mpx, so a slide without one is not masked."""
    full = tifffile.imread(path)
    options = {"tile": (FILE_TILE, FILE_TILE), "compression": "jpeg", "photometric": "rgb"}
    with tifffile.TiffWriter(path + ".part", bigtiff=True) as tif:
        tif.write(full, subifds=levels, **options)
        for level in range(1, levels + 1):
            tif.write(full[:: 2**level, :: 2**level], subfiletype=1, **options)
    os.replace(path + ".part", path)


def kept_run(image: str, model: str, store: str, log: str, extra: Sequence[str]) -> dict[str, Any]:
    """One ``fcnpipe run`` with the CLI's defaults but ``extra`` (``--preview`` undoes run_cli's
    ``--no-preview``; a later ``--mask`` wins over its ``--mask none``), with the record's mask."""
    result = run_cli(image, model, store, FILE_TILE, log, keep=True, extra=["--preview", *extra])
    record = zarr.open_group(zarr_store(store), mode="r").attrs["fcnpipe"]
    result["mask"] = record.get("mask")
    files.remove_tree(store)
    preview = default_preview_path(store)
    if os.path.exists(preview):
        os.remove(preview)
    return result


def fixed_costs(args: argparse.Namespace) -> dict[str, Any]:
    """At 8192² (``--fixed-size``): the reference FCN's seconds outside the tiles' compute with the CLI's
    defaults (tissue mask, preview), and a 70%-background slide masked against unmasked."""
    n = args.fixed_size
    image, reference = make_inputs(args.work, n)
    blank, glass = background_slide(args.work, n)
    store = os.path.join(args.work, f"ceiling_fixed_{n}.zarr")
    log = os.path.join(args.out, f"ceiling_fixed_{n}")
    print(f"N={n}: fixed costs, masked and unmasked runs ...", file=sys.stderr, flush=True)
    default = kept_run(image, reference, store, f"{log}_default.log", ["--mask", "auto"])
    unseen = kept_run(image, reference, store, f"{log}_no_preview.log", ["--mask", "auto", "--no-preview"])
    masked = kept_run(blank, reference, store, f"{log}_masked.log", ["--mask", "auto"])
    unmasked = kept_run(blank, reference, store, f"{log}_unmasked.log", ["--mask", "none"])
    timings = default["timings_s"]
    compute = timings["compute"]
    fixed = default["wall_s"] - compute
    start = default["wall_s"] - timings["total"]
    preview = start - (unseen["wall_s"] - unseen["timings_s"]["total"])
    rest = timings["total"] - timings["setup"] - compute - (timings.get("pyramid") or 0.0)
    chunks = (n // FILE_TILE) ** 2
    skipped = (masked["mask"] or {}).get("chunks_skipped")
    wall_ratio = masked["wall_s"] / unmasked["wall_s"]
    lines = [
        f"fixed costs, reference FCN, {n}² ({n * n / 1e6:.0f} Mpx), the CLI's defaults (tissue mask, preview):",
        f"  wall {default['wall_s']:.2f} s, compute {compute:.2f} s: outside the compute "
        f"{verdict(fixed, TARGETS['fixed_s'], above=False, unit=' s')}",
        f"  = outside timings_s.total (interpreter, imports, preview, exit) {start:.2f} + setup {timings['setup']:.2f}"
        f" + pyramid {cell(timings.get('pyramid'))} + the rest of the run {rest:.2f}; total - compute "
        f"{timings['total'] - compute:.2f} s",
        f"  the preview: about {preview:.2f} s (the same run with --no-preview: wall {unseen['wall_s']:.2f} s); "
        f"{(default['mask'] or {}).get('chunks_skipped', '?')} of {chunks} chunks skipped by the mask",
        f"{glass:.0%}-background {n}² slide (a square of tissue in the middle, glass around), reference FCN:",
        f"  masked {masked['wall_s']:.2f} s ({skipped} of {chunks} chunks skipped, compute "
        f"{masked['timings_s']['compute']:.2f} s), unmasked {unmasked['wall_s']:.2f} s (compute "
        f"{unmasked['timings_s']['compute']:.2f} s): masked / unmasked = "
        f"{verdict(wall_ratio, TARGETS['masked_vs_unmasked'], above=False)}",
    ]
    print("\n".join(lines), flush=True)
    return {
        "size": n,
        "default": default,
        "masked": masked,
        "unmasked": unmasked,
        "fixed_s": fixed,
        "outside_total_s": start,
        "preview_s": preview,
        "no_preview": unseen,
        "total_minus_compute_s": timings["total"] - compute,
        "masked_vs_unmasked": wall_ratio,
        "chunks": chunks,
    }


# --- main ---------------------------------------------------------------------------------------------------------


def pin(threads: int | None) -> int:
    """Pin this process (and so the runs it starts) to ``threads`` of its cores; the cores used."""
    cores = available_cores()
    if threads is None or threads == cores:
        return cores
    if threads > cores:
        print(f"--threads {threads}: only {cores} cores are available; using {cores}", file=sys.stderr)
        return cores
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    return threads


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768], help="image sides N")
    parser.add_argument("--quick", action="store_true", help="4096² only")
    parser.add_argument("--threads", type=int, default=None, help="cores to use [all available]")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each fcnpipe row, the median kept [1]")
    parser.add_argument("--fixed-costs", action="store_true", help="also the 8192² fixed costs and mask runs")
    parser.add_argument("--fixed-size", type=int, default=8192, help="image side of --fixed-costs [8192]")
    parser.add_argument("--model-seconds", type=float, default=5.0, help="the network alone: seconds each time")
    parser.add_argument("--decode-seconds", type=float, default=30.0, help="decoding and reads alone: at most")
    parser.add_argument("--work", default="/tmp/fcnpipe-bench", help="cache for inputs and outputs")
    parser.add_argument("--out", default=None, help="folder for ceiling.json and the logs [WORK/results]")
    args = parser.parse_args(argv)
    args.sizes = [4096] if args.quick else sorted(set(args.sizes))
    args.out = args.out or os.path.join(args.work, "results")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    threads = pin(args.threads)
    started = time.perf_counter()
    sizes = [measure_size(n, args, threads) for n in args.sizes]
    fixed = fixed_costs(args) if args.fixed_costs else None
    if len(sizes) > 1:
        by = {key: [s["ratios"][key] for s in sizes] for key in ("null_vs_decode", "reference_vs_network")}
        print(
            "across sizes: null / decode "
            + ", ".join(f"{s['size']}² {s['ratios']['null_vs_decode']:.3f}" for s in sizes)
            + f" (median {statistics.median(by['null_vs_decode']):.3f}); reference / network "
            + ", ".join(f"{s['size']}² {s['ratios']['reference_vs_network']:.3f}" for s in sizes)
        )
    result = {
        **environment(),
        "cores": threads,
        "tile": FILE_TILE,
        "targets": TARGETS,
        "sizes": sizes,
        "fixed_costs": fixed,
        "seconds": time.perf_counter() - started,
    }
    path = os.path.join(args.out, "ceiling.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    print(f"wrote {path} ({result['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
