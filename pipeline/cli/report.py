"""The lines people read: the plan, the estimate, the summary, what a TIFF and a model hold.

The core returns values (:class:`pipeline.run.plan.RunPlan`, :class:`pipeline.run.estimate.Estimate`,
:class:`pipeline.run.execute.RunResult`, :class:`pipeline.source.tiff.SourceInfo`); how they read
on a terminal and in the log is decided here, in the one vocabulary of chunks: computed, skipped
as background, resumed from earlier runs, and stores already complete. What ``inspect``,
``inspect-model`` and ``plan`` print is made from the JSON documents of :mod:`pipeline.run.describe`,
which ``--json`` prints as they are, so that the text and the JSON say the same.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

from pipeline import remote
from pipeline.run.describe import file_info, inspect_info, model_info, store_info
from pipeline.tiling import halo_overhead

if TYPE_CHECKING:  # the run's packages load torch: a command that fails on its arguments must not wait for it
    from pipeline.run.estimate import Estimate
    from pipeline.run.execute import RunResult
    from pipeline.run.plan import RunPlan

UNNAMED_OUTPUT = "(not written).zarr"
"""The output path of ``fcnpipe plan`` without ``-o``: checked like any other, never written."""


def plural(count: int, word: str, many: str = "") -> str:
    """``1 level``, ``3 levels``.

    >>> plural(1, "level"), plural(3, "level"), plural(2, "class", "classes")
    ('1 level', '3 levels', '2 classes')
    """
    return f"{count} {word if count == 1 else many or word + 's'}"


def json_text(document: dict[str, Any]) -> str:
    """``document`` as strict JSON: a value that is not a finite number becomes null."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): finite(v) for k, v in value.items()}
        return [finite(v) for v in value] if isinstance(value, list | tuple) else value

    return json.dumps(finite(document), indent=2, allow_nan=False, default=str)


def plan_lines(plan: RunPlan, dry_run: bool = False) -> list[str]:
    """The plan as lines a person reads before a long run; ``dry_run``: ``fcnpipe plan``'s, which
    writes nothing."""
    c, y, x = plan.source.shape
    classes, height, width = plan.output_shape
    cfg, spec = plan.config, plan.model.spec
    output = cfg.output.path
    if dry_run:
        output = "no -o given (plan writes nothing)" if output == UNNAMED_OUTPUT else f"{output} (plan writes nothing)"
    grid = plan.grid
    window = "" if grid.full_shape is None else f"; window {grid.origin[1]} {grid.origin[0]} {width} {height} of it"
    return [
        f"input   {remote.redact(plan.source.path)} level {plan.source.ref.level}: {x} x {y} px (width x height), "
        f"{plural(c, 'channel')}, {plan.source.dtype}{window} ({plan.megapixels:.1f} Mpx)",
        f"model   {plan.model.path} ({spec.architecture}, {plural(spec.num_classes, 'class', 'classes')}, "
        f"receptive radius {plan.radius} px, stride {plan.stride} px)",
        f"tiles   {plan.chunks} of {cfg.tiling.tile} px + {plan.halo} px halo "
        f"({halo_overhead(plan.tiles):.1%} extra reads), {plan.forward_batch} per forward pass"
        + _pieces(plan)
        + _approximation(plan),
        f"compute {plan.device}, {_engine(plan)}",
        f"output  {output}: {plural(classes, 'class', 'classes')} x {width} x {height} px {cfg.output.dtype} "
        f"+ uint8 labels, {cfg.output.format}, {plural(len(plan.levels), 'level')}",
        _spatial_line(plan),
        _mask_line(plan),
        *([] if plan.resume is None else [_resume_line(plan)]),
        *plan.notes,
    ]


