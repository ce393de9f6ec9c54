"""Real servers for the tests, on 127.0.0.1, that stop by themselves.

* :func:`start_s3`: moto's S3-compatible server (``moto.server``) in a child process that exits when
  its parent does (it watches its stdin, a pipe from the test process);
* :func:`start_http`: an HTTP server with range requests (the ``rangehttpserver`` package's handler)
  in a thread of the test process, serving a folder; a path under ``/forbidden/`` answers 403 and
  one under ``/drop/`` sends its headers and hangs up halfway through the body.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "fcnpipe-test-key", "AWS_SECRET_ACCESS_KEY": "fcnpipe-test-secret-8e1f"}
"""What the tests give as credentials (moto accepts any): a message that shows them is a failure."""

_WATCHED = """
import sys, threading, os
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()  # returns when the parent's end of the pipe closes: the parent is gone
os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@contextlib.contextmanager
def start_s3(authenticate: bool = False) -> Iterator[dict[str, str]]:
    """Run moto's S3 server; yield the AWS environment that points at it (endpoint, region, keys).

    ``authenticate``: the server checks every request's signature against the keys it knows (it
    knows none), so it refuses :data:`CREDENTIALS` as AWS refuses a wrong key (403)."""
    port = free_port()
    checks = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if authenticate else {}
    process = subprocess.Popen(
        [sys.executable, "-c", _WATCHED, str(port)],
        env={**os.environ, **checks},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError("moto's server did not start")
        wait_for_port(port)
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1", **CREDENTIALS}
    finally:
        process.kill()
        process.wait()


def s3_client(env: dict[str, str]) -> Any:
    """A boto3-style client of the moto server (through botocore, which s3fs depends on)."""
    import botocore.session

    session = botocore.session.get_session()
    return session.create_client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def upload(env: dict[str, str], bucket: str, files: dict[str, Path]) -> None:
    """Make ``bucket`` (if needed) and put each ``key: local file`` into it."""
    client = s3_client(env)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    for key, path in files.items():
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def _handler() -> type:
    from RangeHTTPServer import RangeRequestHandler

    class Handler(RangeRequestHandler):  # type: ignore[misc]
        requests: ClassVar[list[str]] = []

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            Handler.requests.append(f"GET {self.path} {self.headers.get('Range', '')}")
            if self.path.startswith("/forbidden/"):
                self.send_error(403, "Forbidden")
                return
            if self.path.startswith("/drop/"):
                self.send_response(206 if self.headers.get("Range") else 200)
                self.send_header("Content-Length", "100000")
                self.send_header("Content-Range", "bytes 0-99999/100000")
                self.end_headers()
                self.wfile.write(b"II*\x00" + b"\x00" * 100)
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            super().do_GET()

        def do_HEAD(self) -> None:
            if self.path.startswith("/forbidden/"):
                self.send_error(403, "Forbidden")
                return
            if self.path.startswith("/drop/"):
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                return
            super().do_HEAD()

    return Handler


@contextlib.contextmanager
def start_http(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root`` over HTTP with range requests; yield ``(base URL, the requests it got)``."""
    handler = _handler()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=os.fspath(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
