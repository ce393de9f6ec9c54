"""Starting the Dask clusters fcnpipe runs on, closed to everyone else: TLS, and a dashboard on loopback.

On a shared network anyone who reaches a plain Dask scheduler's port can send it a function that runs
as the user, so the clusters fcnpipe starts (``processes``; the job queues, whose scheduler runs in this
process) speak TLS only, and every party, client and workers alike, must show a certificate signed by
the run's certificate authority. The certificates are the user's (``compute.tls_ca_file``, ``tls_cert``,
``tls_key``), or made for the run by :meth:`distributed.security.Security.temporary` (which needs
``cryptography``). A job-queue worker gets them through its job script, which names the files to read:
the user's, or the run's own that dask-jobqueue writes into ``cluster.credentials_directory`` (a folder
the nodes share; files readable by the user only, removed when the run ends).

The dashboard shows slide names and logs, so it listens on 127.0.0.1 unless ``compute.dashboard_address``
says otherwise; :func:`dashboard_text` says how to reach it from another machine (an SSH tunnel).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from pipeline.config import ClusterConfig, ComputeConfig
from pipeline.errors import ConfigError

LOOPBACK_DASHBOARD = "127.0.0.1:0"
"""The dashboard on loopback, on any free port."""


def cluster_security(compute: ComputeConfig) -> Any | None:
    """The ``distributed.security.Security`` of a cluster fcnpipe starts; None with ``compute.tls: false``."""
    if not compute.tls:
        return None
    if compute.tls_cert is not None:
        return _from_files(compute)
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError as err:
        raise ConfigError(
            "compute.tls makes the run's certificates with the cryptography package: pip install cryptography; "
            "or give compute.tls_ca_file and compute.tls_cert, or set compute.tls to false on a network only you reach"
        ) from err


def client_security(compute: ComputeConfig, address: str) -> Any | None:
    """The ``Security`` that joins the scheduler at ``address``: none for ``tcp://``; for ``tls://`` the
    certificates of the config, else those of Dask's own config (``distributed.comm.tls``)."""
    if not address.startswith("tls://"):
        return None
    if compute.tls_cert is not None:
        return _from_files(compute)
    from distributed.security import Security

    security = Security()  # Dask's config, e.g. ~/.config/dask/distributed.yaml
    if security.tls_ca_file and security.tls_client_cert:
        return security
    raise ConfigError(
        f"compute.scheduler {address} speaks TLS: set compute.tls_ca_file, compute.tls_cert and compute.tls_key "
        "(in a config file, -c) to the certificate authority and a certificate and key it signed"
    )


def _from_files(compute: ComputeConfig) -> Any:
    """One certificate and key for every role (client, scheduler, workers), as ``dask scheduler --tls-*`` uses."""
    from distributed.security import Security

    paths: dict[str, str] = {}
    for key in ("tls_ca_file", "tls_cert", "tls_key"):
        value = getattr(compute, key)
        if value is not None:  # absolute: a job's worker starts in another folder
            paths[key] = os.path.abspath(os.path.expanduser(value))
            try:
                open(paths[key], "rb").close()
            except OSError as err:
                raise ConfigError(f"compute.{key} {value}: cannot read it ({err.strerror})") from err
    cert, key = paths["tls_cert"], paths.get("tls_key", paths["tls_cert"])
    roles = {
        f"tls_{role}_{part}": path
        for role in ("client", "scheduler", "worker")
        for part, path in (("cert", cert), ("key", key))
    }
    security = Security(require_encryption=True, tls_ca_file=paths["tls_ca_file"], **roles)
    try:
        security.get_connection_args("client")  # reads every file now, not at the first connection
    except OSError as err:  # ssl.SSLError is one
        named = ", ".join(f"compute.{k} {v}" for k, v in paths.items())
        raise ConfigError(f"{named}: not a PEM certificate authority, certificate and its key ({err})") from err
    return security


