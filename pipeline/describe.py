"""``fcnpipe inspect``: what is in a TIFF, as lines a person reads before a long run."""

from __future__ import annotations

import os

from pipeline.errors import SourceError
from pipeline.source import SourceInfo, open_source


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
