"""A batch killed half-way and started again ends with the manifest and report of an uninterrupted one;
the manifest's rewrites stay a bounded share of a batch however many inputs end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tifffile
import torch

from pipeline.model.network import ReferenceFCN
from pipeline.run import batch
from pipeline.run.batch import BatchItem, Manifest
from tests.conftest import random_image

FIXED = ["--tile", "64", "--workers", "2", "--torch-threads", "1", "--mask", "none", "--no-preview", "--no-progress"]
DYING = Path(__file__).with_name("dying.py")
GOOD = 10
"""Good inputs: 256 x 256, 16 tiles of 64 in 4 tasks each, so that a wave (8 tasks per worker) holds 4."""


def fcnpipe(*args: object, fault: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``fcnpipe ARGS``, through tests/dying.py (a fault at a chosen write, or none)."""
    env = {**os.environ, **(fault or {"FCNPIPE_FAULT": "log", "FCNPIPE_FAULT_TARGET": ""})}
    command = [sys.executable, str(DYING), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[list[Path], Path]:
    """Ten small RGB TIFFs with a broken one in the middle, and a reference FCN's state_dict."""
    folder = tmp_path / "scans"
    folder.mkdir()
    paths = []
    for i in range(GOOD):
        paths.append(folder / f"in_{i:02d}.tif")
        tifffile.imwrite(paths[-1], random_image((256, 256, 3), seed=i), photometric="rgb")
        if i == 5:
            paths.append(folder / "in_05b.tif")
            paths[-1].write_bytes(b"II*\x00 not a TIFF after all")
    model = tmp_path / "m.pt"
    torch.manual_seed(0)
    torch.save(ReferenceFCN(3, 3, 4).state_dict(), model)
    return paths, model


def manifest(outdir: Path) -> dict[str, object]:
    document: dict[str, object] = json.loads((outdir / "manifest.json").read_text())
    return document


def rows(outdir: Path) -> dict[str, dict[str, object]]:
    listed = manifest(outdir)["inputs"]
    assert isinstance(listed, list)
    return {Path(str(row["input"])).name: row for row in listed}


@pytest.mark.slow  # fcnpipe as processes, one killed: about 15 s on 2 cores
def test_a_killed_batch_started_again_lists_every_input_once_with_its_status(
    inputs: tuple[list[Path], Path], tmp_path: Path
) -> None:
    paths, model = inputs
    names = [p.name for p in paths]
    straight = tmp_path / "straight"
    assert fcnpipe("batch", *paths, "-m", model, "-o", straight, *FIXED).returncode == 1  # the broken input

    outdir = tmp_path / "killed"
    # SIGKILL as the second task of in_05 is marked done (each marker is a mkdir and a file: the 4th
    # write there), in the second wave (in_04 ... in_07, whose stores complete only once all their
    # markers are written): in_00 ... in_03 are complete, in_04 ... in_07 started, with one task of
    # in_05 marked done, the others not begun.
    target = str(outdir / "in_05.zarr" / ".fcnpipe" / "done")
    fault = {"FCNPIPE_FAULT": "kill", "FCNPIPE_FAULT_AT": "4", "FCNPIPE_FAULT_TARGET": target}
    killed = fcnpipe("batch", *paths, "-m", model, "-o", outdir, *FIXED, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = rows(outdir)  # whole (written atomically), every input once; it may lag the run by a rewrite
    assert list(left) == names
    assert {str(row["status"]) for row in left.values()} <= {"pending", "done", "failed"}
    assert not (outdir / "in_08.zarr").exists()
    assert (outdir / "in_04.zarr").exists()

    again = fcnpipe("batch", *paths, "-m", model, "-o", outdir, *FIXED)
    assert again.returncode == 1, again.stderr
    found = rows(outdir)
    assert list(found) == names
    want = {name: "already complete" for name in names[:4]} | {name: "done" for name in names[4:]}
    want["in_05b.tif"] = "failed"
    assert {name: row["status"] for name, row in found.items()} == want
    expected = rows(straight)
    assert found["in_05b.tif"]["reason"] == expected["in_05b.tif"]["reason"] != ""
    assert manifest(outdir)["summary"] == {"inputs": 11, "done": 6, "already complete": 4, "failed": 1}
    # resumed stores count their classes as uninterrupted ones do: the chunks of the killed run too
    for name in names:
        pixels = {key: value for key, value in found[name].items() if key.endswith("_pixels")}
        assert pixels == {key: value for key, value in expected[name].items() if key.endswith("_pixels")}, name
    resumed = {name: found[name]["chunks_resumed"] for name in names if found[name]["status"] == "done"}
    assert resumed["in_05.tif"] == 4 and resumed["in_08.tif"] == resumed["in_09.tif"] == 0, resumed  # a task: 4 tiles
    csv_lines = (outdir / "manifest.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(names) and all(sum(n in line for line in csv_lines) == 1 for n in names)
    page = (outdir / "report.html").read_text()
    assert len(re.findall(r'<tr class="(done|already-complete|failed)">', page)) == len(names)
    assert "11 inputs: 6 done, 4 already complete, 1 failed." in page
    assert all(page.count(f">{name}") == 1 for name in names)
    assert [p.name for p in outdir.iterdir() if p.name.endswith((".partial", ".lock"))] == []


def items(count: int, folder: Path) -> list[BatchItem]:
    return [BatchItem(f"in_{i}.tif", str(folder / f"in_{i}.zarr")) for i in range(count)]


def test_inputs_ending_quickly_share_rewrites_and_the_last_write_has_them_all(tmp_path: Path) -> None:
    """Inputs that end faster than 1 / REWRITE_SHARE rewrites' time wait for the next one (a
    rewrite per input would make a batch of N inputs O(N²)); the last write lists them all."""
    now = [0.0]

    def clock() -> float:  # each reading 0.5 s after the last: a rewrite takes 0.5 s, an input as long
        now[0] += 0.5
        return now[0]

    listed = items(200, tmp_path)
    written = Manifest(str(tmp_path), listed, clock)
    written.write()
    for item in listed:
        item.status = "done"
        written.ended(item)
    assert 2 <= written.writes <= 200 * batch.REWRITE_SHARE + 2
    written.write()
    assert manifest(tmp_path)["summary"] == {"inputs": 200, "done": 200, "already complete": 0, "failed": 0}
    assert (tmp_path / "report.html").read_text().count('<tr class="done">') == 200


def test_inputs_ending_slowly_are_each_written_as_they_end(tmp_path: Path) -> None:
    """Inputs that take longer than that (real slides) are each in the files as soon as they end."""
    now = [0.0]

    def clock() -> float:  # a rewrite takes a millisecond, an input 1000 s (below)
        now[0] += 0.001
        return now[0]

    listed = items(5, tmp_path)
    written = Manifest(str(tmp_path), listed, clock)
    written.write()
    for number, item in enumerate(listed, start=1):
        now[0] += 1000.0
        item.status = "failed" if number == 3 else "done"
        written.ended(item)
        statuses = [row["status"] for row in rows(tmp_path).values()]
        assert statuses == [i.status for i in listed]
        assert sum(s != "pending" for s in statuses) == number
    assert written.writes == 6