def _engine(plan: RunPlan) -> str:
    """Where the tasks run: in this process, ``N worker threads, M torch threads each``; on a Dask
    cluster as its engine describes it."""
    if plan.engine.distributed:
        return plan.engine.describe(plan.workers, plan.torch_threads)
    threads = f"{plural(plan.workers, 'worker thread')}, {plural(plan.torch_threads, 'torch thread')} each"
    return f"{threads}, in this process"


def _mask_line(plan: RunPlan) -> str:
    if plan.mask is None:
        return f"mask    none: all {plural(plan.chunks, 'chunk')} computed"
    skipped = plan.chunks_background
    return (
        f"mask    {plan.mask.method}: {skipped} of {plural(plan.chunks, 'chunk')} have no foreground and are "
        f"skipped ({skipped / max(1, plan.chunks):.0%})"
    )


def _resume_line(plan: RunPlan) -> str:
    resume = plan.resume
    if resume is not None and resume.complete:
        return "resume  the store is already complete: nothing to do"
    if resume is not None and resume.restart:
        return "resume  the store was interrupted before its first chunk: starting it again"
    were = "was" if plan.chunks_resumed == 1 else "were"
    done = f"{plural(plan.chunks_resumed, 'chunk')} {were} written by earlier runs"
    return f"resume  {done}; {plan.chunks_to_compute} to compute"


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
        units = f"{size[0]:g} x {size[1]:g} {grid.source.crs_units or 'CRS units'} per pixel (width x height)"
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
        stats = [] if result.stats is None else class_lines(result.stats)
        return [f"{result.output_path}: {result.status}, nothing to do", *stats]
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
        *([] if result.stats is None else class_lines(result.stats)),
    ]


AREA_UNITS = {"area_mm2": "mm²", "area_um2": "µm²", "area_ha": "ha", "area_m2": "m²"}


def _areas(values: dict[str, Any], unit: str | None) -> str:
    """``2.097 mm² = 2,097,152 µm²``: the areas of a class, largest unit first."""
    found = [(AREA_UNITS.get(k, unit or "CRS units²"), v) for k, v in values.items() if k.startswith("area_")]
    return " = ".join(f"{v:,.6g} {u}" if v < 1000 else f"{v:,.0f} {u}" for u, v in reversed(found))


def class_lines(stats: dict[str, Any], indent: str = "") -> list[str]:
    """One line per class of :func:`pipeline.store.reading.class_stats`: pixels, areas, share;
    then the labelled total and the pixels without data."""
    unit, labelled = stats.get("pixel_area_unit"), stats["labelled"]
    width = max((len(name) for name in stats["classes"]), default=0)
    lines = [
        f"{indent}class  {name:<{width}} {v['pixels']:>13,} px  {v['share']:6.1%}  {_areas(v, unit)}".rstrip()
        for name, v in stats["classes"].items()
    ]
    lines.append(
        f"{indent}labelled {labelled['pixels']:,} px {_areas(labelled, unit)}; "
        f"{stats['nodata_pixels']:,} px no data (in no class)".replace("px ;", "px;")
    )
    return lines


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
        f"report  {os.path.join(outdir, 'report.html')}",
    ]


def inspect_lines(path: str | os.PathLike[str]) -> list[str]:
    """Lines for ``fcnpipe inspect``: :func:`file_lines` of a TIFF, :func:`store_lines` of a store."""
    info = inspect_info(path)
    return _store_text(info) if info["kind"] == "fcnpipe store" else _file_text(info)


def file_lines(path: str | os.PathLike[str]) -> list[str]:
    """Lines for ``fcnpipe inspect`` of a TIFF: :func:`file_info` as text."""
    return _file_text(file_info(path))


