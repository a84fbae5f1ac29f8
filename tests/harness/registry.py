"""What the adapter registry (serving.versions.registry) needs without vLLM: a stand-in engine
that loads, unloads and scores as told, and version folders that pass a publish's checks."""

from __future__ import annotations

import json
from pathlib import Path

from serving.engine.manager import EngineUnavailable
from serving.version_folder import MANIFEST, file_digest

PROBE = {"prompt_token_ids": [1, 2], "response_token_ids": [3], "logprobs": [-0.5]}


class StandInEngine:
    """What the registry asks of `EngineManager`: load, unload, score (the probe's scores,
    as the trainer computed them), or nothing at all once `away`."""

    served_model_name = "base"

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.away = False

    async def load_adapter(self, name: str, path: str) -> None:
        if self.away:
            raise EngineUnavailable("the inference engine did not answer")
        self.loaded.add(name)

    async def unload_adapter(self, name: str) -> None:
        self.loaded.discard(name)

    async def score(self, model: str, prompt: list[int], response: list[int]) -> list[float]:
        if self.away:
            raise EngineUnavailable("the inference engine did not answer")
        return list(PROBE["logprobs"])


def write_version(root: Path, name: str, alias: str = "default") -> Path:
    """A version folder `root/name` that passes a publish's checks on a `StandInEngine`: its
    manifest records the files' hashes and a probe the engine scores as recorded."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(name.encode())
    files = {n: file_digest(folder / n) for n in ("adapter_config.json", "adapter_model.safetensors")}
    (folder / MANIFEST).write_text(json.dumps({"version": name, "alias": alias,
                                               "probe": PROBE, "files": files}))
    return folder
