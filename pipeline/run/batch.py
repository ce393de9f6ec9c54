"""Many inputs, one store each, one manifest: the overnight batch.

:func:`expand_inputs` turns files, folders, glob patterns and lists of paths into input files;
:func:`output_paths` names a store after each input. :func:`run_batch` runs them and keeps a
manifest (``manifest.json`` and ``manifest.csv`` in the output folder, rewritten atomically as
inputs end: :class:`Manifest`) with each input's status: ``done``, ``already complete`` (its store
was complete and made with the same input, model and config, so it was kept) or ``failed`` with
the one-line reason, and its class areas as columns (:func:`pipeline.run.overview.class_columns`);
and the page ``report.html`` made from the manifest (:mod:`pipeline.run.overview`), rewritten with
it. One bad input never stops the others.

Inputs are run in *waves*: the level-0 tasks of consecutive inputs are computed together until a
wave holds enough tasks to keep every worker busy (:data:`TASKS_PER_WORKER`), so many small
images do not leave workers idle between them while one big slide still runs, and completes, on
its own. A store is finished (pyramid, completion mark) as soon as its wave is.

A batch keeps ~1.5 KB per input (its :class:`BatchItem` and manifest row); a wave's plans and tasks
go with it, so memory and time per input stay flat from 100 to 2,000 inputs (``benchmarks/README.md``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import io
import json
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import remote
from pipeline.compute import state
from pipeline.compute.engine import THREADS, Engine
from pipeline.compute.job import TaskFailure
from pipeline.compute.tasks import compute_results
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, FcnpipeError
from pipeline.files import PARTIAL, atomic_write
from pipeline.run.execute import StoreWriter
from pipeline.run.overview import REPORT, class_columns, report_html
from pipeline.run.plan import RunPlan, prepare
from pipeline.store.safety import store_lock

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".tf8", ".bif", ".scn", ".qptiff", ".gtiff")
TASKS_PER_WORKER = 8
"""A wave holds at least this many tasks per worker (or is a single input)."""
MANIFEST = "manifest"
REWRITE_SHARE = 0.05
"""Rewriting the manifest and report takes at most this share of a batch's time (:class:`Manifest`)."""


@dataclass
class BatchItem:
    """One input of a batch and what became of it."""

    input: str
    output: str
    status: str = "pending"
    """``pending``, ``done``, ``already complete`` or ``failed``."""
    reason: str = ""
    seconds: float = 0.0
    megapixels: float = 0.0
    chunks: int = 0
    chunks_background: int = 0
    """Chunks without foreground: neither computed nor stored."""
    chunks_resumed: int = 0
    """Chunks written by an earlier, interrupted run."""
    stats: dict[str, Any] | None = None
    """Pixels and areas per class of its store (:func:`pipeline.store.reading.class_stats`)."""


