"""Stores written to object storage (``-o s3://bucket/OUT.zarr``), against moto's real S3 server on
127.0.0.1 (tests/servers.py).

The invariants: a store in S3 holds the bytes of the same run on disk, object by object; a run
killed with SIGKILL resumes against S3 to the same bytes; a second writer is refused while the
first holds the store's lease, and a lease whose holder is gone is taken over; a Dask scheduler
with two worker processes whose only shared storage is the S3 server writes the same bytes; a URL
that cannot hold a store, a missing bucket or refused credentials give one line naming the URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import files
from pipeline.cli.app import cli
from pipeline.source.pixels import clear_reader_caches
from pipeline.store import safety
from pipeline.store.reading import open_store
from tests.conftest import slide_and_model
from tests.servers import CREDENTIALS, s3_client, start_s3, upload
from tests.test_distributed import Cluster
from tests.test_resume import FIXED

ATTRIBUTES = {".zattrs", ".zarray", ".zgroup", "zarr.json"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    with start_s3() as env:
        upload(env, "maps", {})
        yield env


@pytest.fixture
def s3_env(s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    clear_reader_caches()
    return s3


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return slide_and_model(tmp_path_factory.mktemp("slide"), seed=3, size=1024)


def objects(env: dict[str, str], bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (a store's folder), by its path below it."""
    client, found, token = s3_client(env), {}, None
    while True:
        page = client.list_objects_v2(
            Bucket=bucket, Prefix=prefix.rstrip("/") + "/", **({"ContinuationToken": token} if token else {})
        )
        for item in page.get("Contents", []):
            key = item["Key"]
            found[key[len(prefix.rstrip("/")) + 1 :]] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        token = page.get("NextContinuationToken")
        if not token:
            return found


def local_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()}


def chunks(found: dict[str, bytes]) -> dict[str, str]:
    """sha256 of each chunk (or shard) file, attributes and run state left out."""
    return {
        name: hashlib.sha256(data).hexdigest()
        for name, data in found.items()
        if name.rsplit("/", 1)[-1] not in ATTRIBUTES and not name.startswith(".fcnpipe")
    }


def fcnpipe(*args: str, env: dict[str, str], **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,  # type: ignore[call-overload]
    )


