"""The lines people read: the plan, the estimate, the summary, what a TIFF and a model hold.

The core returns values (:class:`pipeline.run.plan.RunPlan`, :class:`pipeline.run.estimate.Estimate`,
:class:`pipeline.run.execute.RunResult`, :class:`pipeline.source.tiff.SourceInfo`); how they read
on a terminal and in the log is decided here, in the one vocabulary of chunks: computed, skipped
as background, resumed from earlier runs, and stores already complete.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pipeline.errors import SourceError
from pipeline.source.tiff import SourceInfo, open_source
from pipeline.tiling import halo_overhead

if TYPE_CHECKING:  # the run's packages load torch: a command that fails on its arguments must not wait for it
    from pipeline.run.estimate import Estimate
    from pipeline.run.execute import RunResult
    from pipeline.run.plan import RunPlan


def plan_lines(plan: RunPlan) -> list[str]:
    """The plan as lines a person reads before a long run."""
    c, y, x = plan.source.shape
    cfg, spec = plan.config, plan.model.spec
    return [
        f"input   {plan.source.path} level {plan.source.ref.level}: {y} x {x} px, {c} channels, "
        f"{plan.source.dtype} ({plan.megapixels:.1f} Mpx)",
        f"model   {plan.model.path} ({spec.architecture}, {spec.num_classes} classes, "
        f"receptive radius {plan.radius} px, stride {plan.stride})",
        f"tiles   {plan.chunks} of {cfg.tiling.tile} px + {plan.halo} px halo "
        f"({halo_overhead(plan.tiles):.1%} extra reads), {plan.forward_batch} per forward pass"
        + _pieces(plan)
        + _approximation(plan),
        f"compute {plan.device}, {plan.engine.describe(plan.workers, plan.torch_threads)}",
        f"output  {cfg.output.path}: {plan.output_shape} {cfg.output.dtype} + uint8 labels, "
        f"{cfg.output.format}, {len(plan.levels)} levels",
        _spatial_line(plan),
        _mask_line(plan),
        *([] if plan.resume is None else [_resume_line(plan)]),
        *plan.notes,
    ]


def _mask_line(plan: RunPlan) -> str:
    if plan.mask is None:
        return f"mask    none: all {plan.chunks} chunks computed"
    skipped = plan.chunks_background
    return (
        f"mask    {plan.mask.method}: {skipped} of {plan.chunks} chunks have no foreground and are "
        f"skipped ({skipped / max(1, plan.chunks):.0%})"
    )


def _resume_line(plan: RunPlan) -> str:
    resume = plan.resume
    if resume is not None and resume.complete:
        return "resume  the store is already complete: nothing to do"
    if resume is not None and resume.restart:
        return "resume  the store was interrupted before its first chunk: starting it again"
    return f"resume  {plan.chunks_resumed} chunks were written by earlier runs; {plan.chunks_to_compute} to compute"


def _pieces(plan: RunPlan) -> str:
    if not plan.forward_tile:
        return ""
    parts = -(-plan.config.tiling.tile // plan.forward_tile)
    return f", each in {parts} x {parts} passes of {plan.forward_tile} px"


def _approximation(plan: RunPlan) -> str:
    if plan.halo >= plan.exact_halo:
        return ""
    blending = "no" if plan.blend is None else plan.blend.mode
    return f"; below the exact {plan.exact_halo} px halo: approximate, {blending} blending"


def _spatial_line(plan: RunPlan) -> str:
    grid = plan.grid
    resampled = "" if grid.resampling is None else f", resampled from level {grid.source.ref.level}"
    note = "" if grid.note is None else f" ({grid.note})"
    if grid.mpp is not None:
        return f"scale   {grid.mpp:g} micrometres per pixel{resampled}{note}"
    georef = grid.georeference
    if georef is not None and georef.crs is not None:
        size = georef.pixel_size or (float("nan"), float("nan"))
        units = f"{size[0]:g} x {size[1]:g} CRS units per pixel"
        return f"scale   {georef.crs}, {units}{resampled}; OME scale in pixels{note}"
    return f"scale   the input records no pixel size: the output's scale is in pixels{note}"


def estimate_lines(estimate: Estimate) -> list[str]:
    """What the sample of the run measured, and what it expects of the whole."""
    total = estimate.tile_s or float("nan")
    return [
        f"measure {estimate.tiles_sampled} sample tiles: {estimate.tile_s * 1e3:.0f} ms per tile "
        f"(read {estimate.read_s / total:.0%}, network {estimate.forward_s / total:.0%}, "
        f"compress {estimate.encode_s / total:.0%})",
        f"expect  ETA {format_duration(estimate.eta_s)}, peak memory {estimate.peak_rss_mib:.0f} MiB, "
        f"output {format_bytes(estimate.output_bytes)} on disk",
    ]


def summary_lines(result: RunResult) -> list[str]:
    """What a run did: the store, its chunks, the no-data pixels, the memory."""
    if result.status != "done":
        return [f"{result.output_path}: {result.status}, nothing to do"]
    rate = result.megapixels / result.seconds if result.seconds else float("inf")
    nodata = (
        [
            f"nodata {result.nodata_pixels:,} px of the computed chunks hold no data (alpha 0, GDAL_NODATA, "
            "NaN or infinite values): probabilities NaN / 255, label 255"
        ]
        if result.nodata_pixels
        else []
    )
    return [
        f"wrote {result.output_path}: {result.shape} in {result.seconds:.1f} s ({rate:.2f} Mpx/s)",
        f"chunks {result.chunks_computed} computed, {result.chunks_background} skipped without foreground "
        f"({result.background_fraction:.0%}), {result.chunks_resumed} from earlier runs; "
        f"peak memory {result.peak_rss_mib:.0f} MiB",
        *nodata,
    ]


def batch_item_line(item: Any) -> str:
    """One input of a batch as it ended (a :class:`pipeline.run.batch.BatchItem`)."""
    line = f"{item.status:<7} {item.input}" + (f": {item.reason}" if item.reason else "")
    if item.status == "done":
        line += f" ({item.megapixels:.0f} Mpx in {item.seconds:.0f} s)"
    return line


def batch_lines(items: list[Any], elapsed: float, outdir: str) -> list[str]:
    """The batch's last lines: what became of its inputs, and where the manifest is."""
    counts = {status: sum(item.status == status for item in items) for status in ("done", "already complete", "failed")}
    finished = [item for item in items if item.status == "done"]
    megapixels = sum(item.megapixels for item in finished)
    chunks, background = sum(i.chunks for i in finished), sum(i.chunks_background for i in finished)
    return [
        f"batch   {len(items)} inputs: {counts['done']} done, {counts['already complete']} already complete, "
        f"{counts['failed']} failed; {megapixels:.1f} Mpx in {elapsed:.0f} s; "
        f"{background / max(1, chunks):.0%} of chunks skipped as background",
        f"manifest {os.path.join(outdir, 'manifest.json')}",
    ]


