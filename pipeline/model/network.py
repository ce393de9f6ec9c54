"""The network: the reference FCN, checkpoints, receptive radius, and the batched forward pass.

This is the module that owns torch for inference (``pipeline.training.train`` owns it for fitting).
Two checkpoint kinds load, always with ``torch.load(..., weights_only=True)`` so that a checkpoint
can never run code:

* a plain ``state_dict`` of :class:`ReferenceFCN` (``torch.save(model.state_dict(), path)``): the
  sizes are inferred from the weight shapes and the input is scaled by the dtype's maximum;
* an fcnpipe checkpoint (:func:`save_checkpoint`): a dict that also names the architecture and its
  arguments, the classes and their colours, the input normalisation and the training resolution,
  so that a run needs no other flags.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError, ModelError

REFERENCE_FCN = "reference_fcn"
_PALETTE = [
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
]  # fmt: skip


def argmax_channels(probs: np.ndarray) -> np.ndarray:
    """``(B, K, H, W)`` -> ``(B, H, W)`` uint8 index of the largest channel, the first of equals.

    The same as ``probs.argmax(axis=1)``, as K elementwise passes: torch's argmax over the channel
    axis took 25 ms per 512 x 512 tile on one thread, longer than the reference network itself,
    numpy's 3.7 ms, and assigning through a boolean mask 2.4 ms; this takes 0.2 ms.

    >>> argmax_channels(np.array([[[[0.2, 0.5]], [[0.7, 0.5]], [[0.1, 0.0]]]])).tolist()
    [[[1, 0]]]
    """
    best = probs[:, 0].copy()
    labels = np.zeros(best.shape, np.uint8)
    for k in range(1, probs.shape[1]):
        better = np.greater(probs[:, k], best)
        # every label so far is below k, so "becomes k where better" is an elementwise maximum
        np.maximum(labels, better.view(np.uint8) * np.uint8(k), out=labels)
        np.maximum(best, probs[:, k], out=best)
    return labels


class ReferenceFCN(nn.Module):
    """``Conv2d(in, hidden, 3, padding=1) -> ReLU -> Conv2d(hidden, classes, 1)``; returns logits.

    Input ``(B, in_channels, H, W)``, output ``(B, num_classes, H, W)``; softmax over dim 1 gives
    probabilities. Receptive field 3 x 3, so a halo of 1 pixel makes tiling exact.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x)))


@dataclass(frozen=True)
class Normalization:
    """``x / scale``, then ``(x - mean) / std`` per channel. ``scale=None``: the dtype's maximum."""

    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def scale_for(self, dtype: np.dtype[Any]) -> float:
        """The divisor for ``dtype``: 255 for uint8, 65535 for uint16, 127 for int8, 1 for floats."""
        if self.scale is not None:
            return self.scale
        if np.issubdtype(dtype, np.integer):
            return float(np.iinfo(dtype).max)
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "mean": _list(self.mean), "std": _list(self.std)}


def _list(values: tuple[float, ...] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a network except its weights: enough to rebuild it and to run it."""

    architecture: str
    arguments: dict[str, int]
    in_channels: int
    num_classes: int
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    normalization: Normalization = field(default_factory=Normalization)
    mpp: float | None = None
    """Micrometres per pixel of the training images (slides), if known."""
    gsd: float | None = None
    """Ground sample distance of the training images (rasters, CRS units per pixel), if known."""
    input_dtype: str | None = None
    """The pixel type of the training images (``uint8``, ``uint16``, ...), if known: the value range
    the network learnt, with the normalisation, to expect. A run on another refuses by default."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "arguments": dict(self.arguments),
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "classes": [
                {"name": n, "color": list(c)} for n, c in zip(self.class_names, self.class_colors, strict=True)
            ],
            "normalization": self.normalization.to_dict(),
            "mpp": self.mpp,
            "gsd": self.gsd,
            "input_dtype": self.input_dtype,
        }


@dataclass
class LoadedModel:
    module: nn.Module
    spec: ModelSpec
    sha256: str
    path: str


def with_classes(spec: ModelSpec, names: tuple[str, ...] | None, colors: tuple[str, ...] | None) -> ModelSpec:
    """``spec`` with class names and ``"#RRGGBB"`` colours replaced where given (one per class)."""
    for what, values in (("class_names", names), ("class_colors", colors)):
        if values is not None and len(values) != spec.num_classes:
            raise ConfigError(f"model.{what} has {len(values)} entries but the model has {spec.num_classes} classes")
    rgb = None if colors is None else tuple((int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)) for c in colors)
    return replace(spec, class_names=names or spec.class_names, class_colors=rgb or spec.class_colors)


