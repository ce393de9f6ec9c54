"""Inputs from object storage and HTTP (:mod:`pipeline.remote`), against real servers on 127.0.0.1:
moto's S3 server and an HTTP server with range requests (tests/servers.py).

The invariants: a URL reads the same pixels and metadata as the file, a run from a URL writes the
same chunk bytes as a run from the file, each file tile is fetched about once, credentials never
appear in anything fcnpipe writes or prints, and a URL that cannot be read gives one line naming it
(without credentials) and leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from pipeline import remote
from pipeline.cli.app import cli
from pipeline.errors import ConfigError, SourceError
from pipeline.source.pixels import clear_reader_caches, read_window
from pipeline.source.tiff import open_source
from pipeline.store.reading import read_record
from tests.conftest import REAL_DATA
from tests.servers import CREDENTIALS, start_http, start_s3, upload

REAL = ["CMU-1-Small-Region.svs", "RGB.byte.tif", "test3-TRITC-2-560.ndpi", "hubmap_multi-channel_pyramid.ome.tif"]
ATTRIBUTES = {".zattrs", ".zarray", ".zgroup", "zarr.json"}


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    with start_s3() as env:
        yield env


@pytest.fixture
def s3_env(s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    clear_reader_caches()
    return s3


@pytest.fixture(scope="module")
def http(real_data_dir: Path) -> Iterator[tuple[str, list[str]]]:
    with start_http(real_data_dir) as served:
        yield served


@pytest.fixture(scope="module")
def real_data_dir() -> Path:
    folder = Path(REAL_DATA)
    if not folder.is_dir():
        pytest.skip(f"{folder}: the shared real files are absent")
    return folder


def chunk_digests(store: Path) -> dict[str, str]:
    """sha256 of every file of a store but its attributes (which name the input) and run state."""
    found = {}
    for parent, folders, names in os.walk(store):
        folders[:] = [f for f in folders if not f.startswith(".fcnpipe")]
        for name in names:
            if name not in ATTRIBUTES:
                path = Path(parent) / name
                found[str(path.relative_to(store))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def everything_written(*places: Path) -> str:
    text = []
    for place in places:
        files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
        text += [p.read_bytes().decode("latin-1") for p in files]
    return "\n".join(text)


@pytest.mark.parametrize("name", REAL)
def test_a_url_reads_the_metadata_and_pixels_of_the_file(
    name: str, s3_env: dict[str, str], http: tuple[str, list[str]], real_data_dir: Path
) -> None:
    upload(s3_env, "slides", {f"in/{name}": real_data_dir / name})
    local = open_source(real_data_dir / name)
    height, width = local.shape[1:]
    box = (height // 3, min(height, height // 3 + 600), width // 4, min(width, width // 4 + 700))
    for url in (f"s3://slides/in/{name}", f"{http[0]}/{name}"):  # same file, two servers
        there = open_source(url)
        assert (there.shape, there.dtype, there.levels, there.mpp) == (
            local.shape,
            local.dtype,
            local.levels,
            local.mpp,
        )
        assert there.georeference == local.georeference and there.file_size == local.file_size
        assert np.array_equal(read_window(there.ref, box), read_window(local.ref, box))


def test_a_window_fetches_its_tiles_in_one_batch_and_each_tile_once(
    s3_env: dict[str, str], real_data_dir: Path
) -> None:
    name = "CMU-1-Small-Region.svs"  # 240 x 240 JPEG tiles
    upload(s3_env, "slides", {name: real_data_dir / name})
    info = open_source(f"s3://slides/{name}")
    ref = type(info.ref)(**{**{f: getattr(info.ref, f) for f in info.ref.__slots__}, "cache_tiles": True})
    read_window(ref, (0, 8, 0, 8))  # opens the level: its directory comes through the block cache
    remote.FETCHED.reset()
    read_window(ref, (0, 720, 0, 960))  # 3 x 4 tiles
    level = open_source(real_data_dir / name)
    assert remote.FETCHED.requests <= 4  # tiles of a row lie together in the file: merged requests
    first = remote.FETCHED.bytes
    read_window(ref, (100, 700, 100, 900))  # inside the same tiles: all in the tile cache
    assert remote.FETCHED.bytes == first
    assert level.file_size > first > 0


def test_run_from_s3_and_http_writes_the_bytes_of_a_run_from_disk(
    s3_env: dict[str, str], http: tuple[str, list[str]], real_data_dir: Path, make_model, tmp_path: Path
) -> None:
    name = "CMU-1-Small-Region.svs"
    upload(s3_env, "slides", {f"a/{name}": real_data_dir / name})
    model = make_model()
    runner = CliRunner()
    common = ["-m", str(model), "--mask", "none", "--no-preview", "-v"]
    outputs = {}
    for label, source in (
        ("disk", str(real_data_dir / name)),
        ("s3", f"s3://slides/a/{name}"),
        ("http", f"http://someone:hunter2-pw@{http[0].removeprefix('http://')}/{name}"),
    ):
        store = tmp_path / f"{label}.zarr"
        result = runner.invoke(cli, ["run", source, "-o", str(store), *common])
        assert result.exit_code == 0, result.output
        outputs[label] = (store, result.output)
    digests = chunk_digests(outputs["disk"][0])
    assert len(digests) > 30
    for label in ("s3", "http"):
        store, output = outputs[label]
        assert chunk_digests(store) == digests
        assert read_record(str(store)).complete
        shown = read_record(str(store)).input_path
        assert shown in (f"s3://slides/a/{name}", f"{http[0]}/{name}")
        assert "read " in output and "over the network" in output
        ratio = float(output.split(" x its ")[0].rsplit("(", 1)[1])
        assert 0.5 < ratio < 1.3, output  # each 240-px JPEG tile fetched about once (the rest: the directory)
        written = everything_written(store, store.with_suffix(".log")) + output
        for secret in (*CREDENTIALS.values(), "hunter2-pw", "someone"):
            assert secret not in written


def test_storage_options_in_yaml_reach_the_tasks_and_are_never_stored(
    s3_env: dict[str, str], real_data_dir: Path, make_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(s3_env, "slides", {"rgb.tif": real_data_dir / "RGB.byte.tif"})
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key)
    secret = "yaml-secret-5d2c"
    options = {"key": "yaml-key", "secret": secret, "endpoint_url": s3_env["AWS_ENDPOINT_URL"]}
    config = tmp_path / "s3.yaml"
    config.write_text(json.dumps({"input": {"storage_options": options}}))
    store = tmp_path / "rgb.zarr"
    args = ["run", "s3://slides/rgb.tif", "-m", str(make_model()), "-o", str(store), "-c", str(config), "--no-preview"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    record = read_record(str(store))
    assert record.complete and record.config["input"]["storage_options"] == dict.fromkeys(options, "<hidden>")
    assert secret not in everything_written(store, store.with_suffix(".log")) + result.output
    remote.configure(None)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("s3://no-such-bucket/slide.svs", "no such bucket"),
        ("s3://slides/no/such.svs", "no such file"),
        ("{http}/forbidden/slide.svs", "access denied"),
        ("{http}/drop/slide.svs", "connection failed"),
        ("{http}/no-such.svs", "no such file"),
        ("{http}/README.md", "not a TIFF file"),
    ],
)
def test_a_url_that_cannot_be_read_gives_one_line_and_no_store(
    where: str, expected: str, s3_env: dict[str, str], http: tuple[str, list[str]], make_model, tmp_path: Path
) -> None:
    upload(s3_env, "slides", {})
    url = where.format(http=http[0].replace("http://", "http://someone:hunter2-pw@"))
    store = tmp_path / "out.zarr"
    result = CliRunner().invoke(cli, ["run", url, "-m", str(make_model()), "-o", str(store)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"fcnpipe: error: {remote.redact(url)}: "), result.output
    assert expected in lines[0] and "hunter2-pw" not in lines[0] and "Traceback" not in result.output
    assert not store.exists()


def test_an_export_or_a_batch_folder_at_a_url_is_refused_before_anything_runs(
    make_model, real_data_dir: Path, tmp_path: Path
) -> None:
    """A run's store may be in S3 (tests/test_remote_store.py); exports and a batch's folder may not."""
    with pytest.raises(ConfigError, match="an export needs a local or shared path"):
        remote.refuse_output("s3://lab/out.tif", "an export")
    image, model = str(real_data_dir / "RGB.byte.tif"), str(make_model())
    for args in (
        ["export", str(tmp_path / "none.zarr"), "-o", "s3://lab/out.tif"],
        ["batch", image, "-o", "s3://lab/"],
    ):
        result = CliRunner().invoke(cli, [*args, "-m", model] if args[0] == "batch" else args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code != 0 and len(lines) == 1 and "needs a local or shared path" in lines[0], result.output


def test_redact_and_reasons_name_no_secret() -> None:
    url = "https://user:pass@host:8443/a/b.svs?X-Amz-Credential=AKIA&X-Amz-Signature=abc"
    assert remote.redact(url) == "https://host:8443/a/b.svs"
    err = OSError(f"failed for {url} with key=AKIA123")
    reason = remote.short_reason(err, url)
    assert "pass" not in reason and "AKIA123" not in reason and "abc" not in reason
    with pytest.raises(SourceError, match=r"^s3://b/k\.tif: cannot read \(no such file\)$"):
        raise remote.remote_error("s3://b/k.tif", FileNotFoundError("b/k.tif"))


@pytest.mark.slow
def test_worker_processes_read_the_url_themselves_and_write_the_same_bytes(
    s3_env: dict[str, str], real_data_dir: Path, make_model, tmp_path: Path
) -> None:
    """Dask worker processes get the task's location, not a handle, and open the URL on their own."""
    upload(s3_env, "slides", {"rgb.tif": real_data_dir / "RGB.byte.tif"})
    model, runner = make_model(), CliRunner()
    stores = [tmp_path / "threads.zarr", tmp_path / "processes.zarr"]
    for store, scheduler in zip(stores, ("threads", "processes"), strict=True):
        args = ["run", "s3://slides/rgb.tif", "-m", str(model), "-o", str(store), "--no-preview"]
        result = runner.invoke(cli, [*args, "--scheduler", scheduler, "--workers", "2"])
        assert result.exit_code == 0, result.output
    assert chunk_digests(stores[0]) == chunk_digests(stores[1])


