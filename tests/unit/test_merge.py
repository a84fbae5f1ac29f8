"""A merged folder is used only if it is the merge of this version's adapter, unaltered: any
other folder is merged again rather than served; merges no alias serves are removed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.engine.merge import RECORD, merged_is_complete, prune
from serving.version_folder import file_digest

ADAPTER_FILES = {"adapter_model.safetensors": "a" * 64, "adapter_config.json": "b" * 64}


@pytest.fixture()
def merged(tmp_path: Path) -> Path:
    folder = tmp_path / "default@v3"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    files = {p.name: file_digest(p) for p in sorted(folder.iterdir())}
    (folder / RECORD).write_text(json.dumps(
        {"version": "default@v3", "adapter_files": ADAPTER_FILES, "files": files}))
    return folder


def test_an_unaltered_merge_of_the_same_adapter_is_reused(merged: Path):
    assert merged_is_complete(merged, "default@v3", ADAPTER_FILES)


def test_altered_weights_are_merged_again(merged: Path):
    (merged / "model.safetensors").write_bytes(b"other weights")
    assert not merged_is_complete(merged, "default@v3", ADAPTER_FILES)


def test_a_missing_file_is_merged_again(merged: Path):
    (merged / "config.json").unlink()
    assert not merged_is_complete(merged, "default@v3", ADAPTER_FILES)


def test_a_merge_of_another_version_or_adapter_is_not_reused(merged: Path):
    assert not merged_is_complete(merged, "default@v4", ADAPTER_FILES)
    assert not merged_is_complete(merged, "default@v3", {**ADAPTER_FILES,
                                                         "adapter_model.safetensors": "c" * 64})


@pytest.mark.parametrize("record", ["not json", json.dumps({"version": "default@v3"}),
                                    json.dumps({"version": "default@v3", "adapter_files": ADAPTER_FILES,
                                                "files": {"../../etc/passwd": "0" * 64}})])
def test_a_broken_or_hostile_record_is_merged_again(merged: Path, record: str):
    (merged / RECORD).write_text(record)
    assert not merged_is_complete(merged, "default@v3", ADAPTER_FILES)


def test_no_folder_is_merged(tmp_path: Path):
    assert not merged_is_complete(tmp_path / "absent", "default@v3", ADAPTER_FILES)


def test_prune_removes_the_merges_no_alias_serves_and_leaves_what_is_not_ours(tmp_path: Path):
    for name in ("default@v3", "default@v2", "default@v1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / RECORD).write_text("{}")
    (tmp_path / ".default@v4.partial").mkdir()  # a merge killed half-way
    (tmp_path / "notes").mkdir()  # someone else's folder: no merge record
    (tmp_path / "stray.txt").write_text("x")

    removed = prune(tmp_path, {"default@v3", "default@v2"})

    assert removed == [".default@v4.partial", "default@v1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "default@v2", "default@v3", "notes", "stray.txt"]
    assert prune(tmp_path / "none-yet", {"default@v3"}) == []
