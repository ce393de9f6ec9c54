"""The pipeline end to end: tiled prediction equals one whole-image pass; the store says what it holds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.config import load_config
from pipeline.errors import ModelError, OutputError
from pipeline.model.checkpoint import load_model
from pipeline.model.predictor import Predictor, select_device
from pipeline.run.execute import run_pipeline
from pipeline.run.plan import prepare
from pipeline.source.pixels import read_window
from pipeline.source.tiff import open_source
from pipeline.store.layout import LABELS, PROBABILITIES
from tests.conftest import random_image


def whole_image_probabilities(image: Path, model: Path) -> np.ndarray:
    """The reference answer: one forward pass over the whole image, no tiling."""
    info = open_source(image)
    pixels = read_window(info.ref, (0, info.shape[1], 0, info.shape[2]))
    x = pixels.astype(np.float32) / np.float32(np.iinfo(pixels.dtype).max)
    return Predictor(load_model(model).module, select_device("cpu"))(x[np.newaxis])[0]


def run(image_path: Path, model_path: Path, out: Path, **sections: dict[str, object]) -> zarr.Group:
    overrides = {
        "input": {"path": str(image_path)},
        "model": {"path": str(model_path)},
        **sections,
        "output": {"path": str(out), "dtype": "float32", **sections.get("output", {})},
        "compute": {"progress": False, **sections.get("compute", {})},
    }
    run_pipeline(load_config(overrides=overrides))
    return zarr.open_group(str(out), mode="r")


SEAM_CASES = [
    # (height, width, tile, batch, workers)
    (97, 131, 32, 4, 2),
    (101, 55, 17, 1, 1),
    (64, 64, 64, 2, 2),
    (33, 200, 50, 3, 2),
    (1, 45, 16, 4, 1),
    (129, 127, 1000, 1, 1),
]


@pytest.mark.parametrize(
    ("height", "width", "tile", "batch", "workers"),
    SEAM_CASES,
    ids=[f"{h}x{w}-tile{t}-b{b}-w{n}" for h, w, t, b, n in SEAM_CASES],
)
def test_stitched_map_equals_whole_image_pass(
    make_tiff: Callable[..., Path],
    make_model: Callable[..., Path],
    tmp_path: Path,
    height: int,
    width: int,
    tile: int,
    batch: int,
    workers: int,
) -> None:
    image = make_tiff(random_image((height, width, 3), seed=height), photometric="rgb")
    model = make_model(num_classes=4)
    store = run(
        image, model, tmp_path / "out.zarr", tiling={"tile": tile, "batch": batch}, compute={"workers": workers}
    )
    expected = whole_image_probabilities(image, model)
    probs = store[PROBABILITIES][:]
    assert probs.shape == (4, height, width) and probs.dtype == np.float32
    assert np.abs(probs - expected).max() < 1e-5
    np.testing.assert_array_equal(store[LABELS][:], expected.argmax(axis=0))
    assert store[PROBABILITIES].chunks == (4, min(tile, height), min(tile, width))


def test_halo_is_what_makes_it_exact(make_tiff: Callable[..., Path], make_model: Callable[..., Path]) -> None:
    """Without the halo the same tiling shows seams: the test above would catch a missing halo."""
    from pipeline.model.receptive import measure_receptive_radius

    image = make_tiff(random_image((64, 64, 3), seed=1), photometric="rgb")
    model = make_model()
    assert measure_receptive_radius(load_model(model).module, 3, stride=1) == 1
    info = open_source(image)
    predictor = Predictor(load_model(model).module, select_device("cpu"))
    scale = np.float32(1 / 255)
    left = predictor((read_window(info.ref, (0, 64, 0, 32)).astype(np.float32) * scale)[np.newaxis])[0]
    whole = whole_image_probabilities(image, model)
    assert np.abs(left[:, :, 31] - whole[:, :, 31]).max() > 1e-3  # seam at the cut
    assert np.abs(left[:, :, :31] - whole[:, :, :31]).max() < 1e-5


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_reduced_precision_outputs(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path, dtype: str
) -> None:
    image = make_tiff(random_image((40, 50, 3)), photometric="rgb")
    model = make_model()
    store = run(image, model, tmp_path / "o.zarr", tiling={"tile": 16}, output={"dtype": dtype})
    expected = whole_image_probabilities(image, model)
    stored = store[PROBABILITIES][:]
    assert stored.dtype == np.dtype(dtype)
    if dtype == "uint8":
        np.testing.assert_array_equal(stored, np.rint(expected * 254).astype(np.uint8))
    else:
        assert np.abs(stored.astype(np.float32) - expected).max() < 1e-3
    np.testing.assert_array_equal(store[LABELS][:], expected.argmax(axis=0))  # from full precision


def test_provenance_and_completion_mark(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image = make_tiff(random_image((30, 30, 3)), photometric="rgb")
    model = make_model()
    store = run(image, model, tmp_path / "o.zarr", tiling={"tile": 16})
    record = store.attrs["fcnpipe"]
    assert record["complete"] is True
    assert record["tile"] == 16 and record["halo"] == 1
    assert record["input"]["path"] == str(image) and record["input"]["size_bytes"] == image.stat().st_size
    assert record["model"]["sha256"] == load_model(model).sha256 and len(record["model"]["sha256"]) == 64
    assert record["config"]["tiling"] == {
        "tile": 16,
        "batch": 4,
        "halo": None,
        "blend": "none",
        "forward_batch": None,
        "forward_tile": None,
    }
    assert set(record["timings_s"]) == {"setup", "compute", "pyramid", "total", "stages"}
    stages = record["timings_s"]["stages"]
    assert set(stages) == {"read", "predict", "write"} and all(v > 0 for v in stages.values())
    assert record["version"]


def test_existing_output_needs_overwrite(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image = make_tiff(random_image((20, 20, 3)), photometric="rgb")
    model = make_model()
    out = tmp_path / "o.zarr"
    run(image, model, out)
    with pytest.raises(OutputError, match=r"already exists and is complete; set output.overwrite to true"):
        run(image, model, out)
    run(image, model, out, output={"overwrite": True})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a store")
    with pytest.raises(OutputError, match="not a Zarr store; refusing"):
        run(image, model, tmp_path / "notes", output={"overwrite": True})
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose: it becomes the store
    assert run(image, model, tmp_path / "empty").attrs["fcnpipe"]["complete"]


def test_channel_mismatch_names_both_numbers(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image = make_tiff(random_image((20, 20, 4)), photometric="rgb", extrasamples=["unassalpha"])
    config = load_config(
        overrides={
            "input": {"path": str(image)},
            "model": {"path": str(make_model(in_channels=4))},
            "output": {"path": str(tmp_path / "o.zarr")},
        }
    )
    with pytest.raises(ModelError, match=r"has 3 channels after dropping its alpha band but the model .* expects 4"):
        prepare(config)
    assert not (tmp_path / "o.zarr").exists()


def test_mean_std_are_applied(make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path) -> None:
    image = make_tiff(random_image((24, 24, 3)), photometric="rgb")
    model = make_model()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    store = run(image, model, tmp_path / "o.zarr", model={"path": str(model), "mean": mean, "std": std})  # type: ignore[arg-type]
    info = open_source(image)
    x = read_window(info.ref, (0, 24, 0, 24)).astype(np.float32) / 255
    x = (x - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
    expected = Predictor(load_model(model).module, select_device("cpu"))(x[np.newaxis])[0]
    assert np.abs(store[PROBABILITIES][:] - expected).max() < 1e-5
