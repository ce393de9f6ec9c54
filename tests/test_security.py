"""Nobody else gets in: the clusters fcnpipe starts speak TLS only, and their dashboards listen on loopback.

Real clusters, started the way ``fcnpipe`` starts them (:func:`pipeline.compute.engine.open_engine`),
and real clients that lack the credentials: none of them gets a connection, while the engine's own
client computes. Every socket is on this machine (loopback, or this host's own interface address).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import numpy as np
import psutil
import pytest

from pipeline.compute.cluster import client_security, cluster_security, dashboard_port, job_queue_cluster
from pipeline.compute.engine import DistributedEngine, open_engine
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import random_image
from tests.test_resume import arrays, fcnpipe


def _add(a: int, b: int) -> int:
    return a + b


async def _answers(address: str, security: Any) -> bool:
    from distributed.comm import connect

    args = security.get_connection_args("client") if security is not None else {}
    try:
        comm = await connect(address, timeout=5, **args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return isinstance(await comm.read(), dict)
        finally:
            comm.abort()
    except (OSError, TypeError):  # TypeError: distributed's own refusal of tls:// without a certificate
        return False


def answers(*attempts: tuple[str, Any]) -> list[bool]:
    """For each ``(address, security)`` (None: no credentials), whether the scheduler answers a Dask
    message from a client with those credentials."""

    async def each() -> list[bool]:
        return [await _answers(address, security) for address, security in attempts]

    return asyncio.run(each())


def bare_tls_refused(address: str) -> bool:
    """Whether the server at ``tls://host:port`` refuses a TLS client that shows no certificate (one
    that skips Dask's own check): the handshake fails, or the connection ends before a byte comes back."""
    host, port = address.split("://")[1].rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        # TLS 1.3: the server's verdict on the client's (missing) certificate comes with the first read
        with socket.create_connection((host, int(port)), timeout=5) as raw, context.wrap_socket(raw) as tls:
            tls.sendall(b"\0" * 16)
            return tls.recv(1) == b""
    except OSError:  # ssl.SSLError (certificate required), reset
        return True


