"""Factories for small synthetic inputs, and the real third-party TIFFs from ../shared."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch

from pipeline.model.network import ReferenceFCN

REAL_DATA = Path(os.environ.get("FCNPIPE_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))


@pytest.fixture
def real_data() -> Path:
    """``../shared/data/real`` beside the checkout (see its README), or skip saying why."""
    if not (REAL_DATA / "README.md").is_file():
        pytest.skip(f"real TIFF collection not found at {REAL_DATA} (set FCNPIPE_REAL_DATA)")
    return REAL_DATA


def random_image(shape: tuple[int, ...], dtype: str = "uint8", seed: int = 0) -> np.ndarray:
    """Smooth-ish random pixels of ``dtype`` (full range for integers, [0, 1] for floats)."""
    rng = np.random.default_rng(seed)
    data = rng.random(shape)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        return (info.min + data * (float(info.max) - info.min)).astype(dtype)
    return data.astype(dtype)


@pytest.fixture
def make_tiff(tmp_path: Path) -> Callable[..., Path]:
    """Write ``data`` (as tifffile takes it, e.g. ``(Y, X, S)``) to a TIFF in ``tmp_path``."""
    counter = iter(range(10_000))

    def make(data: np.ndarray, name: str | None = None, **kwargs: Any) -> Path:
        path = tmp_path / (name or f"image{next(counter)}.tif")
        tifffile.imwrite(path, data, **kwargs)
        return path

    return make


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """Save a seeded reference FCN's plain state_dict; return its path."""

    def make(in_channels: int = 3, num_classes: int = 3, seed: int = 0, hidden: int = 16) -> Path:
        torch.manual_seed(seed)
        module = ReferenceFCN(in_channels, num_classes, hidden)
        # Larger weights than the default init make neighbouring pixels matter more: a tiling bug shows.
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.mul_(4.0)
        path = tmp_path / f"fcn_{in_channels}_{num_classes}_{seed}.pt"
        torch.save(module.state_dict(), path)
        return path

    return make


def slide_and_model(folder: Path, seed: int, size: int = 4096) -> tuple[Path, Path]:
    """A ``size``^2 synthetic slide (about half background) and a seeded reference FCN's state_dict in
    ``folder``: the input of the tests that run ``fcnpipe`` as a process (resume, distributed)."""
    from pipeline.training.synthetic import make_synthetic_slide

    image = folder / "slide.tif"
    make_synthetic_slide(image, folder / "mask.tif", size=size, seed=seed)
    torch.manual_seed(0)
    model = folder / "model.pt"
    torch.save(ReferenceFCN(3, 3, 16).state_dict(), model)
    return image, model


def debian_tool(name: str) -> str:
    """The path of a command from a Debian package that ``.ci/run`` installs (``gdalinfo`` from
    gdal-bin, ...). Missing in CI is a failure; elsewhere the test is skipped, saying how to get it."""
    import shutil

    found = shutil.which(name)
    if found is None:
        message = f"{name} not found: apt-get install the Debian package that .ci/run installs"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def confident_model(path: Path, seed: int = 0) -> Path:
    """A reference FCN state_dict whose weights are scaled up so far that most probabilities are
    exactly 0 or 1 in float32 (and 0 or 254 in uint8): zero is the most common value it stores."""
    torch.manual_seed(seed)
    module = ReferenceFCN(3, 3, 16)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(60.0)
    torch.save(module.state_dict(), path)
    return path
