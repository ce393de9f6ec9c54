"""Checkpoints load safely and describe themselves; the receptive radius comes from the layers."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ModelError
from pipeline.model.architectures import FCN8s, UNet
from pipeline.model.checkpoint import load_model, save_checkpoint
from pipeline.model.network import ModelSpec, Normalization, ReferenceFCN, default_classes
from pipeline.model.predictor import OneDNNConv2d, Predictor, activation_bytes_per_pixel, fuse_for_cpu, select_device
from pipeline.training.synthetic import CLASS_COLORS


def test_plain_state_dict_sizes_are_inferred(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(ReferenceFCN(in_channels=5, num_classes=7, hidden=64).state_dict(), path)
    loaded = load_model(path)
    assert (loaded.spec.in_channels, loaded.spec.num_classes, loaded.spec.arguments["hidden"]) == (5, 7, 64)
    assert loaded.spec.class_names == tuple(f"class_{i}" for i in range(7))
    assert loaded.spec.normalization == Normalization()


def test_data_parallel_prefix_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in ReferenceFCN(3, 2).state_dict().items()}, path)
    assert load_model(path).spec.num_classes == 2


def test_checkpoint_round_trip_keeps_everything(tmp_path: Path) -> None:
    module = ReferenceFCN(3, 2, hidden=8)
    spec = ModelSpec(
        architecture="reference_fcn",
        arguments={"in_channels": 3, "num_classes": 2, "hidden": 8},
        in_channels=3,
        num_classes=2,
        class_names=("background", "tumour"),
        class_colors=((255, 255, 255), (200, 0, 0)),
        normalization=Normalization(scale=255.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        mpp=0.5,
    )
    path = tmp_path / "ck.pt"
    save_checkpoint(path, module, spec)
    loaded = load_model(path)
    assert loaded.spec == spec
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[name], value)


def test_pickled_module_is_refused_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(ReferenceFCN(3, 2), path)  # a whole pickled module: loading it would run code
    with pytest.raises(ModelError, match="refused: the file holds pickled Python objects"):
        load_model(path)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"conv1.weight": torch.zeros(4, 3, 3, 3)}, "missing conv1.bias"),
        (
            {
                "conv1.weight": torch.zeros(4, 3, 5, 5),
                "conv1.bias": torch.zeros(4),
                "conv2.weight": torch.zeros(2, 4, 1, 1),
                "conv2.bias": torch.zeros(2),
            },
            "needs 3x3 conv1",
        ),
        (
            {
                "conv1.weight": torch.zeros(4, 3, 3, 3),
                "conv1.bias": torch.zeros(4),
                "conv2.weight": torch.zeros(2, 6, 1, 1),
                "conv2.bias": torch.zeros(2),
            },
            "conv1 has 4 outputs but conv2 takes 6",
        ),
    ],
    ids=["missing-key", "wrong-kernel", "inconsistent"],
)
def test_state_dict_that_does_not_fit(tmp_path: Path, state: dict[str, torch.Tensor], message: str) -> None:
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ModelError, match=message) as caught:
        load_model(path)
    assert str(caught.value).startswith(str(path))


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(ModelError, match="not a PyTorch checkpoint"):
        load_model(path)


def test_predictor_returns_probabilities() -> None:
    probs = Predictor(ReferenceFCN(3, 4), select_device("cpu"))(np.random.rand(2, 3, 9, 11).astype(np.float32))
    assert probs.shape == (2, 4, 9, 11) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def _called(module: torch.nn.Module, kind: type) -> int:
    """How many modules of exactly ``kind`` ``module``'s forward calls (all of them, untraced)."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return sum(type(m) is kind for m in module.modules())
    named = dict(module.named_modules())
    return sum(node.op == "call_module" and type(named[node.target]) is kind for node in graph.nodes)


@pytest.mark.parametrize(
    ("net", "side"),
    [(ReferenceFCN(3, 3, 64), 40), (UNet(3, 3), 64), (FCN8s(3, 3), 64)],
    ids=["reference", "unet", "fcn8s"],
)
def test_convolutions_run_through_onednn_with_their_relus_fused(net: torch.nn.Module, side: int) -> None:
    net = net.eval().to(memory_format=torch.channels_last)
    convs, relus = _called(net, torch.nn.Conv2d), _called(net, torch.nn.ReLU)
    fused = fuse_for_cpu(net)
    assert fused is not None
    # every convolution is replaced, and every ReLU (each follows a convolution) is folded into one
    assert (_called(fused, OneDNNConv2d), _called(fused, torch.nn.Conv2d), _called(fused, torch.nn.ReLU)) == (
        convs,
        0,
        0,
    )
    assert sum(m.attr == "relu" for m in fused.modules() if isinstance(m, OneDNNConv2d)) == relus
    # the module handed in is unchanged
    assert (_called(net, torch.nn.Conv2d), _called(net, torch.nn.ReLU)) == (convs, relus)
    x = torch.rand(2, 3, side, side).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected, got = net(x), fused(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), (got - expected).abs().max()


