"""Checkpoints: load any supported network file into a module and its :class:`ModelSpec`, and save ours.

Loading never runs arbitrary code: pickled checkpoints go through ``torch.load(...,
weights_only=True)``; TorchScript files run only TorchScript; a ``module:factory`` is imported only
when the user names it. Kinds of file:

* an fcnpipe checkpoint (:func:`save_checkpoint`): architecture and its arguments, classes and
  colours, normalisation and training resolution inside, so a run needs no other flags;
* a plain ``state_dict`` of the reference FCN: sizes inferred from the weight shapes;
* a ``state_dict`` with ``factory="package.module:function"``: the function builds the module;
* a TorchScript file (``torch.jit.save``): used as it is.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import pickle
import zipfile
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import ModelError, option
from pipeline.model.network import REFERENCE_FCN, LoadedModel, ModelSpec, Normalization, ReferenceFCN, default_classes

CHECKPOINT_FORMAT = "fcnpipe-checkpoint"
CHECKPOINT_VERSION = 1


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


MAX_CLASSES = 254
"""Classes the uint8 label map can hold: 0-253 and 254, with 255 meaning no data."""


def load_model(path: str | os.PathLike[str], factory: str | None = None) -> LoadedModel:
    """Load any supported model file into an eval-mode module on the CPU (see the module doc).

    Whatever is wrong with the file (not a checkpoint, malformed, weights that do not fit, NaN or
    infinite weights, more classes than the label map holds) is a ModelError naming it.
    """
    path = os.fspath(path)
    try:
        loaded = _load(path, factory)
    except ModelError:
        raise
    except Exception as err:  # torch.load and the archive readers fail on a damaged file in any way
        raise ModelError(f"{path}: not a loadable model file ({type(err).__name__}: {_first_line(err)})") from err
    _check_loaded(loaded)
    return loaded


def _check_loaded(loaded: LoadedModel) -> None:
    """Refuse what would give meaningless maps: broken weights, too many classes, bad normalisation."""
    path, spec = loaded.path, loaded.spec
    bad = [name for name, tensor in _tensors(loaded.module) if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ModelError(
            f"{path}: its weights hold NaN or infinite values ({', '.join(bad[:3])}); the checkpoint is broken"
        )
    if spec.num_classes > MAX_CLASSES:
        raise ModelError(
            f"{path}: has {spec.num_classes} classes, but the label map stores one class per pixel in uint8: "
            f"at most {MAX_CLASSES} (255 is no data)"
        )
    if spec.num_classes < 1:
        raise ModelError(f"{path}: has no output classes")
    for what, value in (("micrometres per pixel", spec.mpp), ("ground sample distance", spec.gsd)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ModelError(f"{path}: its training resolution ({what}) is {value}; expected a positive number")
    norm = spec.normalization
    if norm.scale is not None and not (math.isfinite(norm.scale) and norm.scale > 0):
        raise ModelError(f"{path}: its normalisation divides by {norm.scale}; expected a positive number")
    if norm.std is not None and not all(math.isfinite(v) and v > 0 for v in norm.std):
        raise ModelError(f"{path}: its normalisation std {list(norm.std)} is not all positive numbers")
    if norm.mean is not None and not all(math.isfinite(v) for v in norm.mean):
        raise ModelError(f"{path}: its normalisation mean {list(norm.mean)} is not all finite")


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The floating-point parameters and buffers of ``module`` (batch-norm counters are integers)."""
    found = [*module.named_parameters(), *module.named_buffers()]
    return [(name, tensor) for name, tensor in found if tensor.is_floating_point()]


def _load(path: str, factory: str | None) -> LoadedModel:
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, not a model file")
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a PyTorch checkpoint (expected a file written by torch.save)")
    if _is_torchscript(path):
        if factory is not None:
            raise ModelError(f"{path}: is a TorchScript file; it needs no factory ({factory})")
        return _load_torchscript(path)
    obj = _load_weights(path)
    if factory is not None:
        return _load_with_factory(path, _state_dict(obj, path), factory)
    if obj.get("format") == CHECKPOINT_FORMAT:
        spec, state = _parse_checkpoint(obj, path)
        state = _state_dict(state, path)
    else:
        state = _state_dict({str(k).removeprefix("module."): v for k, v in obj.items()}, path)
        spec = _spec_from_state_dict(state, path)
    module = build_module(spec, path)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ModelError(f"{path}: weights do not fit {spec.architecture} ({_first_line(err)})") from err
    module.eval()
    return LoadedModel(module=module, spec=spec, sha256=file_sha256(path), path=path)