def default_classes(num_classes: int) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """Names ``class_0 ...`` and a fixed palette (black first), for a bare state_dict."""
    names = tuple(f"class_{i}" for i in range(num_classes))
    colors = tuple(_PALETTE[i % len(_PALETTE)] for i in range(num_classes))
    return names, colors


def select_device(name: str) -> torch.device:
    """``auto``: CUDA if present, then Apple MPS, else CPU. An unavailable explicit device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but PyTorch sees no CUDA GPU; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device 'mps' requested but PyTorch sees no Apple GPU; use --device cpu")
    return torch.device(name)


def set_torch_threads(count: int) -> None:
    """Intra-op threads of each forward pass (process-wide)."""
    torch.set_num_threads(max(1, count))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20
"""glibc's largest ``M_MMAP_THRESHOLD`` (on 64-bit): blocks below it are reused, not unmapped."""
TRIM_THRESHOLD = 128 << 20
"""Free memory a heap keeps at its top: above the 64 MiB of a thread's heap, so those are never trimmed."""
FORWARD_BYTES = 8 << 20
"""The largest tensor one forward pass on a CPU should allocate. Small enough that each worker's
pass stays in the processor's last-level cache: the reference FCN (64 hidden channels) on 2 cores
sharing a 32 MiB cache ran at 52-58 Mpx/s with hidden layers of 2.5-9.6 MB (pieces of 96-192 px),
45-47 with 17 MB (256 px) and 33 with 68 MB (whole 512 px tiles). And far under
:data:`MMAP_THRESHOLD`, so that glibc reuses the memory (see :func:`keep_freed_memory`)."""
_kept = False


def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed blocks of up to 32 MiB instead of returning them to the system.

    By default glibc unmaps a freed block of over 128 KiB (a threshold it raises as it goes) and
    trims its heaps' free tops, so every forward pass maps its activations afresh and the kernel
    zeroes each page again: on 2 cores that was 30% of the reference FCN's time on 514 x 514
    windows (23 -> 33 Mpx/s without it). With the mmap threshold fixed at its maximum and worker
    threads' heaps never trimmed, repeated forward passes of the same shapes reuse their memory
    (tensors of over 32 MiB are still mapped afresh: one reason for :data:`FORWARD_BYTES`). Memory freed is
    kept for the next pass rather than returned. Process-wide, once; False where the C library is
    not glibc.
    """
    global _kept
    if not _kept and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            _kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            )
        except (OSError, AttributeError):  # musl or another C library: leave it as it is
            return False
    return _kept


def activation_bytes_per_pixel(module: nn.Module, in_channels: int, stride: int) -> float | None:
    """Bytes per input pixel of the largest output of any layer of ``module``, as float32 (the
    precision a CPU runs it in).

    Measured with forward hooks on one small random input (a side of 4 strides, at least 64): the
    layers' outputs grow with the input's area. None for a module without hooks (TorchScript) or
    one that cannot run that input. Tensors made inside a ``forward`` (a concatenation) are not
    seen: a lower bound.
    """
    if isinstance(module, torch.jit.ScriptModule):
        return None
    side = max(64, 4 * stride)
    largest = [0]

    def hook(_: nn.Module, __: Any, output: Any) -> None:
        for tensor in output if isinstance(output, tuple | list) else (output,):
            if isinstance(tensor, torch.Tensor):
                largest[0] = max(largest[0], tensor.numel() * 4)

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    parameter = next(module.parameters(), None)
    dtype = torch.float32 if parameter is None else parameter.dtype
    training = module.training
    module.eval()  # batch norm must not learn from the probe
    try:
        with torch.inference_mode():
            module(torch.rand(1, in_channels, side, side, dtype=dtype))
    except RuntimeError:  # e.g. half-precision weights, which a CPU cannot run: unknown
        return None
    finally:
        module.train(training)
        for handle in handles:
            handle.remove()
    return largest[0] / (side * side)


class OneDNNConv2d(nn.Module):
    """A float32 ``nn.Conv2d`` on a CPU run by oneDNN, optionally with the ReLU after it fused in.

    PyTorch runs a 1 x 1 convolution with one thread through its own im2col + GEMM path, and a
    ReLU as a pass of its own over the activation. For the reference FCN on 130 x 130 windows,
    one thread: the 1 x 1 convolution 233 -> 183 us, the whole pass with softmax 630 -> 490 us.
    The weights are the convolution's own tensors, not copies.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.padding = list(conv.padding)  # type: ignore[arg-type]  # ints: see fuse_for_cpu
        self.stride, self.dilation, self.groups = list(conv.stride), list(conv.dilation), conv.groups
        self.attr = "relu" if relu else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pointwise = torch.ops.mkldnn._convolution_pointwise
        out: torch.Tensor = pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, self.attr, [], ""
        )
        return out


