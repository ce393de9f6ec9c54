"""What a TIFF, an output store, a model and a plan hold, as plain JSON values.

``fcnpipe inspect``, ``inspect-model`` and ``plan`` print these documents with ``--json`` (as
``rio info`` and ``gdalinfo -json`` do) and as text (:mod:`pipeline.cli.report`), so both say the
same. Sizes are ``width`` and ``height`` in pixels; every other unit is in its key (``_px``, ``_s``,
``_bytes``, ``_mib``, ``micrometres_per_pixel``) or, for coordinates, in ``crs_units``. Nothing here
reads a pixel or a chunk: a TIFF's directory, a store's record and its arrays' metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from typing import TYPE_CHECKING, Any

from pipeline import remote
from pipeline.errors import SourceError
from pipeline.source.tiff import SourceInfo, crs_units, open_source
from pipeline.tiling import halo_overhead

if TYPE_CHECKING:  # the plan's packages load torch: inspecting a TIFF or a store must not wait for it
    from pipeline.run.estimate import Estimate
    from pipeline.run.plan import RunPlan


def plan_info(plan: RunPlan, estimate: Estimate | None, output_path: str | None) -> dict[str, Any]:
    """What a run would read, compute and write (``fcnpipe plan``, which writes nothing), with the
    sample's ``estimate`` when one was measured; ``output_path``: the store, None if none was named."""
    c, y, x = plan.source.shape
    classes, height, width = plan.output_shape
    cfg, spec, mask, resume = plan.config, plan.model.spec, plan.mask, plan.resume
    return {
        "input": {
            **{"path": remote.redact(plan.source.path), "series": plan.source.ref.series},
            "level": plan.source.ref.level,
            **{"width": x, "height": y, "channels": c, "dtype": str(plan.source.dtype), "megapixels": plan.megapixels},
            "window": None if plan.grid.full_shape is None else [*plan.grid.origin[::-1], width, height],
        },
        "model": {
            **{"path": plan.model.path, "sha256": plan.model.sha256, "architecture": spec.architecture},
            **{"classes": _classes(spec.class_names, spec.class_colors), "receptive_radius_px": plan.radius},
            "stride_px": plan.stride,
        },
        "tiles": {
            **{
                "count": plan.chunks,
                "tile_px": cfg.tiling.tile,
                "halo_px": plan.halo,
                "exact_halo_px": plan.exact_halo,
            },
            **{"extra_reads_fraction": halo_overhead(plan.tiles), "forward_batch": plan.forward_batch},
            **{"forward_tile_px": plan.forward_tile or None, "blend": None if plan.blend is None else plan.blend.mode},
        },
        "compute": {"device": plan.device, "worker_threads": plan.workers, "torch_threads_each": plan.torch_threads},
        "output": {
            **{"path": output_path, "written": False},
            **{
                "classes": classes,
                "width": width,
                "height": height,
                "dtype": cfg.output.dtype,
                "labels_dtype": "uint8",
            },
            **{"format": cfg.output.format, "levels": [{"width": w, "height": h} for h, w in plan.levels]},
        },
        "scale": _scale_info(plan.grid.mpp, plan.grid.georeference, plan.grid.source.crs_units),
        "mask": None if mask is None else {"method": mask.method},
        "chunks": {
            **{"total": plan.chunks, "background": plan.chunks_background, "resumed": plan.chunks_resumed},
            "to_compute": plan.chunks_to_compute,
        },
        "resume": None if resume is None else {"store_complete": resume.complete, "restart": resume.restart},
        "notes": list(plan.notes),
        "estimate": None
        if estimate is None
        else {
            **{"tiles_sampled": estimate.tiles_sampled, "tile_s": estimate.tile_s, "read_s": estimate.read_s},
            **{"forward_s": estimate.forward_s, "encode_s": estimate.encode_s, "eta_s": estimate.eta_s},
            **{"peak_memory_mib": estimate.peak_rss_mib, "output_bytes": estimate.output_bytes},
        },
    }


def _classes(names: Any, colors: Any) -> list[dict[str, Any]]:
    return [{"index": i, "name": n, "color": _hex(c)} for i, (n, c) in enumerate(zip(names, colors, strict=True))]


def _hex(color: Any) -> str:
    return "#" + "".join(f"{int(v):02X}" for v in color)


