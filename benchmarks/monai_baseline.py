"""The same job done the usual in-memory way: MONAI's ``sliding_window_inference`` on the whole image.

Run as a script (``python benchmarks/monai_baseline.py IMAGE MODEL OUT.zarr --tile T --halo H ...``),
it does what ``fcnpipe run`` does, read -> predict -> write, with the settings that make the two
comparable:

* read: the whole TIFF with ``tifffile.imread`` (decoded into memory, ``(Y, X, 3)`` uint8), then
  ``(1, 3, Y, X)`` float32 divided by 255, as fcnpipe normalises a uint8 input;
* predict: ``sliding_window_inference`` with ``roi_size`` the pipeline's window (tile + 2 halo),
  ``sw_batch_size`` the pipeline's batch, ``overlap = 2 halo / window`` so that neighbouring windows
  overlap by a halo on each side (the windows step by one tile, as fcnpipe's cores do),
  ``mode="constant"``, under ``torch.inference_mode``, with all the cores as torch threads; the
  network is the same checkpoint, loaded the same way, in channels-last like :class:`Predictor`;
* write: softmax over the classes, then a ``(C, Y, X)`` float32 Zarr (format 2) array with the
  pipeline's chunks ``(C, tile, tile)`` and compressor (Blosc lz4, level 5, byte shuffle), one row
  of chunks at a time (so the softmax adds no second whole-image copy).

It writes ``{"read": s, "predict": s, "write": s, ...}`` as JSON to ``--report``.
:func:`run_monai` runs it in its own process under the peak-RSS helper of ``_common``, so its
memory is measured exactly like fcnpipe's. The parent never imports monai.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from _common import measured

BYTES_PER_PIXEL = 3 + 3 * 4 + 3 * 4
"""Decoded uint8 RGB, float32 input and float32 output (3 classes) of one pixel."""


def memory_needed(n: int) -> int:
    """Bytes the in-memory baseline holds for an ``n x n`` image (not counting MONAI's count map, 4 B/px)."""
    return n * n * BYTES_PER_PIXEL


def machine_memory() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def overlap_for(tile: int, halo: int) -> float:
    """MONAI's ``overlap`` that makes windows of ``tile + 2 halo`` step by exactly ``tile``.

    MONAI steps by ``int(window * (1 - overlap))``; ``2 halo / window`` can land a hair below
    ``tile`` in floating point and truncate to ``tile - 1``, so it is nudged down until it does not.

    >>> overlap_for(512, 56), int(624 * (1 - overlap_for(512, 56)))
    (0.1794871794871795, 512)
    """
    window = tile + 2 * halo
    overlap = 2 * halo / window
    while int(window * (1 - overlap)) < tile:
        overlap = math.nextafter(overlap, 0.0)
    return overlap


def run_monai(
    image: str, model: str, store: str, tile: int, halo: int, batch: int, threads: int, log: str
) -> dict[str, Any]:
    """The baseline in its own measured process: wall time, peak RSS and its stage times (the store is deleted)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        report = fh.name
    command = [
        sys.executable,
        os.path.abspath(__file__),
        image,
        model,
        store,
        "--tile",
        str(tile),
        "--halo",
        str(halo),
        "--batch",
        str(batch),
        "--threads",
        str(threads),
        "--report",
        report,
    ]
    try:
        result = measured(command, log, "MONAI sliding_window_inference")
        with open(report) as fh:
            result["timings_s"] = json.load(fh)
    finally:
        os.unlink(report)
        shutil.rmtree(store, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image")
    parser.add_argument("model", help="a state_dict or fcnpipe checkpoint (pipeline.model.checkpoint.load_model)")
    parser.add_argument("store", help="the Zarr array to write (replaced)")
    parser.add_argument("--tile", type=int, required=True, help="the pipeline's tile core (px)")
    parser.add_argument("--halo", type=int, required=True, help="the pipeline's halo for this network (px)")
    parser.add_argument("--batch", type=int, required=True, help="windows per forward pass")
    parser.add_argument("--threads", type=int, required=True, help="torch threads (all the cores)")
    parser.add_argument("--report", required=True, help="JSON file for the stage times")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import monai
    import numcodecs
    import numpy as np
    import tifffile
    import torch
    import zarr
    from monai.inferers.utils import sliding_window_inference

    from pipeline.model.checkpoint import load_model

    torch.set_num_threads(args.threads)
    network = load_model(args.model).module.to(memory_format=torch.channels_last).eval()
    window, overlap = args.tile + 2 * args.halo, overlap_for(args.tile, args.halo)
    setup = time.perf_counter()

    pixels = tifffile.imread(args.image)  # (Y, X, 3) uint8
    height, width, channels = pixels.shape
    inputs = np.empty((1, channels, height, width), np.float32)
    inputs[0] = pixels.transpose(2, 0, 1)
    inputs *= np.float32(1.0 / 255.0)
    del pixels
    read = time.perf_counter()

    def predictor(x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = network(x.contiguous(memory_format=torch.channels_last))
        return logits

    with torch.inference_mode():
        logits = sliding_window_inference(
            torch.from_numpy(inputs), (window, window), args.batch, predictor, overlap=overlap, mode="constant"
        )
    if not isinstance(logits, torch.Tensor):  # a tensor in, a tensor out (tuples and dicts are for other nets)
        raise TypeError(f"sliding_window_inference returned {type(logits).__name__}, not a tensor")
    del inputs
    predict = time.perf_counter()

    shutil.rmtree(args.store, ignore_errors=True)
    classes = logits.shape[1]
    like_pipeline = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)  # pipeline/output.py
    out = zarr.create_array(
        args.store,
        shape=(classes, height, width),
        chunks=(classes, args.tile, args.tile),
        dtype="float32",
        fill_value=0,
        zarr_format=2,
        compressors=like_pipeline,
    )
    with torch.inference_mode():
        for y0 in range(0, height, args.tile):
            band = torch.softmax(logits[0, :, y0 : y0 + args.tile], dim=0)
            out[:, y0 : y0 + args.tile, :] = band.numpy()
    write = time.perf_counter()

    timings = {
        "setup": setup - started,
        "read": read - setup,
        "predict": predict - read,
        "write": write - predict,
        "total": write - started,
        "overlap": overlap,
        "window": window,
        "monai": monai.__version__,
    }
    with open(args.report, "w") as fh:
        json.dump(timings, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