def _file_text(info: dict[str, Any]) -> list[str]:
    size, count = f"{info['file_size_bytes']:,} bytes", plural(len(info["series"]), "series", "series")
    lines = [f"{info['path']}: {info['format']}, {size}, {count}"]
    for series in info["series"]:
        head = f"series {series['index']} ({series['name']})"
        if not series["usable"]:
            lines.append(f"{head}: not usable: {series['reason']}")
            continue
        levels, channels = series["levels"], plural(series["channels"], "channel")
        block = f"{series['layout']} {series['block_width']}x{series['block_height']} px"
        notes = ["alpha band dropped"] if series["alpha_dropped"] else []
        notes += [f"axes {series['axes_read_at_index_0']} read at index 0"] if series["axes_read_at_index_0"] else []
        what = f"axes {series['axes']}, {channels}, {series['dtype']}, {series['compression']}, {block}"
        if series["mask_of"] is not None:
            masked = f"the GDAL internal mask of series {series['mask_of']} (0: no data there)"
            lines.append(f"{head}: {masked}, {what}, {plural(len(levels), 'level')} like it")
            continue
        lines.append(f"{head}: {what}, {plural(len(levels), 'level')}" + (f" ({'; '.join(notes)})" if notes else ""))
        lines += [
            f"  level {n['level']}: {n['width']} x {n['height']} px (width x height, downsample {n['downsample']:g})"
            for n in levels
        ]
        lines += _place_lines(series)
    return lines


def _place_lines(series: dict[str, Any]) -> list[str]:
    """Where the series' pixels are: micrometres per pixel, or CRS, bounds and corners; and no data."""
    mpp, units, corners = series["micrometres_per_pixel"], series["crs_units"] or "CRS units", series["corners"]
    lines = []
    if series["associated"]:
        own = "" if mpp is None else f"{mpp:g} micrometres per pixel in its own tags; "
        lines.append(f"  resolution: {own}an image beside the slide, not at the slide's scale")
    elif mpp is not None:
        lines.append(f"  resolution: {mpp:g} micrometres per pixel at level 0")
    elif series["crs"] is None and series["pixel_width"] is None:
        lines.append("  resolution: not recorded in the file")
    else:
        lines.append(f"  crs: {series['crs'] or 'unknown (no EPSG code)'}, units {series['crs_units'] or 'unknown'}")
        if series["pixel_width"] is not None:
            size = f"{series['pixel_width']:g} x {series['pixel_height']:g} {units}"
            lines.append(f"  pixel size: {size} (width x height) at level 0")
    if corners is not None:
        left, bottom, right, top = corners["bounds"]
        lines.append(f"  bounds: left {left:.12g}, bottom {bottom:.12g}, right {right:.12g}, top {top:.12g} ({units})")
        points = [(name, point) for name, point in corners.items() if name != "bounds"]
        lines += [f"  {name.replace('_', ' '):<12}({x:.12g}, {y:.12g})" for name, (x, y) in points]
    if series["nodata"] is not None:
        nodata = series["nodata"]
        lines.append(f"  nodata: {nodata:g} (GDAL_NODATA tag)" if isinstance(nodata, float) else f"  nodata: {nodata}")
    elif series["mask_series"] is not None:
        lines.append(f"  nodata: where its internal mask (series {series['mask_series']}) is 0")
    elif series["crs"] is not None:
        lines.append("  nodata: none recorded")
    return lines


def store_lines(path: str) -> list[str]:
    """Lines for ``fcnpipe inspect`` of a store: :func:`store_info` as text."""
    return _store_text(store_info(path))