def _scale_info(mpp: float | None, georef: Any, units: str | None) -> dict[str, Any]:
    """The pixel size: micrometres, or the CRS, its units and the affine ``transform`` (GDAL order)."""
    size = None if georef is None else georef.pixel_size
    return {
        "micrometres_per_pixel": mpp,
        "crs": None if georef is None else georef.crs,
        "crs_units": None if georef is None else units,
        "pixel_width": None if size is None else size[0],
        "pixel_height": None if size is None else size[1],
        "transform": None if georef is None or georef.transform is None else list(georef.transform),
    }


def inspect_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TIFF (:func:`file_info`) or, for a folder, an fcnpipe store (:func:`store_info`); a
    SourceError for a missing path or a folder that is not a Zarr store."""
    path = os.fspath(path)
    if remote.is_url(path):
        from pipeline.store.layout import is_store

        return store_info(path) if path.rstrip("/").lower().endswith(".zarr") and is_store(path) else file_info(path)
    if not os.path.lexists(path):
        raise SourceError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        from pipeline.store.layout import is_store

        if not is_store(path):
            raise SourceError(f"{path}: is a directory, not a TIFF file or a Zarr store")
        return store_info(path)
    return file_info(path)


def file_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every series of a TIFF with its levels, dtype, compression, tiles, pixel size or georeference,
    and no data; a series that cannot be used has ``usable: false`` and the ``reason``.

    Reads the directory only, never pixels.
    """
    first = open_source(path)
    infos: list[SourceInfo | str] = []
    for index in range(first.series_count):
        try:
            infos.append(first if index == 0 else open_source(path, series=index))
        except SourceError as err:
            infos.append(str(err).removeprefix(f"{remote.redact(first.path)}: ").removeprefix(f"{first.path}: "))
    masks = {i.ref.mask_series: i.ref.series for i in infos if isinstance(i, SourceInfo) and i.ref.mask_series}
    series = [
        {"index": n, "name": first.series_names[n], "usable": False, "reason": info}
        if isinstance(info, str)
        else _series_info(info, masks.get(n))
        for n, info in enumerate(infos)
    ]
    return {
        **{"kind": "tiff", "path": remote.redact(first.path), "format": first.file_format},
        "file_size_bytes": first.file_size,
        **{"series": series},
    }


def _series_info(info: SourceInfo, mask_of: int | None) -> dict[str, Any]:
    geo, (_, height, width) = info.georeference, info.shape
    nodata = info.ref.nodata
    return {
        **{"index": info.ref.series, "name": info.name, "usable": True, "associated": info.associated},
        **{"mask_of": mask_of, "axes": info.ref.axes, "channels": info.shape[0], "dtype": str(info.dtype)},
        **{"compression": info.compression, "layout": "tiles" if info.tiled else "strips"},
        **{"block_width": info.chunk_shape[1], "block_height": info.chunk_shape[0]},
        **{"alpha_dropped": info.alpha_dropped, "axes_read_at_index_0": info.other_axes},
        "levels": [
            {"level": n, "width": lv.shape[1], "height": lv.shape[0], "downsample": lv.downsample}
            for n, lv in enumerate(info.levels)
        ],
        **_scale_info(info.mpp, geo, info.crs_units),
        "pixel_is_point": None if geo is None else geo.pixel_is_point,
        "corners": None if geo is None or geo.transform is None else _corners(geo.transform, width, height),
        "nodata": nodata if nodata is None or math.isfinite(nodata) else str(nodata),
        "mask_series": info.ref.mask_series,
    }


def _corners(transform: tuple[float, ...], width: int, height: int) -> dict[str, list[float]]:
    """The corners and centre in CRS coordinates (as ``gdalinfo`` lists them), and ``bounds``
    ``[left, bottom, right, top]`` (as ``rio info``)."""
    a, b, c, d, e, f = transform
    at: dict[str, tuple[float, float]] = {"upper_left": (0, 0), "lower_left": (0, height), "upper_right": (width, 0)}
    at.update(lower_right=(width, height), center=(width / 2, height / 2))
    points = {name: [a * col + b * row + c, d * col + e * row + f] for name, (col, row) in at.items()}
    xs, ys = [p[0] for p in points.values()], [p[1] for p in points.values()]
    return {**points, "bounds": [min(xs), min(ys), max(xs), max(ys)]}