def file_lines(path: str | os.PathLike[str]) -> list[str]:
    """Lines for ``fcnpipe inspect``: every series with its levels, dtype, compression and resolution.

    Reads the directory only. A series that cannot be used says why instead of failing the rest.
    """
    first = open_source(path)
    lines = [f"{first.path}: {first.file_size:,} bytes, {first.series_count} series"]
    for index in range(first.series_count):
        name = first.series_names[index]
        try:
            info = first if index == 0 else open_source(path, series=index)
        except SourceError as err:
            lines.append(f"series {index} ({name}): not usable: {str(err).removeprefix(f'{first.path}: ')}")
            continue
        lines.extend(_describe_series(index, name, info))
    return lines


def _describe_series(index: int, name: str, info: SourceInfo) -> list[str]:
    channels = info.shape[0]
    notes = []
    if info.alpha_dropped:
        notes.append("alpha band dropped")
    if info.other_axes:
        notes.append(f"axes {info.other_axes} read at index 0")
    chunk = "x".join(map(str, info.chunk_shape))
    lines = [
        f"series {index} ({name}): axes {info.ref.axes}, {channels} channels, {info.dtype}, "
        f"{info.compression}, {'tiles' if info.tiled else 'strips'} {chunk}"
        + (f" ({'; '.join(notes)})" if notes else "")
    ]
    for number, level in enumerate(info.levels):
        height, width = level.shape
        lines.append(f"  level {number}: {height} x {width} px (downsample {level.downsample:g})")
    if info.mpp is not None:
        lines.append(f"  resolution: {info.mpp:g} micrometres per pixel at level 0")
    elif info.crs is not None or info.pixel_size is not None:
        size = "unknown" if info.pixel_size is None else f"{info.pixel_size[0]:g} x {info.pixel_size[1]:g}"
        lines.append(f"  georeference: {info.crs or 'unknown CRS'}, pixel size {size} CRS units")
    else:
        lines.append("  resolution: not recorded in the file")
    return lines


