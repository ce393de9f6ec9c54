"""A PNG preview of a run: the input beside its class colours, with a legend, all small.

:func:`write_store_preview` previews a finished (or partial) output store, never reading a
full-resolution array at once: :func:`label_thumbnail` keeps every ``stride``-th pixel of each chunk
of a 2-D Zarr array (memory: one chunk plus the thumbnail; chunks without a sampled pixel are not
read), :func:`source_thumbnail` reads the smallest large enough pyramid level, window by window.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline import files
from pipeline.errors import ConfigError, OutputError, SourceError
from pipeline.source.pixels import read_window
from pipeline.source.tiff import SourceInfo, open_source
from pipeline.store.layout import NODATA_LABEL, beside
from pipeline.store.reading import StoreReader, open_store

LABEL_ALPHA = 0.45  # opacity of the class colours over the input: classes read at a glance, tissue shows
_GAP = 8  # px of white between the two panels
_UNKNOWN_COLOR = (255, 0, 255)  # labels without a colour show as magenta
_WINDOW = 2048  # px, side of the windows a thumbnail is read in
_INK, _MUTED, _OUTLINE, _WHITE = (0, 0, 0), (90, 90, 90), (64, 64, 64), (255, 255, 255)
INCOMPLETE_COLOR = (200, 0, 0)  # fill of the legend's INCOMPLETE banner
BACKGROUND_NAMES = frozenset({"background", "bg", "glass", "no tissue", "unlabelled", "unlabeled"})
"""Class names drawn like no data, as the input (white swatch): coloured, the background of computed
chunks would differ from skipped ones (a staircase along the chunk grid)."""
_INCOMPLETE_NOTE = "INCOMPLETE: the run did not finish; areas not predicted yet have no colour"
Entry = tuple[tuple[int, int, int], str]  # a legend entry: swatch colour, text


def stride_for(shape: Sequence[int], max_size: int) -> int:
    """Smallest step that brings the largest side of ``shape`` to at most ``max_size`` pixels.

    >>> stride_for((8192, 4000), 1024), stride_for((1000, 600), 1024), stride_for((1025, 10), 1024)
    (8, 1, 2)
    """
    if max_size < 1:
        raise ConfigError(f"Expected a positive thumbnail size. Got {max_size} instead.")
    return max(1, math.ceil(max(shape) / max_size))


def label_thumbnail(array: Any, max_size: int = 1024) -> np.ndarray:
    """``array[::s, ::s]`` of a 2-D (Zarr) array, read chunk by chunk, with ``s`` from :func:`stride_for`.

    ``array`` needs ``shape``, ``dtype`` and basic slicing, and is read in its ``chunks`` (a zarr.Array;
    a NumPy array in 1024 x 1024 blocks). The result has ``ceil(Y / s) x ceil(X / s)`` pixels."""
    return _read_labels(array, max_size, count=False)[0]


def label_summary(array: Any, max_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """:func:`label_thumbnail` of a uint8 label map, and the ``(256,)`` int64 count of each value.

    The counts cover every pixel, so every chunk is read (one at a time): pass a level near the size.

    >>> thumbnail, counts = label_summary(np.array([[0, 1, 1], [255, 1, 2]], np.uint8), max_size=2)
    >>> thumbnail.tolist(), counts[[0, 1, 2, 255]].tolist()
    ([[0, 1]], [1, 3, 1, 1])
    """
    if np.dtype(array.dtype) != np.uint8:
        raise ConfigError(f"Expected a uint8 label map. Got {array.dtype} instead.")
    return _read_labels(array, max_size, count=True)


def _read_labels(array: Any, max_size: int, count: bool) -> tuple[np.ndarray, np.ndarray]:
    """The strided thumbnail and, with ``count``, the value counts of every pixel (else zeros)."""
    height, width = array.shape
    chunk_y, chunk_x = getattr(array, "chunks", None) or (1024, 1024)
    stride = stride_for((height, width), max_size)
    out = np.zeros((-(-height // stride), -(-width // stride)), dtype=array.dtype)
    counts = np.zeros(256, np.int64)
    for y0 in range(0, height, chunk_y):
        y1 = min(y0 + chunk_y, height)
        rows = _sampled(y0, y1, stride)
        for x0 in range(0, width, chunk_x):
            x1 = min(x0 + chunk_x, width)
            cols = _sampled(x0, x1, stride)
            if not count and (rows is None or cols is None):
                continue  # a chunk with no sampled pixel is never read
            block = np.asarray(array[y0:y1, x0:x1])
            if count:
                counts += np.bincount(block.ravel(), minlength=256)
            if rows is not None and cols is not None:
                out[rows[1], cols[1]] = block[rows[0], cols[0]]
    return out, counts


def _sampled(start: int, stop: int, stride: int) -> tuple[slice, slice] | None:
    """Where the multiples of ``stride`` in ``[start, stop)`` lie: in the block, and in the thumbnail.

    >>> _sampled(10, 20, 4)
    (slice(2, 10, 4), slice(3, 5, None))
    >>> _sampled(9, 11, 4) is None
    True
    """
    first = -(-start // stride) * stride
    if first >= stop:
        return None
    count = -(-(stop - first) // stride)
    return slice(first - start, stop - start, stride), slice(first // stride, first // stride + count)


def preview_level(levels: Sequence[tuple[int, int]], max_size: int) -> int:
    """The smallest level whose larger side is at least ``max_size``, else level 0 (the largest).

    >>> preview_level([(8192, 8192), (4096, 4096), (2048, 2048), (1024, 1024)], 1024), preview_level([(800, 600)], 1024)
    (3, 0)
    """
    large_enough = [index for index, shape in enumerate(levels) if max(shape) >= max_size]
    return min(large_enough, key=lambda index: max(levels[index])) if large_enough else 0


def source_thumbnail(
    info: SourceInfo, max_size: int = 1024, box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """``(3, h, w)`` uint8 thumbnail of the input (or of its ``box`` ``(y0, y1, x0, x1)`` of the level
    opened: a window run's), largest side at most ``max_size`` pixels.

    Reads the level :func:`preview_level` picks, in windows of about 2048 px, keeping every
    ``stride``-th pixel. Grey is repeated to three channels, two channels get a zero third, more
    than three keep the first three; non-uint8 data is scaled by the thumbnail's own min and max.
    """
    (oy, ox), boxes = info.levels[info.ref.level].shape, []
    for height, width in (level.shape for level in info.levels):  # the box scaled to every level
        y0, y1, x0, x1 = box or (0, oy, 0, ox)
        top, left = int(y0 * height / oy), int(x0 * width / ox)
        bottom, right = min(height, math.ceil(y1 * height / oy)), min(width, math.ceil(x1 * width / ox))
        boxes.append((top, max(top + 1, bottom), left, max(left + 1, right)))
    level = preview_level([(b[1] - b[0], b[3] - b[2]) for b in boxes], max_size)
    ref = replace(info.ref, level=level)
    top, bottom, left, right = boxes[level]
    stride = stride_for((bottom - top, right - left), max_size)
    step = -(-_WINDOW // stride) * stride  # a multiple of the stride, so every window starts on a sample
    out = np.zeros((info.shape[0], -(-(bottom - top) // stride), -(-(right - left) // stride)), dtype=info.dtype)
    for y0 in range(top, bottom, step):
        y1 = min(y0 + step, bottom)
        for x0 in range(left, right, step):
            x1 = min(x0 + step, right)
            window = read_window(ref, (y0, y1, x0, x1))[:, ::stride, ::stride]
            ty, tx = (y0 - top) // stride, (x0 - left) // stride
            out[:, ty : ty + window.shape[1], tx : tx + window.shape[2]] = window
    return to_rgb8(out)


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """``(C, h, w)`` of any dtype -> ``(3, h, w)`` uint8 for display.

    >>> to_rgb8(np.array([[[0, 512, 1024]]], dtype=np.uint16)).tolist()
    [[[0, 128, 255]], [[0, 128, 255]], [[0, 128, 255]]]
    """
    if image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    elif image.shape[0] == 2:
        image = np.concatenate([image, np.zeros_like(image[:1])])
    image = image[:3]
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    data = image.astype(np.float64)
    finite = data[np.isfinite(data)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scaled = (np.nan_to_num(data, nan=low) - low) * (255.0 / (high - low) if high > low else 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def colorize(labels: np.ndarray, colors: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """``(h, w)`` class indices -> ``(h, w, 3)`` uint8 colours; indices without a colour are magenta."""
    palette = np.tile(np.asarray(_UNKNOWN_COLOR, np.uint8), (256, 1))
    palette[: len(colors)] = np.asarray(colors, np.uint8).reshape(-1, 3)[:256]
    return palette[labels.astype(np.uint8)]


def resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes of ``image`` to ``height x width``."""
    rows = np.arange(height) * image.shape[0] // height
    cols = np.arange(width) * image.shape[1] // width
    out: np.ndarray = image[rows[:, None], cols[None, :]]
    return out


def _side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two ``(h, w, 3)`` uint8 panels, 8 white columns apart: ``(h, 2 w + 8, 3)``."""
    return np.concatenate([left, np.full((left.shape[0], _GAP, 3), 255, np.uint8), right], axis=1)


def _write_png(png_path: str | os.PathLike[str], canvas: np.ndarray) -> str:
    """Encode ``canvas`` (``(H, W, 3)`` uint8) as a PNG at ``png_path``, whole or not at all (beside a
    store in S3: one PUT); return the path."""
    path, encoded = os.fspath(png_path), io.BytesIO()
    Image.fromarray(canvas).save(encoded, format="PNG")
    try:
        files.put(path, encoded.getvalue())
    except OSError as err:
        raise OutputError(f"{path}: cannot write the preview ({err.strerror or err})") from err
    return path


@dataclass(frozen=True)
class StoreSummary:
    """What a preview needs from an output store: its ``fcnpipe`` attribute and label pyramid."""

    input_path: str
    series: int
    level: int
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    complete: bool
    label_shapes: tuple[tuple[int, int], ...]
    """``(Y, X)`` of ``labels/argmax/0``, ``1``, ... in pixels."""
    input_shape: tuple[int, int]
    """``(Y, X)`` of the level the run read: the labels' own, or other where the run resampled."""
    window: tuple[int, int, int, int] | None = None
    """``(y0, y1, x0, x1)`` of that level that a window run computed."""


def default_preview_path(store_path: str | os.PathLike[str]) -> str:
    """Where ``fcnpipe run`` puts a store's preview: beside it, ``.zarr`` replaced by ``.preview.png``.

    >>> default_preview_path("/data/slide1.zarr/"), default_preview_path("out")
    ('/data/slide1.preview.png', 'out.preview.png')
    """
    return beside(store_path, ".preview.png")


def write_store_preview(
    store_path: str | os.PathLike[str], png_path: str | os.PathLike[str], max_size: int = 1024
) -> str:
    """Write a PNG that shows at a glance what a run predicted; return ``png_path`` as a string.

    With ``h x w`` the input's thumbnail (:func:`source_thumbnail` of the run's series and level,
    largest side at most ``max_size``), the PNG is ``(h + legend height) x max(2 w + 8, legend
    width)`` RGB: rows ``0:h`` hold the thumbnail in columns ``0:w`` and, in ``w + 8 : 2 w + 8``,
    the labels in class colours over it (:func:`blend_labels`: no-data pixels stay the thumbnail);
    below, the :func:`render_legend` (a red INCOMPLETE banner if the run did not finish, a swatch,
    name and share of labelled pixels per class). Labels are read one chunk at a time from the
    :func:`readable_level`, near ``max_size`` a side; the shares count every pixel of it.

    If the input cannot be read (moved, deleted or resized: stores are often copied away from
    their inputs), the one ``h x w`` panel is the labels in full colour on white, and the legend
    says why. Raises OutputError naming ``store_path`` if it is not an fcnpipe store.
    """
    reader, summary = read_store_summary(store_path)
    level = readable_level(reader, summary, max_size)
    labels, counts = label_summary(reader.labels[level], max_size)
    thumbnail, note = _input_thumbnail(summary, max_size)
    image = np.full((*labels.shape, 3), 255, np.uint8) if thumbnail is None else np.moveaxis(thumbnail, 0, -1)
    labels = resize_nearest(labels, *image.shape[:2])
    clear = background_classes(summary.class_names) if thumbnail is not None else []
    overlay = blend_labels(image, labels, summary.class_colors, 1.0 if thumbnail is None else LABEL_ALPHA, clear)
    panels = overlay if thumbnail is None else _side_by_side(image, overlay)
    title, entries = _legend_text(summary, level, counts, with_input=thumbnail is not None)
    font_px = int(np.clip(max(labels.shape) // 40, 12, 32))
    legend = render_legend(panels.shape[1], font_px, title, entries, [note] if note else [], not summary.complete)
    panels = np.pad(panels, ((0, 0), (0, legend.shape[1] - panels.shape[1]), (0, 0)), constant_values=255)
    return _write_png(png_path, np.concatenate([panels, legend]))


def read_store_summary(store_path: str | os.PathLike[str]) -> tuple[StoreReader, StoreSummary]:
    """An fcnpipe output store, finished or not, opened for reading, and its :class:`StoreSummary`."""
    reader = open_store(os.fspath(store_path), complete=False)
    record = reader.record
    return reader, StoreSummary(
        input_path=record.input_path,
        series=record.series,
        level=record.level_read,
        class_names=tuple(c.name for c in record.classes),
        class_colors=tuple(c.color for c in record.classes),
        complete=record.complete,
        label_shapes=tuple((int(a.shape[0]), int(a.shape[1])) for a in reader.labels),
        input_shape=record.input_shape[1:],
        window=record.window,
    )


def readable_level(reader: StoreReader, summary: StoreSummary, max_size: int) -> int:
    """The label level to preview: :func:`preview_level`'s, or a finer one for an unfinished run.

    Coarse levels are built after level 0 is done, so a run stopped early left them empty or partly
    written: then the coarsest level at most :func:`preview_level`'s whose share of written chunks
    is at least level 0's is read (else level 0): slower, but it shows all that was predicted.
    """
    preferred = preview_level(summary.label_shapes, max_size)
    if summary.complete:
        return preferred
    written = [reader.written(level) for level in range(preferred + 1)]  # all-no-data chunks are not stored
    return next((level for level in range(preferred, 0, -1) if written[level] >= written[0]), 0)


def _input_thumbnail(summary: StoreSummary, max_size: int) -> tuple[np.ndarray | None, str]:
    """The input's ``(3, h, w)`` uint8 thumbnail and ``""``, or None and a note saying why not."""
    try:
        source = open_source(summary.input_path, summary.series, summary.level)
        if source.shape[1:] != summary.input_shape:  # resampled runs read a level of another size
            return None, f"input not shown: {source.path} is now {source.shape[1]} x {source.shape[2]} px"
        return source_thumbnail(source, max_size, summary.window), ""
    except SourceError as err:
        return None, f"input not shown: {err}"


def blend_labels(
    image: np.ndarray,
    labels: np.ndarray,
    colors: Sequence[tuple[int, int, int]],
    alpha: float = LABEL_ALPHA,
    clear: Sequence[int] = (),
) -> np.ndarray:
    """``(h, w, 3)`` uint8 ``image`` with ``(h, w)`` ``labels`` coloured over it at opacity ``alpha``.

    A pixel becomes ``rint((1 - alpha) * image + alpha * colour)``; a no-data pixel (label 255) and
    a pixel of a ``clear`` class (the background, :func:`background_classes`) keep the image's
    value, so they look as they do in the input, and alike.

    >>> image, labels = np.full((1, 3, 3), 100, np.uint8), np.array([[0, 255, 1]])
    >>> blend_labels(image, labels, [(200, 0, 0), (0, 0, 200)], 0.5, clear=[1]).tolist()
    [[[150, 50, 50], [100, 100, 100], [100, 100, 100]]]
    """
    blended = image.astype(np.float64) * (1.0 - alpha) + colorize(labels, colors).astype(np.float64) * alpha
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    shown = np.isin(labels, [NODATA_LABEL, *clear])
    out[shown] = image[shown]
    return out


def background_classes(names: Sequence[str]) -> list[int]:
    """Indices of the classes named as background (:data:`BACKGROUND_NAMES`, any case).

    >>> background_classes(["Background", "stroma", "glass"])
    [0, 2]
    """
    return [index for index, name in enumerate(names) if name.strip().lower() in BACKGROUND_NAMES]


def class_shares(counts: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of each class among the labelled pixels (label < 255), from :func:`label_summary`'s counts.

    >>> class_shares(np.bincount([0, 1, 1, 1, 255, 255], minlength=256), 3).tolist()
    [0.25, 0.75, 0.0]
    """
    labelled = int(counts[:NODATA_LABEL].sum())
    shares: np.ndarray = counts[:num_classes] / labelled if labelled else np.zeros(num_classes)
    return shares


def _legend_text(summary: StoreSummary, level: int, counts: np.ndarray, with_input: bool) -> tuple[str, list[Entry]]:
    """The legend's title line and its (colour, "name  share") entries, each swatch as the class is
    drawn: a background class over the input is not coloured, and its swatch is white."""
    name = os.path.basename(summary.input_path)[:60]
    (height, width), (level_y, level_x) = summary.label_shapes[0], summary.label_shapes[level]
    labelled = counts[:NODATA_LABEL].sum() / max(1, counts.sum())
    title = f"{name}: {width} x {height} px (width x height); labels level {level} ({level_x} x {level_y} px), "
    title += f"{labelled:.1%} labelled"
    shares = class_shares(counts, len(summary.class_names))
    texts = [
        f"{name}  {share:.1%}" if share >= 0.001 or not share else f"{name}  <0.1%"
        for name, share in zip(summary.class_names, shares, strict=True)
    ]
    clear = background_classes(summary.class_names) if with_input else []
    entries = [
        (_WHITE, f"{text}  (not coloured: as the input)") if index in clear else (color, text)
        for index, (color, text) in enumerate(zip(summary.class_colors, texts, strict=True))
    ]
    return title, entries


def render_legend(
    width: int, font_px: int, title: str, entries: Sequence[Entry], notes: Sequence[str] = (), incomplete: bool = False
) -> np.ndarray:
    """``(L, W, 3)`` uint8 legend on white, ``W = max(width, what its text needs)`` pixels.

    Lines of ``font_px`` text ``1.6 font_px`` apart in a ``font_px`` margin: ``title``, ``notes`` in
    grey, a white-on-:data:`INCOMPLETE_COLOR` banner if ``incomplete``, then the (colour, text)
    ``entries`` behind ``font_px`` swatches with a dark outline, in as many columns as fit.
    """
    font = ImageFont.load_default(size=font_px)
    pad, line = font_px, round(1.6 * font_px)  # the swatches are pad x pad
    lines = [(title, _INK), *((note, _MUTED) for note in notes), *([(_INCOMPLETE_NOTE, _WHITE)] if incomplete else [])]
    column = 2 * pad + pad // 2 + math.ceil(max((font.getlength(text) for _, text in entries), default=0))
    needed = max(column, *(math.ceil(font.getlength(text)) + pad for text, _ in lines))
    width = max(width, needed + 2 * pad)
    columns = max(1, min(len(entries), (width - 2 * pad) // column))
    image = Image.new("RGB", (width, 2 * pad + line * (len(lines) - (-len(entries) // columns))), _WHITE)
    draw = ImageDraw.Draw(image)
    for index, (text, ink) in enumerate(lines):
        y = pad + index * line
        if ink == _WHITE:  # the INCOMPLETE banner: white on red
            draw.rectangle((pad, y - line // 5, pad + needed, y + line - line // 5), fill=INCOMPLETE_COLOR)
        draw.text((pad + (pad // 2 if ink == _WHITE else 0), y), text, fill=ink, font=font)
    for index, (color, text) in enumerate(entries):
        x, y = pad + (index % columns) * column, pad + (len(lines) + index // columns) * line
        draw.rectangle((x, y, x + pad, y + pad), fill=tuple(color), outline=_OUTLINE)
        draw.text((x + pad + pad // 2, y), text, fill=_INK, font=font)
    return np.asarray(image)
