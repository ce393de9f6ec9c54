"""Polygon export of large label maps: time and peak memory of ``fcnpipe export STORE -o OUT.geojson``.

For each ``--sizes`` N (default 8192 and 32768) a real fcnpipe store of N x N is made once
(``pipeline.store.arrays.create_store`` and a finished record), its level-0 labels written chunk
by chunk: nucleus-like discs (radius 4 to 9 px, two classes) on a jittered 32 px grid over
background, so there are about N² / 1024 regions and many of them are cut by chunk edges. Then
each export runs as its own process, measured by ``_common.measured`` (wall time, peak RSS).
What to expect: time grows with the number of regions, peak RSS stays about flat (the open seams
and one batch of polygons), so the two sizes differ 16x in time and little in memory.

Run: ``.venv/bin/python benchmarks/polygons.py [--sizes 8192 32768] [--formats geojson gpkg]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from _common import measured

from pipeline.store.arrays import create_store
from pipeline.store.layout import LABEL_GROUP
from pipeline.store.record import StoreRecord, write_record

CELL = 32
CHUNK = 1024
CLASSES = [
    {"name": "background", "color": [255, 255, 255]},
    {"name": "tumour", "color": [200, 30, 30]},
    {"name": "lymphocyte", "color": [30, 30, 200]},
]


def blob_chunk(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Labels of rows ``y0:y1``, columns ``x0:x1``: each 32 px cell holds one disc of class 1 or 2
    whose centre and radius are a hash of the cell, so every chunk is made alone and agrees with
    its neighbours."""
    ys, xs = np.arange(y0, y1)[:, None], np.arange(x0, x1)[None, :]
    cy, cx = ys // CELL, xs // CELL
    cell = (cy * 1_000_003 + cx * 7919) % 2_147_483_647
    jitter_y, jitter_x = cell % 7 - 3, (cell // 7) % 7 - 3
    radius = 4 + (cell // 49) % 6
    dy, dx = ys - (cy * CELL + CELL // 2 + jitter_y), xs - (cx * CELL + CELL // 2 + jitter_x)
    inside = dy * dy + dx * dx <= radius * radius
    return np.where(inside, 1 + (cell // 300) % 2, 0).astype(np.uint8)


def make_store(path: str, n: int) -> None:
    """A finished fcnpipe store of ``n`` x ``n`` whose labels are :func:`blob_chunk`'s."""
    if os.path.exists(path + ".done"):
        return
    create_store(path, len(CLASSES), [(n, n)], CHUNK, "uint8", overwrite=True)
    import zarr

    labels = zarr.open_group(path, mode="r+")[f"{LABEL_GROUP}/0"]
    for y0 in range(0, n, CHUNK):
        for x0 in range(0, n, CHUNK):
            labels[y0 : y0 + CHUNK, x0 : x0 + CHUNK] = blob_chunk(y0, min(n, y0 + CHUNK), x0, min(n, x0 + CHUNK))
    record = StoreRecord(
        config={"input": {"series": 0, "level": 0}},
        input={"path": "/synthetic.tif", "size_bytes": 0, "shape_cyx": [3, n, n]},
        model={"sha256": "", "classes": CLASSES},
        tile=CHUNK,
        halo=0,
        spatial={"mpp": 0.5, "level_read": 0, "level0_shape": [n, n]},
        complete=True,
    )
    write_record(path, record)
    open(path + ".done", "w").close()  # beside the store: zarr warns of files it does not know


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--formats", nargs="+", default=["geojson"], choices=["geojson", "geojson.gz", "gpkg", "fgb"])
    parser.add_argument("--work", default="/tmp/fcnpipe-bench/polygons")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    results = []
    for n in args.sizes:
        store = os.path.join(args.work, f"blobs_{n}.zarr")
        make_store(store, n)
        for kind in args.formats:
            out = os.path.join(args.work, f"blobs_{n}.{kind}")
            command = [sys.executable, "-m", "pipeline", "export", store, "-o", out, "--overwrite"]
            found = measured(command, os.path.join(args.work, f"export_{n}_{kind}.log"), f"export {n} {kind}")
            with open(os.path.join(args.work, f"export_{n}_{kind}.log"), encoding="utf-8") as log:
                tail = log.read().strip().splitlines()[-1:]
            row = {"size": n, "format": kind, **found, "output_bytes": os.path.getsize(out), "said": tail}
            results.append(row)
            print(
                f"{n:>6}^2 {kind:<10} {found['wall_s']:8.1f} s  peak RSS {found['maxrss_kib'] / 1024:7.0f} MiB  "
                f"{os.path.getsize(out) / 2**20:8.1f} MiB  {' '.join(tail)}",
                flush=True,
            )
    with open(os.path.join(args.work, "results.json"), "w", encoding="utf-8") as file:
        json.dump(results, file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
