"""What the adapter registry (serving.versions.registry) needs without vLLM: a stand-in engine
that loads, unloads and scores as told, and version folders that pass a publish's checks."""

from __future__ import annotations

import json
from pathlib import Path

from serving.engine.manager import EngineRequestError, EngineUnavailable
from serving.version_folder import MANIFEST, file_digest

PROBE = {"prompt_token_ids": [1, 2], "response_token_ids": [3], "logprobs": [-0.5]}


class StandInEngine:
    """What the registry asks of `EngineManager`, as vLLM does it: load a folder under a name
    (a name it has keeps its first folder), unload, score under a name (the probe's scores of
    the folder loaded under it, as the trainer computed them), or nothing at all once `away`."""

    served_model_name = "base"

    def __init__(self) -> None:
        self.folders: dict[str, Path] = {}  # name → the folder loaded under it
        self.away = False

    @property
    def loaded(self) -> set[str]:
        """The versions loaded (their folders' manifests), whatever the engine calls them."""
        return {json.loads((f / MANIFEST).read_text())["version"] for f in self.folders.values()}

    async def load_adapter(self, name: str, path: str) -> None:
        if self.away:
            raise EngineUnavailable("the inference engine did not answer")
        self.folders.setdefault(name, Path(path))

    async def unload_adapter(self, name: str) -> None:
        self.folders.pop(name, None)

    async def score(self, model: str, prompt: list[int], response: list[int]) -> list[float]:
        if self.away:
            raise EngineUnavailable("the inference engine did not answer")
        if model not in self.folders:
            raise EngineRequestError(404, f"The model `{model}` does not exist.")
        return list(json.loads((self.folders[model] / MANIFEST).read_text())["probe"]["logprobs"])


def write_version(root: Path, name: str, alias: str = "default", weights: bytes = b"",
                  logprob: float = -0.5) -> Path:
    """A version folder `root/name` that passes a publish's checks on a `StandInEngine`: its
    manifest records the files' hashes and a probe (`logprob`) the engine scores as recorded.
    `weights` default to the name."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    weights = weights or name.encode()
    (folder / "adapter_model.safetensors").write_bytes(weights)
    files = {n: file_digest(folder / n) for n in ("adapter_config.json", "adapter_model.safetensors")}
    probe = {**PROBE, "logprobs": [logprob]}
    (folder / MANIFEST).write_text(json.dumps({"version": name, "alias": alias,
                                               "probe": probe, "files": files}))
    return folder
