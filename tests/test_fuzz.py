"""Fuzzing the input: real third-party TIFFs with mutated tags, truncated and corrupted bytes.

A seeded generator takes each file of ``../shared/data/real`` that tifffile can open and writes
variants of it: one tag of a page set to a value that is malformed or out of range (sizes, tile
and strip layout, offsets and byte counts, sample format, resolution, ImageDescription / MPP,
GDAL_NODATA, GeoTIFF keys, alpha), the file cut short, or bytes overwritten. ``fcnpipe inspect``
and ``fcnpipe run`` then read each variant, and each must end one of two ways:

* exit 0: for ``run``, a complete store of the shape the file's level has, labels that are class
  indices or no data; stderr holds only the plan, the summary and warnings that name the file;
* a non-zero exit that is not 70 (an internal error): one ``fcnpipe: error:`` line that names the
  file, nothing else the user did not ask for (no traceback, no library's messages), and no store
  marked complete.

The commands run in one worker process (``tests/fuzz_worker.py``), restarted if a command hangs.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr

from pipeline.model.network import ReferenceFCN
from pipeline.source.tiff import open_source

pytestmark = pytest.mark.slow  # real processes, seconds each; the quick loop is -m 'not slow'

WORKER = Path(__file__).with_name("fuzz_worker.py")
TIMEOUT_S = 60.0
"""A command that takes longer hangs: the worker is killed, the variant fails."""
SMALLER = {
    # files whose level 0 is large: run a small level (a mutation that removes it fails cleanly)
    "east_coast_phase3_2023_AY31_1000_3335.tif": ["--level", "4"],
    "sparse.tiff": ["--series", "1", "--level", "2"],
    "test3-TRITC-2-560.ndpi": ["--level", "2"],
}
PLAN_WORDS = (
    "input",
    "model",
    "tiles",
    "compute",
    "output",
    "scale",
    "mask",
    "measure",
    "expect",
    "resume",
    "threads",
    "wrote",
    "chunks",
    "nodata",
    "progress",
    "preview",
    "class",
    "labelled",
)
"""First words of the lines a run prints on stderr besides warnings and errors."""


@dataclass(frozen=True)
class Variant:
    path: Path
    source: str
    """The real file it was made from."""
    mutation: str


# --- the variants -----------------------------------------------------------------------------------


def _sizes(value: Any, rng: random.Random) -> list[Any]:
    v = int(value)
    return [0, 1, v + 1, max(1, v // 2), v * 2, 2**31 - 1, 2**32 - 1, rng.randrange(2, 70000)]


def _arrays(value: Any, rng: random.Random) -> list[Any]:
    """Offsets or byte counts: one entry moved, zeroed or pointed far away; all shuffled or halved."""
    values = [int(v) for v in (value if isinstance(value, tuple | list) else (value,))]
    i = rng.randrange(len(values))
    moved, zeroed, far = list(values), list(values), list(values)
    moved[i] += rng.choice([-1000, -7, 3, 511, 100000])
    zeroed[i] = 0
    far[i] = 2**31 + rng.randrange(1000)
    halved = [v // 2 for v in values]
    shuffled = rng.sample(values, len(values))
    short = values[: max(1, len(values) // 2)]
    return [[max(0, v) for v in moved], zeroed, far, halved, shuffled, short]


def _description(value: Any, rng: random.Random) -> list[Any]:
    text = value if isinstance(value, str) else ""
    garbage = "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 200)))
    out = ["", garbage, "<?xml version='1.0'?><OME><Pixels PhysicalSizeX=\"0\"", text[: len(text) // 2]]
    if "MPP" in text:
        out += [text.replace("MPP = 0.499", f"MPP = {m}") for m in ("0", "-1", "nan", ".", "1e400", "inf", "e")]
    if "PhysicalSize" in text or text.startswith("<?xml"):
        out += [text.replace('PhysicalSizeX="', f'PhysicalSizeX="{m}') for m in ("0", "-", "nan", "1e999")]
    return out


def _nodata(value: Any, rng: random.Random) -> list[Any]:
    return ["-10000", "nan", "abc", "1e400", "", "300", "-1", "0.5", "inf", "-128"]


def _rational(value: Any, rng: random.Random) -> list[Any]:
    return [(0, 1), (1, 0), (10**9, 1), (1, 10**9), (2**32 - 1, 1)]


def _small(choices: list[int]) -> Callable[[Any, random.Random], list[Any]]:
    def values(value: Any, rng: random.Random) -> list[Any]:
        if isinstance(value, tuple | list):  # one per sample
            return [tuple([c] * len(value)) for c in choices]
        return list(choices)

    return values


def _doubles(value: Any, rng: random.Random) -> list[Any]:
    n = len(value) if isinstance(value, tuple | list) else 3
    return [(0.0,) * n, (float("nan"),) * n, (-1.0,) * n, (1e308,) * n, (1.0,) * max(1, n // 2)]


def _geokeys(value: Any, rng: random.Random) -> list[Any]:
    keys = [int(v) for v in value]
    truncated = keys[: max(4, len(keys) // 2)]
    scrambled = [rng.randrange(0, 65536) for _ in keys]
    return [truncated, scrambled, [1, 1, 0, 200, *keys[4:]]]


MUTATIONS: dict[str, Callable[[Any, random.Random], list[Any]]] = {
    "ImageWidth": _sizes,
    "ImageLength": _sizes,
    "TileWidth": _sizes,
    "TileLength": _sizes,
    "RowsPerStrip": _sizes,
    "StripOffsets": _arrays,
    "StripByteCounts": _arrays,
    "TileOffsets": _arrays,
    "TileByteCounts": _arrays,
    "BitsPerSample": _small([1, 4, 12, 16, 64]),
    "SamplesPerPixel": _small([1, 2, 4, 255]),
    "Compression": _small([1, 5, 7, 8, 50000]),
    "PhotometricInterpretation": _small([0, 1, 2, 4, 6]),
    "PlanarConfiguration": _small([1, 2, 3]),
    "SampleFormat": _small([1, 2, 3, 6]),
    "ExtraSamples": _small([0, 1, 2, 99]),
    "XResolution": _rational,
    "YResolution": _rational,
    "ResolutionUnit": _small([0, 1, 3, 99]),
    "ImageDescription": _description,
    "GDAL_NODATA": _nodata,
    "ModelPixelScaleTag": _doubles,
    "ModelTiepointTag": _doubles,
    "ModelTransformationTag": _doubles,
    "GeoKeyDirectoryTag": _geokeys,
    "NewSubfileType": _small([0, 1, 2]),
}


def _readable(path: Path) -> bool:
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.series)
    except Exception:
        return False


def tag_variant(source: Path, out: Path, rng: random.Random) -> str | None:
    """``source`` copied to ``out`` with one tag of one page overwritten; its description, or None
    when the chosen tag could not be written (the copy is then removed)."""
    shutil.copyfile(source, out)
    try:
        with tifffile.TiffFile(out, mode="r+b") as tif:
            pages = [page for page in tif.pages if isinstance(page, tifffile.TiffPage)]
            page_index = 0 if rng.random() < 0.7 else rng.randrange(len(pages))
            page = pages[page_index]
            names = [tag.name for tag in page.tags.values() if tag.name in MUTATIONS]
            if not names:
                raise ValueError("no tag to mutate")
            name = rng.choice(names)
            tag = page.tags[name]
            value = rng.choice(MUTATIONS[name](tag.value, rng))
            if isinstance(value, list):
                value = tuple(value)
            tag.overwrite(value)
            return f"page {page_index} {name} = {str(value)[:60]!r}"
    except Exception:
        out.unlink(missing_ok=True)
        return None


def byte_variant(source: Path, out: Path, rng: random.Random, kind: str) -> str:
    """``source`` cut short at a random place, or with random bytes overwritten."""
    data = bytearray(source.read_bytes())
    if kind == "truncated":
        cut = rng.choice([8, 16, 200, int(len(data) * rng.uniform(0.05, 0.995))])
        out.write_bytes(bytes(data[:cut]))
        return f"truncated to {cut} of {len(data)} bytes"
    count = rng.choice([1, 8, 64])
    where = [rng.randrange(8, len(data)) for _ in range(count)]
    for i in where:
        data[i] = rng.randrange(256)
    out.write_bytes(bytes(data))
    return f"{count} bytes overwritten from offset {min(where)}"


TARGETED = ("GDAL_NODATA", "ImageDescription", "XResolution", "ModelPixelScaleTag")
"""Metadata tags every value of whose mutations is tried on page 0 of each file that has them."""


def targeted_variants(source: Path, folder: Path, rng: random.Random) -> Iterator[Variant]:
    """``source`` with each of :data:`TARGETED`'s tags set to each of its malformed values."""
    with tifffile.TiffFile(source) as tif:
        tags = {tag.name: tag.value for tag in tif.pages[0].tags.values() if tag.name in TARGETED}
    stem = source.name.replace(".", "_")
    for name, value in tags.items():
        for number, new in enumerate(MUTATIONS[name](value, rng)):
            out = folder / f"{stem}-{name}-{number}{source.suffix}"
            shutil.copyfile(source, out)
            try:
                with tifffile.TiffFile(out, mode="r+b") as tif:
                    tif.pages[0].tags[name].overwrite(tuple(new) if isinstance(new, list) else new)
            except Exception:
                out.unlink()
                continue
            yield Variant(out, source.name, f"page 0 {name} = {str(new)[:60]!r}")


