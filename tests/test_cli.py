"""The command line: Click's runner for speed, and real subprocesses as users run it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from tests.conftest import random_image


def fcnpipe(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline ARGS`` in a fresh process, the way a shell would run ``fcnpipe``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_help_explains_every_command() -> None:
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for command in ("run", "inspect", "demo"):
        assert command in top.output
        sub = runner.invoke(cli, [command, "--help"])
        assert sub.exit_code == 0 and "Usage:" in sub.output
    run_help = runner.invoke(cli, ["run", "--help"]).output
    for flag in ("--model", "--tile", "--level", "--dtype", "--overwrite", "--config", "--device"):
        assert flag in run_help


@pytest.mark.slow
def test_run_as_a_real_process(make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path) -> None:
    image = make_tiff(random_image((70, 90, 3)), tile=(32, 32), photometric="rgb")
    out = tmp_path / "out.zarr"
    done = fcnpipe("run", str(image), "--model", str(make_model()), "-o", str(out), "--tile", "32", "--dtype", "uint8")
    assert done.returncode == 0, done.stderr
    assert "tiles   9 of 32 px + 1 px halo" in done.stderr  # the plan, printed before the run
    assert f"wrote {out}" in done.stderr
    store = zarr.open_group(str(out), mode="r")
    assert store["0"].shape == (3, 70, 90) and store["0"].dtype == "uint8"
    assert store.attrs["fcnpipe"]["complete"] is True


@pytest.mark.slow
def test_errors_are_one_line_without_traceback_and_debug_shows_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.svs"
    done = fcnpipe("run", str(missing), "--model", "m.pt", "-o", str(tmp_path / "o.zarr"))
    assert done.returncode == 1
    assert done.stderr.strip() == f"fcnpipe: error: {missing}: no such file"
    debug = fcnpipe("--debug", "run", str(missing), "--model", "m.pt", "-o", str(tmp_path / "o.zarr"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "SourceError" in debug.stderr


def test_bad_config_key_names_file_and_key(make_tiff: Callable[..., Path], tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("tiling:\n  tile: 256\n  hallo: 3\n")
    image = make_tiff(random_image((8, 8, 3)), photometric="rgb")
    result = CliRunner().invoke(cli, ["run", str(image), "-c", str(config), "-m", "m.pt", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert (
        result.stderr.strip() == f"fcnpipe: error: {config}: Unknown config key 'tiling.hallo'. "
        "Known keys here: batch, blend, forward_batch, forward_tile, halo, tile."
    )


def test_bad_flag_value_is_a_config_error(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image = make_tiff(random_image((8, 8, 3)), photometric="rgb")
    args = ["run", str(image), "-m", str(make_model()), "-o", str(tmp_path / "o.zarr"), "--tile", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.stderr.strip() == "fcnpipe: error: --tile: Expected a positive integer. Got 0 instead."
    assert not (tmp_path / "o.zarr").exists()


def test_flags_override_yaml(make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("tiling:\n  tile: 16\noutput:\n  dtype: float16\n")
    image = make_tiff(random_image((40, 40, 3)), photometric="rgb")
    out = tmp_path / "o.zarr"
    result = CliRunner().invoke(
        cli, ["run", str(image), "-c", str(config), "-m", str(make_model()), "-o", str(out), "--tile", "32"]
    )
    assert result.exit_code == 0, result.output
    store = zarr.open_group(str(out), mode="r")
    assert store["0"].chunks == (3, 32, 32) and store["0"].dtype == "float16"


def test_inspect_prints_levels_and_resolution(real_data: Path) -> None:
    done = fcnpipe("inspect", str(real_data / "hubmap_multi-channel_pyramid.ome.tif"))
    assert done.returncode == 0, done.stderr
    assert "axes CYX, 3 channels, uint8, ADOBE_DEFLATE, tiles 512x512" in done.stdout
    assert "level 7: 3 x 1 px (width x height" in done.stdout
    assert "resolution: not recorded in the file" in done.stdout


@pytest.mark.slow
def test_missing_required_options_are_usage_errors(tmp_path: Path) -> None:
    """``run`` without ``-o`` or ``-m``, ``batch`` without ``-m``: Click's usage error, exit code 2,
    once (not one failure per input), and ``--help`` says they are required."""
    image = tmp_path / "x.tif"
    for args, option in (
        (["run", str(image), "-m", "m.pt"], "'-o' / '--output'"),
        (["run", str(image), "-o", str(tmp_path / "o.zarr")], "'-m' / '--model'"),
        (["batch", str(image), str(image), "-o", str(tmp_path / "maps")], "'-m' / '--model'"),
    ):
        done = fcnpipe(*args)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("Error: Missing option") == 1 and option in done.stderr
        assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert not (tmp_path / "maps").exists() and not list(tmp_path.iterdir())
    run_help = CliRunner().invoke(cli, ["run", "--help"]).output
    assert "[required, or output.path]" in run_help and "[required, or model.path]" in run_help


@pytest.mark.slow
def test_ordinary_mistakes_get_one_plain_line_and_leave_nothing(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image = make_tiff(random_image((40, 40, 3)), photometric="rgb")
    model = str(make_model())
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["run", str(tmp_path), "-m", model, "-o", str(tmp_path / "d.zarr")], 1, "is a directory, not a TIFF file"),
        (["inspect", str(tmp_path)], 1, "is a directory, not a TIFF file"),
        (["run", str(image), "-m", model, "-o", str(tmp_path / "out.tif")], 2, "run with -o"),
        (["run", str(tmp_path / "missing.svs"), "-m", model, "-o", str(tmp_path / "m.zarr")], 1, "no such file"),
        (["run", str(image), "-m", str(tmp_path / "none.pt"), "-o", str(tmp_path / "n.zarr")], 1, "no such model"),
    ]
    for args, code, message in cases:
        done = fcnpipe(*args)
        assert done.returncode == code, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    # failures before the run starts leave no log, lock or store behind
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_closed_pipe_ends_quietly(real_data: Path, tmp_path: Path) -> None:
    """``fcnpipe inspect FILE | head``: the reader leaves first; no BrokenPipeError, no message,
    and the exit code of a Unix tool stopped by SIGPIPE."""
    errors = tmp_path / "stderr.txt"
    command = f"{sys.executable} -m pipeline inspect {real_data / 'CMU-1-Small-Region.svs'} 2> {errors} | true"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        ["bash", "-c", f"{command}; echo ${{PIPESTATUS[0]}}"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.stdout.strip() == "141" and errors.read_text() == ""


def test_an_interruption_before_anything_was_written_says_so(tmp_path: Path) -> None:
    from pipeline.cli.run import _interrupted
    from pipeline.errors import Interrupted

    with pytest.raises(Interrupted, match=r"^nothing was written$"), _interrupted(str(tmp_path / "o.zarr"), False):
        raise KeyboardInterrupt


def test_options_left_out_leave_the_config_alone(tmp_path: Path) -> None:
    """Every shared option, a boolean ``--x/--no-x`` pair included, is None when not given, so the
    YAML's value (or the default) stands; each given one reaches its config key."""
    import click

    from pipeline.cli.options import PROGRESS, RESUME, RUN_OPTIONS, click_option, load, run_options

    seen: dict[str, object] = {}

    @click.command()
    @run_options
    @click_option(RESUME)
    @click_option(PROGRESS)
    def probe(configs: tuple[str, ...], **given: object) -> None:
        seen.update(given)
        seen["config"] = load(configs, given)

    yaml = tmp_path / "c.yaml"
    yaml.write_text("compute:\n  progress: false\n  workers: 3\noutput:\n  resume: true\n")
    assert CliRunner().invoke(probe, ["-c", str(yaml)]).exit_code == 0
    assert {k: v for k, v in seen.items() if k != "config" and v is not None} == {}
    config = seen["config"]
    assert config.compute.progress is False and config.compute.workers == 3 and config.output.resume is True  # type: ignore[attr-defined]
    assert CliRunner().invoke(probe, ["-c", str(yaml), "--progress", "--workers", "2"]).exit_code == 0
    config = seen["config"]
    assert config.compute.progress is True and config.compute.workers == 2  # type: ignore[attr-defined]
    assert {option.dest for option in [*RUN_OPTIONS, RESUME, PROGRESS]} <= set(seen)
