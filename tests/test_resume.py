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

from pipeline.lock import store_lock
from pipeline.model import ReferenceFCN
from pipeline.resume import STATE_DIR
from tests.conftest import slide_and_model

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
    resumed = fcnpipe("run", image, "-m", model, "-o", store, *FIXED, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    # each finished task held up to 4 chunks with foreground; the plan and the summary say how many were left
    line = next(line for line in resumed.stderr.splitlines() if line.startswith("chunks"))
    from_before = int(line.split(", ")[2].split()[0])
    assert finished <= from_before <= 4 * finished
    again = fcnpipe("run", image, "-m", model, "-o", store, *FIXED, "--resume")
    assert again.returncode == 0 and "already complete" in again.stderr


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
    assert plain.returncode != 0 and "already exists; pass --overwrite" in plain.stderr
    assert not completed(store)


def test_a_second_writer_is_refused(slide: tuple[Path, Path], tmp_path: Path) -> None:
    image, model = slide
    store = tmp_path / "out.zarr"
    with store_lock(str(store)):
        refused = fcnpipe("run", image, "-m", model, "-o", store, *FIXED, "--overwrite")
    assert refused.returncode != 0
    assert f"another fcnpipe process (pid {os.getpid()}) is writing to it" in refused.stderr
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


def test_every_config_key_is_fingerprinted_or_declared_byte_neutral() -> None:
    """Walk the whole schema: changing a key changes the fingerprint unless BYTE_NEUTRAL names it
    (or its section); and BYTE_NEUTRAL names only keys that exist."""
    from pipeline.config import BYTE_NEUTRAL, RunConfig, byte_neutral, config_keys
    from pipeline.resume import fingerprint_of

    values = RunConfig().to_dict()
    base = fingerprint_of(values, "s.svs", 100, "ab")
    keys = config_keys()
    assert len(keys) > 40 and "tiling.tile" in keys and "cluster.cores" in keys
    for key in keys:
        section, name = key.split(".")
        changed = {**values, section: {**values[section], name: ["a value no default has", 17]}}
        moved = fingerprint_of(changed, "s.svs", 100, "ab") != base
        assert moved != byte_neutral(key), (
            f"{key}: {'declared byte-neutral' if byte_neutral(key) else 'not fingerprinted'}"
        )
    for declared in BYTE_NEUTRAL:
        assert declared in keys or any(key.startswith(f"{declared}.") for key in keys), f"{declared} is no key"
    for other in (("t.svs", 100, "ab"), ("s.svs", 101, "ab"), ("s.svs", 100, "cd")):
        assert fingerprint_of(values, *other) != base  # the input's name and size, the model's hash


def small_slide(folder: Path, seed: int = 0) -> Path:
    """A 300 x 400 RGB TIFF: a run of it takes a second."""
    import tifffile

    from tests.conftest import random_image

    path = folder / f"small{seed}.tif"
    tifffile.imwrite(path, random_image((300, 400, 3), seed=seed), photometric="rgb")
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
