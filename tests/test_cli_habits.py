"""Habits of rio and gdal: -q / -v on every command, presets by name from any folder, `config show`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import config_keys, load_config
from pipeline.errors import ConfigError
from pipeline.presets import config_file, preset_names
from tests.conftest import random_image

REPOSITORY_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += commands(command, f"{prefix}{name} ")
        else:
            found.append((f"{prefix}{name}", command))
    return found


def test_every_command_takes_quiet_and_verbose() -> None:
    every = commands(cli)
    assert len(every) >= 10
    for name, command in every:
        flags = {flag for param in command.params for flag in getattr(param, "opts", [])}
        assert {"-q", "--quiet", "-v", "--verbose"} <= flags, name
        assert "-v" in CliRunner().invoke(cli, [*name.split(), "--help"]).output


def test_quiet_says_nothing_but_logs_and_verbose_shows_the_log(
    make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    image, model = make_tiff(random_image((96, 80, 3))), make_model()
    base = ["run", str(image), "-m", str(model), "--no-progress", "--no-preview"]
    quiet = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "q.zarr"), "-q"])
    assert quiet.exit_code == 0 and quiet.output == "", quiet.output
    log = (tmp_path / "q.log").read_text()
    assert "wrote " in log and "input " in log  # what was not said is in the log
    normal = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "n.zarr")])
    verbose = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "v.zarr"), "-v"])
    assert normal.exit_code == verbose.exit_code == 0
    assert "fcnpipe: info: " not in normal.output and "fcnpipe: info: " in verbose.output
    assert len(verbose.output.splitlines()) > len(normal.output.splitlines())
    both = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "b.zarr"), "-q", "-v"])
    assert both.exit_code == 2 and "contradict" in both.output


def test_a_quiet_error_is_still_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.tif"), "-q"])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1


def test_presets_ship_with_the_package_and_work_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here
    names = preset_names()
    assert {path.stem for path in REPOSITORY_CONFIGS.glob("*.yaml")} == set(names)
    assert load_config(["satellite"]).output.dtype == "float32"
    assert load_config(["satellite.yaml"]) == load_config([REPOSITORY_CONFIGS / "satellite.yaml"])
    assert load_config(["pathology"]) == load_config([REPOSITORY_CONFIGS / "pathology.yaml"])
    (tmp_path / "satellite").write_text("tiling:\n  tile: 128\n")  # a file of that name wins
    assert config_file("satellite") == "satellite" and load_config(["satellite"]).tiling.tile == 128
    with pytest.raises(ConfigError, match=r"no-such: no such config file, and no preset .*pathology"):
        load_config(["no-such"])


def test_config_show_names_the_source_of_every_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("mask:\n  mode: none\ntiling:\n  tile: 1024\n")
    result = CliRunner().invoke(cli, ["config", "show", "-c", "satellite", "-c", "mine.yaml", "--tile", "256"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.output.splitlines())
    assert list(lines) == config_keys()
    assert lines["tiling.tile"] == "256  (--tile)"  # flags win over every file
    assert lines["mask.mode"] == '"none"  (mine.yaml)'
    assert lines["output.dtype"].startswith('"float32"  (preset satellite: ')
    assert lines["tiling.batch"] == "4  (default)"
    shown = json.loads(CliRunner().invoke(cli, ["config", "show", "-c", "satellite", "--json"]).output)
    assert shown["output.dtype"]["value"] == "float32" and shown["compute.workers"] == {
        "value": None,
        "source": "default",
    }
    bad = CliRunner().invoke(cli, ["config", "show", "--tile", "-5"])
    assert bad.exit_code != 0 and "--tile" in bad.output


def test_train_records_the_ground_sample_distance_of_a_geotiff_and_takes_gsd(real_data: Path, tmp_path: Path) -> None:
    """So that `run --gsd`'s default, the model's, applies to rasters trained with fcnpipe."""
    import rasterio
    import tifffile

    from pipeline.model.checkpoint import load_model

    image = real_data / "RGB.byte.tif"
    with rasterio.open(image) as source:
        size = (abs(source.transform.a) + abs(source.transform.e)) / 2
        bands = source.read(1)
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, (bands > 60).astype("uint8"))
    for extra, expected in (([], size), (["--gsd", "600"], 600.0)):
        model = tmp_path / f"m{len(extra)}.pt"
        args = ["train", str(image), "--masks", str(mask), "-o", str(model), "--epochs", "1"]
        result = CliRunner().invoke(cli, [*args, "--patches-per-epoch", "16", "--patch", "32", *extra])
        assert result.exit_code == 0, result.output
        assert load_model(model).spec.gsd == pytest.approx(expected, rel=1e-12)
    described = CliRunner().invoke(cli, ["inspect-model", str(tmp_path / "m0.pt")])
    assert f"{size:g}" in described.output


def test_small_texts_say_what_they_mean(make_tiff: Callable[..., Path], tmp_path: Path) -> None:
    import torch

    from pipeline.model.architectures import UNet

    torch.save(UNet(3, 3).state_dict(), tmp_path / "unet.pt")
    image = make_tiff(random_image((64, 64, 3)))
    other = CliRunner().invoke(cli, ["plan", str(image), "-m", str(tmp_path / "unet.pt")])
    assert other.exit_code != 0
    text = " ".join(other.output.split())
    assert "another architecture" in text and "--factory package.module:function" in text
    help_text = " ".join(CliRunner().invoke(cli, ["run", "--help"]).output.split())
    assert "--device [auto|cpu|cuda|mps] Where the network runs" in help_text
    missing = CliRunner().invoke(cli, ["preview", str(tmp_path / "gone.zarr")])
    assert missing.output.strip() == f"fcnpipe: error: {tmp_path / 'gone.zarr'}: no such file or folder"


def test_a_quiet_batch_still_names_each_failed_input(
    real_data: Path, make_tiff: Callable[..., Path], make_model: Callable[..., Path], tmp_path: Path
) -> None:
    good = make_tiff(random_image((64, 64, 3)))
    args = ["batch", str(good), str(real_data / "corrupt.tif"), "-m", str(make_model()), "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, [*args, "--no-progress", "-q"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcnpipe: error: failed") and "corrupt.tif" in lines[0]