def store_info(path: str) -> dict[str, Any]:
    """An fcnpipe output store: complete or unfinished (chunks on disk of all), classes, levels,
    format, the input and model it was made from, its fingerprint, timings. Reads no chunk."""
    from pipeline.store.layout import stored_chunks
    from pipeline.store.reading import open_store

    with warnings.catch_warnings():  # an unfinished run's resume state is a folder zarr does not know
        warnings.simplefilter("ignore", UserWarning)
        store = open_store(path, complete=False)
        on_disk = stored_chunks(path, store.labels[0])
    record, labels, probabilities = store.record, store.labels[0], store.probabilities
    fingerprint = json.dumps(record.fingerprint, sort_keys=True).encode()
    c, y, x = record.input_shape
    return {
        **{"kind": "fcnpipe store", "path": path, "status": "complete" if record.complete else "unfinished"},
        "chunks": {
            **{"total": int(labels.nchunks), "on_disk": on_disk},
            **{"background": int((record.mask or {}).get("chunks_skipped") or 0)},
        },
        **{"format": record.config["output"]["format"], "zarr_format": int(probabilities[0].metadata.zarr_format)},
        **{"dtype": str(probabilities[0].dtype), "labels_dtype": str(labels.dtype)},
        "classes": _classes([k.name for k in record.classes], [k.color for k in record.classes]),
        "levels": [
            {
                **{"level": n, "width": a.shape[-1], "height": a.shape[-2], "chunk_width": a.chunks[-1]},
                **({"shard_width": a.shards[-1]} if a.shards else {}),  # a file per shard of chunks
            }
            for n, a in enumerate(probabilities)
        ],
        **{"tile_px": record.tile, "halo_px": record.halo},
        "input": {
            **{"path": record.input_path, "size_bytes": record.input.get("size_bytes"), "series": record.series},
            **{"level": record.level_read, "width": x, "height": y, "channels": c},
        },
        "model": {
            **{"sha256": record.model_sha256, "architecture": record.model.get("architecture")},
            **{"receptive_radius_px": record.model.get("receptive_radius"), "stride_px": record.model.get("stride")},
        },
        "scale": _scale_info(record.mpp, _StoredGeoreference(record.crs, record.transform), _units(record.crs)),
        "mask": record.mask,
        **{"fingerprint_sha256": hashlib.sha256(fingerprint).hexdigest(), "fingerprint": record.fingerprint},
        **{"fcnpipe_version": record.version, "started": record.started, "finished": record.finished},
        **{"resumed": record.resumed or 0, "timings_s": record.timings_s},
    }


def _units(crs: str | None) -> str | None:
    """The units of an ``EPSG:<code>`` CRS that the code alone tells (UTM zones, Web Mercator)."""
    code = crs.removeprefix("EPSG:") if crs else ""
    return crs_units({"ProjectedCSTypeGeoKey": int(code)}) if code.isdigit() else None


class _StoredGeoreference:
    """The CRS and transform a store records, with the pixel size of :class:`Georeference`."""

    def __init__(self, crs: str | None, transform: tuple[float, ...] | None) -> None:
        self.crs, self.transform = crs, transform
        a, b, _, d, e, _ = transform or (0.0,) * 6
        self.pixel_size = None if transform is None else (math.hypot(a, d), math.hypot(b, e))


def model_info(path: str | os.PathLike[str], factory: str | None = None) -> dict[str, Any]:
    """What a model file holds and the tiling it needs.

    The receptive radius and stride are measured from the network itself (TorchScript included):
    the halo that makes tiled prediction equal a whole-image pass, and the alignment of tiles.
    """
    from pipeline.model.checkpoint import load_model
    from pipeline.model.receptive import measure_tiling

    loaded = load_model(path, factory)
    spec = loaded.spec
    stride, radius, halo = measure_tiling(loaded.module, spec.in_channels, loaded.path)
    norm = spec.normalization
    return {
        **{"path": loaded.path, "sha256": loaded.sha256, "architecture": spec.architecture},
        **{"arguments": dict(spec.arguments or {}), "parameters": sum(p.numel() for p in loaded.module.parameters())},
        "in_channels": spec.in_channels,
        "normalization": {
            "scale": norm.scale,
            "scale_is_dtype_maximum": norm.scale is None,
            **{"mean": None if not norm.mean else list(norm.mean), "std": None if not norm.std else list(norm.std)},
        },
        "classes": _classes(spec.class_names, spec.class_colors),
        **{"receptive_radius_px": radius, "receptive_field_px": 2 * radius + 1, "stride_px": stride, "halo_px": halo},
        **{"trained_micrometres_per_pixel": spec.mpp, "trained_ground_sample_distance": spec.gsd},
        "trained_input_dtype": spec.input_dtype,
    }
