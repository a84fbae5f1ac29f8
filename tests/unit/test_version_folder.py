"""What a version folder must be before anything loads it: its manifest hashes the files the
engine loads and names nothing outside the folder, the folder holds no weights the manifest does
not hash, and a publish takes folders only from `server.publish_dirs`."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from serving.config import load_config
from serving.version_folder import (
    MANIFEST,
    RegistryError,
    confined,
    file_digest,
    open_version,
)
from serving.versions.registry import AdapterRegistry


def _version(root: Path, name: str = "default@v1", **manifest: Any) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    files = {n: file_digest(folder / n) for n in ("adapter_config.json", "adapter_model.safetensors")}
    (folder / MANIFEST).write_text(json.dumps({
        "version": name, "alias": name.split("@")[0], "probe": {}, "files": files, **manifest}))
    return folder


def _refused(folder: Path, status: int = 422) -> str:
    with pytest.raises(RegistryError) as caught:
        open_version(folder).verify_files()
    assert caught.value.status == status, caught.value
    return str(caught.value)


def test_a_folder_whose_manifest_hashes_what_the_engine_loads_passes(tmp_path):
    open_version(_version(tmp_path)).verify_files()


@pytest.mark.parametrize("files", [{}, {"adapter_config.json": "0" * 64}, [], {"x": 1}])
def test_a_manifest_that_does_not_hash_the_adapter_files_is_refused(tmp_path, files):
    message = _refused(_version(tmp_path, files=files))
    assert "'files'" in message and MANIFEST in message


@pytest.mark.parametrize(("name", "words"), [
    ("/etc/passwd", "relative to the version folder"),
    ("../other@v1/adapter_model.safetensors", "'..' is not allowed"),
    ("sub/../../x", "'..' is not allowed"),
])
def test_a_manifest_naming_files_outside_the_folder_is_refused(tmp_path, name, words):
    folder = _version(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert words in _refused(folder)


def test_a_hashed_file_that_is_a_symlink_out_of_the_folder_is_refused(tmp_path):
    """The hash would be of a file elsewhere, which can change under the folder's name."""
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"weights")
    folder = _version(tmp_path / "versions")
    (folder / "adapter_model.safetensors").unlink()
    os.symlink(outside, folder / "adapter_model.safetensors")
    assert "leads outside the version folder" in _refused(folder)


@pytest.mark.parametrize("extra", ["adapter_model.bin", "adapter_model.pt", "extra.safetensors"])
def test_a_folder_with_weights_the_manifest_does_not_hash_is_refused(tmp_path, extra):
    folder = _version(tmp_path)
    (folder / extra).write_bytes(b"more weights")
    message = _refused(folder)
    assert extra in message and "does not hash" in message


def test_publish_takes_folders_only_from_the_publish_dirs(tmp_path):
    allowed = tmp_path / "sdloop-data"
    inside = _version(allowed / "adapters")
    assert confined(inside, [allowed], "server.publish_dirs") == inside.resolve()
    outside = _version(tmp_path / "downloads")
    with pytest.raises(RegistryError) as caught:
        confined(outside, [allowed], "server.publish_dirs")
    assert caught.value.status == 403 and "server.publish_dirs" in str(caught.value)
    # A symlink inside the allowed folder to a folder outside it is judged by where it leads.
    os.symlink(outside, allowed / "adapters" / "default@v2")
    with pytest.raises(RegistryError, match="outside the folders"):
        confined(allowed / "adapters" / "default@v2", [allowed], "server.publish_dirs")
    with pytest.raises(RegistryError, match="outside the folders"):  # no dirs: nothing allowed
        confined(inside, [], "server.publish_dirs")


def test_the_registry_refuses_a_publish_from_outside_before_reading_the_folder(tmp_path):
    registry = AdapterRegistry(writer=None, engine=None,  # type: ignore[arg-type]
                               publish_dirs=[tmp_path / "sdloop-data"])
    with pytest.raises(RegistryError) as caught:
        asyncio.run(registry.publish(tmp_path / "nowhere" / "default@v9"))
    assert caught.value.status == 403
    assert "SDLOOP_SERVER__PUBLISH_DIRS" in str(caught.value)  # says which setting to change


def test_versions_are_published_from_the_data_dir_unless_publish_dirs_says_otherwise(tmp_path):
    cfg = load_config(env={}, overrides={"data_dir": str(tmp_path)})
    assert cfg.publish_paths == [tmp_path.resolve()]  # which holds the learner's adapters/
    assert cfg.adapters_path.is_relative_to(cfg.publish_paths[0])
    cfg = load_config(env={"SDLOOP_SERVER__PUBLISH_DIRS": json.dumps([str(tmp_path / "v")])})
    assert cfg.publish_paths == [(tmp_path / "v").resolve()]


def test_the_ingester_refuses_a_publish_from_outside_too(tmp_path):
    """At scale the ingester takes the publish and every replica loads what it names."""
    from serving.versions.control import ControlPublisher

    publisher = object.__new__(ControlPublisher)  # no broker: refused before one is needed
    publisher.publish_dirs = [tmp_path / "sdloop-data"]
    with pytest.raises(RegistryError) as caught:
        asyncio.run(publisher.publish(_version(tmp_path / "downloads")))
    assert caught.value.status == 403 and "server.publish_dirs" in str(caught.value)
