"""What a batch shows in the morning: its class areas as manifest columns, and ``report.html``.

``report.html`` is one static page in the batch's output folder, made from ``manifest.json`` alone
(:func:`write_report`), so ``fcnpipe batch`` (as inputs end) and ``fcnpipe report`` (any time
after) write the same page. It needs no server and reaches no network: its CSS and the few lines
of JavaScript that sort its columns (click a heading; ``report.html#sort=N`` opens it sorted by
column N, ``#sort=-N`` descending) are inline, and the only other files it names are the
previews and stores beside it, by relative path. Failed inputs come first, with their one-line
reason; then the others in input order. Every text it shows is escaped.
"""

from __future__ import annotations

import datetime
import html
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.errors import OutputError
from pipeline.files import atomic_write
from pipeline.store.layout import beside

REPORT = "report.html"

AREAS = (("area_mm2", "mm²"), ("area_ha", "ha"), ("area_crs_units2", ""))
"""The area a page shows for a class, in order of preference; ``""``: the manifest's
``pixel_area_unit`` (another CRS's unit squared)."""


def _significant(value: float) -> float:
    return float(f"{value:.9g}")


def class_columns(stats: Mapping[str, Any] | None) -> dict[str, Any]:
    """The manifest columns of a store's class areas (:func:`pipeline.store.reading.class_stats`):
    ``labelled_pixels`` and its areas, then per class ``<name>_pixels``, ``<name>_area_mm2`` (or
    ``_um2``, ``_m2``, ``_ha``, ``_crs_units2``) and ``<name>_share`` (of the labelled pixels).

    >>> from pipeline.store.reading import class_stats
    >>> class_columns(class_stats([3, 1], ["a", "b"], 10, 100.0, "m²"))["a_area_ha"]
    0.03
    """
    if not stats:
        return {}
    columns: dict[str, Any] = {"pixel_area_unit": stats.get("pixel_area_unit")}
    for key, value in stats["labelled"].items():
        columns[f"labelled_{key}"] = value if key == "pixels" else _significant(value)
    for name, values in stats["classes"].items():
        columns[f"{name}_pixels"] = values["pixels"]
        columns.update({f"{name}_{k}": _significant(v) for k, v in values.items() if k.startswith("area_")})
        columns[f"{name}_share"] = _significant(values["share"])
    return columns


def write_report(outdir: str) -> str:
    """Write ``report.html`` in ``outdir`` from its ``manifest.json``, atomically (a page open in a
    browser is never half written); return its path."""
    manifest = os.path.join(outdir, "manifest.json")
    try:
        with open(manifest, encoding="utf-8") as file:
            document = json.load(file)
    except FileNotFoundError as err:
        raise OutputError(f"{outdir}: has no manifest.json; it is not the output folder of fcnpipe batch") from err
    except (OSError, ValueError) as err:
        raise OutputError(f"{manifest}: cannot read the manifest ({type(err).__name__}: {err})") from err
    path = os.path.join(outdir, REPORT)
    atomic_write(path, report_html(document, outdir))
    return path


