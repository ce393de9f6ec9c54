"""The morning report: manifest columns of the class areas, and report.html, checked as written and
as a real browser (headless Chromium, from disk, no network) renders it."""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from tests.conftest import debian_tool, random_image

FIXED = ["--tile", "64", "--workers", "2", "--torch-threads", "1", "--no-progress"]
BAD = "bad<i>&amp;.tif"
"""A broken input whose name is markup: the page must show it as text."""


@pytest.fixture
def batch(make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path) -> Path:
    """The output folder of a batch of two good images and a broken one (listed last)."""
    a = make_tiff(random_image((150, 200, 3), seed=1), "a.tif", photometric="rgb", tile=(64, 64))
    b = make_tiff(random_image((90, 130, 3), seed=2), "b.tif", photometric="rgb")
    bad = tmp_path / BAD
    bad.write_bytes(b"II*\x00 not really a TIFF")
    outdir = tmp_path / "out"
    done = CliRunner().invoke(
        cli, ["batch", str(a), str(b), str(bad), "-m", str(make_model()), "-o", str(outdir), *FIXED]
    )
    assert done.exit_code == 1, done.output  # one input failed
    assert f"report  {outdir / 'report.html'}" in done.output
    return outdir


class Table(HTMLParser):
    """The rows of the page's table: each cell's text, ``data-sort``, and the images and links in it."""

    def __init__(self) -> None:
        super().__init__()
        self.part = ""
        self.rows: dict[str, list[list[dict[str, Any]]]] = {"thead": [], "tbody": [], "tfoot": []}
        self.cell: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in self.rows:
            self.part = tag
        elif tag == "tr" and self.part:
            self.rows[self.part].append([])
        elif tag in ("td", "th") and self.part:
            self.cell = {"text": "", "sort": values.get("data-sort"), "img": [], "a": [], "tags": []}
            self.rows[self.part][-1].append(self.cell)
        elif self.cell is not None:
            self.cell["tags"].append(tag)
            if tag == "img":
                self.cell["img"].append(values.get("src"))
            if tag == "a":
                self.cell["a"].append(values.get("href"))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self.cell = None
        elif tag in self.rows:
            self.part = ""

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell["text"] += data


def table(page: str) -> Table:
    parsed = Table()
    parsed.feed(page)
    return parsed


def test_the_manifest_has_pixels_areas_and_shares_per_class(batch: Path) -> None:
    document = json.loads((batch / "manifest.json").read_text())
    assert document["classes"] == ["class_0", "class_1", "class_2"]
    rows = {Path(row["input"]).name: row for row in document["inputs"]}
    with open(batch / "manifest.csv", newline="") as file:
        header = next(csv.reader(file))
    for name in ("class_0", "class_1", "class_2"):
        assert {f"{name}_pixels", f"{name}_share"} <= set(header) <= set(rows["a.tif"])
    assert rows["a.tif"]["labelled_pixels"] == 150 * 200
    assert sum(rows["a.tif"][f"class_{k}_pixels"] for k in range(3)) == 150 * 200
    assert "class_0_pixels" not in rows[BAD] and rows[BAD]["status"] == "failed"


def test_the_page_lists_failed_inputs_first_escapes_names_and_adds_up(batch: Path) -> None:
    page = (batch / "report.html").read_text()
    assert "<script src" not in page and "http" not in page.replace("http-equiv", "")  # nothing fetched
    parsed = table(page)
    body = parsed.rows["tbody"]
    assert [row[0]["text"] for row in body] == ["failed", "done", "done"]
    assert body[0][1]["text"].startswith(BAD) and "i" not in body[0][1]["tags"]  # shown, not obeyed
    assert [row[1]["text"] for row in body[1:]] == ["a.tif", "b.tif"]
    for row in body[1:]:
        (src,) = row[-2]["img"]
        assert (batch / src).is_file() and src.endswith(".preview.png") and row[-2]["a"] == [src]
        assert (batch / row[-1]["a"][0]).is_dir()
    rebuilt = CliRunner().invoke(cli, ["report", str(batch)])
    assert rebuilt.exit_code == 0 and table((batch / "report.html").read_text()).rows == parsed.rows


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess[str]:
    """Headless Chromium, offline: its own profile, no extensions, no background requests."""
    command = [debian_tool("chromium"), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    command += ["--disable-extensions", "--disable-background-networking", "--disable-sync", "--mute-audio"]
    command += [f"--user-data-dir={user_data}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)


@pytest.mark.slow
def test_chromium_renders_the_report_from_disk(batch: Path, tmp_path: Path) -> None:
    url = (batch / "report.html").as_uri()
    dom = chromium("--dump-dom", url, user_data=tmp_path / "profile").stdout
    parsed = table(dom)
    head = [cell["text"] for cell in parsed.rows["thead"][0]]
    body = parsed.rows["tbody"]
    assert head[:4] == ["status", "input", "time (s)", "Mpx"] and "class_2 area" in head
    assert [row[0]["text"] for row in body] == ["failed", "done", "done"]
    manifest = {Path(r["input"]).name: r for r in json.loads((batch / "manifest.json").read_text())["inputs"]}
    a = next(row for row in body if row[1]["text"] == "a.tif")
    assert a[3]["text"] == f"{manifest['a.tif']['megapixels']:.2f}"
    area = head.index("class_2 area")
    assert float(a[area]["sort"]) == pytest.approx(manifest["a.tif"]["class_2_pixels"])  # no scale: in pixels
    assert a[area + 1]["text"] == f"{manifest['a.tif']['class_2_share']:.1%}"
    total = parsed.rows["tfoot"][0]
    assert "3 inputs: 2 done, 1 failed" in total[1]["text"]
    pixels = sum(manifest[n]["class_2_pixels"] for n in ("a.tif", "b.tif"))
    assert total[area]["text"] == f"{pixels:,.1f} px"
    sorted_dom = chromium("--dump-dom", url + "#sort=-3", user_data=tmp_path / "profile").stdout  # by Mpx, descending
    assert [row[1]["sort"] for row in table(sorted_dom).rows["tbody"]] == ["a.tif", "b.tif", BAD]
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,800", url, user_data=tmp_path / "profile")
    pixels_rgb = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels_rgb.shape == (800, 1200, 3)
    assert len(np.unique(pixels_rgb.reshape(-1, 3), axis=0)) > 50 and pixels_rgb.std() > 10  # text and thumbnails
