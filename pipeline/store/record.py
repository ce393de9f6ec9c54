"""What a store says about itself: the ``fcnpipe`` attribute of its root group, typed.

It holds the fcnpipe version, the resolved config, the input (path, size, shape of the level
read), the model (sha256, architecture, classes and colours, receptive radius and stride), the
tile and halo, the scale or georeference, the fingerprint that ``--resume`` and ``batch`` compare,
the mask, timings, the class areas (``stats``, :func:`pipeline.store.reading.class_stats`), and
``complete``, which is written ``false`` when the store is created and
``true`` only after every chunk is on disk, so that a killed or failed run never leaves an output
that looks finished. :class:`StoreRecord` is the one reader and writer of the attribute; its
``to_dict`` is exactly what is stored.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import zarr

from pipeline import __version__
from pipeline.errors import OutputError
from pipeline.store.layout import zarr_store

ATTRIBUTE = "fcnpipe"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, kw_only=True)
class ClassInfo:
    """One class of the model: its name and its ``(R, G, B)`` colour."""

    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True, kw_only=True)
class StoreRecord:
    """The ``fcnpipe`` attribute. ``model``, ``config``, ``spatial`` and ``fingerprint`` are kept as
    the JSON they are stored as (their keys are those of :class:`pipeline.config.RunConfig` and of
    the model's spec); the fields read elsewhere have typed properties."""

    config: dict[str, Any]
    input: dict[str, Any]
    """``path`` (absolute), ``size_bytes`` and ``shape_cyx`` of the level read."""
    model: dict[str, Any]
    """``sha256``, the spec (``architecture``, ``classes``, ...), ``receptive_radius``, ``stride``."""
    tile: int
    halo: int
    spatial: dict[str, Any]
    """``mpp``, ``crs``, ``transform``, ``pixel_is_point``, ``level_read``, ``resampling``."""
    torch_threads: int | None = None
    fingerprint: dict[str, Any] | None = None
    mask: dict[str, Any] | None = None
    """``method`` (one line) and ``chunks_skipped`` (chunks without foreground), or None: no mask."""
    version: str = __version__
    started: str = field(default_factory=_now)
    complete: bool = False
    resumed: int | None = None
    """How often the run was resumed, once it was."""
    timings_s: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    """Pixels and areas per class of the level-0 labels (:func:`pipeline.store.reading.class_stats`),
    written with ``complete``; None in stores of earlier fcnpipe versions (counted when asked)."""
    finished: str | None = None

    @property
    def classes(self) -> tuple[ClassInfo, ...]:
        return tuple(
            ClassInfo(name=str(c["name"]), color=(int(c["color"][0]), int(c["color"][1]), int(c["color"][2])))
            for c in self.model.get("classes") or ()
        )

    @property
    def model_sha256(self) -> str:
        return str(self.model.get("sha256", ""))

    @property
    def input_path(self) -> str:
        return str(self.input["path"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, Y, X)`` of the level the run read."""
        c, y, x = (int(v) for v in self.input["shape_cyx"])
        return (c, y, x)

    @property
    def series(self) -> int:
        return int(self.config["input"]["series"])

    @property
    def level_read(self) -> int:
        level = self.spatial.get("level_read")
        return int(level if level is not None else self.config["input"]["level"] or 0)

    @property
    def window(self) -> tuple[int, int, int, int] | None:
        """``(y0, y1, x0, x1)`` of the level read that a window run computed (None: all of it)."""
        box, factors = self.spatial.get("window"), self.spatial.get("resampling") or (1.0, 1.0)
        if box is None:
            return None
        col, row, width, height = (int(v) for v in box)  # of the grid: back to the level read
        fy, fx = (float(v) for v in factors)
        return (int(row * fy), math.ceil((row + height) * fy), int(col * fx), math.ceil((col + width) * fx))

    @property
    def mpp(self) -> float | None:
        return None if self.spatial.get("mpp") is None else float(self.spatial["mpp"])

    @property
    def crs(self) -> str | None:
        return self.spatial.get("crs")

    @property
    def transform(self) -> tuple[float, float, float, float, float, float] | None:
        values = self.spatial.get("transform")
        if values is None:
            return None
        a, b, c, d, e, f = (float(v) for v in values[:6])
        return (a, b, c, d, e, f)

    def resumed_again(self) -> StoreRecord:
        """This record for a run that resumes the store once more."""
        return dataclasses.replace(self, resumed=(self.resumed or 0) + 1)

    def completed(self, timings: Mapping[str, Any], stats: Mapping[str, Any] | None = None) -> StoreRecord:
        """This record once the run is done: its timings, its class areas, ``complete``, and when it
        finished (all written in one attribute, so a complete store always has its stats)."""
        kept = None if stats is None else dict(stats)
        return dataclasses.replace(self, timings_s=dict(timings), stats=kept, complete=True, finished=_now())

    def to_dict(self) -> dict[str, Any]:
        """The attribute as stored (fields that are None and were never set are left out)."""
        value = dataclasses.asdict(self)
        for optional in ("resumed", "timings_s", "stats", "finished"):
            if value[optional] is None:
                del value[optional]
        return value

    @classmethod
    def from_dict(cls, value: Mapping[str, Any], path: str) -> StoreRecord:
        """The record of the store at ``path`` from its stored attribute; an OutputError naming the
        store if the attribute is malformed. Records of earlier fcnpipe versions lack the newer,
        optional fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            record = cls(**{k: v for k, v in value.items() if k in names})
            record.input_shape, record.classes, record.level_read  # noqa: B018  (the fields read elsewhere parse)
        except (TypeError, KeyError, ValueError, IndexError) as err:
            reason = f"{type(err).__name__}: {err}"
            raise OutputError(f"{path}: its '{ATTRIBUTE}' attribute is malformed ({reason})") from err
        return record


def write_record(path: str, record: StoreRecord) -> None:
    """Write ``record`` as the ``fcnpipe`` attribute of the store (or staging folder) at ``path``."""
    group = zarr.open_group(zarr_store(path), mode="r+")
    group.attrs[ATTRIBUTE] = record.to_dict()


def read_record(path: str) -> StoreRecord | None:
    """The record of the store at ``path``, or None when it has no ``fcnpipe`` attribute."""
    group = zarr.open_group(zarr_store(path, read_only=True), mode="r")
    value = group.attrs.get(ATTRIBUTE)
    return StoreRecord.from_dict(value, path) if isinstance(value, dict) else None