_RELUS = (torch.relu, torch.relu_, nn.functional.relu)


def fuse_for_cpu(module: nn.Module) -> nn.Module | None:
    """``module`` with each float32 ``Conv2d`` run by oneDNN (:class:`OneDNNConv2d`), a ReLU that
    is its output's only use fused in; None where that cannot be done (TorchScript, a module
    ``torch.fx`` cannot trace, no oneDNN, no Conv2d). ``module`` itself is not changed."""
    if isinstance(module, torch.jit.ScriptModule) or not torch.backends.mkldnn.is_available():
        return None
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return None
    try:
        traced = torch.fx.symbolic_trace(module)
    except Exception:  # data-dependent control flow and the like: run the module as it is
        return None
    modules = dict(traced.named_modules())
    fused = 0
    for node in list(traced.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or type(conv) is not nn.Conv2d:  # a subclass may change forward
            continue
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.weight.dtype != torch.float32:
            continue
        users = list(node.users)
        relu = users[0] if len(users) == 1 and _is_relu(users[0], modules) else None
        name = f"onednn_conv_{fused}"
        traced.add_submodule(name, OneDNNConv2d(conv, relu is not None))
        with traced.graph.inserting_after(node):
            replacement = traced.graph.call_module(name, node.args, node.kwargs)
        (relu or node).replace_all_uses_with(replacement)
        for gone in (relu, node):
            if gone is not None:
                traced.graph.erase_node(gone)
        fused += 1
    if not fused:
        return None
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if len(node.args) != 1 or (node.kwargs and set(node.kwargs) != {"inplace"}):
        return False
    if node.op == "call_module":
        return type(modules.get(str(node.target))) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELUS
    return node.op == "call_method" and node.target in ("relu", "relu_")


PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Predictor:
    """A loaded network on one device that maps normalised input batches to probabilities.

    ``precision`` float16 / bfloat16 run the network in half precision (CUDA only: on a CPU half
    precision is many times slower, so it is refused); the softmax is always taken in float32.
    ``tta`` averages the probabilities of the batch and its horizontal, vertical and double flips.
    On a CPU it has glibc keep freed memory for the next pass (:func:`keep_freed_memory`) and runs
    the convolutions through oneDNN, ReLUs fused in, where it can (:func:`fuse_for_cpu`).
    """

    def __init__(
        self, module: nn.Module, device: torch.device, precision: str = "float32", tta: bool = False, name: str = ""
    ) -> None:
        self.name = name or "the network"
        """What error messages call the network: its model file."""
        if precision != "float32" and device.type != "cuda":
            raise ModelError(f"precision {precision} needs a CUDA device (on {device.type} it is slower); use float32")
        if device.type == "cpu":
            keep_freed_memory()
        self.device = device
        self.dtype = PRECISIONS[precision]
        self.tta = tta
        self.channels_last = device.type in ("cpu", "cuda")
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.module = module.to(device=device, dtype=self.dtype, memory_format=fmt).eval()
        if device.type == "cpu":
            self.module = fuse_for_cpu(self.module) or self.module

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """``(B, C, H, W)`` float32 -> ``(B, K, H, W)`` float32 class probabilities.

        Probabilities that are not finite (weights or inputs that overflow) are a ModelError: they
        must never be stored as if they were a map.
        """
        with torch.inference_mode():
            probs = self._probabilities(batch)
            if not bool(torch.isfinite(probs).all()):
                bad = int((~torch.isfinite(probs)).sum())
                raise ModelError(
                    f"{self.name}: the network returned NaN or infinite probabilities ({bad} of {probs.numel()} "
                    "values of a forward pass); its weights or the input's normalisation (--mean, --std) are broken"
                )
            out: np.ndarray = probs.cpu().numpy()
            return out

    def _probabilities(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch).to(self.device, self.dtype)
        if not self.tta:
            return self._forward(x)
        total = self._forward(x)
        for dims in ((3,), (2,), (2, 3)):  # horizontal, vertical, both: undone after the pass
            total = total + self._forward(x.flip(dims)).flip(dims)
        return (total / 4).contiguous()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.module(x).float(), dim=1).contiguous()
