"""Tasks are small and self-contained: the same graph runs on threads and on separate processes."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr

from pipeline.compute.job import Job
from pipeline.compute.tasks import build_tasks, normalize
from pipeline.model.checkpoint import load_model
from pipeline.source.tiff import open_source
from pipeline.store.arrays import create_store
from pipeline.store.layout import LABELS, PROBABILITIES, OutputRef
from pipeline.tiling import plan_tiles
from tests.conftest import random_image


def _job(image: Path, model: Path, out: Path, tile: int) -> tuple[Job, list[object]]:
    info = open_source(image)
    loaded = load_model(model)
    create_store(str(out), loaded.spec.num_classes, [info.shape[1:]], tile, "float32", overwrite=False)
    job = Job(
        source=info.ref,
        resampling=None,
        source_shape=info.shape[1:],
        output=OutputRef(str(out), "float32"),
        model_path=str(model),
        model_sha256=loaded.sha256,
        model_factory=None,
        device="cpu",
        stride=1,
        precision="float32",
        tta=False,
        torch_threads=1,
        scale=255.0,
        mean=None,
        std=None,
    )
    return job, build_tasks(job, plan_tiles(info.shape[1], info.shape[2], tile, halo=1), batch=2)


def test_tasks_pickle_small(make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path) -> None:
    job, tasks = _job(make_tiff(random_image((64, 64, 3)), photometric="rgb"), make_model(), tmp_path / "o.zarr", 16)
    graph = dict(dask.delayed(list)(tasks).__dask_graph__())
    assert len(pickle.dumps(job)) < 1000  # a path and a window, no pixels, no model, no file handle
    assert len(pickle.dumps(graph)) < 1000 * len(tasks)


@pytest.mark.slow
def test_same_graph_on_processes_gives_same_bytes(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image = make_tiff(random_image((50, 70, 3)), tile=(16, 16), photometric="rgb")
    model = make_model()
    results = []
    for scheduler in ("threads", "processes"):
        out = tmp_path / f"{scheduler}.zarr"
        _, tasks = _job(image, model, out, 16)
        assert sum(r.pixels for r in dask.compute(*tasks, scheduler=scheduler, num_workers=2)) == 50 * 70
        store = zarr.open_group(str(out), mode="r")
        results.append((store[PROBABILITIES][:], store[LABELS][:]))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_normalize_scales_then_standardises() -> None:
    window = np.array([[[0, 255]], [[51, 102]]], dtype=np.uint8)
    np.testing.assert_allclose(normalize(window, 255.0, None, None), [[[0, 1]], [[0.2, 0.4]]], rtol=1e-6)
    np.testing.assert_allclose(normalize(window, 255.0, (0.5, 0.2), (0.5, 0.1)), [[[-1, 1]], [[0, 2]]], atol=1e-6)


def test_fast_argmax_quantise_and_pyramid_mean_equal_the_plain_numpy_ones() -> None:
    """The hot path's rewritten arithmetic gives the bytes of the obvious formulas: argmax (first of
    equals, ties made on purpose), round(p * 254), and the 2 x 2 mean of uint8 values rounded half
    to even, in integers, against the float mean for even, odd and 1-pixel blocks."""
    from pipeline.model.predictor import argmax_channels
    from pipeline.store.layout import quantize
    from pipeline.store.pyramid import mean_2x2

    rng = np.random.default_rng(7)
    for classes in (2, 3, 7):
        probs = rng.dirichlet(np.ones(classes), size=(2, 33, 35)).astype(np.float32).transpose(0, 3, 1, 2)
        probs[:, 1, :5] = probs[:, 0, :5]  # ties: the first class wins
        np.testing.assert_array_equal(argmax_channels(probs), probs.argmax(axis=1))
        np.testing.assert_array_equal(quantize(probs, "uint8"), np.rint(probs * 254.0).astype(np.uint8))
    for shape in [(3, 64, 32), (2, 7, 9), (1, 1, 1), (4, 2, 6)]:
        block = rng.integers(0, 255, shape, dtype=np.uint8)  # 255 is no data
        if min(shape[1:]) > 1:
            block[0, :2, :2] = [[3, 3], [0, 0]]  # a mean of exactly 1.5
        c, y, x = shape
        padded = np.zeros((c, y + y % 2, x + x % 2))
        padded[:, :y, :x] = block
        counts = np.zeros(padded.shape[1:])
        counts[:y, :x] = 1
        sums = padded.reshape(c, padded.shape[1] // 2, 2, -1, 2).sum(axis=(2, 4))
        expected = np.rint(sums / counts.reshape(counts.shape[0] // 2, 2, -1, 2).sum(axis=(1, 3)))
        np.testing.assert_array_equal(mean_2x2(block, "uint8"), expected.astype(np.uint8))


def test_a_store_created_again_at_the_same_path_is_written_through_its_own_arrays(tmp_path: Path) -> None:
    """Tasks write through array handles kept per process and store token. A store created again at
    the same path under a new token, with another chunking, is written as that new store (no handle
    of the old one is used); a task that names the store by another token (another process's view)
    writes the same arrays."""
    import pipeline.store.arrays as output

    path = str(tmp_path / "o.zarr")
    probs = np.full((2, 16, 16), 0.25, np.float32)
    for token, tile in (("first", 16), ("second", 8)):
        create_store(path, 2, [(16, 32)], tile, "float32", overwrite=True, token=token)
        output.write_stored(
            OutputRef(path, "float32", token), 0, (0, 8, 0, 8), probs[:, :8, :8], np.ones((8, 8), np.uint8)
        )
        group = zarr.open_group(path, mode="r")
        assert group[PROBABILITIES].chunks == (2, tile, tile) and group[LABELS].chunks == (tile, tile)
        np.testing.assert_array_equal(group[LABELS][:8, :8], 1)
        np.testing.assert_array_equal(group[PROBABILITIES][:, :8, :8], 0.25)
    elsewhere = OutputRef(path, "float32", "elsewhere")
    for x0 in (0, 8):
        output.write_stored(elsewhere, 0, (8, 16, x0, x0 + 8), probs[:, :8, :8], np.zeros((8, 8), np.uint8))
    np.testing.assert_array_equal(
        zarr.open_group(path, mode="r")[LABELS][:16, :16], np.repeat([[1] * 8 + [255] * 8, [0] * 16], 8, axis=0)
    )


def test_delayed_call_names_the_task_and_passes_its_arguments_as_they_are() -> None:
    from pipeline.compute.tasks import delayed_call

    inner = dask.delayed(sum)([1, 2])
    task = delayed_call(lambda a, b: (a, b), [inner], {"x": 1}, key="fcnpipe-test-1")
    assert task.key == "fcnpipe-test-1"
    (result,) = dask.compute(task, scheduler="sync")
    assert result[0][0] is inner and result[1] == {"x": 1}  # not searched for collections, not computed


def test_the_device_pass_stores_the_bytes_of_the_numpy_passes_and_refuses_nan() -> None:
    """``Predictor.stored`` (quantise and argmax where the network runs: a GPU's path, run here on the
    CPU) gives the values of the numpy passes the CPU path uses, ties to the first channel included;
    probabilities that are not finite are refused by both paths."""
    import torch
    from torch import nn

    from pipeline.errors import ModelError
    from pipeline.model.network import ReferenceFCN
    from pipeline.model.predictor import Predictor, argmax_channels
    from pipeline.store.layout import UINT8_SCALE, quantize

    torch.manual_seed(0)
    predictor = Predictor(ReferenceFCN(3, 4, hidden=8), torch.device("cpu"))
    batch = np.random.default_rng(0).normal(size=(2, 3, 48, 40)).astype(np.float32)
    batch[:, :, :8] = 0.0  # equal inputs: the same logits in places, ties after rounding
    probs = predictor(batch)
    for dtype in ("uint8", "float16", "float32"):
        values, labels = predictor.stored(batch, dtype, UINT8_SCALE)
        expected = quantize(probs, dtype)
        assert values.dtype == expected.dtype and values.tobytes() == expected.tobytes(), dtype
        assert labels.tobytes() == argmax_channels(probs).tobytes(), dtype
    tied, broken = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        tied.weight.zero_(), tied.bias.zero_(), broken.bias.__setitem__(1, float("nan"))
    assert not Predictor(tied, torch.device("cpu")).stored(batch, "uint8", UINT8_SCALE)[1].any()  # equal: the first
    for call in (lambda p: p(batch), lambda p: p.stored(batch, "uint8", UINT8_SCALE)):
        with pytest.raises(ModelError, match=r"NaN or infinite probabilities \(11520 of 11520 values"):
            call(Predictor(broken, torch.device("cpu")))
