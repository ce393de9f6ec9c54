"""Runs that are killed, refused or fail half-way: resume gives the same bytes, or a clear refusal."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.config import load_config
from pipeline.model.network import ReferenceFCN
from pipeline.run.execute import execute
from pipeline.run.plan import prepare
from pipeline.store.layout import LABELS
from pipeline.store.safety import STATE_DIR, store_lock
from tests.conftest import slide_and_model

pytestmark = pytest.mark.slow  # fcnpipe as processes killed and resumed: seconds each
FCNPIPE = [sys.executable, "-m", "pipeline"]
FIXED = ["--tile", "128", "--workers", "2", "--torch-threads", "1", "--no-preview", "--no-progress"]
FIXED += ["--forward-tile", "64"]  # tiles predicted in pieces, as a 512 px tile of a 64-channel FCN is


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4096^2 synthetic slide (about half background) and a reference FCN's state_dict."""
    return slide_and_model(tmp_path_factory.mktemp("resume"), seed=3)


@pytest.fixture(scope="module")
def reference(slide: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """An uninterrupted run of the slide, and how long it took (start-up included)."""
    image, model = slide
    store = tmp_path_factory.mktemp("reference") / "reference.zarr"
    started = time.perf_counter()
    done = fcnpipe("run", image, "-m", model, "-o", store, *FIXED)
    assert done.returncode == 0, done.stderr
    assert "each in 2 x 2 passes of 64 px" in done.stderr
    return store, time.perf_counter() - started


def fcnpipe(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FCNPIPE, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload,no-any-return]


def arrays(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every array of a store, by path, read whole (the stores here are small)."""
    group = zarr.open_group(path, mode="r")
    for name, array in sorted(group.arrays()):
        yield name, array[...]
    for name, _ in sorted(group.groups()):
        for child, values in arrays(path / name):
            yield f"{name}/{child}", values


def assert_same_bytes(a: Path, b: Path) -> None:
    left, right = dict(arrays(a)), dict(arrays(b))
    assert sorted(left) == sorted(right)
    assert len(left) >= 4  # levels of probabilities and labels at least
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert left[name].tobytes() == right[name].tobytes(), f"{name} differs"


def completed(path: Path) -> bool:
    record = zarr.open_group(path, mode="r").attrs.get("fcnpipe", {})
    return bool(record.get("complete"))


def test_killed_at_random_moments_resumes_to_identical_bytes(
    slide: tuple[Path, Path], reference: tuple[Path, float], tmp_path: Path
) -> None:
    image, model = slide
    reference_store, duration = reference

    store = tmp_path / "killed.zarr"
    rng = random.Random(7)
    kills = 0
    for attempt in range(6):
        args = ["run", image, "-m", model, "-o", store, *FIXED] + (["--resume"] if attempt else [])
        process = subprocess.Popen([*FCNPIPE, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.2, duration * 0.8))  # anywhere: start-up, setup, level 0, pyramid
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        if store.exists() and completed(store):
            break
    assert kills >= 3, "the run always finished before it could be killed: make the slide bigger"
    markers = store / STATE_DIR / "done"
    resumed = fcnpipe("run", image, "-m", model, "-o", store, *FIXED, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "already complete" in resumed.stderr or "from earlier runs" in resumed.stderr
    assert completed(store)
    assert not markers.exists() and not (store / STATE_DIR).exists()
    assert not list(store.rglob("*.partial"))
    assert_same_bytes(reference_store, store)


def test_resume_computes_only_missing_chunks(slide: tuple[Path, Path], tmp_path: Path) -> None:
    image, model = slide
    store = tmp_path / "out.zarr"
    process = subprocess.Popen(
        [*FCNPIPE, *map(str, ["run", image, "-m", model, "-o", store, *FIXED])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    markers = store / STATE_DIR / "done"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not markers.exists() or len(os.listdir(markers)) < 20):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(os.listdir(markers))
    assert finished >= 20
    config = load_config(
        overrides={
            "input": {"path": str(image)},
            "model": {"path": str(model)},
            "output": {"path": str(store), "resume": True},
            "tiling": {"tile": 128, "forward_tile": 64},
            "compute": {"workers": 2, "torch_threads": 1},
        }
    )
    resumed = execute(prepare(config))
    # each finished task held up to 4 chunks with foreground; the others are computed now, and only they
    assert finished <= resumed.chunks_resumed <= 4 * finished
    assert resumed.chunks_computed == resumed.chunks - resumed.chunks_background - resumed.chunks_resumed > 0
    assert zarr.open_group(store, mode="r")[LABELS].nchunks_initialized == resumed.chunks - resumed.chunks_background
    again = execute(prepare(config))
    assert again.status == "already complete" and again.chunks_computed == 0


def test_resume_refuses_another_model_or_config(slide: tuple[Path, Path], tmp_path: Path) -> None:
    image, model = slide
    store = tmp_path / "out.zarr"
    process = subprocess.Popen([*FCNPIPE, *map(str, ["run", image, "-m", model, "-o", store, *FIXED])])
    while not (store / STATE_DIR / "run.json").exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(ReferenceFCN(3, 3, 16).state_dict(), other)
    refused = fcnpipe("run", image, "-m", other, "-o", store, *FIXED, "--resume")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "cannot resume" in refused.stderr and "model.sha256" in refused.stderr
    retiled = fcnpipe("run", image, "-m", model, "-o", store, *FIXED, "--resume", "--tile", "256", "--dtype", "float32")
    assert retiled.returncode == 2
    assert "tiling.tile: 128 -> 256" in retiled.stderr and "output.dtype: uint8 -> float32" in retiled.stderr
    plain = fcnpipe("run", image, "-m", model, "-o", store, *FIXED)
    assert plain.returncode != 0 and "already exists and is incomplete (an interrupted run)" in plain.stderr
    assert "pass --resume to continue it, or pass --overwrite to start again" in plain.stderr
    assert not completed(store)


def test_a_second_writer_is_refused(slide: tuple[Path, Path], tmp_path: Path) -> None:
    image, model = slide
    store = tmp_path / "out.zarr"
    with store_lock(str(store)):
        refused = fcnpipe("run", image, "-m", model, "-o", store, *FIXED, "--overwrite")
    assert refused.returncode != 0
    assert f"another fcnpipe process (pid {os.getpid()}) is writing to it" in refused.stderr
    assert refused.stderr.count("\n") == 1  # refused first: no plan, no sample timing before it
    assert not store.exists()
    assert not Path(str(store) + ".lock").exists()


def _limit_file_size() -> None:
    """In the child: writes past 8 KiB per file fail with EFBIG, as a full disk fails them with ENOSPC
    (the compressed 128 x 128 probability chunks are 5-30 KiB; the metadata and log stay below)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))