@pytest.mark.parametrize("form", ["ome-zarr-0.4", "ome-zarr-0.5-shard"])
def test_a_store_in_s3_holds_the_bytes_of_the_store_on_disk(
    form: str, s3_env: dict[str, str], slide: tuple[Path, Path], tmp_path: Path
) -> None:
    image, model = slide
    extra = ["--format", "ome-zarr-0.5", "--shard", "2"] if form.endswith("shard") else ["--format", form]
    local = tmp_path / "disk.zarr"
    url = f"s3://maps/{form}/slide.zarr"
    runner = CliRunner()
    for target in (str(local), url):
        result = runner.invoke(cli, ["run", str(image), "-m", str(model), "-o", target, "--tile", "256", *extra])
        assert result.exit_code == 0, result.output
    stored, on_disk = objects(s3_env, "maps", f"{form}/slide.zarr"), local_files(local)
    assert chunks(stored) == chunks(on_disk) and len(chunks(stored)) >= 8
    assert sorted(stored) == sorted(on_disk)  # the same metadata files too, and no run state left
    for name in stored:  # metadata byte for byte, but the record of each run (its own timings, paths)
        if name.endswith((".zarray", ".zgroup")) or (name.endswith("zarr.json") and "/" in name):
            assert stored[name] == on_disk[name], name
    reader = open_store(url, complete=True)  # fcnpipe reads it back from S3: complete, with its stats
    assert reader.record.complete and reader.record.stats == open_store(str(local), complete=True).record.stats
    assert not safety.done_tasks(url) and not files.exists(url + ".lock")  # no markers, no lease left
    beside = objects(s3_env, "maps", form)
    assert "slide.preview.png" in beside and beside["slide.preview.png"].startswith(b"\x89PNG")
    assert b"complete in" in beside["slide.log"]
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"].encode() not in b"".join(stored.values()) + beside["slide.log"]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_against_s3_to_the_same_bytes(s3_env: dict[str, str], tmp_path: Path) -> None:
    image, model = slide_and_model(tmp_path, seed=5, size=2048)
    args = ["run", str(image), "-m", str(model), *FIXED, "--tile", "256"]
    whole = CliRunner().invoke(cli, [*args, "-o", "s3://maps/whole.zarr"])
    assert whole.exit_code == 0, whole.output
    url = "s3://maps/killed.zarr"
    process = fcnpipe(*args, "-o", url, env=s3_env)
    deadline = time.monotonic() + 120
    while len(safety.done_tasks(url)) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = safety.done_tasks(url)
    assert done and not open_store(url, complete=False).record.complete
    second = CliRunner().invoke(cli, [*args, "-o", url])  # the lease's holder is gone: taken over at once
    assert second.exit_code != 0 and "--resume" in second.output, second.output
    resumed = CliRunner().invoke(cli, [*args, "-o", url, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    log = s3_client(s3_env).get_object(Bucket="maps", Key="killed.log")["Body"].read().decode()
    assert f"resuming, {len(done)} tasks done" in log
    assert chunks(objects(s3_env, "maps", "killed.zarr")) == chunks(objects(s3_env, "maps", "whole.zarr"))


def test_a_second_writer_is_refused_while_the_lease_is_held(
    s3_env: dict[str, str], slide: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    image, model = slide
    url = "s3://maps/leased.zarr"
    client = s3_client(s3_env)
    holder = {"host": "another-node", "pid": 4242, "expires": time.time() + 300}
    client.put_object(Bucket="maps", Key="leased.zarr.lock", Body=json.dumps(holder).encode())
    result = CliRunner().invoke(cli, ["run", str(image), "-m", str(model), "-o", url])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "another fcnpipe process (pid 4242 on another-node) is writing to it" in lines[0]
    assert not files.exists(url)  # nothing was written
    holder["expires"] = time.time() - 1  # its holder stopped renewing it: taken over
    client.put_object(Bucket="maps", Key="leased.zarr.lock", Body=json.dumps(holder).encode())
    with safety.store_lock(url):
        taken = json.loads(client.get_object(Bucket="maps", Key="leased.zarr.lock")["Body"].read())
        assert taken["pid"] == os.getpid() and taken["expires"] > time.time() + 60
        other = fcnpipe("run", str(image), "-m", str(model), "-o", url, env=s3_env)  # a live process of this host
        output = other.communicate(timeout=120)[0].decode()
        assert other.returncode != 0 and f"another fcnpipe process (pid {os.getpid()} on " in output, output
    assert not files.exists(url + ".lock")  # released at the end
    monkeypatch.setattr(safety, "RENEW_SECONDS", 0.05)  # a lease another writer took is noticed
    with safety.store_lock(url):
        client.put_object(Bucket="maps", Key="leased.zarr.lock", Body=b'{"pid": 1, "host": "thief"}')
        time.sleep(0.5)
        with pytest.raises(safety.LeaseLost, match="is not marked complete"):
            safety.check_lease(url)
    assert client.get_object(Bucket="maps", Key="leased.zarr.lock")["Body"].read() == b'{"pid": 1, "host": "thief"}'


@pytest.mark.slow
def test_storage_options_in_yaml_reach_worker_processes_and_are_never_stored(
    s3_env: dict[str, str], slide: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no AWS environment at all, the store's options reach Dask worker processes only in the
    tasks (``OutputRef.storage``); the record keeps their names."""
    image, model = slide
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key)
    secret = "yaml-output-secret-77a1"
    options = {"key": "yaml-key", "secret": secret, "endpoint_url": s3_env["AWS_ENDPOINT_URL"]}
    config = tmp_path / "s3.yaml"
    config.write_text(json.dumps({"output": {"storage_options": options}}))
    url = "s3://maps/options.zarr"
    args = ["run", str(image), "-m", str(model), "-o", url, "-c", str(config), "--scheduler", "processes"]
    result = CliRunner().invoke(cli, [*args, "--workers", "2", "--no-preview"])
    assert result.exit_code == 0, result.output
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    reader = open_store(url, complete=True)
    assert reader.record.config["output"]["storage_options"] == dict.fromkeys(options, "<hidden>")
    written = objects(s3_env, "maps", "options.zarr")
    assert len(chunks(written)) >= 8 and secret.encode() not in b"".join(written.values())
    log = s3_client(s3_env).get_object(Bucket="maps", Key="options.log")["Body"].read().decode()
    assert secret not in log + result.output


@pytest.mark.slow
def test_two_dask_workers_sharing_only_s3_write_the_bytes_of_a_local_run(
    s3_env: dict[str, str], slide: tuple[Path, Path], tmp_path: Path
) -> None:
    """A loopback ``dask scheduler`` and two ``dask worker`` processes, each in its own folder: the
    input, the store and its markers are in S3 only (the scheduler file just finds the scheduler)."""
    image, model = slide
    upload(s3_env, "slides", {"slide.tif": image})
    local = tmp_path / "local.zarr"
    result = CliRunner().invoke(cli, ["run", str(image), "-m", str(model), "-o", str(local), *FIXED])
    assert result.exit_code == 0, result.output
    cluster = Cluster(tmp_path, workers=2)  # they inherit the AWS environment that points at the server
    try:
        args = ["run", "s3://slides/slide.tif", "-m", str(model), "-o", "s3://maps/cluster.zarr", *FIXED]
        run = CliRunner().invoke(cli, [*args, "--scheduler", cluster.address])
        assert run.exit_code == 0, run.output
    finally:
        cluster.stop()
    assert chunks(objects(s3_env, "maps", "cluster.zarr")) == chunks(local_files(local))
    assert not [p for folder in cluster.folders for p in folder.rglob("*") if ".zarr" in p.name or ".tif" in p.name]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("https://host.example/maps/out.zarr", "cannot write the store to https:// URLs"),
        ("s3://maps", "name the store inside the bucket"),
        ("s3://no-such-bucket-here/out.zarr", "no such bucket"),
    ],
)
def test_an_output_url_that_cannot_hold_a_store_gives_one_line(
    target: str, expected: str, s3_env: dict[str, str], slide: tuple[Path, Path]
) -> None:
    image, model = slide
    result = CliRunner().invoke(cli, ["run", str(image), "-m", str(model), "-o", target, "--no-preview"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fcnpipe: error: ") and expected in lines[0], result.output
    assert "Traceback" not in result.output


def test_refused_credentials_give_one_line_naming_the_url(slide: tuple[Path, Path], tmp_path: Path) -> None:
    """A server that checks signatures (moto with authentication on) refuses unknown keys: access denied."""
    image, model = slide
    with start_s3(authenticate=True) as env:
        for args in (
            ["run", str(image), "-m", str(model), "-o", "s3://maps/out.zarr"],
            ["run", "s3://slides/slide.tif", "-m", str(model), "-o", str(tmp_path / "out.zarr")],
        ):
            process = fcnpipe(*args, "--no-preview", env=env)
            output = process.communicate(timeout=120)[0].decode()
            lines = [line for line in output.splitlines() if line.strip()]
            assert process.returncode != 0 and len(lines) == 1, output
            assert "access denied" in lines[0] and "s3://" in lines[0], output
            assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in output and "Traceback" not in output
    assert not (tmp_path / "out.zarr").exists()
