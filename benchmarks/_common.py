"""What the benchmark scripts share: inputs, checkpoints, measured subprocesses, the fcnpipe run.

* :func:`make_inputs`: a cached synthetic RGB JPEG-tiled TIFF (written tile by tile, never in memory)
  and a reference-FCN state_dict;
* :func:`write_checkpoint`: an fcnpipe checkpoint of any shipped architecture, seeded;
* :func:`measured`: a command's wall time and peak RSS, from a fresh helper process;
* :func:`run_cli`: one ``fcnpipe run`` measured that way, with the store's ``fcnpipe.timings_s``;
* :func:`geometry`: a network's stride, receptive radius and halo, as ``fcnpipe run`` measures them.

Imported by the scripts beside it (a script's folder is on ``sys.path``); not a package.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tifffile
import torch
import zarr
from torch import nn

from pipeline import __version__, files
from pipeline.model.checkpoint import architectures, save_checkpoint
from pipeline.model.network import ModelSpec, ReferenceFCN, default_classes
from pipeline.model.receptive import measure_tiling
from pipeline.store.layout import zarr_store

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
    blobs = [
        (rng.uniform(0, n), rng.uniform(0, n), rng.uniform(0.05, 0.25) * n, rng.uniform(40, 220, 3)) for _ in range(8)
    ]
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
    """The cached TIFF and reference-FCN state_dict for size ``n`` (made atomically, skipped when present)."""
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
        tifffile.imwrite(
            image_path + ".part",
            synthetic_tiles(n),
            shape=(n, n, 3),
            dtype="uint8",
            tile=(FILE_TILE, FILE_TILE),
            compression="jpeg",
            photometric="rgb",
            bigtiff=True,
        )
        os.replace(image_path + ".part", image_path)
        print(f"  made in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return image_path, model_path


def write_checkpoint(work: str, name: str) -> tuple[str, dict[str, int]]:
    """An fcnpipe checkpoint of architecture ``name``: 3 in, 3 classes, other arguments at their defaults."""
    cls = architectures()[name]
    arguments = {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
    arguments |= {"in_channels": 3, "num_classes": 3}
    torch.manual_seed(0)
    module = cls(**arguments)
    names, colors = default_classes(3)
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, f"{name}_3x3.pt")
    save_checkpoint(path + ".part", module, ModelSpec(name, arguments, 3, 3, names, colors))
    os.replace(path + ".part", path)
    return path, arguments


def geometry(module: nn.Module, in_channels: int = 3) -> tuple[int, int, int]:
    """``(stride, receptive radius, halo)`` of ``module``, measured as ``fcnpipe run`` does in its setup."""
    return measure_tiling(module, in_channels, "the benchmark's network")


def measured(command: list[str], log: str, what: str) -> dict[str, Any]:
    """Run ``command`` (stdout and stderr to ``log``) in a fresh helper process.

    Returns ``{"wall_s", "maxrss_kib", "rc"}``: the command's wall time and its peak resident memory
    (``getrusage(RUSAGE_CHILDREN).ru_maxrss``, exact, of that one child). A non-zero exit raises,
    quoting the end of the log; ``what`` names the command in that message.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        report = fh.name
    try:
        with open(log, "w") as err:
            subprocess.run([sys.executable, "-c", HELPER, report, *command], stdout=err, stderr=err, check=True)
        with open(report) as fh:
            result: dict[str, Any] = json.load(fh)
    finally:
        os.unlink(report)
    if result["rc"] != 0:
        with open(log) as fh:
            raise RuntimeError(f"{what} failed (exit {result['rc']}):\n{fh.read()[-3000:]}")
    return result


def run_cli(
    image: str, model: str, store: str, tile: int, log: str, keep: bool = False, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """One end-to-end ``fcnpipe run``: wall time, peak RSS (:func:`measured`) and the stored ``timings_s``.

    Every chunk is computed (``--mask none``: a tissue mask would skip background chunks that a
    baseline computes) and no preview PNG is drawn (``--no-preview``: not part of the map). The store
    is deleted afterwards unless ``keep`` (a 32768² float32 store is many GB). ``extra``: more flags.
    """
    cli = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        image,
        "--model",
        model,
        "-o",
        store,
        "--tile",
        str(tile),
        "--overwrite",
        "--no-progress",
        "--no-preview",
        "--mask",
        "none",
        *extra,
    ]
    result = measured(cli, log, "fcnpipe run")
    record = zarr.open_group(zarr_store(store), mode="r").attrs["fcnpipe"]  # a folder, or s3://
    if not record.get("complete"):
        raise RuntimeError(f"{store}: not marked complete")
    result["timings_s"] = dict(record["timings_s"])
    if not keep:
        files.remove_tree(store)
    return result


def environment() -> dict[str, Any]:
    """Versions and machine, for the top of a results.json."""
    return {
        "fcnpipe_version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