def _order(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed inputs first, then done and already complete ones, then those still pending; each
    group in input order."""
    rank = {"failed": 0, "pending": 2}
    return sorted(rows, key=lambda row: rank.get(str(row.get("status")), 1))


def _number(value: float) -> str:
    """``1,234.5``, ``12.346``, ``0.0123`` (no exponent below a millionth's precision).

    >>> _number(1234.5), _number(12.34567), _number(0.012345), _number(0)
    ('1,234.5', '12.346', '0.01235', '0')
    """
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.3f}" if abs(value) >= 1 else f"{value:.4g}"


def _area(row: Mapping[str, Any], name: str) -> tuple[float, str] | None:
    """The area of class ``name`` in a row and its unit, or its pixels ``px`` without a scale."""
    for key, unit in AREAS:
        value = row.get(f"{name}_{key}")
        if isinstance(value, int | float):
            return float(value), unit or str(row.get("pixel_area_unit") or "CRS units²")
    pixels = row.get(f"{name}_pixels")
    return (float(pixels), "px") if isinstance(pixels, int | float) else None


def _cell(text: str, sort: object = None, cls: str = "") -> str:
    key = text if sort is None else sort
    attributes = f' data-sort="{html.escape(str(key))}"' + (f' class="{cls}"' if cls else "")
    return f"<td{attributes}>{text}</td>"


def _row(row: Mapping[str, Any], classes: Sequence[str], outdir: str) -> str:
    status, name = str(row.get("status", "")), os.path.basename(str(row.get("input", "")))
    reason = str(row.get("reason") or "")
    what = html.escape(name) + (f'<div class="reason">{html.escape(reason)}</div>' if reason else "")
    cells = [
        _cell(html.escape(status), status, "status"),
        _cell(what, name, "input"),
        _cell(f"{float(row.get('seconds') or 0):.1f}", row.get("seconds") or 0, "num"),
        _cell(f"{float(row.get('megapixels') or 0):.2f}", row.get("megapixels") or 0, "num"),
    ]
    for label in classes:
        area, share = _area(row, label), row.get(f"{label}_share")
        text = "" if area is None else f"{_number(area[0])} {html.escape(area[1])}"
        cells.append(_cell(text, -1 if area is None else area[0], "num"))
        cells.append(_cell("" if share is None else f"{float(share):.1%}", -1 if share is None else share, "num"))
    store = str(row.get("output", ""))
    png = beside(store, ".preview.png")
    link = html.escape(os.path.relpath(png, outdir))
    thumb = f'<a href="{link}"><img src="{link}" alt="preview of {html.escape(name)}"></a>'
    cells.append(_cell(thumb if os.path.isfile(png) else "", name, "preview"))
    there = os.path.isdir(store)
    href = html.escape(os.path.relpath(store, outdir))
    cells.append(_cell(f'<a href="{href}">{html.escape(os.path.basename(store))}</a>' if there else "", store))
    css = html.escape(status.replace(" ", "-"))
    return f'<tr class="{css}">' + "".join(cells) + "</tr>"


def _totals(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> str:
    """The last row: inputs per status, time and megapixels of all, each class's area summed per
    unit and its share of all labelled pixels."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row.get("status"))] = counts.get(str(row.get("status")), 0) + 1
    said = ", ".join(f"{n} {html.escape(status)}" for status, n in counts.items())
    labelled = sum(int(row.get("labelled_pixels") or 0) for row in rows)
    cells = [
        f"<td>total</td><td>{len(rows)} inputs: {said}</td>",
        f'<td class="num">{sum(float(r.get("seconds") or 0) for r in rows):.1f}</td>',
        f'<td class="num">{sum(float(r.get("megapixels") or 0) for r in rows):.2f}</td>',
    ]
    for label in classes:
        sums: dict[str, float] = {}
        for row in rows:
            found = _area(row, label)
            if found is not None:
                sums[found[1]] = sums.get(found[1], 0.0) + found[0]
        text = " + ".join(f"{_number(v)} {html.escape(unit)}" for unit, v in sums.items())
        pixels = sum(int(row.get(f"{label}_pixels") or 0) for row in rows)
        share = f"{pixels / labelled:.1%}" if labelled else ""
        cells.append(f'<td class="num">{text}</td><td class="num">{share}</td>')
    return "<tr>" + "".join(cells) + "<td></td><td></td></tr>"


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.failed td.status { color: #b00020; font-weight: bold; }
tr.done td.status, tr.already-complete td.status { color: #1b5e20; }
.reason { color: #b00020; font-size: 12px; max-width: 40em; }
img { max-width: 160px; max-height: 80px; display: block; }
tfoot td { font-weight: bold; border-top: 2px solid #999; }
"""

SCRIPT = r"""
document.querySelectorAll("#inputs thead th").forEach(function (th, i) {
  th.addEventListener("click", function () {
    var body = document.querySelector("#inputs tbody"), up = th.dataset.order !== "up";
    th.dataset.order = up ? "up" : "down";
    Array.from(body.rows).sort(function (a, b) {
      var x = a.cells[i].dataset.sort, y = b.cells[i].dataset.sort, nx = parseFloat(x), ny = parseFloat(y);
      var order = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
      return up ? order : -order;
    }).forEach(function (row) { body.appendChild(row); });
  });
});
var sorted = /^#sort=(-?)(\d+)$/.exec(location.hash);  // report.html#sort=4 opens sorted by column 4
if (sorted) {
  var th = document.querySelectorAll("#inputs thead th")[+sorted[2]];
  if (th) { th.click(); if (sorted[1]) { th.click(); } }
}
"""


def report_html(document: Mapping[str, Any], outdir: str) -> str:
    """The page of a manifest (``manifest.json`` as loaded) whose stores are in ``outdir``."""
    rows, classes = list(document.get("inputs") or []), [str(c) for c in document.get("classes") or []]
    summary = document.get("summary") or {}
    head = ["status", "input", "time (s)", "Mpx"]
    for label in classes:
        head += [f"{label} area", f"{label} share"]
    head += ["preview", "store"]
    said = ", ".join(f"{v} {k}" for k, v in summary.items() if k != "inputs")
    made = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    title = html.escape(f"fcnpipe batch: {os.path.abspath(outdir)}")
    return "\n".join(
        [
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
            f"<title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>",
            f"<h1>{title}</h1>",
            f'<p id="summary">{summary.get("inputs", len(rows))} inputs: {html.escape(said)}. Written {made}.</p>',
            '<table id="inputs">\n<thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead>",
            "<tbody>\n" + "\n".join(_row(row, classes, outdir) for row in _order(rows)) + "\n</tbody>",
            f"<tfoot>{_totals(rows, classes)}</tfoot>\n</table>",
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n",
        ]
    )
