"""Golden stores: the same commands give the same bytes, chunk by chunk and attribute by attribute.

A fixed set of runs (the reference FCN on a masked synthetic slide in both formats, a U-Net, a
GeoTIFF, a run killed and resumed, a blended run) is made from fixed inputs with fixed threads, and
the sha256 of every file of each store is compared with ``tests/golden.json``: a restructuring of
the code must leave every byte as it was. The JSON attributes are hashed without what changes
from run to run by design (times, the fcnpipe version, absolute paths).

Float arithmetic follows the processor's vector instructions, so the digests are recorded per kind
of CPU (``by_cpu`` in the JSON: the kinds this project has run on). To record them, on purpose,
after a change that is meant to move bytes: ``FCNPIPE_UPDATE_GOLDEN=1 pytest tests/test_golden.py``
(it replaces this processor's entry). A new kind of processor is recorded from the commit that first
recorded the golden stores (c604b82, before the restructure), never from the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tifffile
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.model.network import ReferenceFCN
from tests.conftest import REAL_DATA, random_image

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).with_name("golden.json")
FIXED = ["--workers", "2", "--torch-threads", "1", "--no-preview", "--no-progress"]
VOLATILE = {"started", "finished", "timings_s", "version"}
"""Keys of the ``fcnpipe`` record that change on every run by design."""


def cpu() -> str:
    """The kind of processor, as far as float results depend on it."""
    name = platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    vectors = [flag for flag in ("avx512f", "avx2", "fma") if flag in flags]
    return " ".join([name, model, *vectors])


def _clean(value: Any, folder: str) -> Any:
    """``value`` without volatile record fields, with ``folder`` (the test's tmp dir) as ``<tmp>`` and
    the real data's folder as ``<real>``."""
    if isinstance(value, dict):
        return {k: _clean(v, folder) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v, folder) for v in value]
    if isinstance(value, str):
        return (
            value.replace(folder, "<tmp>").replace(str(REAL_DATA.resolve()), "<real>").replace(str(REAL_DATA), "<real>")
        )
    return value


def digest(store: Path, folder: Path) -> dict[str, str]:
    """``{path in the store: sha256}`` of every file; JSON metadata hashed cleaned (:func:`_clean`)."""
    hashes = {}
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name in (".zattrs", ".zarray", ".zgroup", "zarr.json"):
            cleaned = _clean(json.loads(data), str(folder))
            data = json.dumps(cleaned, sort_keys=True).encode()
        hashes[str(path.relative_to(store))] = hashlib.sha256(data).hexdigest()
    return hashes


def _run(*args: object) -> None:
    result = CliRunner().invoke(cli, ["run", *map(str, args), *FIXED])
    assert result.exit_code == 0, result.output


def make_stores(folder: Path) -> dict[str, Path]:
    """The golden runs, from inputs made here (and RGB.byte.tif), into ``folder``."""
    from pipeline.training.synthetic import make_synthetic_slide
    from tests.test_exactness import save

    slide = folder / "slide.tif"
    make_synthetic_slide(slide, folder / "slide_mask.tif", size=1536, seed=11)
    torch.manual_seed(0)
    reference = folder / "reference.pt"
    torch.save(ReferenceFCN(3, 3, 16).state_dict(), reference)
    unet = save(folder, "unet")
    small = folder / "small.tif"
    tifffile.imwrite(small, random_image((203, 157, 3), seed=2), photometric="rgb")
    stores = {
        name: folder / f"{name}.zarr" for name in ("slide-0.4", "slide-0.5", "unet", "geotiff", "resumed", "blended")
    }
    _run(slide, "-m", reference, "-o", stores["slide-0.4"], "--tile", "256")  # tissue mask: a masked slide
    _run(slide, "-m", reference, "-o", stores["slide-0.5"], "--tile", "256", "--format", "ome-zarr-0.5")
    _run(small, "-m", unet, "-o", stores["unet"], "--tile", "64", "--dtype", "float32")
    _run(REAL_DATA / "RGB.byte.tif", "-m", reference, "-o", stores["geotiff"], "--tile", "256", "--dtype", "float16")
    killed = _killed_run(slide, reference, stores["resumed"])
    assert killed == -signal.SIGKILL
    _run(slide, "-m", reference, "-o", stores["resumed"], "--tile", "128", "--resume")
    _run(small, "-m", unet, "-o", stores["blended"], "--tile", "64", "--halo", "16", "--blend", "gaussian")
    return stores


def _killed_run(image: Path, model: Path, store: Path) -> int:
    """``fcnpipe run`` SIGKILLed at its 150th write into the store (chunks, markers): mid-run."""
    env = {**os.environ, "FCNPIPE_FAULT": "kill", "FCNPIPE_FAULT_AT": "150", "FCNPIPE_FAULT_TARGET": store.name}
    command = [sys.executable, str(Path(__file__).with_name("dying.py")), "run", image, "-m", model, "-o", store]
    done = subprocess.run([*map(str, command), "--tile", "128", *FIXED], env=env, capture_output=True, timeout=300)
    return done.returncode


def test_the_same_commands_give_the_same_bytes(tmp_path: Path) -> None:
    if not (REAL_DATA / "README.md").is_file():
        pytest.skip(f"real TIFF collection not found at {REAL_DATA} (set FCNPIPE_REAL_DATA)")
    stores = {name: digest(path, tmp_path) for name, path in make_stores(tmp_path).items()}
    recorded = json.loads(GOLDEN.read_text())["by_cpu"]
    if os.environ.get("FCNPIPE_UPDATE_GOLDEN"):
        recorded[cpu()] = stores
        GOLDEN.write_text(json.dumps({"by_cpu": recorded}, indent=1, sort_keys=True) + "\n")
    assert cpu() in recorded, (
        f"tests/golden.json holds digests for {sorted(recorded)}, this is {cpu()!r}: float results may differ "
        "in the last bit between processors; record them from commit c604b82 with FCNPIPE_UPDATE_GOLDEN=1"
    )
    golden = {"stores": recorded[cpu()]}
    for name, files in golden["stores"].items():
        now = stores[name]
        assert sorted(now) == sorted(files), f"{name}: files differ: {sorted(set(now) ^ set(files))[:8]}"
        changed = [path for path in files if now[path] != files[path]]
        assert not changed, f"{name}: {len(changed)} of {len(files)} files changed, e.g. {changed[:6]}"
    assert sorted(stores) == sorted(golden["stores"])