def local_cluster(workers: int, security: Any | None, dashboard_address: str) -> Any:
    """A ``distributed.LocalCluster`` of ``workers`` processes of one thread, on loopback; TLS with ``security``."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        protocol="tls://" if security is not None else None,
        security=security,
        dashboard_address=dashboard_address,
        silence_logs=logging.ERROR,
    )


def job_queue_cluster(
    kind: str, cluster: ClusterConfig, security: Any | None = None, dashboard_address: str = LOOPBACK_DASHBOARD
) -> Any:
    """A dask-jobqueue cluster of ``kind`` (slurm, pbs, sge, local-jobs) from ``cluster``; no job is submitted yet.

    ``cluster.job_script()`` is the script each job runs: a Dask worker of ``cores / processes``
    threads per process (and the resource GPU=1 with ``gpus: 1``); with ``security``, over TLS with
    the certificate files it names (``--tls-ca-file``, ``--tls-cert``, ``--tls-key``). The scheduler
    runs in this process (the login node), so its dashboard on loopback is this machine's.
    """
    try:
        import dask_jobqueue
    except ImportError as err:
        raise ConfigError(f"compute.scheduler {kind} needs dask-jobqueue: pip install dask-jobqueue ({err})") from err
    from dask_jobqueue.local import LocalCluster as LocalJobs

    classes = {
        "slurm": dask_jobqueue.SLURMCluster,
        "pbs": dask_jobqueue.PBSCluster,
        "sge": dask_jobqueue.SGECluster,
        "local-jobs": LocalJobs,
    }
    directives = list(cluster.job_extra_directives)
    extra_args: list[str] = []
    if cluster.gpus:
        directives += ["--gres=gpu:1"] if kind == "slurm" else []
        extra_args += ["--resources", "GPU=1"]
    options: dict[str, Any] = {
        "queue": cluster.queue,
        "account": cluster.account if kind != "sge" else None,
        "project": cluster.account if kind == "sge" else None,
        "cores": cluster.cores,
        "memory": cluster.memory,
        "processes": 1 if cluster.gpus else cluster.processes,
        "walltime": cluster.walltime,
        "job_extra_directives": directives,
        "job_script_prologue": list(cluster.job_script_prologue),
        "worker_extra_args": extra_args,
        "local_directory": cluster.local_directory,
        "log_directory": cluster.log_directory,
        "interface": cluster.interface,
        "job_name": "fcnpipe-worker",
        "scheduler_options": {"dashboard_address": dashboard_address},
        "security": security,
        "shared_temp_directory": _credentials_directory(cluster) if security is not None else None,
    }
    if kind == "local-jobs":  # the job script run as local processes: no queue to ask
        options = {k: v for k, v in options.items() if k not in ("queue", "account", "project", "walltime")}
    return classes[kind](**{k: v for k, v in options.items() if v is not None})


def forget_credentials(cluster: Any) -> None:
    """Remove the run's own certificate files that dask-jobqueue wrote for the jobs of ``cluster`` (it
    keeps them open, and removes them only once the cluster object is garbage)."""
    for part in ("ca_file", "cert", "key"):
        file = getattr(cluster, f"_job_{part}", None)
        if file is not None:
            file.close()  # a NamedTemporaryFile: closing removes it


def _credentials_directory(cluster: ClusterConfig) -> str:
    """The folder where dask-jobqueue writes the run's own certificates for the jobs (made, private, if missing)."""
    folder = os.path.abspath(os.path.expanduser(os.path.expandvars(cluster.credentials_directory or ".")))
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cluster.credentials_directory {folder}: cannot make it ({err.strerror})") from err
    return folder


def dashboard_text(port: int | None, dashboard_address: str, scheduler_address: str, here: str | None = None) -> str:
    """The dashboard's address and, when it listens on loopback, the SSH tunnel that reaches it from
    another machine (``here`` is this host's name: :func:`socket.gethostname` by default).

    >>> dashboard_text(8787, "127.0.0.1:0", "tls://10.1.2.3:37001", "login1")
    'http://127.0.0.1:8787/status (from another machine: ssh -N -L 8787:127.0.0.1:8787 login1, then open it)'
    >>> dashboard_text(8787, ":8787", "tls://10.1.2.3:37001", "login1")
    'http://10.1.2.3:8787/status'
    >>> dashboard_text(None, "127.0.0.1:0", "tls://10.1.2.3:37001")
    'none'
    """
    if port is None:
        return "none"
    host = dashboard_address.rsplit(":", 1)[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):  # every interface: the scheduler's own address reaches it
        host = scheduler_address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    shown = f"[{host}]" if ":" in host else host
    link = f"http://{shown}:{port}/status"
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        return link
    return (
        f"{link} (from another machine: ssh -N -L {port}:{shown}:{port} {here or socket.gethostname()}, then open it)"
    )


def dashboard_port(client: Any) -> int | None:
    """The port the dashboard of ``client``'s scheduler listens on; None without one."""
    port = client.scheduler_info(n_workers=0).get("services", {}).get("dashboard")
    return None if port is None else int(port)