STATUSES = ("done", "already complete", "failed")


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Input files from ``items``: files, folders (their TIFFs), glob patterns, and ``@list.txt``
    files of paths (one per line, ``#`` comments), in the order given, each once.

    A name that matches nothing is kept as it is, so that it is reported as failed, not dropped.
    """
    found: list[str] = []
    for item in items:
        if item.startswith("@"):
            found += expand_inputs(_read_list(item[1:]))
        elif remote.is_url(item):
            found += remote.expand(item, TIFF_SUFFIXES)
        elif os.path.isdir(item):
            names = sorted(os.listdir(item))
            found += [
                os.path.join(item, n) for n in names if n.lower().endswith(TIFF_SUFFIXES) and not n.startswith(".")
            ]
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            found += [m for m in matches if os.path.isfile(m)] or [item]
        else:
            found.append(item)
    unique: dict[str, str] = {}
    for path in found:
        unique.setdefault(path if remote.is_url(path) else os.path.abspath(path), path)
    return list(unique.values())


def _read_list(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as file:
            lines = [line.split("#", 1)[0].strip() for line in file]
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the list of inputs ({err.strerror or err})") from err
    base = os.path.dirname(path)
    return [line if os.path.isabs(line) or remote.is_url(line) else os.path.join(base, line) for line in lines if line]


def output_paths(inputs: Sequence[str], outdir: str) -> list[str]:
    """``OUTDIR/<name>.zarr`` for each input, the name being its file name without the extension
    (``slide.ome.tif`` -> ``slide``); names that repeat get ``-2``, ``-3``, ... in input order.

    >>> output_paths(["a/s1.svs", "b/s1.tif", "c/x.ome.tiff"], "out")
    ['out/s1.zarr', 'out/s1-2.zarr', 'out/x.zarr']
    """
    seen: dict[str, int] = {}
    paths = []
    for path in inputs:
        name = os.path.basename(remote.redact(path))
        for suffix in (".ome.tiff", ".ome.tif", ".ome.btf"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        else:
            name = os.path.splitext(name)[0]
        seen[name] = seen.get(name, 0) + 1
        paths.append(os.path.join(outdir, f"{name}-{seen[name]}.zarr" if seen[name] > 1 else f"{name}.zarr"))
    return paths


def manifest_row(item: BatchItem) -> dict[str, Any]:
    """The manifest's row of ``item``: its fields, rounded, and its class areas as columns."""
    row = {field.name: getattr(item, field.name) for field in dataclasses.fields(item) if field.name != "stats"}
    row["input"] = remote.redact(row["input"])  # a presigned URL's signature is a credential
    row["seconds"] = round(row["seconds"], 2)
    row["megapixels"] = round(row["megapixels"], 3)
    return {**row, **class_columns(item.stats)}


def write_manifest(
    outdir: str, items: Sequence[BatchItem], rows: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """``manifest.json`` and ``manifest.csv`` in ``outdir``, each replaced atomically: one row per
    input (``rows``, else made), its class areas flattened into columns (the union over the inputs;
    empty where absent). Return the manifest, as ``manifest.json`` holds it."""
    rows = [manifest_row(item) for item in items] if rows is None else rows
    names = list(dict.fromkeys(name for item in items for name in (item.stats or {}).get("classes", {})))
    fields = list(dict.fromkeys(key for row in rows for key in row)) or ["input"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    summary = {"inputs": len(items), **{s: sum(i.status == s for i in items) for s in STATUSES}}
    document = {"summary": summary, "classes": names, "inputs": list(rows)}
    atomic_write(os.path.join(outdir, f"{MANIFEST}.json"), json.dumps(document, indent=1))
    atomic_write(os.path.join(outdir, f"{MANIFEST}.csv"), text.getvalue())
    return document


class Manifest:
    """The manifest and ``report.html`` of a batch: written at its start and end, and as inputs end.

    A rewrite is O(inputs): one after every input made 2,000 small inputs cost 0.43 s each more
    (``benchmarks/README.md``). So an input that ends sooner than ``1 / REWRITE_SHARE`` times the
    last rewrite's duration after it (0.32 s -> 6.4 s at 2,000 rows) waits for the next: rewrites
    take at most :data:`REWRITE_SHARE` of the batch's time, and the files lag it by those seconds at
    most. Inputs slower than that (any real slide) are each written as they end. A batch killed in
    between loses only that lag: the next run checks every input again. A row is made as its input ends.
    """

    def __init__(self, outdir: str, items: Sequence[BatchItem], clock: Callable[[], float] = time.perf_counter) -> None:
        self.outdir = outdir
        self.items = items
        self._rows: list[dict[str, Any] | None] = [None] * len(items)
        self._where = {id(item): index for index, item in enumerate(items)}
        self._clock = clock
        self._due = 0.0
        self._behind = True
        self.writes = 0

    def ended(self, item: BatchItem) -> None:
        """``item`` has its final status: its row is made, and both files rewritten if it is time."""
        self._rows[self._where[id(item)]] = manifest_row(item)
        self._behind = True
        if self._clock() >= self._due:
            self.write()

    def write(self) -> None:
        """Rewrite both files now, if anything changed since the last time."""
        if not self._behind:
            return
        started = self._clock()
        rows = [manifest_row(item) if row is None else row for row, item in zip(self._rows, self.items, strict=True)]
        document = write_manifest(self.outdir, self.items, rows)
        atomic_write(os.path.join(self.outdir, REPORT), report_html(document, self.outdir))
        self._behind, self.writes = False, self.writes + 1
        now = self._clock()
        self._due = now + (now - started) / REWRITE_SHARE


def _remove_partial_writes(outdir: str) -> None:
    """The temporary files of manifest and report writes that a killed batch left in ``outdir``."""
    for name in (f"{MANIFEST}.json", f"{MANIFEST}.csv", REPORT):
        for path in glob.glob(os.path.join(glob.escape(outdir), f"{glob.escape(name)}.*{PARTIAL}")):
            with contextlib.suppress(OSError):
                os.unlink(path)


def run_batch(
    config: RunConfig,
    inputs: Sequence[str],
    outdir: str,
    on_plan: Callable[[BatchItem, RunPlan], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_item: Callable[[BatchItem], None] | None = None,
    engine: Engine = THREADS,
) -> list[BatchItem]:
    """Run ``config`` on every input, one store each in ``outdir``; return the manifest's items.

    ``on_plan(item, plan)`` shows each input's plan before it runs, ``on_progress(pixels)`` follows
    the level-0 tasks of every input, ``on_item(item)`` reports each input as it ends. ``engine``
    runs the tasks (:func:`pipeline.compute.engine.open_engine`).
    """
    remote.refuse_output(outdir, "a batch's output folder")
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{outdir}: cannot create the output folder ({err.strerror or err})") from err
    items = [BatchItem(path, out) for path, out in zip(inputs, output_paths(inputs, outdir), strict=True)]
    _remove_partial_writes(outdir)
    manifest = Manifest(outdir, items)
    manifest.write()

    def report(item: BatchItem) -> None:
        if on_item is not None:
            on_item(item)  # writes its preview, which the page shows
        manifest.ended(item)

    try:
        _run_all(config, items, engine, on_plan, on_progress, report)
    except BaseException:  # Ctrl-C, or a lost cluster: the files say what ended before it
        with contextlib.suppress(Exception):
            manifest.write()
        raise
    manifest.write()
    return items


def _run_all(
    config: RunConfig,
    items: Sequence[BatchItem],
    engine: Engine,
    on_plan: Callable[[BatchItem, RunPlan], None] | None,
    on_progress: Callable[[int], None] | None,
    report: Callable[[BatchItem], None],
) -> None:
    """Run every input in waves (see the module's docstring); ``report(item)`` as each ends."""
    pending = deque(items)
    while pending:
        wave: list[_Open] = []
        tasks: list[Any] = []
        while pending and (not wave or len(tasks) < TASKS_PER_WORKER * wave[0].writer.plan.workers):
            item = pending.popleft()
            opened = _open(item, config, engine, on_plan)
            if opened is None:  # failed: said in the manifest
                report(item)
            elif opened.writer.result is not None:
                opened.held.close()
                item.status, item.stats = "already complete", opened.writer.result.stats
                item.seconds = time.perf_counter() - opened.started
                report(item)
            elif opened.writer.plan.blend is not None:  # blended stores run on their own
                with opened.held:
                    _run_alone(opened, on_progress)
                report(item)
            else:
                wave.append(opened)
                tasks += opened.writer.tasks(guarded=True)
        if wave:
            _run_wave(wave, tasks, on_progress, report)


@dataclass(frozen=True)
class _Open:
    """An input of a batch whose store is open for writing."""

    item: BatchItem
    writer: StoreWriter
    started: float
    held: contextlib.ExitStack
    """The store's lock and writer, released together."""


def _open(
    item: BatchItem, config: RunConfig, engine: Engine, on_plan: Callable[[BatchItem, RunPlan], None] | None
) -> _Open | None:
    """Lock, plan and open ``item``'s store (another writer is refused before planning); None, and
    ``item`` failed with the reason, if that fails."""
    started, held = time.perf_counter(), contextlib.ExitStack()
    try:
        held.enter_context(store_lock(item.output))
        plan = prepare(_for_input(config, item), engine)
        item.megapixels, item.chunks, item.chunks_background = plan.megapixels, plan.chunks, plan.chunks_background
        item.chunks_resumed = plan.chunks_resumed
        if on_plan is not None:
            on_plan(item, plan)
        return _Open(item, held.enter_context(StoreWriter(plan)), started, held)
    except Exception as err:  # one bad input never stops the others: one line in the manifest
        held.close()
        _fail(item, _one_line(err), started)
        return None


def _for_input(config: RunConfig, item: BatchItem) -> RunConfig:
    """``config`` for one input of the batch: its paths; resume unless told to overwrite."""
    output = dataclasses.replace(config.output, path=item.output, resume=not config.output.overwrite)
    return dataclasses.replace(config, input=dataclasses.replace(config.input, path=item.input), output=output)


def _one_line(err: Exception) -> str:
    return str(err) if isinstance(err, FcnpipeError) else f"internal error: {type(err).__name__}: {err}"


def _fail(item: BatchItem, reason: str, started: float) -> None:
    """``item`` failed for ``reason``, which does not repeat the input's path (the line names it)."""
    item.status, item.reason = "failed", " ".join(reason.split()).removeprefix(f"{item.input}: ")
    item.seconds = time.perf_counter() - started


def _run_alone(opened: _Open, on_progress: Callable[[int], None] | None) -> None:
    try:
        opened.writer.compute(on_progress)
        opened.item.stats = opened.writer.finish().stats
        opened.item.status = "done"
        opened.item.seconds = time.perf_counter() - opened.started
    except Exception as err:
        _fail(opened.item, _one_line(err), opened.started)


def _run_wave(
    wave: Sequence[_Open],
    tasks: Sequence[Any],
    on_progress: Callable[[int], None] | None,
    report: Callable[[BatchItem], None],
) -> None:
    """Compute ``tasks``, the level-0 tasks of every store of ``wave``, together; then finish each
    store and release it (its writer and lock)."""
    try:
        compute_started = time.perf_counter()
        plan = wave[0].writer.plan
        results = compute_results(tasks, plan.engine, workers=plan.workers, on_done=on_progress, gpu=plan.gpu)
        compute_s = time.perf_counter() - compute_started
        failures: dict[str, str] = {}
        for result in results:
            if isinstance(result, TaskFailure) and result.message:
                failures.setdefault(result.token, result.message)
        total_pixels = sum(opened.writer.plan.megapixels_to_compute for opened in wave) or 1.0
        for opened in wave:
            _finish(opened, results, failures, compute_s / total_pixels)
            opened.held.close()
            report(opened.item)
    finally:
        for opened in wave:
            opened.held.close()


def _finish(opened: _Open, results: list[Any], failures: dict[str, str], seconds_per_mpx: float) -> None:
    """Finish one store of a wave whose tasks ran (or fail it with its first task's error)."""
    writer, item = opened.writer, opened.item
    token = writer.job.output.token
    writer.took(results)
    failure = failures.get(token)
    if failure is not None:
        state.forget(token)
        _fail(item, failure, opened.started)
        return
    try:  # the wave's compute time, shared by pixels
        item.stats = writer.finish(seconds_per_mpx * writer.plan.megapixels_to_compute).stats
        item.status = "done"
        item.seconds = time.perf_counter() - opened.started
    except Exception as err:
        _fail(item, _one_line(err), opened.started)