def _is_torchscript(path: str) -> bool:
    """TorchScript archives carry their code (``<name>/code/...``); torch.save archives do not."""
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _load_torchscript(path: str) -> LoadedModel:
    try:
        module = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError) as err:
        raise ModelError(f"{path}: not a loadable TorchScript file ({_first_line(err)})") from err
    module.eval()
    spec = probe_spec(module, path, "torchscript")
    return LoadedModel(module=module, spec=spec, sha256=file_sha256(path), path=path)


def _load_with_factory(path: str, state: dict[str, Any], factory: str) -> LoadedModel:
    """``factory`` = ``"package.module:function"``; the function takes no arguments."""
    module_name, _, function_name = factory.partition(":")
    if not module_name or not function_name:
        raise ModelError(f"{path}: factory must look like 'package.module:function', got {factory!r}")
    try:
        build = getattr(importlib.import_module(module_name), function_name)
        module = build()
    except (ImportError, AttributeError, TypeError) as err:
        raise ModelError(f"{path}: cannot build a module with factory {factory!r} ({_first_line(err)})") from err
    try:
        module.load_state_dict({str(k).removeprefix("module."): v for k, v in state.items()})
    except RuntimeError as err:
        raise ModelError(f"{path}: weights do not fit {factory} ({_first_line(err)})") from err
    module.eval()
    return LoadedModel(module=module, spec=probe_spec(module, path, factory), sha256=file_sha256(path), path=path)


def probe_spec(module: nn.Module, path: str, architecture: str) -> ModelSpec:
    """A spec for a module that does not describe itself: channels from its first convolution's
    weight, classes from one forward pass, default class names and plain ``value / max`` scaling."""
    weights = [p for p in module.parameters() if p.ndim == 4]
    if not weights:
        raise ModelError(f"{path}: has no convolution weights; is it a fully convolutional network?")
    in_channels = int(weights[0].shape[1])
    with torch.inference_mode():
        try:
            out = module(torch.zeros(1, in_channels, 256, 256))
        except RuntimeError as err:
            raise ModelError(
                f"{path}: a forward pass on 1 x {in_channels} x 256 x 256 failed ({_first_line(err)})"
            ) from err
    if out.ndim != 4 or tuple(out.shape[2:]) != (256, 256):
        raise ModelError(f"{path}: returns {tuple(out.shape)} for a 256 x 256 input; an FCN returns (B, C, 256, 256)")
    num_classes = int(out.shape[1])
    names, colors = default_classes(num_classes)
    return ModelSpec(
        architecture=architecture,
        arguments={},
        in_channels=in_channels,
        num_classes=num_classes,
        class_names=names,
        class_colors=colors,
    )


