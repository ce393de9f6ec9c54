"""Stride, receptive radius and halo measured on the network agree with analytic fields, and make tiling exact.

Analytic fields, per axis. A "cell" of a feature map at stride ``s`` is the ``s`` input pixels
under one of its pixels; write the input a pixel depends on as its cell grown by ``(L, R)``. A
3 x 3 convolution at stride ``s`` adds ``s`` to both; ``MaxPool2d(2)`` adds nothing (the new cell
is the two old ones); a ``k``-fold upsampling takes each fine pixel from one coarse pixel
(nearest, ``ConvTranspose2d(2, stride=2)``) or the two nearest (bilinear), whose cells stick out
of the fine cell by up to ``s - s/k`` (one neighbour) or ``1.5 s - s/k`` (two) on one side. The
radius is the largest ``L`` or ``R`` at stride 1, over all phases. Hence:

* FCN-8s: convolutions ``1+2+4+8+16 = 31`` on the stride-32 path, upsamplings ``32`` (32 -> 16),
  ``16`` (16 -> 8) and ``11`` (8 -> 1): ``90``, reached by phases 3 and 4 modulo 8;
* U-Net of depth ``d``: convolutions ``2(2^d - 1) + 2 * 2^d + 2(2^d - 1)``, upsamplings
  ``2^(d-1) + ... + 1 = 2^d - 1``: ``7 * 2^d - 5`` (51 for ``d = 3``, 23 for ``d = 2``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.model.architectures import FCN8s, UNet
from pipeline.model.network import ReferenceFCN
from pipeline.model.receptive import halo_for, measure_halo, measure_receptive_radius, measure_stride


def _chain_3_5_1() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 5, padding=2), nn.Conv2d(8, 2, 1))


def _dilated() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=2, dilation=2), nn.Conv2d(8, 2, 3, padding=1))


def _pool_conv_up(mode: str) -> nn.Module:
    return nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(3, 2, 3, padding=1), nn.Upsample(scale_factor=2, mode=mode))


def _strided_transposed() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ConvTranspose2d(8, 2, 2, stride=2))


@pytest.mark.parametrize(
    ("make", "stride", "radius", "halo"),
    [
        pytest.param(lambda: ReferenceFCN(3, 2), 1, 1, 1, id="reference"),
        pytest.param(_chain_3_5_1, 1, 3, 3, id="3x3-5x5-1x1"),
        pytest.param(_dilated, 1, 3, 3, id="dilated"),
        # pixels 2j and 2j+1 see [2j-2, 2j+3]: radius 3 (from 2j+1), but the cell only needs 2
        pytest.param(lambda: _pool_conv_up("nearest"), 2, 3, 2, id="pool-conv-nearest"),
        # pixel 2j takes coarse j-1 and j: [2j-4, 2j+3]; 2j+1 takes j and j+1: [2j-2, 2j+5]
        pytest.param(lambda: _pool_conv_up("bilinear"), 2, 4, 4, id="pool-conv-bilinear"),
        # coarse j sees [2j-1, 2j+1], and so do both its pixels: radius 2 (from 2j+1), cell 1 -> halo 2
        pytest.param(_strided_transposed, 2, 2, 2, id="strided-transposed"),
    ],
)
def test_simple_chains_match_their_analytic_fields(
    make: Callable[[], nn.Module], stride: int, radius: int, halo: int
) -> None:
    torch.manual_seed(0)
    net = make().eval()
    assert measure_stride(net, 3) == stride
    assert measure_receptive_radius(net, 3, stride) == radius
    assert measure_halo(net, 3, stride) == halo


@functools.cache
def _network(name: str) -> tuple[nn.Module, int, int]:
    """The network ``name`` (seeded), its measured stride and halo, once per session."""
    torch.manual_seed(0)
    net = {"fcn8s": FCN8s, "unet": UNet, "unet-depth2": lambda: UNet(width=8, depth=2)}[name]().eval()
    stride = measure_stride(net, 3)
    return net, stride, measure_halo(net, 3, stride)


@functools.cache
def _measured(name: str) -> tuple[nn.Module, int, int, int]:
    """As :func:`_network`, with the receptive radius too (the slow probe), once per session."""
    net, stride, halo = _network(name)
    return net, stride, measure_receptive_radius(net, 3, stride), halo


@pytest.mark.parametrize(
    ("name", "stride", "radius"), [("fcn8s", 32, 90), ("unet", 8, 51), ("unet-depth2", 4, 23)], ids=str
)
@pytest.mark.slow
def test_deep_networks_match_their_analytic_fields(name: str, stride: int, radius: int) -> None:
    _, measured_stride, measured_radius, halo = _measured(name)
    assert (measured_stride, measured_radius) == (stride, radius)
    assert halo % stride == 0 and halo <= halo_for(radius, stride)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_torchscript_gives_the_same_numbers_as_eager() -> None:
    net, stride, radius, halo = _measured("unet")
    traced = torch.jit.trace(net, torch.rand(1, 3, 32, 32))
    assert measure_stride(traced, 3) == stride
    assert measure_receptive_radius(traced, 3, stride) == radius
    assert measure_halo(traced, 3, stride) == halo


class _GlobalContext(nn.Module):
    """A convolution plus its global average: the output size is right, but no shift is a symmetry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + y.mean(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_GlobalContext, "not equivariant to shifts by any power of two up to 64 pixels"),
        (lambda: nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1)), r"to \(1, 2, 1, 1\), not"),
        (lambda: nn.Conv2d(3, 2, 3), r"to \(1, 2, 510, 62\), not to \(1, K, 512, 64\)"),
        (lambda: nn.Conv2d(4, 2, 3, padding=1), "the network fails on a"),
    ],
    ids=["global-average", "classifier", "valid-padding", "wrong-channels"],
)
def test_networks_that_cannot_be_tiled_are_refused(make: Callable[[], nn.Module], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        measure_stride(make(), 3)


@pytest.mark.slow
def test_limits_are_model_errors() -> None:
    net = _measured("fcn8s")[0]
    with pytest.raises(ModelError, match=r"fails on a .* or a stride above max_stride=16"):
        measure_stride(net, 3, max_stride=16)
    with pytest.raises(ModelError, match=r"exceeds max_radius=40 pixels"):
        measure_receptive_radius(net, 3, 32, max_radius=40)
    with pytest.raises(ModelError, match=r"power of two for max_stride\. Got 48"):
        measure_stride(net, 3, max_stride=48)


def test_the_callers_module_and_torch_state_are_untouched() -> None:
    torch.manual_seed(0)
    net = UNet(width=4, depth=2).train()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    measure_receptive_radius(net, 3, measure_stride(net, 3))
    assert net.training and all(p.requires_grad and p.dtype == torch.float32 for p in net.parameters())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads


def test_halo_for_rounds_up_to_the_stride() -> None:
    assert [halo_for(r, 8) for r in (0, 1, 8, 51)] == [0, 8, 8, 56]
    with pytest.raises(ModelError, match=r"positive integer for 'stride'\. Got 0"):
        halo_for(3, 0)


def _stitched(net: nn.Module, image: torch.Tensor, tile: int, halo: int, stride: int) -> torch.Tensor:
    """Logits of ``image`` ``(1, C, H, W)`` (``H, W`` multiples of ``stride``) computed tile by tile.

    Cores are ``tile x tile`` blocks; each is predicted from the window grown by ``halo`` on every
    side and clipped to the image, then cut out of the window's logits. Independent of
    ``pipeline.tiling`` on purpose.
    """
    _, _, height, width = image.shape
    out = torch.full((1, 2, height, width), float("nan"))
    for y0 in range(0, height, tile):
        y1, wy0 = min(y0 + tile, height), max(0, y0 - halo)
        wy1 = min(height, y1 + halo)
        for x0 in range(0, width, tile):
            x1, wx0 = min(x0 + tile, width), max(0, x0 - halo)
            wx1 = min(width, x1 + halo)
            assert wy0 % stride == 0 and wx0 % stride == 0 and (wy1 - wy0) % stride == 0 and (wx1 - wx0) % stride == 0
            with torch.no_grad():
                logits = net(image[:, :, wy0:wy1, wx0:wx1])
            out[:, :, y0:y1, x0:x1] = logits[:, :, y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
    return out


def _padded_image(height: int, width: int, stride: int) -> torch.Tensor:
    """A random ``(1, 3, H, W)`` image, zero-padded at the bottom and right to multiples of ``stride``."""
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height * width))
    return nn.functional.pad(image, (0, -width % stride, 0, -height % stride))


