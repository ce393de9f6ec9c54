"""``fcnpipe inspect``: what is in a TIFF, as lines a person reads before a long run."""

from __future__ import annotations

import os

from pipeline.errors import SourceError
from pipeline.source.tiff import SourceInfo, open_source


def describe_file(path: str | os.PathLike[str]) -> list[str]:
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


def describe_model(path: str | os.PathLike[str], factory: str | None = None) -> list[str]:
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