def make_variants(real: Path, folder: Path, seed: int, per_file: int) -> list[Variant]:
    """About ``per_file`` random variants of each readable real file, its targeted variants, and
    each file as it is (a control)."""
    rng = random.Random(seed)
    variants = []
    for source in sorted(p for p in real.iterdir() if p.suffix != ".md" and _readable(p)):
        stem = source.name.replace(".", "_")
        variants.append(Variant(source, source.name, "none (the file as it is)"))
        variants += targeted_variants(source, folder, rng)
        made, attempts = 0, 0
        while made < per_file and attempts < per_file * 4:
            attempts += 1
            out = folder / f"{stem}-{attempts:03d}{source.suffix}"
            kind = rng.choices(["tag", "truncated", "bytes"], weights=[6, 2, 2])[0]
            described = tag_variant(source, out, rng) if kind == "tag" else byte_variant(source, out, rng, kind)
            if described is not None:
                variants.append(Variant(out, source.name, described))
                made += 1
    return variants


# --- running them -----------------------------------------------------------------------------------


class Worker:
    """``tests/fuzz_worker.py`` as a process: one command at a time, restarted after a hang."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process: subprocess.Popen[str] | None = None
        self.count = 0

    def _start(self) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        return subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            stderr=subprocess.DEVNULL,
        )

    def run(self, *args: object) -> dict[str, Any]:
        """``fcnpipe ARGS``: its exit code, stdout and stderr; ``code`` None after a hang or a crash."""
        self.process = self.process or self._start()
        self.count += 1
        reply = self.folder / f"reply-{self.count}.json"
        request = {"id": self.count, "args": [str(a) for a in args], "reply": str(reply)}
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + TIMEOUT_S
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=deadline - time.monotonic()):
                    break
                line = self.process.stdout.readline()
                if not line:  # the worker died (a crash in a codec)
                    return self._lost(f"the worker died ({self.process.wait()})")
                if line.strip() == f"done {self.count}":
                    return dict(json.loads(reply.read_text()))
        return self._lost(f"no answer within {TIMEOUT_S:.0f} s")

    def _lost(self, why: str) -> dict[str, Any]:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None
        return {"code": None, "stdout": "", "stderr": why, "escaped": None}

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def problems(variant: Variant, command: str, reply: dict[str, Any], store: Path | None) -> list[str]:
    """What is wrong with how ``command`` ended on ``variant``: nothing, or the broken promises."""
    code, stderr = reply["code"], reply["stderr"]
    name = str(variant.path)
    found = []
    if code is None:
        return [stderr]
    if code == 70 or reply["escaped"]:
        return [f"internal error: {stderr.strip() or reply['escaped']}"]
    lines = stderr.splitlines()
    for line in lines:
        ours = line.split(" ", 1)[0] in PLAN_WORDS or line.startswith(("fcnpipe: warning: ", "fcnpipe: error: "))
        if not ours:
            found.append(f"stray stderr line {line[:120]!r}")
        elif line.startswith("fcnpipe: warning: ") and name not in line:
            found.append(f"warning without the file: {line[:120]!r}")
    complete = (
        store is not None
        and store.exists()
        and zarr.open_group(store, mode="r").attrs.get("fcnpipe", {}).get("complete")
    )
    if code == 0:
        if command == "run":
            found += _store_problems(variant, store) if complete else ["exit 0 without a complete store"]
        elif not reply["stdout"].strip():
            found.append("inspect printed nothing")
    else:
        errors = [line for line in lines if line.startswith("fcnpipe: error: ")]
        if len(errors) != 1 or name not in errors[0]:
            found.append(f"expected one error line naming the file, got {errors!r}")
        if complete:
            found.append(f"exit {code} but the store is marked complete")
    return found


def _store_problems(variant: Variant, store: Path | None) -> list[str]:
    assert store is not None
    group = zarr.open_group(store, mode="r")
    record = group.attrs["fcnpipe"]
    spatial, run_input = record["spatial"], record["config"]["input"]
    level = open_source(variant.path, run_input["series"], spatial["level_read"])
    probabilities, labels = group["0"], group["labels/argmax/0"]
    found = []
    if probabilities.shape != (3, *level.shape[1:]) or labels.shape != level.shape[1:]:
        found.append(f"store of shape {probabilities.shape} for a level of {level.shape}")
    values = np.unique(np.asarray(labels))
    if not set(values.tolist()) <= {0, 1, 2, 255}:
        found.append(f"labels hold {values.tolist()[:8]}")
    return found


def models(folder: Path) -> Iterator[tuple[int, Path]]:
    """A tiny reference FCN for each channel count a real file has (1 to 64)."""
    for channels in (1, 2, 3, 4, 64):
        torch.manual_seed(channels)
        path = folder / f"fcn{channels}.pt"
        torch.save(ReferenceFCN(channels, 3, 4).state_dict(), path)
        yield channels, path


def test_fuzzed_real_files_end_in_a_complete_store_or_one_clean_line(real_data: Path, tmp_path: Path) -> None:
    variants = make_variants(real_data, tmp_path, seed=15, per_file=10)
    by_channels = dict(models(tmp_path))
    worker = Worker(tmp_path)
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    started = time.monotonic()
    try:
        for number, variant in enumerate(variants):
            try:
                channels = open_source(real_data / variant.source).shape[0]
            except Exception:
                channels = 3
            model = by_channels.get(channels, by_channels[3])
            inspected = worker.run("inspect", variant.path)
            store = tmp_path / f"out-{number}.zarr"
            flags = ["--no-preview", "--no-progress", *SMALLER.get(variant.source, [])]
            ran = worker.run("run", variant.path, "-m", model, "-o", store, *flags)
            for command, reply, out in (("inspect", inspected, None), ("run", ran, store)):
                outcomes[f"{command} {'ok' if reply['code'] == 0 else 'error'}"] += 1
                for problem in problems(variant, command, reply, out):
                    failures.append(f"{command} {variant.source} [{variant.mutation}]: {problem}")
            shutil.rmtree(store, ignore_errors=True)
    finally:
        worker.close()
    elapsed = time.monotonic() - started
    print(
        f"\nfuzz: {len(variants)} variants of {len({v.source for v in variants})} files in {elapsed:.0f} s:",
        dict(outcomes),
    )
    assert len(variants) >= 240 and outcomes["run ok"] >= 50 and outcomes["run error"] >= 50
    assert not failures, f"{len(failures)} broken promises:\n" + "\n".join(failures[:40])