def test_a_failed_write_leaves_a_store_that_resume_completes(
    slide: tuple[Path, Path], reference: tuple[Path, float], tmp_path: Path
) -> None:
    image, model = slide
    store = tmp_path / "out.zarr"
    failed = fcnpipe("run", image, "-m", model, "-o", store, *FIXED, preexec_fn=_limit_file_size)
    assert failed.returncode != 0
    message = failed.stderr.strip().splitlines()[-1]
    assert message.startswith("fcnpipe: error: ") and "File too large" in message and str(store) in message
    assert "Traceback" not in failed.stderr
    assert not completed(store)
    resumed = fcnpipe("run", image, "-m", model, "-o", store, *FIXED, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_bytes(reference[0], store)


def small_slide(folder: Path, seed: int = 0) -> Path:
    """A 1200 x 300 RGB TIFF, two pyramid levels: a run of it takes a second."""
    import tifffile

    from tests.conftest import random_image

    path = folder / f"small{seed}.tif"
    tifffile.imwrite(path, random_image((1200, 300, 3), seed=seed), photometric="rgb")
    return path


def test_a_complete_store_is_checked_like_an_incomplete_one(tmp_path: Path) -> None:
    """A retrained model, rerun with --resume or by the overnight batch, is never answered with
    yesterday's complete store: refused (run) or failed (batch), saying what differs; --overwrite
    recomputes it."""
    import json

    image = small_slide(tmp_path)
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.manual_seed(0)
    torch.save(ReferenceFCN(3, 3, 8).state_dict(), old)
    torch.save(ReferenceFCN(3, 4, 8).state_dict(), new)  # retrained, with a class more
    fixed = ["--no-preview", "--no-progress", "--tile", "128"]
    outdir = tmp_path / "maps"
    store = outdir / "small0.zarr"
    done = fcnpipe("batch", image, "-m", old, "-o", outdir, *fixed)
    assert done.returncode == 0, done.stderr
    assert completed(store)
    before = dict(arrays(store))

    refused = fcnpipe("run", image, "-m", new, "-o", store, *fixed, "--resume")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "is complete but was made with a different input, model or config" in refused.stderr
    assert "model.sha256" in refused.stderr and "--overwrite" in refused.stderr
    retiled = fcnpipe("run", image, "-m", old, "-o", store, *fixed, "--resume", "--tile", "64")
    assert retiled.returncode == 2 and "tiling.tile: 128 -> 64" in retiled.stderr
    same = fcnpipe("run", image, "-m", old, "-o", store, *fixed, "--resume")
    assert same.returncode == 0 and "already complete" in same.stderr, same.stderr

    batch = fcnpipe("batch", image, "-m", new, "-o", outdir, *fixed)
    assert batch.returncode == 1, batch.stderr
    item = json.loads((outdir / "manifest.json").read_text())["inputs"][0]
    assert item["status"] == "failed" and "model.sha256" in item["reason"], item
    assert {name: values.tobytes() for name, values in arrays(store)} == {
        name: values.tobytes() for name, values in before.items()
    }  # yesterday's maps untouched, and not reported as today's

    again = fcnpipe("batch", image, "-m", new, "-o", outdir, *fixed, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert zarr.open_group(store, mode="r")["0"].shape[0] == 4 and completed(store)
    assert json.loads((outdir / "manifest.json").read_text())["inputs"][0]["status"] == "done"


DYING = Path(__file__).with_name("dying.py")


def fcnpipe_faulty(
    mode: str, at: int, target: str, *args: object, log: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``fcnpipe ARGS`` with a fault (``kill``, ``full`` or ``log``) at the ``at``-th write whose path
    contains ``target`` (see tests/dying.py)."""
    env = {**os.environ, "FCNPIPE_FAULT": mode, "FCNPIPE_FAULT_AT": str(at), "FCNPIPE_FAULT_TARGET": target}
    if log is not None:
        env["FCNPIPE_FAULT_LOG"] = str(log)
    command = [sys.executable, str(DYING), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def leftovers(folder: Path) -> list[str]:
    """What runs left beside the stores in ``folder`` that is neither a store, a log nor an input."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".lock"))


def test_killed_or_out_of_space_while_creating_the_store_then_completed(tmp_path: Path) -> None:
    """SIGKILL, or a full disk, at chosen writes of the store's creation (the lock, the first
    folder, the group files, the record, the resume state, the rename into place), then --resume,
    batch or --overwrite: each completes the store to the bytes of an uninterrupted run."""
    image = small_slide(tmp_path)
    model = tmp_path / "m.pt"
    torch.manual_seed(0)
    torch.save(ReferenceFCN(3, 3, 8).state_dict(), model)
    fixed = ["--no-preview", "--no-progress", "--tile", "128", "--workers", "2", "--torch-threads", "1"]
    reference = tmp_path / "reference.zarr"
    assert fcnpipe("run", image, "-m", model, "-o", reference, *fixed).returncode == 0

    events = tmp_path / "events.txt"
    logged = tmp_path / "logged" / "small0.zarr"
    done = fcnpipe_faulty("log", 0, "small0.zarr", "run", image, "-m", model, "-o", logged, *fixed, log=events)
    assert done.returncode == 0, done.stderr
    writes = [line.split(" ", 2) for line in events.read_text().splitlines()]
    into_place = next(
        int(n) for n, event, path in writes if event == "os.rename" and ".creating-" in path.split("/")[-1]
    )
    assert into_place > 20  # the creation is many writes, each a moment to be killed at
    rng = random.Random(11)
    moments = sorted({1, into_place, *rng.sample(range(2, into_place), 3)})
    finishers = [("run", "--resume"), ("batch",), ("run", "--overwrite")]
    for number, at in enumerate(moments):
        folder = tmp_path / f"kill{at}"
        store = folder / "small0.zarr"
        killed = fcnpipe_faulty("kill", at, "small0.zarr", "run", image, "-m", model, "-o", store, *fixed)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not (store.exists() and completed(store))
        command, *flags = finishers[number % len(finishers)]
        if command == "batch":
            finished = fcnpipe("batch", image, "-m", model, "-o", folder, *fixed)
        else:
            finished = fcnpipe("run", image, "-m", model, "-o", store, *fixed, *flags)
        assert finished.returncode == 0, f"killed at write {at}, then {command} {flags}: {finished.stderr}"
        assert_same_bytes(reference, store)
        assert leftovers(folder) == [], f"killed at write {at}"
    for at in (into_place // 2,):  # the disk fills up during the creation
        store = tmp_path / f"full{at}" / "small0.zarr"
        full = fcnpipe_faulty("full", at, "small0.zarr", "run", image, "-m", model, "-o", store, *fixed)
        assert full.returncode == 1, full.stderr
        last = full.stderr.splitlines()[-1]
        assert full.stderr.count("fcnpipe:") == 1 and "Traceback" not in full.stderr, full.stderr
        # write counts move by a few from run to run (zarr writes metadata from threads)
        assert last.startswith(f"fcnpipe: error: {store}: cannot ") and last.endswith("(No space left on device)")
        assert not (store.exists() and completed(store))
        resumed = fcnpipe("run", image, "-m", model, "-o", store, *fixed, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert_same_bytes(reference, store)
        assert leftovers(store.parent) == []


def test_what_an_older_creation_left_is_completed_or_cleared(tmp_path: Path) -> None:
    """An empty folder, or a group with nothing but its own metadata (a creation killed before it
    was atomic): --resume completes it, --overwrite clears it."""
    image = small_slide(tmp_path)
    model = tmp_path / "m.pt"
    torch.manual_seed(0)
    torch.save(ReferenceFCN(3, 3, 8).state_dict(), model)
    fixed = ["--no-preview", "--no-progress", "--tile", "128"]
    empty, group, cleared = tmp_path / "empty.zarr", tmp_path / "group.zarr", tmp_path / "cleared.zarr"
    empty.mkdir()
    for bare in (group, cleared):
        zarr.open_group(bare, mode="w", zarr_format=2)
    for store, flag in ((empty, "--resume"), (group, "--resume"), (cleared, "--overwrite")):
        done = fcnpipe("run", image, "-m", model, "-o", store, *fixed, flag)
        assert done.returncode == 0, done.stderr
        assert completed(store)


def test_the_lock_and_overwrite_follow_symlinks(tmp_path: Path) -> None:
    """A second writer reaching the store through a symlink meets the first one's lock, and
    --overwrite through a symlink replaces the store it points to."""
    image = small_slide(tmp_path)
    model = tmp_path / "m.pt"
    torch.save(ReferenceFCN(3, 3, 8).state_dict(), model)
    real = tmp_path / "real.zarr"
    link = tmp_path / "link.zarr"
    fixed = ["--no-preview", "--no-progress", "--tile", "128"]
    assert fcnpipe("run", image, "-m", model, "-o", real, *fixed).returncode == 0
    link.symlink_to(real, target_is_directory=True)
    with store_lock(str(real)):
        refused = fcnpipe("run", image, "-m", model, "-o", link, *fixed, "--overwrite")
    assert refused.returncode == 1 and f"pid {os.getpid()}" in refused.stderr, refused.stderr
    replaced = fcnpipe("run", image, "-m", model, "-o", link, *fixed, "--overwrite", "--dtype", "float32")
    assert replaced.returncode == 0, replaced.stderr
    assert link.is_symlink() and zarr.open_group(real, mode="r")["0"].dtype == np.float32
    assert leftovers(tmp_path) == []


def test_ctrl_c_says_how_to_continue_and_resume_completes(
    slide: tuple[Path, Path], reference: tuple[Path, float], tmp_path: Path
) -> None:
    """SIGINT mid-run: one line naming the store and --resume, the interruption in the log; the
    plain command again suggests --resume before --overwrite; --resume gives the same bytes. Off a
    terminal, progress lines with rate and time left go to stderr and to the log."""
    image, model = slide
    store = tmp_path / "out.zarr"
    args = ["run", image, "-m", model, "-o", store, *[f for f in FIXED if f != "--no-progress"]]
    process = subprocess.Popen([*FCNPIPE, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    markers = store / STATE_DIR / "done"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not markers.exists() or len(os.listdir(markers)) < 5):
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-1] == (
        f"fcnpipe: interrupted: {store} is incomplete; run the same command with --resume to continue it"
    )
    assert "Traceback" not in stderr and not completed(store)
    log = (tmp_path / "out.log").read_text()
    assert "WARNING interrupted:" in log and "--resume" in log
    again = fcnpipe(*args)
    assert again.returncode == 1 and "pass --resume to continue it, or pass --overwrite to start again" in again.stderr
    resumed = fcnpipe(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_bytes(reference[0], store)
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("progress")]
    assert lines and lines[-1].startswith("progress 100%") and " Mpx/s, " in lines[-1] and "left" in lines[-1]
    assert lines[-1] in (tmp_path / "out.log").read_text()
    assert "Tqdm" not in resumed.stderr and "<-" not in resumed.stderr