def test_batch_takes_url_patterns_folders_and_lists(
    s3_env: dict[str, str], http: tuple[str, list[str]], real_data_dir: Path, make_model, tmp_path: Path
) -> None:
    files = {"b/one.tif": real_data_dir / "RGB.byte.tif", "b/sub/two.tif": real_data_dir / "RGB.byte.tif"}
    upload(s3_env, "batch", {**files, "b/notes.txt": real_data_dir / "README.md"})
    assert remote.expand("s3://batch/b/*.tif", (".tif",)) == ["s3://batch/b/one.tif"]
    assert remote.expand("s3://batch/b/**/*.tif", (".tif",)) == ["s3://batch/b/one.tif", "s3://batch/b/sub/two.tif"]
    assert remote.expand("s3://batch/b/", (".tif",)) == ["s3://batch/b/one.tif", "s3://batch/b/sub/two.tif"]
    listed = tmp_path / "inputs.txt"
    listed.write_text(f"s3://batch/b/sub/two.tif\n{http[0]}/CMU-1-Small-Region.svs  # a web server\n")
    outdir = tmp_path / "maps"
    args = ["batch", "s3://batch/b/*.tif", f"@{listed}", "-m", str(make_model()), "-o", str(outdir), "--no-preview"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((outdir / "manifest.json").read_text())
    assert [row["input"] for row in manifest["inputs"]] == [
        "s3://batch/b/one.tif",
        "s3://batch/b/sub/two.tif",
        f"{http[0]}/CMU-1-Small-Region.svs",
    ]
    assert [row["status"] for row in manifest["inputs"]] == ["done"] * 3
    assert sorted(p.name for p in outdir.glob("*.zarr")) == ["CMU-1-Small-Region.zarr", "one.zarr", "two.zarr"]
    assert chunk_digests(outdir / "one.zarr") == chunk_digests(outdir / "two.zarr")


def test_train_reads_images_and_masks_from_urls(s3_env: dict[str, str], make_tiff, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = make_tiff(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8), "img.tif", photometric="rgb")
    mask = make_tiff((rng.random((256, 256)) > 0.5).astype(np.uint8), "mask.tif")
    upload(s3_env, "train", {"img.tif": image, "mask.tif": mask})
    model = tmp_path / "trained.pt"
    args = ["train", "s3://train/img.tif", "--masks", "s3://train/mask.tif", "-o", str(model), "--epochs", "1"]
    result = CliRunner().invoke(cli, [*args, "--patches-per-epoch", "4", "--patch", "32", "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert model.stat().st_size > 0


def test_two_threads_reading_neighbouring_windows_fetch_each_tile_once(
    s3_env: dict[str, str], real_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's two workers read neighbouring windows at the same time, and their halos share file
    tiles: a tile one thread is fetching, the other waits for instead of fetching it again. (Both
    fetched it: over moto's S3 server, slower than HTTP, a run fetched 1.6-1.7 x the file.)"""
    import collections
    import dataclasses
    import threading
    from concurrent.futures import ThreadPoolExecutor

    name = "CMU-1-Small-Region.svs"  # 240 x 240 JPEG tiles, 13 rows of 10
    upload(s3_env, "slides", {f"once/{name}": real_data_dir / name})
    asked: collections.Counter[tuple[int, int]] = collections.Counter()
    fetch = remote.read_ranges

    def counted(url: str, ranges: list[tuple[int, int]], options: object = None) -> list[bytes]:
        asked.update(ranges)
        return fetch(url, ranges, options)  # type: ignore[arg-type]

    monkeypatch.setattr(remote, "read_ranges", counted)
    height, width = open_source(real_data_dir / name).shape[1:]
    core, halo = 480, 8  # a task's window: 2 x 2 file tiles and a halo reaching into the next ones
    windows = [
        (max(0, y - halo), min(height, y + core + halo), max(0, x - halo), min(width, x + core + halo))
        for y in range(0, height, core)
        for x in range(0, width, core)
    ]

    def read_all(threads: int) -> int:
        """Bytes fetched reading every window, ``threads`` neighbouring windows at a time."""
        clear_reader_caches()
        ref = dataclasses.replace(open_source(f"s3://slides/once/{name}").ref, cache_tiles=True)
        read_window(ref, (0, 8, 0, 8))  # opens the level (its directory comes through the block cache)
        asked.clear()
        remote.FETCHED.reset()
        steps = [windows[i : i + threads] for i in range(0, len(windows), threads)]
        barrier = threading.Barrier(threads, timeout=60)

        def worker(side: int) -> None:
            for step in steps:
                barrier.wait()  # neighbours start together, as the run's worker threads do
                if side < len(step):
                    read_window(ref, step[side])

        with ThreadPoolExecutor(threads) as pool:
            for done in [pool.submit(worker, side) for side in range(threads)]:
                done.result()
        return remote.FETCHED.bytes

    alone = read_all(1)  # (more than the tiles: the bytes between a window's rows of tiles come along)
    together = read_all(2)
    again = {span: n for span, n in asked.items() if n > 1}
    assert not again, f"{len(again)} of {len(asked)} tiles fetched more than once"
    assert len(asked) >= 120  # every tile of the level but the first, read on opening it
    assert together <= 1.05 * alone, (together, alone)


def test_a_thread_waiting_for_a_tile_whose_fetch_fails_fetches_it_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    started, fail = threading.Event(), threading.Event()
    calls: list[list[tuple[int, int]]] = []

    def flaky(url: str, ranges: list[tuple[int, int]], options: object = None) -> list[bytes]:
        calls.append(list(ranges))
        if len(calls) == 1:  # the first fetch hangs, then the connection drops
            started.set()
            fail.wait(30)
            raise SourceError(f"{url}: cannot read (connection failed)")
        return [b"t" * count for _, count in ranges]

    monkeypatch.setattr(remote, "read_ranges", flaky)
    url, key = "s3://slides/a.svs", ("s3://slides/a.svs", "etag:1", 0, 7)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(remote.read_once, url, {key: (4096, 5)})
        assert started.wait(30)
        second = pool.submit(remote.read_once, url, {key: (4096, 5)})
        time.sleep(0.3)
        assert len(calls) == 1 and not second.done()  # it waits for the fetch in flight
        fail.set()
        with pytest.raises(SourceError, match="connection failed"):
            first.result()
        assert second.result(timeout=30) == {key: b"ttttt"}  # woken, and fetched it itself
    assert calls == [[(4096, 5)], [(4096, 5)]]
    assert not remote._flights  # nothing left in flight


def test_a_wide_level_keeps_the_rows_its_halos_reach_back_to_fetched(
    make_tiff, make_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The undecoded-tile cache grows with the width of a URL level (ROWS_FETCHED rows of its
    compressed tiles), so that a slide far wider than a fixed cache still fetches each tile once: a
    32768² slide fetched 1.20 x its bytes with a fixed 64 MiB. Here the fixed size is shrunk below
    one row of a small slide's tiles (and the decoded tiles' cache to two), which the growth must
    make up for."""
    from pipeline.source import pixels

    y, x = np.mgrid[0:1536, 0:6144]
    rng = np.random.default_rng(0)
    image = np.stack([(x // 7 + y // 5) % 256, (x // 3) % 256, (y // 2) % 256], axis=-1).astype(np.uint8)
    image = np.clip(image + rng.integers(0, 24, image.shape), 0, 255).astype(np.uint8)
    path = make_tiff(image, "wide.tif", tile=(256, 256), compression="jpeg", photometric="rgb")
    row = path.stat().st_size / 6
    monkeypatch.setattr(pixels.FETCHED_CACHE, "max_bytes", int(row / 2))
    monkeypatch.setattr(pixels.TILE_CACHE, "max_bytes", 2 * 256 * 256 * 3)  # decoded: two tiles, not a row
    clear_reader_caches()
    with start_http(tmp_path) as (server, _):
        log = tmp_path / "wide.log"
        args = ["run", f"{server}/wide.tif", "-m", str(make_model()), "-o", str(tmp_path / "wide.zarr")]
        result = CliRunner().invoke(cli, [*args, "--mask", "none", "--tile", "256", "--no-preview", "--log", str(log)])
    assert result.exit_code == 0, result.output
    tiles = sum(tifffile.TiffFile(path).pages[0].databytecounts)  # type: ignore[union-attr]
    assert pixels.FETCHED_CACHE.max_bytes >= pixels.ROWS_FETCHED * row * 0.9
    assert 0.5 * tiles <= remote.FETCHED.bytes <= 1.05 * tiles, (remote.FETCHED.bytes, tiles)