class _Shared(torch.nn.Module):
    """A convolution whose output is used before and after its ReLU: the ReLU must not be fused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(torch.relu(y) - y)  # = max(-y, 0): zero wherever a fused ReLU would leave y


class _DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else -self.conv(x)  # torch.fx cannot trace this


def test_fusion_keeps_what_it_cannot_fuse_as_it_is() -> None:
    net = _Shared().eval()
    fused = fuse_for_cpu(net)
    assert fused is not None
    assert [m.attr for m in fused.modules() if isinstance(m, OneDNNConv2d)] == ["none", "none"]
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(fused(x), net(x), atol=1e-6)
        assert net(x).abs().max() > 0
    # what cannot be traced or has nothing to fuse runs as it is
    assert fuse_for_cpu(_DataDependent()) is None
    assert fuse_for_cpu(torch.nn.Sequential(torch.nn.ReLU())) is None
    assert fuse_for_cpu(torch.jit.script(ReferenceFCN(3, 2))) is None
    # the Predictor runs the fused network on a CPU
    predictor = Predictor(ReferenceFCN(3, 2, 8), torch.device("cpu"))
    assert _called(predictor.module, OneDNNConv2d) == 2


def test_activation_bytes_per_pixel_is_the_largest_layer_output() -> None:
    from pipeline.model.architectures import UNet

    assert activation_bytes_per_pixel(ReferenceFCN(3, 2, 64), 3, 1) == 64 * 4  # the hidden layer, float32
    assert activation_bytes_per_pixel(ReferenceFCN(3, 2, 8).double(), 3, 1) == 8 * 4  # as float32, as a CPU runs it
    assert activation_bytes_per_pixel(UNet(3, 3, 16, 3), 3, 8) == 16 * 4  # its full-resolution convolutions
    traced = torch.jit.trace(ReferenceFCN(3, 2, 8), torch.rand(1, 3, 16, 16))
    assert activation_bytes_per_pixel(traced, 3, 1) is None  # no hooks on TorchScript: unknown


_PASSES = """
import resource, sys, threading
from pipeline.model.network import ReferenceFCN  # first: it sets THP_MEM_ALLOC_ENABLE for torch
from pipeline.model.predictor import keep_freed_memory
import torch
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
cl, faults = torch.channels_last, []
net, x = ReferenceFCN(3, 3, 64).eval().to(memory_format=cl), torch.rand(1, 3, 258, 258).to(memory_format=cl)
def passes():  # as Predictor runs them: channels-last, on worker threads (each with its own malloc arena)
    with torch.inference_mode():
        for i in range(12):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            torch.softmax(net(x), dim=1)
            faults.extend([resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before] if i >= 4 else [])
workers = [threading.Thread(target=passes) for _ in range(2)]
[w.start() for w in workers] + [w.join() for w in workers]
print(sum(faults) / len(faults))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_kept_freed_memory_spares_each_forward_pass_its_page_faults() -> None:
    def faults_per_pass(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", _PASSES, mode], capture_output=True, text=True, check=True)
        return float(done.stdout)

    # 17 MB of hidden activations a pass: by default glibc hands them back and the kernel maps and
    # zeroes them again for the next pass (hundreds of faults); kept, the next pass reuses them
    assert faults_per_pass("default") > 50
    assert faults_per_pass("keep") < 5


def test_unavailable_device_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path is for machines without it")
    with pytest.raises(ModelError, match=r"no CUDA GPU; set compute.device to cpu"):
        select_device("cuda")


def test_make_model_fixture_is_loadable(make_model: Callable[..., Path]) -> None:
    assert load_model(make_model(in_channels=2, num_classes=5)).spec.in_channels == 2


def test_torchscript_file_loads_with_probed_sizes(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(ReferenceFCN(4, 5, 8), torch.rand(1, 4, 16, 16)), path)
    loaded = load_model(path)
    assert (loaded.spec.architecture, loaded.spec.in_channels, loaded.spec.num_classes) == ("torchscript", 4, 5)
    x = torch.rand(1, 4, 12, 12)
    assert loaded.module(x).shape == (1, 5, 12, 12)


def test_state_dict_with_factory(tmp_path: Path) -> None:
    from pipeline.model.architectures import UNet

    path = tmp_path / "unet_weights.pt"
    torch.save(UNet().state_dict(), path)
    loaded = load_model(path, factory="pipeline.model.architectures:UNet")
    assert loaded.spec.architecture == "pipeline.model.architectures:UNet"
    assert loaded.spec.in_channels == 3
    with pytest.raises(ModelError, match=r"factory must look like 'package.module:function'"):
        load_model(path, factory="UNet")
    with pytest.raises(ModelError, match=r"cannot build a module with factory 'nowhere.at_all:f'"):
        load_model(path, factory="nowhere.at_all:f")
    with pytest.raises(ModelError, match=r"weights do not fit pipeline\.model\.network:ReferenceFCN"):
        load_model(path, factory="pipeline.model.network:ReferenceFCN")


@pytest.mark.parametrize(
    "colors",
    [default_classes(12)[1], CLASS_COLORS],
    ids=["default palette", "demo classes"],
)
def test_class_colours_show_on_a_slide_and_in_napari(colors: tuple[tuple[int, int, int], ...]) -> None:
    """No black (invisible as a napari channel, a nodata collar in a legend), no grey or white (the
    glass), nothing near H&E's eosin pink or haematoxylin purple (an overlay must stand out)."""
    stains = {"eosin": (232, 160, 198), "haematoxylin": (92, 58, 150)}
    for color in colors:
        assert max(color) - min(color) >= 80, f"{color} is black, grey or white"
        for stain, rgb in stains.items():
            assert math.dist(color, rgb) >= 100, f"{color} is close to {stain} {rgb}"
    assert len(set(colors)) == len(colors)
