"""Running a network: the device, the threads, and forward passes sized and fused for the CPU.

:class:`Predictor` maps normalised ``(B, C, H, W)`` input batches to class probabilities on one
device, in float32 or half precision (CUDA only), optionally averaged over the four flips. On a
CPU it has glibc keep freed memory for the next pass (:func:`keep_freed_memory`) and runs the
convolutions through oneDNN with their ReLUs fused in (:func:`fuse_for_cpu`); tiles are cut into
passes whose activations stay in the cache (:data:`FORWARD_BYTES`, :func:`activation_bytes_per_pixel`).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError, ModelError, option


def argmax_channels(probs: np.ndarray) -> np.ndarray:
    """``(B, K, H, W)`` -> ``(B, H, W)`` uint8 index of the largest channel, the first of equals.

    The same as ``probs.argmax(axis=1)``, as K elementwise passes, which are an order of magnitude
    faster than an argmax over the channel axis (figures in benchmarks/README.md, "Why the defaults").

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


def select_device(name: str) -> torch.device:
    """``auto``: CUDA if present, then Apple MPS, else CPU. An unavailable explicit device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device 'cuda' requested but PyTorch sees no CUDA GPU; {option('compute.device', 'cpu')}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device 'mps' requested but PyTorch sees no Apple GPU; {option('compute.device', 'cpu')}")
    return torch.device(name)


def set_torch_threads(count: int) -> None:
    """Intra-op threads of each forward pass (process-wide)."""
    torch.set_num_threads(max(1, count))


def check_precision(precision: str, device_type: str) -> None:
    """Half precision only on CUDA: on a CPU it is many times slower, and on MPS not supported."""
    if precision != "float32" and device_type != "cuda":
        raise ConfigError(
            f"compute.precision {precision} needs a CUDA device, but this run uses {device_type}: half precision "
            f"on a CPU is many times slower; {option('compute.precision', 'float32')}"
        )


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h

MMAP_THRESHOLD = 32 << 20
"""glibc's largest ``M_MMAP_THRESHOLD`` (on 64-bit): blocks below it are reused, not unmapped."""

TRIM_THRESHOLD = 128 << 20
"""Free memory a heap keeps at its top: above the 64 MiB of a thread's heap, so those are never trimmed."""

FORWARD_BYTES = 8 << 20
"""The largest tensor one forward pass on a CPU should allocate. Small enough that each worker's
pass stays in the processor's last-level cache, where the passes run fastest (figures in
benchmarks/README.md, "Why the defaults"). And far under
:data:`MMAP_THRESHOLD`, so that glibc reuses the memory (see :func:`keep_freed_memory`)."""

_kept = False


def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed blocks of up to 32 MiB instead of returning them to the system.

    By default glibc unmaps a freed block of over 128 KiB (a threshold it raises as it goes) and
    trims its heaps' free tops, so every forward pass maps its activations afresh and the kernel
    zeroes each page again, a large share of a small network's time (benchmarks/README.md).
    With the mmap threshold fixed at its maximum and worker
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
        check_precision(precision, device.type)
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
            probs = self._checked(self._probabilities(batch))
            out: np.ndarray = probs.cpu().numpy()
            return out

    def stored(self, batch: np.ndarray, dtype: str, scale: int) -> tuple[np.ndarray, np.ndarray]:
        """``(B, C, H, W)`` float32 -> the probabilities as stored, ``(B, K, H, W)`` in ``dtype``
        (``uint8``: ``round(p * scale)``), and their argmax ``(B, H, W)`` uint8 (the first of equals).

        Elementwise passes on the network's device after the softmax, so that only the stored bytes
        cross back to the host (a quarter of the float32 probabilities for uint8): for a GPU. The same
        values as :meth:`__call__` then ``rint(p * scale)`` and :func:`argmax_channels` in numpy
        (float32 arithmetic, rounding half to even, the first of equal channels). On a CPU the numpy
        passes are faster (torch's argmax over channels took 84 ms for a 514 x 514 window, numpy's
        passes 0.12 ms), and the probabilities there are already on the host: use :meth:`__call__`.
        """
        with torch.inference_mode():
            probs = self._checked(self._probabilities(batch))
            best = probs[:, 0].clone()
            labels = torch.zeros(best.shape, dtype=torch.uint8, device=probs.device)
            for k in range(1, probs.shape[1]):  # as argmax_channels: a later channel wins only if larger
                labels.masked_fill_(probs[:, k] > best, k)
                torch.maximum(best, probs[:, k], out=best)
            # uint8: in place, the probabilities are not used again; float16 / float32: cast
            uint8 = dtype == "uint8"
            values = probs.mul_(scale).round_().to(torch.uint8) if uint8 else probs.to(PRECISIONS[dtype])
            return values.cpu().numpy(), labels.cpu().numpy()

    def _checked(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs``, or a ModelError where one of them is not finite. Softmax probabilities are at most
        1, so their sum is finite exactly when each of them is: one reduction, not a mask of every value."""
        if not bool(torch.isfinite(probs.sum())):
            bad = int((~torch.isfinite(probs)).sum())
            raise ModelError(
                f"{self.name}: the network returned NaN or infinite probabilities ({bad} of {probs.numel()} "
                "values of a forward pass); its weights or the input's normalisation (model.mean, model.std) "
                "are broken"
            )
        return probs

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