def listening(pids: set[int]) -> list[tuple[str, int]]:
    """``(address, port)`` of every listening TCP socket of the processes ``pids``."""
    return sorted(
        (c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in pids
    )


def loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1"


def host_address() -> str | None:
    """An IPv4 address of one of this host's own interfaces that is not loopback, if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not loopback(address.address):
                return str(address.address)
    return None


def connection_refused(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=3).close()
    except ConnectionRefusedError:
        return True
    return False


def assert_dashboard_on_loopback_only(engine: DistributedEngine) -> None:
    """The dashboard's port is bound to loopback only, and the engine says how to tunnel to it."""
    port = dashboard_port(engine.client)
    assert port is not None
    bound = [ip for ip, p in listening({os.getpid()}) if p == port]
    assert bound and all(loopback(ip) for ip in bound), bound
    assert f"ssh -N -L {port}:127.0.0.1:{port} " in engine.describe(1, 1)
    ip = host_address()
    if ip is None:
        pytest.skip(f"bound to {bound} only; this host has no non-loopback address to try port {port} on")
    assert connection_refused(ip, port), f"the dashboard answers on {ip}:{port}"


def assert_only_its_own_client_gets_in(address: str, own: Any) -> None:
    """The scheduler at ``address`` answers a client with the credentials ``own``, and nobody else."""
    from distributed.security import Security

    assert address.startswith("tls://")
    plain = address.replace("tls://", "tcp://")
    attempts = [(address, own), (address, None), (plain, None), (address, Security.temporary())]
    who = ["its own client", "no credentials", "plain TCP", "another authority's certificate"]
    answered = dict(zip(who, answers(*attempts), strict=True))
    assert answered == {name: name == "its own client" for name in who}, answered
    assert bare_tls_refused(address), "a TLS client without a certificate got an answer"


@pytest.fixture(scope="module")
def processes() -> Iterator[DistributedEngine]:
    """``--scheduler processes --workers 1``, as fcnpipe opens it."""
    config = load_config(overrides={"compute": {"scheduler": "processes", "workers": 1}})
    started = time.monotonic()
    with open_engine(config.compute, config.cluster) as engine:
        print(f"TLS LocalCluster of 1 worker up in {time.monotonic() - started:.2f} s")
        assert isinstance(engine, DistributedEngine)
        yield engine


@pytest.fixture
def credentials(tmp_path: Path) -> dict[str, str]:
    """A certificate authority, and a certificate and key it signed, in PEM files (the config's keys)."""
    from distributed.security import Security

    made = Security.temporary()
    files = {"tls_ca_file": made.tls_ca_file, "tls_cert": made.tls_client_cert, "tls_key": made.tls_client_key}
    for key, text in files.items():
        (tmp_path / f"{key}.pem").write_text(text)
        (tmp_path / f"{key}.pem").chmod(0o600)
    return {key: str(tmp_path / f"{key}.pem") for key in files}


def test_tls_is_on_by_default_and_off_only_when_asked() -> None:
    config = load_config()
    assert config.compute.tls and config.compute.dashboard_address == "127.0.0.1:0"
    security = cluster_security(config.compute)
    assert security is not None and security.require_encryption
    assert cluster_security(load_config(overrides={"compute": {"tls": False}}).compute) is None
    assert client_security(config.compute, "tcp://node17:8786") is None  # the user's own plain cluster


@pytest.mark.parametrize(
    ("compute", "message"),
    [
        ({"tls_cert": "cert.pem"}, "compute.tls_ca_file and compute.tls_cert together"),
        ({"tls_ca_file": "ca.pem", "tls_key": "key.pem"}, "compute.tls_ca_file and compute.tls_cert together"),
        ({"dashboard_address": "8787"}, "'compute.dashboard_address'"),
        ({"dashboard_address": "0.0.0.0:port"}, "'compute.dashboard_address'"),
        ({"tlss": True}, "Unknown config key 'compute.tlss'"),
    ],
    ids=["cert-without-authority", "key-without-cert", "port-alone", "port-not-a-number", "typo"],
)
def test_bad_tls_and_dashboard_keys_fail_on_load(compute: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides={"compute": compute})


def test_missing_certificate_files_fail_in_one_line_naming_the_key(tmp_path: Path) -> None:
    missing = {"tls_ca_file": str(tmp_path / "ca.pem"), "tls_cert": str(tmp_path / "cert.pem")}
    compute = load_config(overrides={"compute": missing}).compute
    with pytest.raises(ConfigError, match=r"compute\.tls_ca_file") as caught:
        cluster_security(compute)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_a_processes_cluster_lets_in_only_its_own_client(processes: DistributedEngine) -> None:
    assert_only_its_own_client_gets_in(processes.client.scheduler.address, processes.client.security)
    assert processes.run([dask.delayed(_add)(1, 2)], 1) == [3]
    assert "Dask processes (TLS)" in processes.describe(1, 1)


@pytest.mark.slow
def test_a_processes_cluster_listens_on_loopback_only(processes: DistributedEngine) -> None:
    """The scheduler, the dashboard, the nanny and the worker: every port on 127.0.0.1."""
    info = processes.client.scheduler_info(n_workers=-1)
    ports = {int(a.rsplit(":", 1)[1]) for a in [processes.client.scheduler.address, *info["workers"]]}
    ports |= {int(str(w["nanny"]).rsplit(":", 1)[1]) for w in info["workers"].values() if w.get("nanny")}
    ports.add(dashboard_port(processes.client) or 0)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    sockets = [(ip, port) for ip, port in listening({os.getpid(), *children}) if port in ports]
    assert {port for _, port in sockets} == ports
    assert all(loopback(ip) for ip, _ in sockets), sockets
    assert_dashboard_on_loopback_only(processes)


@pytest.mark.slow
def test_a_run_on_the_tls_cluster_gives_the_threads_bytes(
    processes: DistributedEngine, make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    from pipeline.run.execute import execute
    from pipeline.run.plan import prepare

    image = make_tiff(random_image((512, 512, 3)), photometric="rgb")
    model = make_model()
    stores = {}
    for name, engine in (("threads", None), ("tls", processes)):
        overrides = {
            "input": {"path": str(image)},
            "model": {"path": str(model)},
            "output": {"path": str(tmp_path / f"{name}.zarr")},
            "tiling": {"tile": 128},
            "mask": {"mode": "none"},
            "compute": {"workers": 1, "torch_threads": 1},
        }
        config = load_config(overrides=overrides)
        plan = prepare(config, engine) if engine is not None else prepare(config)
        assert execute(plan).status == "done"
        stores[name] = dict(arrays(tmp_path / f"{name}.zarr"))
    assert sorted(stores["threads"]) == sorted(stores["tls"]) and stores["tls"]
    for name, values in stores["threads"].items():
        assert np.array_equal(values, stores["tls"][name]), name


@pytest.mark.slow
def test_local_jobs_get_their_credentials_through_the_job_script(tmp_path: Path) -> None:
    """A job-queue cluster (its jobs run as local processes): the script names private certificate
    files (never their contents), its scheduler lets in only its own client, the dashboard stays on
    loopback, and the files are gone at the end."""
    folder = tmp_path / "credentials"
    cluster = {"cores": 1, "memory": "2GB", "minimum_jobs": 1, "maximum_jobs": 1, "credentials_directory": str(folder)}
    config = load_config(overrides={"compute": {"scheduler": "local-jobs"}, "cluster": cluster})
    started = time.monotonic()
    with open_engine(config.compute, config.cluster) as engine:
        assert isinstance(engine, DistributedEngine)
        engine.client.wait_for_workers(1, timeout=60)
        print(f"TLS local-jobs cluster with its worker up in {time.monotonic() - started:.2f} s")
        files = sorted(folder.iterdir())
        assert len(files) == 3 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files), files
        script = engine.client.cluster.job_script()
        assert "--protocol tls://" in script and "PRIVATE KEY" not in script and "BEGIN" not in script
        for flag in ("--tls-ca-file", "--tls-cert", "--tls-key"):
            assert f"{flag} {folder}/.dask-jobqueue.worker." in script, flag
        address = engine.client.scheduler.address
        assert not loopback(address.split("://")[1].rsplit(":", 1)[0])  # the jobs' scheduler listens on the network
        assert_only_its_own_client_gets_in(address, engine.client.security)
        assert engine.run([dask.delayed(_add)(2, 3)], 1) == [5]
        assert_dashboard_on_loopback_only(engine)
    assert not list(folder.iterdir())


def test_a_slurm_job_script_names_the_users_certificate_files(credentials: dict[str, str]) -> None:
    config = load_config(overrides={"compute": credentials})
    with job_queue_cluster("slurm", config.cluster, cluster_security(config.compute)) as slurm:
        script = slurm.job_script()
        assert slurm.scheduler_address.startswith("tls://")
    assert f"--tls-ca-file {credentials['tls_ca_file']}" in script
    assert f"--tls-cert {credentials['tls_cert']} --tls-key {credentials['tls_key']}" in script


class TlsScheduler:
    """``dask scheduler`` and one ``dask worker`` on 127.0.0.1, TLS only, with the certificate files given."""

    def __init__(self, folder: Path, credentials: dict[str, str]) -> None:
        file = folder / "scheduler.json"
        tls = ["--tls-ca-file", credentials["tls_ca_file"], "--tls-cert", credentials["tls_cert"]]
        tls += ["--tls-key", credentials["tls_key"], "--scheduler-file", str(file)]
        host = ["--host", "127.0.0.1", "--no-dashboard", "--protocol", "tls"]
        self.processes = [  # together: the worker waits for the scheduler file
            self._start("dask_scheduler", *host, "--port", "0", *tls),
            self._start("dask_worker", *host, "--nthreads", "1", "--no-nanny", *tls),
        ]
        deadline, self.address = time.monotonic() + 60, ""
        while not self.address and time.monotonic() < deadline:
            time.sleep(0.1)
            with contextlib.suppress(OSError, ValueError):  # not there yet, or half written
                self.address = json.loads(file.read_text())["address"]

    @staticmethod
    def _start(program: str, *args: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", f"distributed.cli.{program}", *args]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.kill()
            process.wait()


@pytest.mark.slow
def test_a_tls_address_is_joined_with_the_certificates_and_refused_without(
    credentials: dict[str, str], tmp_path: Path
) -> None:
    scheduler = TlsScheduler(tmp_path, credentials)
    try:
        assert scheduler.address.startswith("tls://127.0.0.1:")
        config = load_config(overrides={"compute": {"scheduler": scheduler.address, **credentials}})
        with open_engine(config.compute, config.cluster) as engine:
            assert isinstance(engine, DistributedEngine)
            engine.client.wait_for_workers(1, timeout=60)
            assert engine.run([dask.delayed(_add)(20, 22)], 1) == [42]
        assert_only_its_own_client_gets_in(scheduler.address, client_security(config.compute, scheduler.address))
        bare = load_config(overrides={"compute": {"scheduler": scheduler.address}})
        with (
            pytest.raises(ConfigError, match=r"compute\.tls_ca_file") as caught,
            open_engine(bare.compute, bare.cluster),
        ):
            pass
        assert "\n" not in str(caught.value)
        done = fcnpipe(
            "run", "slide.tif", "-m", "model.pt", "-o", "out.zarr", "--scheduler", scheduler.address, cwd=tmp_path
        )
        errors = [line for line in done.stderr.splitlines() if line.startswith("fcnpipe:")]
        assert done.returncode != 0 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "compute.tls_ca_file" in errors[0] and scheduler.address in errors[0]
    finally:
        scheduler.stop()