def model_lines(path: str | os.PathLike[str], factory: str | None = None) -> list[str]:
    """Lines for ``fcnpipe inspect-model``: what the network is and what tiling it needs.

    The receptive radius and stride are measured from the network itself (TorchScript included):
    the halo that makes tiled prediction equal a whole-image pass, and the alignment of tiles.
    """
    from pipeline.model.checkpoint import load_model
    from pipeline.model.receptive import measure_tiling

    loaded = load_model(path, factory)
    spec = loaded.spec
    stride, radius, halo = measure_tiling(loaded.module, spec.in_channels, loaded.path)
    norm = spec.normalization
    scale = "dtype maximum (255 for uint8, 65535 for uint16)" if norm.scale is None else f"{norm.scale:g}"
    parameters = sum(p.numel() for p in loaded.module.parameters())
    lines = [
        f"{loaded.path}: sha256 {loaded.sha256}",
        f"architecture     {spec.architecture} {spec.arguments or ''}".rstrip(),
        f"parameters       {parameters:,}",
        f"input            {spec.in_channels} channels, divided by {scale}"
        + (f", mean {list(norm.mean)}" if norm.mean else "")
        + (f", std {list(norm.std)}" if norm.std else ""),
        f"classes          {spec.num_classes}: "
        + ", ".join(
            f"{n} #{''.join(f'{v:02X}' for v in c)}" for n, c in zip(spec.class_names, spec.class_colors, strict=True)
        ),
        f"receptive radius {radius} px (each output pixel sees {2 * radius + 1} x {2 * radius + 1} input pixels)",
        f"stride           {stride} (tiles start on multiples of it; windows are zero-padded to it)",
        f"halo             {halo} px read around every tile: the least that makes tiling exact",
    ]
    if spec.mpp is not None:
        lines.append(f"trained at       {spec.mpp:g} micrometres per pixel")
    if spec.gsd is not None:
        lines.append(f"trained at       {spec.gsd:g} CRS units per pixel")
    if spec.input_dtype is not None:
        lines.append(f"trained on       {spec.input_dtype} pixels (a run on others is refused)")
    return lines


def format_duration(seconds: float) -> str:
    """``3 h 05 min``, ``4 min 10 s``, ``12 s``.

    >>> format_duration(11100), format_duration(250), format_duration(12.4)
    ('3 h 05 min', '4 min 10 s', '12 s')
    """
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def format_bytes(size: float) -> str:
    """``512 B``, ``1.5 KiB``, ... ``3.0 GiB``.

    >>> format_bytes(512), format_bytes(1536), format_bytes(3.2e9)
    ('512 B', '1.5 KiB', '3.0 GiB')
    """
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"
