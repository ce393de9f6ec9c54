"""FCN-8s and U-Net: logits at input size, exact equivariance to shifts by the stride, TorchScript-ready."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ModelError
from pipeline.model.architectures import ARCHITECTURES, FCN8s, UNet, bilinear_upsampling
from pipeline.model.receptive import measure_stride

NETWORKS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "fcn8s": (lambda: FCN8s(), 3, 2),
    "fcn8s-1in-5cls-w4": (lambda: FCN8s(in_channels=1, num_classes=5, width=4), 1, 5),
    "unet": (lambda: UNet(), 3, 2),
    "unet-depth2-w8": (lambda: UNet(in_channels=2, num_classes=3, width=8, depth=2), 2, 3),
}
"""Name -> (factory, in_channels, num_classes)."""


def _network(name: str) -> nn.Module:
    torch.manual_seed(0)
    return NETWORKS[name][0]().eval()


def _input(name: str, height: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, NETWORKS[name][1], height, width, generator=generator)


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("cells", [(1, 1), (2, 3), (5, 7)], ids=["1x1", "2x3", "5x7"])
def test_logits_have_the_input_size(name: str, cells: tuple[int, int]) -> None:
    net = _network(name)
    height, width = cells[0] * net.stride, cells[1] * net.stride
    with torch.no_grad():
        logits = net(_input(name, height, width))
    assert logits.shape == (1, NETWORKS[name][2], height, width)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NETWORKS)
def test_stride_attribute_is_the_measured_stride(name: str) -> None:
    net = _network(name)
    assert measure_stride(net, NETWORKS[name][1]) == net.stride


@pytest.mark.parametrize("name", NETWORKS)
def test_shifting_by_the_stride_shifts_the_logits(name: str) -> None:
    """Away from the borders (further than the receptive radius), moving the input window by one
    stride moves the logits by one stride, exactly up to float rounding: what makes tiling exact."""
    net = _network(name)
    s, margin, size = net.stride, 96, 320
    image = _input(name, size + s, size + s)
    with torch.no_grad():
        before = net(image[:, :, :size, :size])
        after = net(image[:, :, s:, s:])
    inner = slice(margin, size - s - margin)
    moved = slice(margin + s, size - margin)
    torch.testing.assert_close(after[:, :, inner, inner], before[:, :, moved, moved], atol=1e-5, rtol=1e-5)
    half = net.stride // 2
    with torch.no_grad():
        off_phase = net(image[:, :, half : half + size, half : half + size])
    moved_half = slice(margin + half, size - s - margin + half)
    off_by = (off_phase[:, :, inner, inner] - before[:, :, moved_half, moved_half]).abs().max()
    assert off_by > 1e-3 * before.abs().max()  # half a stride is not a symmetry: the stride is no smaller


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["fcn8s", "unet"])
def test_torchscript_gives_identical_logits(name: str) -> None:
    net = _network(name)
    image = _input(name, 3 * net.stride, 5 * net.stride)
    with torch.no_grad():
        expected = net(image)
        scripted = torch.jit.script(net)
        traced = torch.jit.trace(net, _input(name, 2 * net.stride, 2 * net.stride, seed=2))  # another size
        torch.testing.assert_close(scripted(image), expected, atol=0, rtol=0)
        torch.testing.assert_close(traced(image), expected, atol=0, rtol=0)


def test_upsampling_starts_as_bilinear_interpolation() -> None:
    """Away from the borders (where it sees zeros rather than the edge), it is F.interpolate's bilinear."""
    coarse = torch.randn(1, 3, 12, 10, generator=torch.Generator().manual_seed(3))
    for factor in (2, 8):
        with torch.no_grad():
            ours = bilinear_upsampling(3, factor)(coarse)
        theirs = F.interpolate(coarse, scale_factor=factor, mode="bilinear", align_corners=False)
        inner = slice(factor, -factor)
        torch.testing.assert_close(ours[:, :, inner, inner], theirs[:, :, inner, inner])


def test_registry_and_strides() -> None:
    assert ARCHITECTURES["fcn8s"] is FCN8s and ARCHITECTURES["unet"] is UNet and len(ARCHITECTURES) == 2
    assert FCN8s.stride == 32
    assert [UNet(depth=d).stride for d in (1, 3, 4)] == [2, 8, 16]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FCN8s(width=0), "positive integer for 'width'. Got 0"),
        (lambda: UNet(depth=-1), "positive integer for 'depth'. Got -1"),
        (lambda: UNet(num_classes=True), "positive integer for 'num_classes'. Got True"),
        (lambda: bilinear_upsampling(2, 3), "even upsampling factor >= 2. Got 3"),
    ],
    ids=["width", "depth", "bool-classes", "odd-factor"],
)
def test_bad_arguments_are_model_errors(make: Callable[[], nn.Module], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        make()