def _store_text(info: dict[str, Any]) -> list[str]:
    chunks, inp, model, scale = info["chunks"], info["input"], info["model"], info["scale"]
    status = info["status"]
    if status == "unfinished":
        status += f": the run did not finish; `fcnpipe run {inp['path']} -o {info['path']} --resume` goes on"
    classes = ", ".join(f"{k['name']} {k['color']}" for k in info["classes"])
    tile = info["tile_px"]
    lines = [
        f"{info['path']}: fcnpipe store, {status}",
        f"chunks   {chunks['on_disk']} of {plural(chunks['total'], 'chunk')} ({tile} x {tile} px) on disk, "
        f"{chunks['background']} skipped as background (chunks with no data at all are not stored)",
        f"classes  {len(info['classes'])}: {classes}",
        f"format   Zarr format {info['zarr_format']}, {info['format']}: {info['dtype']} probabilities "
        f"(class x Y x X) + {info['labels_dtype']} labels (255: no data)",
        *[f"level {lv['level']}  {lv['width']} x {lv['height']} px (width x height)" for lv in info["levels"]],
        f"input    {inp['path']} series {inp['series']} level {inp['level']}: {inp['width']} x {inp['height']} px, "
        f"{plural(inp['channels'], 'channel')}"
        + ("" if inp["size_bytes"] is None else f", {inp['size_bytes']:,} bytes"),
        f"model    {model['architecture']}, sha256 {model['sha256']}, receptive radius "
        f"{model['receptive_radius_px']} px, stride {model['stride_px']} px, halo {info['halo_px']} px",
    ]
    if scale["micrometres_per_pixel"] is not None:
        lines.append(f"scale    {scale['micrometres_per_pixel']:g} micrometres per pixel")
    elif scale["crs"] is not None or scale["pixel_width"] is not None:
        size = "" if scale["pixel_width"] is None else f", {scale['pixel_width']:g} x {scale['pixel_height']:g}"
        units = scale["crs_units"] or "CRS units"
        lines.append(f"scale    {scale['crs'] or 'unknown CRS'}{size} {units} per pixel (width x height)")
    lines.append(f"fingerprint sha256 {info['fingerprint_sha256'][:16]} (what --resume and batch compare)")
    timings = info["timings_s"] or {}
    spent = ", ".join(f"{k} {v:g} s" for k, v in timings.items() if isinstance(v, int | float) and k != "total")
    lines.append(
        f"written  by fcnpipe {info['fcnpipe_version']}, started {info['started']}"
        + ("" if info["finished"] is None else f", finished {info['finished']}")
        + ("" if "total" not in timings else f"; {timings['total']:g} s in all ({spent})")
        + ("" if not info["resumed"] else f"; resumed {plural(info['resumed'], 'time')}")
    )
    return lines


def model_lines(path: str | os.PathLike[str], factory: str | None = None) -> list[str]:
    """Lines for ``fcnpipe inspect-model``: :func:`model_info` as text."""
    info = model_info(path, factory)
    norm, field = info["normalization"], 2 * info["receptive_radius_px"] + 1
    scale = "dtype maximum (255 for uint8, 65535 for uint16)" if norm["scale"] is None else f"{norm['scale']:g}"
    lines = [
        f"{info['path']}: sha256 {info['sha256']}",
        f"architecture     {info['architecture']} {info['arguments'] or ''}".rstrip(),
        f"parameters       {info['parameters']:,}",
        f"input            {plural(info['in_channels'], 'channel')}, divided by {scale}"
        + (f", mean {norm['mean']}" if norm["mean"] else "")
        + (f", std {norm['std']}" if norm["std"] else ""),
        f"classes          {len(info['classes'])}: " + ", ".join(f"{k['name']} {k['color']}" for k in info["classes"]),
        f"receptive radius {info['receptive_radius_px']} px (each output pixel sees {field} x {field} input pixels)",
        f"stride           {info['stride_px']} px (tiles start on multiples of it; windows are zero-padded to it)",
        f"halo             {info['halo_px']} px read around every tile: the least that makes tiling exact",
    ]
    if info["trained_micrometres_per_pixel"] is not None:
        lines.append(f"trained at       {info['trained_micrometres_per_pixel']:g} micrometres per pixel")
    if info["trained_ground_sample_distance"] is not None:
        gsd = info["trained_ground_sample_distance"]
        lines.append(f"trained at       {gsd:g} units of the training image's CRS per pixel (ground sample distance)")
    if info["trained_input_dtype"] is not None:
        lines.append(f"trained on       {info['trained_input_dtype']} pixels (a run on others is refused)")
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
