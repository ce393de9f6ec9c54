"""Whether an existing store may be continued, or kept, or replaced: the fingerprint and its checks.

A store holds the fingerprint of its run (what its bytes depend on: the store format, the input
file, the model, and every config key not declared byte-neutral; :func:`fingerprint`), in its
record and, while it is unfinished, in ``.fcnpipe/run.json`` (:mod:`pipeline.store.safety`).
``--resume`` (and ``batch``, which always resumes) compares it, complete store or not, and refuses
another input, model or config, saying what differs; then it skips the tasks that have a marker
and runs the rest. The coarser pyramid levels (a sixteenth of the pixels) are always made again
from level 1. The tasks are deterministic (fixed tiling, fixed torch threads), so the result is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from pipeline import files, remote
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, OutputError, option
from pipeline.source.tiff import SourceInfo
from pipeline.store.layout import STORE_FORMAT, is_empty_folder, is_store
from pipeline.store.record import StoreRecord, read_record
from pipeline.store.safety import being_created, done_tasks, read_state


def differences(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """What differs between two fingerprints, as ``key: before -> now`` lines.

    >>> differences({"model": {"sha256": "ab"}, "tile": 512}, {"model": {"sha256": "cd"}, "tile": 512})
    ['model.sha256: ab -> cd']
    """
    lines = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        name = f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            lines.extend(differences(old, new, f"{name}."))
        elif old != new:
            lines.append(f"{name}: {_short(old)} -> {_short(new)}")
    return lines


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Resume:
    """What ``--resume`` found at the output path."""

    done: frozenset[str]
    """Tasks finished by earlier runs."""
    complete: bool = False
    """The store is already complete: nothing to do."""
    restart: bool = False
    """The store was interrupted before its first task: it is created again."""
    record: StoreRecord | None = None
    """The store's record, kept (with its start time) for the completion mark."""


BYTE_NEUTRAL: dict[str, str] = {
    "input.path": "the input is fingerprinted by its file name and size instead",
    "input.storage_options": "how the input is reached (endpoint, credentials), not what it holds",
    "output.storage_options": "how the store is reached (endpoint, credentials), not what it holds",
    "model.path": "the model is fingerprinted by the sha256 of its file instead",
    "output.path": "where the store is, not what it holds",
    "output.overwrite": "whether an existing store may be replaced",
    "output.resume": "whether an existing store is continued",
    "model.allow_other_dtype": "whether a run may start, not what it computes",
    "compute.workers": "tasks at once: each task's bytes do not depend on what else runs",
    "compute.torch_threads": "a resumed run takes the interrupted run's count (same bytes); a complete "
    "store made with another count holds the same probabilities to float rounding",
    "compute.progress": "what the terminal shows",
    "compute.scheduler": "where the tasks run: every worker computes the same bytes",
    **dict.fromkeys(
        ("compute.tls", "compute.tls_ca_file", "compute.tls_cert", "compute.tls_key", "compute.dashboard_address"),
        "how the client, the scheduler, its workers and its dashboard are reached, not what they compute",
    ),
    "cluster": "the batch jobs that run the tasks (the whole section)",
}
"""Config keys (or whole sections) that do not change a byte of the output, and why. Every other
key is part of the store's fingerprint (:func:`pipeline.run.resume.fingerprint`), so a key added to the
schema is compared by ``--resume`` and ``batch`` unless it is declared here."""


def byte_neutral(key: str) -> bool:
    """Whether ``key`` (``"section.name"``) or its section is declared in :data:`BYTE_NEUTRAL`.

    >>> byte_neutral("compute.workers"), byte_neutral("cluster.cores"), byte_neutral("tiling.tile")
    (True, True, False)
    """
    return key in BYTE_NEUTRAL or key.split(".", 1)[0] in BYTE_NEUTRAL


def fingerprint(config: RunConfig, source: SourceInfo, model_sha256: str) -> dict[str, Any]:
    """What the output's bytes depend on, as plain JSON values: the store format, the input file (name
    and size), the model (sha256) and every config key not declared byte-neutral
    (:data:`BYTE_NEUTRAL`), so that a new key is compared unless declared neutral."""
    name = os.path.basename(remote.redact(source.path).rstrip("/"))
    return fingerprint_of(config.to_dict(), name, source.file_size, model_sha256)


