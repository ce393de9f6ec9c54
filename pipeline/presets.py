"""The presets that ship with fcnpipe, and where each value of a resolved config comes from.

``-c satellite`` (or ``-c satellite.yaml``) names a preset of the package's ``configs/`` folder
(installed as ``pipeline.configs``) and works from any folder; a path that exists is read as it is,
and wins over a preset of the same name. :func:`config_sources` tells, for ``fcnpipe config show``,
which layer (default, which file, which flag) gave each value.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

PRESETS = "pipeline.configs"
"""The package the YAML presets are installed as (the repository's ``configs/`` folder)."""


def _folder() -> Any:
    """The presets' folder: the installed ``pipeline.configs``, else (a source checkout, an editable
    install) ``configs/`` beside the package."""
    try:
        return resources.files(PRESETS)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs"


def preset_names() -> list[str]:
    """The names of the presets that ship with fcnpipe.

    >>> {"default", "pathology", "satellite", "cluster"} <= set(preset_names())
    True
    """
    folder = _folder()
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def config_file(name: str | os.PathLike[str]) -> str:
    """The YAML file ``-c name`` means: ``name`` itself if it exists, else the preset of that name.

    >>> os.path.basename(config_file("satellite")), os.path.basename(config_file("pathology.yaml"))
    ('satellite.yaml', 'pathology.yaml')
    """
    path = os.fspath(name)
    if os.path.exists(path):
        return path
    stem = path[: -len(".yaml")] if path.endswith(".yaml") else path
    if os.sep not in stem and stem in preset_names():
        return str(_folder() / f"{stem}.yaml")
    if os.sep in stem:
        raise ConfigError(f"{path}: no such config file")
    raise ConfigError(f"{path}: no such config file, and no preset of that name (presets: {', '.join(preset_names())})")


def flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``("section.name", value)`` of a nested config mapping; a mapping value of a leaf stays whole.

    >>> list(flatten({"tiling": {"tile": 256}, "model": {"mean": [0.5]}}))
    [('tiling.tile', 256), ('model.mean', [0.5])]
    """
    for key, value in data.items():
        if isinstance(value, Mapping) and not prefix:
            yield from flatten(value, f"{key}.")
        else:
            yield f"{prefix}{key}", value


def config_sources(
    keys: Sequence[str], layers: Sequence[tuple[str, Mapping[str, Any]]], default: str = "default"
) -> dict[str, str]:
    """For each of ``keys``, the name of the last of ``layers`` (``(name, nested mapping)``, lowest
    first) that sets it, else ``default``.

    >>> config_sources(["a.x", "a.y"], [("f.yaml", {"a": {"x": 1}}), ("--y", {"a": {"y": 2}})])
    {'a.x': 'f.yaml', 'a.y': '--y'}
    """
    sources = dict.fromkeys(keys, default)
    for name, data in layers:
        for key, _ in flatten(data):
            if key in sources:
                sources[key] = name
    return sources