@pytest.mark.parametrize(
    ("name", "shape", "which"),
    [
        pytest.param("unet", (203, 157), "radius", marks=pytest.mark.slow),  # measuring the radius is slow
        ("unet", (203, 157), "halo"),
        pytest.param("fcn8s", (203, 157), "radius", marks=pytest.mark.slow),
        ("fcn8s", (203, 157), "halo"),
        # large enough for windows that are not clipped on any side
        pytest.param("fcn8s", (421, 333), "radius", marks=pytest.mark.slow),
        ("fcn8s", (421, 333), "halo"),
    ],
    ids=str,
)
def test_stitched_tiles_equal_the_whole_image(name: str, shape: tuple[int, int], which: str) -> None:
    """Whatever the halo is derived from, tiles read with it reproduce the whole-image logits."""
    net, stride, tight = _network(name)
    halo = halo_for(_measured(name)[2], stride) if which == "radius" else tight
    image = _padded_image(*shape, stride)
    with torch.no_grad():
        whole = net(image)
    stitched = _stitched(net, image, 64, halo, stride)
    height, width = shape
    torch.testing.assert_close(stitched[..., :height, :width], whole[..., :height, :width], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["unet", "fcn8s"])
def test_one_stride_less_halo_is_not_enough(name: str) -> None:
    """The measured halo is the smallest: one stride less and interior tiles go wrong."""
    net, stride, halo = _network(name)
    image = _padded_image(203, 157, stride)
    with torch.no_grad():
        whole = net(image)
    error = (_stitched(net, image, 64, halo - stride, stride) - whole).abs().max()
    assert error > 1e-3 * whole.abs().max()
