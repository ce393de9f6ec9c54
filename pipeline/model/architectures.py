"""Deeper fully convolutional networks than the reference FCN: FCN-8s and a small U-Net.

Both map ``(B, in_channels, H, W)`` to ``(B, num_classes, H, W)`` logits, for ``H`` and ``W``
multiples of the network's ``stride`` (its total downsampling factor), and are built only from
"same" (zero-padded) convolutions, ``MaxPool2d(2)`` and transposed convolutions. No layer looks at
absolute positions or at the input size (no global pooling, no size-dependent crops or
interpolation), so each network is exactly equivariant to shifts by multiples of its stride.
That is what makes tiled prediction exact: a tile that starts on a multiple of the stride and is
read with a halo of at least the receptive radius (see :mod:`pipeline.model.receptive`) gives the same
logits as one whole-image pass.

Upsampling is ``ConvTranspose2d``, not ``F.interpolate``: a transposed convolution has no notion of
the output size, so ``torch.jit.trace`` records no sizes and a traced network runs on any input,
and it zero-pads at the borders like every other layer. FCN-8s initialises it to bilinear
interpolation (Long et al., 2015), so an untrained network already upsamples smoothly.

>>> FCN8s(num_classes=3)(torch.zeros(1, 3, 64, 96)).shape
torch.Size([1, 3, 64, 96])
>>> UNet(depth=2).stride
4
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.parse import parse_int


def _he_init(layer: nn.Conv2d | nn.ConvTranspose2d, fan_in: int, gain: float = 2.0) -> None:
    """Normal weights of variance ``gain / fan_in`` (He et al., 2015) and zero bias.

    ``gain`` 2 before a ReLU, 1 before a linear use. Keeps the signal's scale from layer to layer,
    so the deep (coarse) paths of an untrained network matter as much as the shallow ones, which
    is what training starts from and what the tests of strides and fields look at.
    """
    nn.init.normal_(layer.weight, std=(gain / fan_in) ** 0.5)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _conv(in_channels: int, out_channels: int, kernel: int, gain: float) -> nn.Conv2d:
    """A "same" ``kernel x kernel`` convolution (``kernel`` odd), He-initialised with ``gain``."""
    layer = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    _he_init(layer, in_channels * kernel * kernel, gain)
    return layer


def _conv_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A 3 x 3 "same" convolution and a ReLU: one pixel of context per side at the current stride."""
    return [_conv(in_channels, out_channels, 3, gain=2.0), nn.ReLU(inplace=True)]


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3 x 3 convolutions with ReLUs, the U-Net block: two pixels of context at its stride."""
    return nn.Sequential(*_conv_relu(in_channels, out_channels), *_conv_relu(out_channels, out_channels))


def bilinear_upsampling(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A learnable ``factor`` x upsampling of ``(B, channels, h, w)`` to ``(B, channels, h*f, w*f)``.

    Kernel ``2 * factor``, stride ``factor``, padding ``factor // 2`` (``factor`` even): the output
    is exactly ``factor`` times the input, whatever its size. The weights start as bilinear
    interpolation of each channel on its own (``align_corners=False`` sampling positions), so each
    output pixel mixes the two nearest input pixels per axis; at the borders the missing neighbour
    is zero rather than a copy of the edge, which tiling reproduces because clipped windows end
    where the image ends.
    """
    if factor < 2 or factor % 2:
        raise ModelError(f"Expected an even upsampling factor >= 2. Got {factor} instead.")
    layer = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    taps = 1.0 - (torch.arange(2 * factor, dtype=torch.float32) - (factor - 0.5)).abs() / factor
    with torch.no_grad():
        layer.weight.zero_()
        for channel in range(channels):
            layer.weight[channel, channel] = taps[:, None] * taps[None, :]
    return layer


