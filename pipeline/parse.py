"""Parse at the boundary: the one place numbers, choices and YAML from users are checked.

The config (:mod:`pipeline.config`) is read with :func:`read_yaml` and :func:`parse_dataclass` and
checks every value it loads with :func:`parse_int`, :func:`parse_number` and :func:`parse_choice`,
as do the few public functions that take values from users directly; the core then trusts its
arguments. This module owns PyYAML. Each
failure is a :class:`~pipeline.errors.ConfigError` that says what was expected and what came,
as zarr-python's messages do: ``Expected a positive integer for 'tiling.tile'. Got 0 instead.``
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import yaml

from pipeline.errors import ConfigError, FcnpipeError


def parse_int(
    value: object,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    error: type[FcnpipeError] = ConfigError,
) -> int:
    """``value`` as an int, if it is one (a bool is not) within ``[minimum, maximum]``; else ``error``
    (a :class:`~pipeline.errors.ModelError` for a network's arguments).

    >>> parse_int(3, "tiling.batch", minimum=1)
    3
    >>> parse_int(0, "tiling.tile", minimum=1)
    Traceback (most recent call last):
    ...
    pipeline.errors.ConfigError: Expected a positive integer for 'tiling.tile'. Got 0 instead.
    """
    if minimum == 1:
        kind = "a positive integer"
    elif minimum == 0:
        kind = "a non-negative integer"
    else:
        kind = "an integer" if minimum is None else f"an integer of at least {minimum}"
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise error(f"Expected {kind} for {name!r}. Got {value!r} instead.")
    if minimum is not None and value < minimum:
        raise error(f"Expected {kind} for {name!r}. Got {value} instead.")
    if maximum is not None and value > maximum:
        raise error(f"Expected at most {maximum} for {name!r}. Got {value} instead.")
    return int(value)


def parse_number(
    value: object, name: str, *, minimum: float | None = None, maximum: float | None = None, positive: bool = False
) -> float:
    """``value`` as a finite float within ``[minimum, maximum]`` (above 0 if ``positive``).

    >>> parse_number(0.5, "mask.threshold", minimum=0, maximum=1)
    0.5
    >>> parse_number(float("nan"), "input.mpp", positive=True)
    Traceback (most recent call last):
    ...
    pipeline.errors.ConfigError: Expected a positive number for 'input.mpp'. Got nan instead.
    """
    if positive:
        kind = "a positive number"
    elif minimum is not None and maximum is not None:
        kind = f"a number in [{minimum:g}, {maximum:g}]"
    else:
        kind = "a number"
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"Expected {kind} for {name!r}. Got {value!r} instead.")
    number = float(value)
    too_low = (minimum is not None and number < minimum) or (positive and number <= 0)
    if not math.isfinite(number) or too_low or (maximum is not None and number > maximum):
        raise ConfigError(f"Expected {kind} for {name!r}. Got {value} instead.")
    return number


def parse_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``.

    >>> parse_choice("cog", "kind", ("cog", "ome-tiff"))
    'cog'
    """
    if value not in choices:
        raise ConfigError(f"Expected one of {', '.join(choices)} for {name!r}. Got {value!r} instead.")
    return str(value)


# --- YAML into dataclasses ---------------------------------------------------------------------------------------


def read_yaml(file: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML config file as a mapping (empty for an empty file), or a ConfigError naming it."""
    name = os.fspath(file)
    try:
        with open(name, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as err:
        raise ConfigError(f"{name}: cannot read config ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{name}: not a YAML config: not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x})"
        ) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{name}: not valid YAML ({' '.join(str(err).split())})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: a config must be a mapping of sections, got {type(data).__name__}")
    return dict(data)


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict update: ``extra`` wins, sections merge key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_dataclass(cls: type[Any], data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and ill-typed values."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"Expected a mapping for config section {where or '<root>'!r}. Got {data!r} instead.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"Unknown config key {key!r}. Known keys here: {', '.join(sorted(names))}.")
    values = {}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name in names & set(data):
        key = f"{where}.{name}" if where else name
        empty = data[name] == [] and defaults[name] == ()  # an empty list where that is the default
        values[name] = () if empty else _value(hints[name], data[name], key)
    return cls(**values)


def _value(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return parse_dataclass(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, value, key)
    if origin is Literal:
        return parse_choice(value, key, [str(a) for a in args])
    if origin is dict:  # options passed through as they are (fsspec's storage_options)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"Expected a mapping of names to values for {key!r}. Got {value!r} instead.")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            kind = "strings" if args[0] is str else "numbers"
            raise ConfigError(f"Expected a list of {kind} for {key!r}. Got {value!r} instead.")
        if args[-1] is not Ellipsis and len(value) != len(args):  # a fixed-length tuple: input.window
            raise ConfigError(f"Expected {len(args)} numbers for {key!r}. Got {value!r} instead.")
        return tuple(_value(args[0], v, key) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"Expected true or false for {key!r}. Got {value!r} instead.")
        return value
    if hint is int:
        return parse_int(value, key)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"Expected a number for {key!r}. Got {value!r} instead.")
        return float(value)  # NaN and infinities pass here; each key's own check refuses them where it must
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"Expected a string for {key!r}. Got {value!r} instead.")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a programming error, not a user's
