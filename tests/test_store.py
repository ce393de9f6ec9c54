"""The store's own pieces: the typed record of the ``fcnpipe`` attribute, and files written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import zarr

from pipeline.errors import OutputError
from pipeline.files import PARTIAL, atomic_write, remove_partial_files
from pipeline.store.record import ATTRIBUTE, ClassInfo, StoreRecord, read_record, write_record


def _record() -> StoreRecord:
    return StoreRecord(
        config={"input": {"series": 0, "level": None}},
        input={"path": "/data/slide.svs", "size_bytes": 123, "shape_cyx": [3, 700, 500]},
        model={"sha256": "ab" * 32, "classes": [{"name": "tumour", "color": [255, 0, 0]}], "stride": 1},
        tile=512,
        halo=1,
        spatial={"mpp": 0.25, "crs": None, "transform": None, "level_read": 2},
        fingerprint={"model": "ab" * 32},
    )


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_record_reads_back_as_it_was_written_in_both_formats(tmp_path: Path, zarr_format: int) -> None:
    path = str(tmp_path / "s.zarr")
    zarr.open_group(path, mode="w", zarr_format=zarr_format)
    record = _record().resumed_again().completed({"compute": 1.5})
    write_record(path, record)
    back = read_record(path)
    assert back == record
    assert back is not None and back.to_dict() == json.loads(json.dumps(record.to_dict()))
    assert back.classes == (ClassInfo(name="tumour", color=(255, 0, 0)),)
    assert (back.input_shape, back.level_read, back.mpp, back.complete, back.resumed) == (
        (3, 700, 500),
        2,
        0.25,
        True,
        1,
    )


def test_optional_fields_never_set_are_not_stored() -> None:
    stored = _record().to_dict()
    assert not {"resumed", "timings_s", "finished"} & stored.keys()
    assert stored["complete"] is False


def test_a_store_without_the_attribute_has_no_record(tmp_path: Path) -> None:
    path = str(tmp_path / "plain.zarr")
    zarr.open_group(path, mode="w")
    assert read_record(path) is None


@pytest.mark.parametrize(
    "damage",
    [lambda d: d.pop("tile"), lambda d: d["input"].update(shape_cyx=[3, 7]), lambda d: d["model"].update(classes=[{}])],
    ids=["missing-field", "short-shape", "class-without-name"],
)
def test_a_malformed_attribute_is_one_error_naming_the_store(tmp_path: Path, damage: object) -> None:
    path = str(tmp_path / "bad.zarr")
    group = zarr.open_group(path, mode="w")
    value = _record().to_dict()
    damage(value)  # type: ignore[operator]
    group.attrs[ATTRIBUTE] = value
    with pytest.raises(OutputError, match=r"bad\.zarr: its 'fcnpipe' attribute is malformed"):
        read_record(path)


def test_a_record_of_an_earlier_version_with_unknown_keys_still_reads(tmp_path: Path) -> None:
    path = str(tmp_path / "old.zarr")
    group = zarr.open_group(path, mode="w")
    group.attrs[ATTRIBUTE] = {**_record().to_dict(), "a_key_this_version_does_not_know": 1}
    back = read_record(path)
    assert back is not None and back.tile == 512


@pytest.mark.parametrize("durable", [False, True])
def test_atomic_write_makes_the_folder_replaces_whole_and_leaves_no_partial_file(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "deep" / "er" / "file.json"
    atomic_write(str(path), "first", durable=durable)
    atomic_write(str(path), b"second", durable=durable)
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["file.json"]


def test_remove_partial_files_removes_only_what_killed_writers_left(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    left = [tmp_path / f"c.1{PARTIAL}", tmp_path / "a" / "b" / f"0.0.0.7{PARTIAL}"]
    kept = [tmp_path / "a" / "0.0.0", tmp_path / "a" / "partial.txt"]
    for path in [*left, *kept]:
        path.write_bytes(b"x")
    assert remove_partial_files(str(tmp_path)) == 2
    assert sorted(os.path.relpath(p, tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        os.path.relpath(p, tmp_path) for p in kept
    )
