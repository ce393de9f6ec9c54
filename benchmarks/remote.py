"""Reading from object storage against reading from disk, on the same slide, side by side.

Serves a synthetic JPEG-tiled slide (``_common.make_inputs``) from an HTTP server with range
requests and from moto's S3 server, both on 127.0.0.1 (``tests/servers.py``), and runs ``fcnpipe
run`` on it from disk, from ``http://`` and from ``s3://``, and from disk into a store in S3
(``to-s3``), for the reference FCN and a near-null network (``ReferenceFCN(3, 3, hidden=1)``,
where reading and writing are all there is).
Prints wall time, Mpx/s, the S3 / disk throughput ratio, and what the run says it fetched over the
network: bytes fetched / bytes of the file (each file tile about once is 1.0) and requests.

    python benchmarks/remote.py              # 32768^2 (1.07 Gpx)
    python benchmarks/remote.py --size 8192  # a quick look
    python benchmarks/remote.py --near-null-only --sources disk,http  # 1 Gpx, reading only

The loopback network is faster than a real one: the HTTP ratio is the pipeline's own cost of ranged
reads (requests, copies, concurrency), not a cloud's latency. moto's server copies the whole object
for every ranged GET (90 ms for 200 KB of a 100 MiB object, 13 ms of a 1 MiB one, measured here), so
its row shows that the S3 path works and what it fetches, not what S3 would cost.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch
from _common import make_inputs, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests/servers.py
from pipeline.model.network import ReferenceFCN
from tests.servers import start_http, start_s3, upload

FETCHED = re.compile(r"read ([\d.]+) MiB of the input over the network in (\d+) requests \(([\d.]+) x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32768, help="slide side in pixels [32768]")
    parser.add_argument("--work", default="/tmp/fcnpipe-bench", help="cache of slides and models")
    parser.add_argument("--near-null-only", action="store_true", help="skip the reference FCN's rows (reading only)")
    parser.add_argument("--sources", default="disk,http,s3,to-s3", help="rows to run [disk,http,s3,to-s3]")
    args = parser.parse_args(argv)
    image, reference = make_inputs(args.work, args.size)
    null = os.path.join(args.work, "null_fcn_3x3.pt")
    torch.manual_seed(0)
    torch.save(ReferenceFCN(3, 3, hidden=1).state_dict(), null)
    megapixels = args.size * args.size / 1e6
    rows = []
    with start_s3() as env, start_http(Path(image).parent) as (http, _):
        os.environ.update(env)
        upload(env, "bench", {os.path.basename(image): Path(image)} if "s3" in args.sources.split(",") else {})
        sources = {"disk": image, "http": f"{http}/{os.path.basename(image)}"}
        sources["s3"] = f"s3://bench/{os.path.basename(image)}"
        sources["to-s3"] = image
        sources = {where: source for where, source in sources.items() if where in args.sources.split(",")}
        networks = [("near-null", null)] + ([] if args.near_null_only else [("reference FCN", reference)])
        for network, model in networks:
            for where, source in sources.items():
                store = "s3://bench/out.zarr" if where == "to-s3" else os.path.join(args.work, f"remote_{where}.zarr")
                log = os.path.join(args.work, f"remote_{where}.log")
                result = run_cli(source, model, store, 512, log, extra=["--dtype", "uint8", "-v"])
                found = FETCHED.search(Path(log).read_text())
                rows.append((network, where, result, found))
                print(f"{network:14} {where:4} {result['wall_s']:7.1f} s", file=sys.stderr, flush=True)
    print(
        f"\n{args.size}x{args.size} JPEG-tiled slide ({megapixels:.0f} Mpx, {os.path.getsize(image) / 2**20:.0f} MiB)"
    )
    heads = (("wall s", 7), ("Mpx/s", 7), ("vs disk", 8), ("fetched MiB", 12), ("x file", 7), ("requests", 9))
    print(f"{'network':14} {'from':5} " + " ".join(f"{head:>{width}}" for head, width in heads))
    disk: dict[str, float] = {}
    for network, where, result, found in rows:
        rate = megapixels / result["wall_s"]
        disk.setdefault(network, rate)
        fetched = ("", "", "") if found is None else found.groups()
        print(
            f"{network:14} {where:5} {result['wall_s']:7.1f} {rate:7.2f} {rate / disk[network]:8.2f} "
            f"{fetched[0]:>12} {fetched[2]:>7} {fetched[1]:>9}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