def _load_weights(path: str) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not objects refused: bytes that are no pickle at all
            raise ModelError(f"{path}: not a PyTorch checkpoint (its data is damaged: not a pickle)") from err
        raise ModelError(
            f"{path}: refused: the file holds pickled Python objects, not only weights; "
            "save model.state_dict() or an fcnpipe checkpoint instead"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise ModelError(f"{path}: not a PyTorch checkpoint ({_first_line(err)})") from err
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a state_dict or an fcnpipe checkpoint, got a {type(obj).__name__}")
    return obj


def _state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """``obj`` if it maps names to tensors, as a state_dict does; else a ModelError saying what it holds."""
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"{path}: expected a state_dict (names of weights -> tensors), got {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(
                f"{path}: is not a state_dict: {str(key)[:40]!r} holds a {type(value).__name__}, "
                "not a tensor of weights"
            )
    return obj


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _spec_from_state_dict(state: dict[str, Any], path: str) -> ModelSpec:
    needed = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")
    missing = [k for k in needed if k not in state]
    if missing and len(missing) < len(needed):
        raise ModelError(f"{path}: not a state_dict of the reference FCN (missing {', '.join(missing)})")
    if missing:
        keys = ", ".join(list(state)[:3])
        raise ModelError(
            f"{path}: a state_dict of another architecture than the reference FCN (its weights are {keys}, ...; "
            f"the reference FCN's are conv1.*, conv2.*): {option('model.factory', 'package.module:function')} "
            "(a function that builds the module these weights belong to), or run an fcnpipe checkpoint, "
            "which names its architecture"
        )
    w1, w2 = state["conv1.weight"], state["conv2.weight"]
    if w1.ndim != 4 or tuple(w1.shape[2:]) != (3, 3) or w2.ndim != 4 or tuple(w2.shape[2:]) != (1, 1):
        raise ModelError(
            f"{path}: reference FCN needs 3x3 conv1 and 1x1 conv2 weights, got {tuple(w1.shape)} and {tuple(w2.shape)}"
        )
    if w2.shape[1] != w1.shape[0]:
        raise ModelError(f"{path}: conv1 has {w1.shape[0]} outputs but conv2 takes {w2.shape[1]} inputs")
    in_channels, hidden, num_classes = int(w1.shape[1]), int(w1.shape[0]), int(w2.shape[0])
    names, colors = default_classes(num_classes)
    return ModelSpec(
        architecture=REFERENCE_FCN,
        arguments={"in_channels": in_channels, "num_classes": num_classes, "hidden": hidden},
        in_channels=in_channels,
        num_classes=num_classes,
        class_names=names,
        class_colors=colors,
    )


def _parse_checkpoint(obj: dict[str, Any], path: str) -> tuple[ModelSpec, dict[str, Any]]:
    try:
        if obj["version"] > CHECKPOINT_VERSION:
            raise ModelError(f"{path}: checkpoint version {obj['version']} is newer than this fcnpipe reads")
        classes = obj["classes"]
        norm = obj.get("normalization") or {}
        spec = ModelSpec(
            architecture=str(obj["architecture"]),
            arguments={str(k): int(v) for k, v in obj["arguments"].items()},
            in_channels=int(obj["in_channels"]),
            num_classes=len(classes),
            class_names=tuple(str(c["name"]) for c in classes),
            class_colors=tuple((int(c["color"][0]), int(c["color"][1]), int(c["color"][2])) for c in classes),
            normalization=Normalization(
                scale=None if norm.get("scale") is None else float(norm["scale"]),
                mean=None if norm.get("mean") is None else tuple(float(v) for v in norm["mean"]),
                std=None if norm.get("std") is None else tuple(float(v) for v in norm["std"]),
            ),
            mpp=None if obj.get("mpp") is None else float(obj["mpp"]),
            gsd=None if obj.get("gsd") is None else float(obj["gsd"]),
            input_dtype=None if obj.get("input_dtype") is None else str(np.dtype(str(obj["input_dtype"]))),
        )
        state = obj["state_dict"]
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ModelError(f"{path}: malformed fcnpipe checkpoint (bad or missing field {err})") from err
    return spec, state


def architectures() -> dict[str, type[nn.Module]]:
    """Networks an fcnpipe checkpoint can name."""
    from pipeline.model.architectures import ARCHITECTURES

    return {REFERENCE_FCN: ReferenceFCN, **ARCHITECTURES}


def build_module(spec: ModelSpec, path: str = "<model>") -> nn.Module:
    known = architectures()
    if spec.architecture not in known:
        raise ModelError(f"{path}: unknown architecture {spec.architecture!r} (known: {', '.join(sorted(known))})")
    try:
        return known[spec.architecture](**spec.arguments)
    except TypeError as err:
        raise ModelError(f"{path}: bad arguments for {spec.architecture}: {err}") from err


def save_checkpoint(path: str | os.PathLike[str], module: nn.Module, spec: ModelSpec) -> None:
    """Write a self-describing fcnpipe checkpoint that :func:`load_model` reads back."""
    obj = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **spec.to_dict()}
    obj["state_dict"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save(obj, os.fspath(path))


def with_normalization(spec: ModelSpec, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> ModelSpec:
    """``spec`` with mean/std overridden where given (the config wins over the checkpoint)."""
    norm = spec.normalization
    return replace(spec, normalization=replace(norm, mean=mean or norm.mean, std=std or norm.std))
