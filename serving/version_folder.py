"""The version-folder contract between the learner, which writes versions, and the servers that
publish them (the registry on one machine, the control publisher and every replica at scale).

A version is an immutable folder `<alias>@v<N>/`: the peft adapter files and `manifest.json`
with the version, its alias and parent, a sha256 per file, the gate's verdict, and a probe — a
prompt and response with the log-probabilities the trainer computed under the new weights and
under the base model. Everything that reads a folder checks it here, the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# What the engine loads from a version folder: vLLM's LoRA loader (and peft, for the merged copy)
# reads the config and these weights, and with `adapter_model.safetensors` present neither reads
# another weights file. The manifest must hash both, so that nothing the engine loads is unchecked.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Files a loader could take weights from (torch pickles among them): in a version folder each
# must be one the manifest hashes, or the folder is refused.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
VERSION_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*@v[0-9]+$")
# Mean |Δ log-prob| per probe token, engine under the version vs trainer under the new
# weights (`probe_distance`). bf16 serving of the fp32-trained weights measured 0.005–0.011
# (runtime LoRA and merged, 2026-12-04); as a difference with the base scores it had measured
# 0.001 on confident tokens and up to 0.105 on uncertain ones. A version with other weights
# than the manifest's is far off (2 and more).
PROBE_TOLERANCE = 0.25


class RegistryError(RuntimeError):
    """A publish, promote or rollback was refused; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def engine_name(version: str, files: dict[str, str]) -> str:
    """`VersionFolder.engine_name` of a version with these files (name → sha256)."""
    digest = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
    return f"{version}.{digest[:12]}"


@dataclass(frozen=True)
class VersionFolder:
    path: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def alias(self) -> str:
        return self.manifest["alias"]

    @property
    def engine_name(self) -> str:
        """The name the primary engine loads this version's adapter under: the version and a
        digest of its files' hashes. Version names count per store, so gateways of two stores
        sharing one engine (staging beside production) may each have a `default@v1`; under the
        bare name the engine would serve whichever was loaded first to both, and the other's
        probe would fail. Replicas of one store load the same files: the same name."""
        return engine_name(self.version, self.manifest["files"])

    @property
    def status(self) -> str:
        """`rejected` for a version whose gate failed, `candidate` otherwise. A failed gate is
        final unless the learner ran with its gate not enforced (benchmarks): then it is only
        recorded."""
        gate = self.manifest.get("gate") or {}
        return "rejected" if gate.get("passed") is False and gate.get("enforced", True) \
            else "candidate"

    def rejected(self) -> dict[str, Any]:
        """What publishing a rejected version answers: it is recorded, never loaded."""
        return {"version": self.version, "alias": self.alias, "status": "rejected",
                "reasons": (self.manifest.get("gate") or {}).get("reasons", [])}

    def verify_files(self) -> None:
        """Every file the manifest names is there, inside the folder (symlinks followed), with
        its sha256, and the folder holds no weights file the manifest does not hash (checked
        before every load: the manifest is only worth what it covers)."""
        for name, digest in self.manifest["files"].items():
            file = self.path / name
            if not file.resolve().is_relative_to(self.path):
                raise RegistryError(422, f"{file} leads outside the version folder {self.path} "
                                         "(a symlink?); put the file itself in the folder")
            if not file.is_file():
                raise RegistryError(422, f"{file} is missing")
            if file_digest(file) != digest:
                raise RegistryError(422, f"{file} does not match its sha256 in the manifest")
        hashed = {(self.path / name).resolve() for name in self.manifest["files"]}
        for entry in sorted(self.path.iterdir()) if self.path.is_dir() else ():
            if entry.suffix in WEIGHT_SUFFIXES and entry.resolve() not in hashed:
                raise RegistryError(422, f"{entry} holds weights the manifest does not hash: "
                                         f"remove it from the folder or add its sha256 to "
                                         f"'files' in {MANIFEST}")


def open_version(folder: str | Path, manifest: dict[str, Any] | None = None) -> VersionFolder:
    """The folder and its checked manifest (read from the folder unless given, e.g. as stored)."""
    path = Path(folder).resolve()
    if manifest is None:
        manifest = read_manifest(path)
    check_file_names(path, manifest)
    return VersionFolder(path, manifest)


def check_file_names(path: Path, manifest: dict[str, Any]) -> None:
    """The manifest's `files` name, relative to the folder, at least the files the engine loads
    (`ADAPTER_FILES`) and nothing outside the folder: a manifest that hashes nothing, or other
    files than those loaded, would pass its own check. RegistryError(422) says what to fix."""
    files = manifest.get("files")
    where = path / MANIFEST
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise RegistryError(422, f"'files' in {where} must map file names to their sha256")
    missing = [name for name in ADAPTER_FILES if name not in files]
    if missing:
        raise RegistryError(422, f"'files' in {where} must list the adapter files the engine "
                                 f"loads, with their sha256; missing: {', '.join(missing)}")
    for name in files:
        if not name or Path(name).is_absolute():
            raise RegistryError(422, f"'files' in {where} names {name!r}: use a path relative "
                                     "to the version folder")
        if ".." in Path(name).parts:
            raise RegistryError(422, f"'files' in {where} names {name!r}: '..' is not allowed, "
                                     "name files inside the version folder")


def confined(folder: str | Path, roots: Sequence[Path], knob: str) -> Path:
    """`folder`, resolved (symlinks followed), if it lies inside one of `roots`; else
    RegistryError(403) naming `knob`, the setting that lists them. A publish names a path, and
    without this any folder the server can read could be offered as a version."""
    path = Path(folder).resolve()
    allowed = [Path(root).resolve() for root in roots]
    if not any(path.is_relative_to(root) for root in allowed):
        where = ", ".join(str(root) for root in allowed) or "nowhere"
        raise RegistryError(403, f"{path} is outside the folders versions may be published from "
                                 f"({where}); move the version folder into one of them or add "
                                 f"its parent folder to {knob}")
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise RegistryError(404, f"no adapter folder at {path}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise RegistryError(400, f"{path} has no {MANIFEST}") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(400, f"{path / MANIFEST} is not valid JSON: {exc}") from None
    for key in ("version", "alias", "files", "probe"):
        if key not in manifest:
            raise RegistryError(400, f"{path / MANIFEST} lacks '{key}'")
    if not VERSION_NAME.match(str(manifest["version"])):
        raise RegistryError(400, f"version name '{manifest['version']}' is not <alias>@v<N>")
    if manifest["version"].split("@")[0] != manifest["alias"]:
        raise RegistryError(400, f"version {manifest['version']} does not belong to alias "
                                 f"'{manifest['alias']}'")
    return manifest


def probe_distance(probe: dict[str, Any], served: Sequence[float]) -> float:
    """Mean per-token difference between the log-probabilities the engine gives the probe
    response under a version (as runtime LoRA, or merged) and those the trainer computed under
    the new weights.

    Absolute, not as a difference with the engine's base scores: the merged engine has no base
    to difference with, and a difference would carry any error of the engine's base path into
    the check (vLLM-CPU's own LoRA ops gave base requests the last slot's adapter, see
    `serving.engine.vllm_plugin`: a probe under traffic refused a correct version that way)."""
    return sum(abs(g - w) for g, w in zip(served, probe["logprobs"], strict=True)) \
        / max(len(probe["response_token_ids"]), 1)
