"""Stride and receptive radius of a network, measured on the network itself.

Tiled prediction is exact when every tile starts on a multiple of the network's *stride* (so that
it sees the same pooling phase as the whole image) and is read with a *halo* of at least the
*receptive radius* (so that every output pixel sees all the input it depends on). Walking the
layers cannot see branches, upsampling or TorchScript graphs, so these functions treat the
network as a black box:

* the stride is the smallest power of two ``s`` such that shifting the input by ``s`` shifts the
  output by ``s`` (away from the borders): pooling by ``s`` breaks equivariance to smaller shifts;
* the radius is how far the gradient of one output pixel reaches into the input. Output pixels of
  different phases modulo the stride see different windows (an upsampled pixel leans towards
  one coarse neighbour), so every phase is probed, on two random inputs because a ReLU or a max
  pool passes the gradient of only some inputs. A whole output row is probed at once (all column
  phases), and rows and columns are measured separately on tall and wide narrow images: far
  cheaper than square images, and the vertical reach of a row does not depend on the columns;
* the **exact halo** (:func:`measure_halo`; the one fcnpipe reads, plans and reports): the smallest
  multiple of the stride that makes stride-aligned tiling exact. A stride-aligned tile starts with an
  output row of phase 0, and the row of phase ``q`` lies ``q`` rows further in, so the halo only has
  to cover the field of one whole *cell* of ``stride`` output rows beyond the cell: FCN-8s 64
  pixels, U-Net 48, where the radius rounded up to the stride (:func:`halo_for`) would read 96 and 56.

All run on a float64 copy when the network converts (TorchScript included), where a pixel with no
path to the probe gets a gradient of exactly zero; the caller's module is never changed.

>>> from pipeline.model.network import ReferenceFCN
>>> net = ReferenceFCN(3, 2)
>>> stride = measure_stride(net, 3)
>>> stride, measure_receptive_radius(net, 3, stride), measure_halo(net, 3, stride), halo_for(90, 32)
(1, 1, 1, 96)
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.parse import parse_int

Network = Callable[[torch.Tensor], torch.Tensor]
"""``(B, C, H, W)`` -> ``(B, K, H, W)``: an eager or TorchScript module, or a wrapper of one."""

_SEED = 20240611
_RELATIVE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}
"""How closely shifted outputs must agree, relative to the output's magnitude: well above rounding
error, and well below the difference a wrong phase makes even on weak (untrained) deep paths."""
_INPUTS_PER_PHASE = 2
_INPUTS_PER_CELL = 4


def halo_for(radius: int, stride: int) -> int:
    """The halo for tiling: ``radius`` rounded up to a multiple of ``stride``.

    Tiles start on multiples of the stride, so their read windows must too.

    This is not the exact halo, which :func:`measure_halo` measures and may be smaller.

    >>> halo_for(51, 8), halo_for(1, 1), halo_for(0, 32)
    (56, 1, 0)
    """
    parse_int(radius, "receptive radius", minimum=0, error=ModelError)
    parse_int(stride, "stride", minimum=1, error=ModelError)
    return -(-radius // stride) * stride


def measure_stride(module: nn.Module, in_channels: int, max_stride: int = 64) -> int:
    """The network's total downsampling factor, found by shifting a random input.

    For ``s = 1, 2, 4, ..., max_stride`` an input window ``8 * max_stride`` long is moved ``s`` rows
    (then columns) along a random image and the output compared with the unmoved output shifted
    by ``s``, on a band ``max_stride`` wide in the middle, so that the window's borders are
    further away than the receptive radius of any network worth tiling (up to about
    ``2.5 * max_stride``). The smallest ``s`` that matches on both axes, to ``1e-9`` of the
    output's magnitude in float64 (``1e-5`` in float32), is the stride. A network that matches no
    ``s`` is not fully convolutional (global pooling, attention, a layer that reads the input
    size) or has a stride (or radius) too large for ``max_stride``: a ModelError.
    """
    parse_int(in_channels, "in_channels", minimum=1, error=ModelError)
    parse_int(max_stride, "max_stride", minimum=1, error=ModelError)
    if max_stride & (max_stride - 1):
        raise ModelError(f"Expected a power of two for max_stride. Got {max_stride} instead.")
    net, dtype = _probe_copy(module, in_channels, _round_up(32, max_stride))
    generator = torch.Generator().manual_seed(_SEED)
    axes = [_ShiftTest(axis_net, in_channels, max_stride, dtype, generator) for axis_net in (net, _transposed(net))]
    for shift in (1 << k for k in range(max_stride.bit_length())):
        if all(axis.matches(shift) for axis in axes):
            return shift
    raise ModelError(
        f"the network is not equivariant to shifts by any power of two up to {max_stride} pixels: "
        f"it is not fully convolutional (global pooling?), or its stride or its receptive radius (over "
        f"{5 * max_stride // 2}) is too large for max_stride={max_stride}"
    )


def measure_receptive_radius(module: nn.Module, in_channels: int, stride: int, max_radius: int = 512) -> int:
    """Pixels of input context each output pixel needs on every side, from gradients.

    ``stride`` is the network's stride (:func:`measure_stride`); input lengths are multiples of it.
    The result is the farthest input pixel, over all output phases modulo the stride, both axes
    and two random inputs, with a nonzero gradient: reading ``halo_for(radius, stride)`` extra
    pixels around a stride-aligned tile makes tiling exact, and :func:`measure_halo` is the least
    that does. The input is grown until the field
    lies well inside it; a field wider than ``max_radius`` is a ModelError.
    """
    return max(_per_axis(module, in_channels, stride, max_radius, _phase_extent))


def measure_tiling(module: nn.Module, in_channels: int, path: str) -> tuple[int, int, int]:
    """``(stride, receptive radius, exact halo)`` of the network in the model file ``path``, from one
    set of probes; a network that cannot be measured is a ModelError naming the file."""
    try:
        stride = measure_stride(module, in_channels)
        cells: list[int] = []

        def phases(probe: _Probe, extent: int, length: int, max_radius: int) -> int:
            cells.append(extent)
            return _phase_extent(probe, extent, length, max_radius)

        radius = max(_per_axis(module, in_channels, stride, 512, phases))
        return stride, radius, halo_for(max(cells), stride)
    except ModelError as err:
        raise ModelError(f"{path}: {err}") from err


def measure_halo(module: nn.Module, in_channels: int, stride: int, max_radius: int = 512) -> int:
    """The smallest halo, a multiple of ``stride``, that makes tiling with stride-aligned tiles exact.

    The farthest reach of the field of a whole cell of ``stride`` output rows (columns) beyond
    the cell, rounded up to the stride; never more than ``halo_for(measure_receptive_radius(...))``.
    Valid only for tiles whose cores start on multiples of ``stride``, which tiling ensures.
    """
    extents = _per_axis(module, in_channels, stride, max_radius, lambda probe, extent, length, _: extent)
    return halo_for(max(extents), stride)


def _per_axis(
    module: nn.Module, in_channels: int, stride: int, max_radius: int, refine: Callable[[_Probe, int, int, int], int]
) -> list[int]:
    """``refine(probe, cell extent, input length, max_radius)`` for rows, then columns, of a float64 copy."""
    parse_int(in_channels, "in_channels", minimum=1, error=ModelError)
    parse_int(stride, "stride", minimum=1, error=ModelError)
    parse_int(max_radius, "max_radius", minimum=1, error=ModelError)
    net, dtype = _probe_copy(module, in_channels, _round_up(32, stride))
    generator = torch.Generator().manual_seed(_SEED)
    extents = []
    with torch.inference_mode(False), torch.enable_grad():
        for axis_net in (net, _transposed(net)):
            probe = _Probe(axis_net, in_channels, stride, dtype, generator)
            extent, length = _cell_extent(probe, max_radius)
            extents.append(refine(probe, extent, length, max_radius))
    if max(extents) > max_radius:
        raise _too_wide(max_radius)
    return extents


class _Probe:
    """Gradients of output rows of a network on tall, narrow random inputs ``(B, C, length, width)``."""

    def __init__(self, net: Network, channels: int, stride: int, dtype: torch.dtype, gen: torch.Generator) -> None:
        self.net, self.channels, self.stride, self.dtype, self.generator = net, channels, stride, dtype, gen
        self.width = max(2 * stride, 32)
        """Columns of the input: a few cells of every column phase, enough for the row probes."""

    def reach(self, length: int, starts: list[int], rows: int) -> list[tuple[int, int, int]]:
        """For each start: the first and last input rows with a gradient from output rows ``[start, start+rows)``.

        Returns ``(start, first, last)`` per start, each on its own random input; a probe whose
        gradient is zero everywhere (a dead input) is left out.
        """
        x = torch.randn(len(starts), self.channels, length, self.width, generator=self.generator, dtype=self.dtype)
        x.requires_grad_(True)
        y = _forward(self.net, x)
        mask = torch.zeros(len(starts), 1, length, 1, dtype=self.dtype)
        for b, start in enumerate(starts):
            mask[b, 0, start : start + rows] = 1.0
        (grad,) = torch.autograd.grad((y * mask).sum(), x)
        touched = grad.abs().sum(dim=(1, 3)) != 0
        found = []
        for b, start in enumerate(starts):
            hit = torch.nonzero(touched[b]).flatten()
            if hit.numel():
                found.append((start, int(hit[0]), int(hit[-1])))
        return found


def _cell_extent(probe: _Probe, max_radius: int) -> tuple[int, int]:
    """How far the field of one cell of ``stride`` output rows reaches beyond the cell, and an input
    length that holds it with a stride to spare on both sides.

    Probed on a few random inputs at once, and grown (doubled) until the field stops short of
    both borders.
    """
    s = probe.stride
    limit = _round_up(2 * (max_radius + 2 * s) + s, s)
    length = _round_up(max(8 * s, 64), s)
    while True:
        start = (length - s) // 2 // s * s
        extent, inside = _extent(probe.reach(length, [start] * _INPUTS_PER_CELL, s), length, s, s)
        if inside:
            return extent, length
        length = _grown(length, limit, s, extent, max_radius)


def _phase_extent(probe: _Probe, cell_extent: int, length: int, max_radius: int) -> int:
    """The farthest reach above or below one output row, over every phase modulo the stride.

    The cell's field bounds every phase's, so an input ``2 * round_up(cell_extent + s, s) + s``
    long holds them. Should a phase still reach within a stride of the border (a gradient the
    cell's inputs missed), the input grows and the phases are probed again.
    """
    s = probe.stride
    limit = _round_up(2 * (max_radius + 2 * s) + s, s)
    length = 2 * _round_up(cell_extent + s, s) + s
    while True:
        starts = [(length - s) // 2 + phase for phase in range(s) for _ in range(_INPUTS_PER_PHASE)]
        chunk = max(1, 4096 * 64 // (length * probe.width))
        reaches = [r for i in range(0, len(starts), chunk) for r in probe.reach(length, starts[i : i + chunk], 1)]
        extent, inside = _extent(reaches, length, 1, s)
        if inside:
            return extent
        length = _grown(length, limit, s, extent, max_radius)


def _extent(reaches: list[tuple[int, int, int]], length: int, rows: int, margin: int) -> tuple[int, bool]:
    """The farthest reach above or below probes of ``rows`` output rows, and whether every reach
    stops ``margin`` rows or more short of both borders of the ``length``-row input."""
    extent = max((max(start - first, last - (start + rows - 1)) for start, first, last in reaches), default=0)
    inside = all(first >= margin and last < length - margin for _, first, last in reaches)
    return extent, inside


def _grown(length: int, limit: int, stride: int, extent: int, max_radius: int) -> int:
    """The next input length to try (doubling, capped at ``limit``), or a ModelError past ``max_radius``."""
    if extent > max_radius or length >= limit:
        raise _too_wide(max_radius)
    return min(limit, _round_up(2 * length, stride))


def _too_wide(max_radius: int) -> ModelError:
    return ModelError(f"the receptive field exceeds max_radius={max_radius} pixels; raise it if that is intended")


class _ShiftTest:
    """Does moving a ``(1, C, 8 * max_stride, max_stride)`` window down a random image by ``s`` rows
    move the middle ``max_stride + 1`` output rows down with it?

    The window moves over new pixels, rather than rolling the same ones around, so that a global
    average (which a roll leaves unchanged) changes as it should.
    """

    def __init__(self, net: Network, channels: int, max_stride: int, dtype: torch.dtype, gen: torch.Generator) -> None:
        self.net, self.length = net, 8 * max_stride
        self.hint = f"in_channels={channels} wrong, or a stride above max_stride={max_stride}?"
        self.image = torch.randn(1, channels, self.length + max_stride, max_stride, generator=gen, dtype=dtype)
        self.y = self._output(0)
        self.rows = slice(self.length // 2 - max_stride // 2, self.length // 2 + max_stride // 2 + 1)
        self.tolerance = _RELATIVE_TOLERANCE[dtype] * (float(self.y[:, :, self.rows].abs().max()) or 1.0)

    def matches(self, shift: int) -> bool:
        moved = self.y[:, :, self.rows.start + shift : self.rows.stop + shift]
        return bool((self._output(shift)[:, :, self.rows] - moved).abs().max() <= self.tolerance)

    def _output(self, shift: int) -> torch.Tensor:
        with torch.no_grad():
            return _forward(self.net, self.image[:, :, shift : shift + self.length], self.hint)


def _forward(net: Network, x: torch.Tensor, hint: str = "in_channels wrong?") -> torch.Tensor:
    """``net(x)``, checked to be ``(B, K, H, W)`` for an ``(B, C, H, W)`` input; failures as ModelError.

    ``hint`` (the likely cause) ends the message of a network that raises.
    """
    try:
        y = net(x)
    except (RuntimeError, ValueError, torch.jit.Error) as err:  # jit.Error: a ``raise`` in TorchScript
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"the network fails on a {_shape(x)} input: {reason} ({hint})") from err
    if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
        got = _shape(y) if isinstance(y, torch.Tensor) else type(y).__name__
        height, width = x.shape[2:]
        raise ModelError(
            f"the network maps a {_shape(x)} input to {got}, not to ({x.shape[0]}, K, {height}, {width}): "
            "not a fully convolutional network with 'same' padding"
        )
    return y


def _probe_copy(module: nn.Module, channels: int, size: int) -> tuple[Network, torch.dtype]:
    """An eval-mode CPU copy of ``module`` without parameter gradients, in float64 if it runs in float64.

    Float64 because a pixel with no path to the probe then gets a gradient of exactly zero, and
    shifted outputs agree to far below the tolerance. A network that fails in float64 (a traced
    graph with float32 constants) is measured in float32.
    """
    net = _copy(module).cpu()
    net.eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    try:
        double = _copy(net).double()
        with torch.no_grad():
            double(torch.zeros(1, channels, size, size, dtype=torch.float64))
    except (RuntimeError, ValueError, torch.jit.Error):
        return net, torch.float32
    return double, torch.float64


def _copy(module: nn.Module) -> nn.Module:
    """A copy to convert and measure. TorchScript modules go through ``torch.jit.save`` and ``load``:
    ``deepcopy`` gives them parameters that are not leaves."""
    try:
        if isinstance(module, torch.jit.ScriptModule):
            buffer = io.BytesIO()
            torch.jit.save(module, buffer)
            buffer.seek(0)
            return torch.jit.load(buffer)
        return copy.deepcopy(module)
    except (RuntimeError, TypeError, pickle.PicklingError) as err:
        raise ModelError(f"cannot copy the network to measure it: {err}") from err


def _transposed(net: Network) -> Network:
    """``net`` on the transposed image, transposed back: its rows are the original's columns."""
    return lambda x: net(x.transpose(2, 3)).transpose(2, 3)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _shape(x: torch.Tensor) -> str:
    return "(" + ", ".join(str(n) for n in x.shape) + ")"