class FCN8s(nn.Module):
    """FCN-8s: a strided encoder whose class scores at strides 8, 16 and 32 are fused, then upsampled.

    Encoder: five stages of ``conv3x3 + ReLU + MaxPool2d(2)`` with ``width * (1, 2, 4, 8, 8)``
    channels, so the stage outputs have strides 2, 4, 8, 16 and 32. A 1 x 1 convolution scores each
    of the last three; the stride-32 scores are upsampled 2x and added to the stride-16 scores, the
    sum is upsampled 2x and added to the stride-8 scores (the skip connections that give FCN-8s its
    detail), and that is upsampled 8x to the input size. Input ``(B, in_channels, H, W)`` with ``H``
    and ``W`` multiples of 32; output ``(B, num_classes, H, W)`` logits.

    Receptive radius 90 pixels: the stride-32 path has ``1 + 2 + 4 + 8 + 16 = 31`` pixels of
    convolution context per side, and each upsampling adds at most ``1.5 x`` its input stride minus
    its output stride (32, 16, then 11); :mod:`pipeline.model.receptive` measures it.
    """

    stride = 32
    """Total downsampling factor: tiles must start on, and be sized in, multiples of it."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: int = 16) -> None:
        super().__init__()
        parse_int(in_channels, "in_channels", minimum=1, error=ModelError)
        parse_int(num_classes, "num_classes", minimum=1, error=ModelError)
        parse_int(width, "width", minimum=1, error=ModelError)
        channels = [in_channels] + [width * m for m in (1, 2, 4, 8, 8)]
        self.stages = nn.ModuleList(
            nn.Sequential(*_conv_relu(channels[i], channels[i + 1]), nn.MaxPool2d(2)) for i in range(5)
        )
        self.score8 = _conv(channels[3], num_classes, 1, gain=1.0)
        self.score16 = _conv(channels[4], num_classes, 1, gain=1.0)
        self.score32 = _conv(channels[5], num_classes, 1, gain=1.0)
        self.up32 = bilinear_upsampling(num_classes, 2)
        self.up16 = bilinear_upsampling(num_classes, 2)
        self.up8 = bilinear_upsampling(num_classes, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, num_classes, H, W)`` logits; ``H, W`` multiples of 32."""
        features: list[torch.Tensor] = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        scores = self.up32(self.score32(features[4])) + self.score16(features[3])
        scores = self.up16(scores) + self.score8(features[2])
        return self.up8(scores)


class _UpBlock(nn.Module):
    """U-Net decoder step: 2x up (``ConvTranspose2d(2, stride=2)``), concatenate the skip, two convs."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        _he_init(self.up, in_channels, gain=1.0)  # each output pixel takes one tap per input channel
        self.convs = _double_conv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``(B, in, h, w)`` and skip ``(B, out, 2h, 2w)`` -> ``(B, out, 2h, 2w)``."""
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """A small U-Net: ``depth`` levels of two 3 x 3 convolutions, pooled down, upsampled back with skips.

    Level ``l`` (``0 <= l < depth``) works at stride ``2**l`` with ``width * 2**l`` channels; the
    bottleneck at stride ``2**depth`` has ``width * 2**depth``. Each decoder level upsamples with
    ``ConvTranspose2d(2, stride=2)`` (every output pixel comes from exactly one coarse pixel),
    concatenates the encoder output of its level and applies two convolutions; a 1 x 1 convolution
    gives the logits. Input ``(B, in_channels, H, W)`` with ``H`` and ``W`` multiples of
    ``2**depth``; output ``(B, num_classes, H, W)``.

    Receptive radius ``7 * 2**depth - 5`` pixels (51 for ``depth=3``): the convolutions on the
    deepest path give ``2 * (2**depth - 1)`` on the way down, ``2 * 2**depth`` at the bottleneck and
    ``2 * (2**depth - 1)`` on the way up, and each 2x upsampling from stride ``s`` shifts the
    window by up to ``s / 2`` to one side, ``2**depth - 1`` in all.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        parse_int(in_channels, "in_channels", minimum=1, error=ModelError)
        parse_int(num_classes, "num_classes", minimum=1, error=ModelError)
        parse_int(width, "width", minimum=1, error=ModelError)
        parse_int(depth, "depth", minimum=1, error=ModelError)
        self.depth = depth
        self.stride = 2**depth
        """Total downsampling factor, ``2**depth``: tiles must start on, and be sized in, multiples of it."""
        widths = [width * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList(
            _double_conv(in_channels if level == 0 else widths[level - 1], widths[level]) for level in range(depth)
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(widths[depth - 1], widths[depth])
        self.up = nn.ModuleList(_UpBlock(widths[level + 1], widths[level]) for level in reversed(range(depth)))
        self.head = _conv(width, num_classes, 1, gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, num_classes, H, W)`` logits; ``H, W`` multiples of the stride."""
        skips: list[torch.Tensor] = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for block in self.up:
            x = block(x, skips.pop())
        return self.head(x)


ARCHITECTURES: dict[str, type[nn.Module]] = {"fcn8s": FCN8s, "unet": UNet}
"""Architecture name (as stored in checkpoints and configs) -> class; the reference FCN is in ``model``."""
