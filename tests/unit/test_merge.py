"""A merged folder is used only if it is the merge of this version's adapter, unaltered: any
other folder is merged again rather than served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.merge import RECORD, merged_is_complete
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
