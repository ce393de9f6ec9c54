"""Runs ``fcnpipe`` commands one after another in one process, for the fuzz test.

Each line on stdin is a JSON request ``{"id": ..., "args": [...], "reply": PATH}``: the command
runs through Click's runner (the CLI's own error handling included), its exit code, stdout and
stderr are written as JSON to ``PATH``, then ``done ID`` is printed. One process for hundreds of
commands saves the second of imports each would cost; the test kills and restarts it if a command
hangs or crashes it.
"""

from __future__ import annotations

import json
import sys


def serve() -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    for line in sys.stdin:
        request = json.loads(line)
        result = CliRunner().invoke(cli, request["args"])
        escaped = result.exception if not isinstance(result.exception, SystemExit) else None
        reply = {
            "code": result.exit_code,
            "stdout": result.stdout,
            "stderr": result.stderr,
            "escaped": None if escaped is None else f"{type(escaped).__name__}: {escaped}",
        }
        with open(request["reply"], "w", encoding="utf-8") as file:
            json.dump(reply, file)
        print(f"done {request['id']}", flush=True)


if __name__ == "__main__":
    serve()
