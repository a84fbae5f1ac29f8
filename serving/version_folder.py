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
        """Every file the manifest names is there with its sha256 (checked before loading)."""
        for name, digest in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                raise RegistryError(422, f"{file} is missing")
            if file_digest(file) != digest:
                raise RegistryError(422, f"{file} does not match its sha256 in the manifest")


def open_version(folder: str | Path, manifest: dict[str, Any] | None = None) -> VersionFolder:
    """The folder and its checked manifest (read from the folder unless given, e.g. as stored)."""
    path = Path(folder).resolve()
    if manifest is None:
        manifest = read_manifest(path)
    return VersionFolder(path, manifest)


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
    `serving.vllm_plugin`: a probe under traffic refused a correct version that way)."""
    return sum(abs(g - w) for g, w in zip(served, probe["logprobs"], strict=True)) \
        / max(len(probe["response_token_ids"]), 1)
