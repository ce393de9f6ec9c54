"""What the output says about itself: provenance and the completion mark.

The root attribute ``fcnpipe`` of the output group holds the fcnpipe version, the resolved config,
the model's sha256 and description, the input path and size, the tile and halo used, timings, and
``complete``. ``complete`` is written ``false`` when the store is created and ``true`` only after
every chunk is on disk, so a killed or failed run never leaves an output that looks finished.
"""

from __future__ import annotations

import datetime
from typing import Any

import zarr

from pipeline import __version__

ATTRIBUTE = "fcnpipe"


def provenance(
    *,
    config: dict[str, Any],
    input_path: str,
    input_size: int,
    input_shape: tuple[int, int, int],
    model_sha256: str,
    model: dict[str, Any],
    tile: int,
    halo: int,
) -> dict[str, Any]:
    """The ``fcnpipe`` attribute as written when a run starts (``complete: false``)."""
    return {
        "version": __version__,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": config,
        "input": {"path": input_path, "size_bytes": input_size, "shape_cyx": list(input_shape)},
        "model": {"sha256": model_sha256, **model},
        "tile": tile,
        "halo": halo,
        "complete": False,
    }


def write_start(path: str, record: dict[str, Any]) -> None:
    group = zarr.open_group(path, mode="r+")
    group.attrs[ATTRIBUTE] = record


def mark_complete(path: str, record: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """Write the timings and ``complete: true``; the last write of a successful run."""
    final = {**record, "timings_s": timings, "complete": True}
    final["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    group = zarr.open_group(path, mode="r+")
    group.attrs[ATTRIBUTE] = final
    return final


def read_record(path: str) -> dict[str, Any] | None:
    """The ``fcnpipe`` attribute of a store, or None when it has none."""
    group = zarr.open_group(path, mode="r")
    value = group.attrs.get(ATTRIBUTE)
    return dict(value) if isinstance(value, dict) else None
