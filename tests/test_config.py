"""Config: defaults < YAML < flags, unknown keys and bad values rejected with their key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import RunConfig, load_config
from pipeline.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_documents_the_real_defaults() -> None:
    assert load_config([CONFIGS / "default.yaml"]) == RunConfig()


@pytest.mark.parametrize("preset", ["pathology", "satellite"])
def test_presets_load(preset: str) -> None:
    config = load_config([CONFIGS / f"{preset}.yaml"])
    assert config.tiling.tile > 0


def test_precedence_defaults_then_files_then_flags(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("tiling: {tile: 256, batch: 2}\noutput: {dtype: uint8}\n")
    second.write_text("tiling: {tile: 128}\n")
    config = load_config([first, second], {"output": {"dtype": "float16"}})
    assert (config.tiling.tile, config.tiling.batch, config.output.dtype) == (128, 2, "float16")
    assert config.compute.device == "auto"  # untouched default


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tiling": {"tyle": 3}}, "Unknown config key 'tiling.tyle'"),
        ({"modle": {}}, "Unknown config key 'modle'"),
        ({"output": {"dtype": "int8"}}, "Expected one of float32, float16, uint8 for 'output.dtype'. Got 'int8'"),
        ({"tiling": {"tile": "big"}}, "Expected an integer for 'tiling.tile'. Got 'big'"),
        ({"tiling": {"batch": 0}}, "Expected a positive integer for 'tiling.batch'. Got 0"),
        ({"input": {"level": -1}}, "Expected a non-negative integer for 'input.level'. Got -1"),
        ({"output": {"overwrite": "yes"}}, "Expected true or false for 'output.overwrite'"),
        ({"model": {"mean": 0.5}}, "Expected a list of numbers for 'model.mean'"),
        ({"compute": {"device": "tpu"}}, "Expected one of auto, cpu, cuda, mps for 'compute.device'"),
        ({"tiling": 5}, "Expected a mapping for config section 'tiling'"),
    ],
    ids=["typo", "section-typo", "enum", "type", "positive", "non-negative", "bool", "list", "device", "section"],
)
def test_bad_values_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(overrides=overrides)


def test_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("tiling: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config([broken])
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such config file"):
        load_config([tmp_path / "missing.yaml"])


def test_resolved_config_is_plain_data() -> None:
    plain = load_config(overrides={"model": {"mean": [0.1, 0.2, 0.3]}}).to_dict()
    assert plain["model"]["mean"] == [0.1, 0.2, 0.3]
    assert plain["tiling"] == {
        "tile": 512,
        "batch": 4,
        "halo": None,
        "blend": "none",
        "forward_batch": None,
        "forward_tile": None,
    }


def test_every_config_key_is_fingerprinted_or_declared_byte_neutral() -> None:
    """Walk the whole schema: changing a key changes the fingerprint unless BYTE_NEUTRAL names it
    (or its section); and BYTE_NEUTRAL names only keys that exist."""
    from pipeline.config import RunConfig, config_keys
    from pipeline.run.resume import BYTE_NEUTRAL, byte_neutral, fingerprint_of

    values = RunConfig().to_dict()
    base = fingerprint_of(values, "s.svs", 100, "ab")
    keys = config_keys()
    assert len(keys) > 40 and "tiling.tile" in keys and "cluster.cores" in keys
    for key in keys:
        section, name = key.split(".")
        changed = {**values, section: {**values[section], name: ["a value no default has", 17]}}
        moved = fingerprint_of(changed, "s.svs", 100, "ab") != base
        assert moved != byte_neutral(key), (
            f"{key}: {'declared byte-neutral' if byte_neutral(key) else 'not fingerprinted'}"
        )
    for declared in BYTE_NEUTRAL:
        assert declared in keys or any(key.startswith(f"{declared}.") for key in keys), f"{declared} is no key"
    for other in (("t.svs", 100, "ab"), ("s.svs", 101, "ab"), ("s.svs", 100, "cd")):
        assert fingerprint_of(values, *other) != base  # the input's name and size, the model's hash
