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
import os
import pickle
import zipfile
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.model import (
    REFERENCE_FCN,
    LoadedModel,
    ModelSpec,
    Normalization,
    ReferenceFCN,
    default_classes,
)

CHECKPOINT_FORMAT = "fcnpipe-checkpoint"
CHECKPOINT_VERSION = 1


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Load a state_dict or an fcnpipe checkpoint into an eval-mode module on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a PyTorch checkpoint (expected a file written by torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelError(
            f"{path}: refused: the file holds pickled Python objects, not only weights; "
            "save model.state_dict() or an fcnpipe checkpoint instead"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise ModelError(f"{path}: not a PyTorch checkpoint ({_first_line(err)})") from err
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a state_dict or an fcnpipe checkpoint, got a {type(obj).__name__}")
    if obj.get("format") == CHECKPOINT_FORMAT:
        spec, state = _parse_checkpoint(obj, path)
    else:
        state = {str(k).removeprefix("module."): v for k, v in obj.items()}
        spec = _spec_from_state_dict(state, path)
    module = build_module(spec, path)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ModelError(f"{path}: weights do not fit {spec.architecture} ({_first_line(err)})") from err
    module.eval()
    return LoadedModel(module=module, spec=spec, sha256=file_sha256(path), path=path)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _spec_from_state_dict(state: dict[str, Any], path: str) -> ModelSpec:
    needed = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ModelError(
            f"{path}: not a state_dict of the reference FCN (missing {', '.join(missing)}); "
            "save an fcnpipe checkpoint for other architectures"
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
        )
        state = obj["state_dict"]
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ModelError(f"{path}: malformed fcnpipe checkpoint (bad or missing field {err})") from err
    return spec, state


def build_module(spec: ModelSpec, path: str = "<model>") -> nn.Module:
    if spec.architecture != REFERENCE_FCN:
        raise ModelError(f"{path}: unknown architecture {spec.architecture!r} (known: {REFERENCE_FCN})")
    try:
        return ReferenceFCN(**spec.arguments)
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