def fingerprint_of(values: dict[str, Any], input_name: str, input_size: int, model_sha256: str) -> dict[str, Any]:
    """:func:`fingerprint` of a config as :meth:`pipeline.config.RunConfig.to_dict` gives it.

    >>> config = {"input": {"path": "/a/s.svs", "level": None}, "compute": {"workers": 2, "device": "cpu"}}
    >>> fingerprint_of(config, "s.svs", 10, "ab")["compute"], fingerprint_of(config, "s.svs", 10, "ab")["input"]
    ({'device': 'cpu'}, {'level': None, 'name': 's.svs', 'size_bytes': 10})
    """
    value: dict[str, Any] = {"store_format": STORE_FORMAT}
    for section, keys in values.items():
        if byte_neutral(section):
            continue
        value[section] = {key: v for key, v in keys.items() if not byte_neutral(f"{section}.{key}")}
    value.setdefault("input", {}).update(name=input_name, size_bytes=input_size)
    value.setdefault("model", {})["sha256"] = model_sha256
    loaded: dict[str, Any] = json.loads(json.dumps(value))
    return loaded


def check_target(path: str, overwrite: bool) -> None:
    """Refuse an existing output without ``overwrite``, saying what it is and what to pass; and
    anything but a Zarr store (or an empty folder) even with it."""
    if not files.exists(path) or is_empty_folder(path):
        return
    if overwrite:
        if not is_store(path) and not being_created(path):
            raise OutputError(f"{path}: exists and is not a Zarr store; refusing to delete it")
        return
    if not is_store(path) and not being_created(path):
        raise OutputError(f"{path}: already exists and is not a Zarr store; choose another output path")
    record = None if being_created(path) else read_record(path)
    if record is not None and record.complete:
        raise OutputError(f"{path}: already exists and is complete; {option('output.overwrite')} to compute it again")
    if record is None and read_state(path) is None and not _begun(path):
        raise OutputError(f"{path}: already exists and is not an fcnpipe output; choose another output path")
    raise OutputError(
        f"{path}: already exists and is incomplete (an interrupted run); {option('output.resume')} to continue it, "
        f"or {option('output.overwrite')} to start again"
    )


_METADATA_ONLY = {".zgroup", ".zattrs", "zarr.json", ".zmetadata"}


def _begun(path: str) -> bool:
    """A Zarr group that holds nothing but its own metadata: an fcnpipe store whose creation an
    earlier fcnpipe did not finish (nothing of it can be lost by starting it again)."""
    return being_created(path) or set(files.names(path)) <= _METADATA_ONLY


def check_resume(path: str, fingerprint: dict[str, Any]) -> Resume | None:
    """What ``--resume`` finds at ``path``; None if there is nothing there (a new store is made).

    Refuses a store, complete or not, made from another input, model or config, saying what
    differs, and anything that is not an fcnpipe output. An empty folder, or a group that holds
    nothing but its own metadata (a creation killed before this fcnpipe made it atomic), is started
    again.
    """
    if not files.exists(path) or is_empty_folder(path):
        return None
    if being_created(path):  # in object storage, a creation that did not finish: nothing to lose
        return Resume(frozenset(), restart=True)
    if not is_store(path):
        raise OutputError(f"{path}: exists and is not a Zarr store; cannot resume it")
    record = read_record(path)
    if record is not None and record.complete:
        _check_same(path, record.fingerprint, fingerprint, complete=True)
        return Resume(frozenset(), complete=True, record=record)
    state = read_state(path)
    if state is None:
        if record is None and not _begun(path):
            raise OutputError(
                f"{path}: is not an fcnpipe output (no fcnpipe record); {option('output.overwrite')} to replace it"
            )
        return Resume(frozenset(), restart=True)
    _check_same(path, state.get("fingerprint"), fingerprint, complete=False)
    return Resume(frozenset(done_tasks(path)), record=record)


def _check_same(path: str, before: Any, now: dict[str, Any], complete: bool) -> None:
    """Refuse a store whose fingerprint is not ``now``, saying what differs and what to do."""
    what = "is complete but was made" if complete else "cannot resume: it was started"
    again = "to compute it again" if complete else "instead of resuming, to start again"
    if not isinstance(before, dict):
        raise ConfigError(
            f"{path}: {what} by an fcnpipe that kept no fingerprint, so it cannot be checked against this "
            f"input, model and config; {option('output.overwrite')} {again}"
        )
    changed = differences(before, now)
    if changed:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ConfigError(
            f"{path}: {what} with a different input, model or config ({shown}); "
            f"rerun with the same ones, or {option('output.overwrite')} {again}"
        )


def resumed_threads(path: str, threads: int) -> tuple[int, tuple[str, ...]]:
    """The torch threads of the interrupted run at ``path`` (the same count gives the same bytes), and
    a note for the plan when that is not ``threads``."""
    before = (read_state(path) or {}).get("torch_threads")
    if isinstance(before, int) and before != threads:
        return before, (f"threads {before} torch threads per forward pass, as in the interrupted run (same bytes)",)
    return threads, ()
