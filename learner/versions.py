"""Writing a trained adapter as an immutable version folder (the contract is
`serving.version_folder`), which the round then hands to the server to publish.

`<adapters>/<alias>@v<N>/` holds the peft adapter files and `manifest.json`: the version, its
parent, the base model, a sha256 per file, whatever the round records (knobs, episodes, gate
metrics), and a probe — a prompt and response with the log-probabilities this trainer computed
for them under the new weights and under the base model. The server loads the folder into the
engine and compares the engine's log-probabilities with the probe's before it flips an alias;
the probe is chosen among the training examples where adapter and base differ most, so that a
pass shows the engine really serves this version.

The folder is written under a temporary name and renamed when complete: a crash never leaves a
half-written version.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from feedback import utcnow
from learner.inference import adapter_and_base_log_probs, generate_greedy, prompt_ids
from serving.version_folder import MANIFEST, file_digest

MAX_PROBE_CANDIDATES = 8
PROBE_TOKENS = 16


def choose_probe(model: Any, tokenizer: Any,
                 candidates: Sequence[tuple[list[dict[str, Any]], list[int]]]) -> dict[str, Any]:
    """A prompt and the adapter's own greedy answer to it, where adapter and base disagree most.

    Greedy tokens are confident ones, so serving precision (bf16 in the engine, fp32 here)
    barely moves their log-probabilities; the registry compares adapter-minus-base deltas,
    which cancels what is left of it.
    """
    best: dict[str, Any] | None = None
    model.eval()
    seen: set[str] = set()
    for messages, _ in candidates:
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        if len(seen) > MAX_PROBE_CANDIDATES:
            break
        response = generate_greedy(model, tokenizer, [messages], PROBE_TOKENS)[0]
        if not response:
            continue
        prompt = prompt_ids(tokenizer, messages)
        ids = torch.tensor(response)[:, None]
        tuned, base = (logp.gather(-1, ids.to(logp.device))[:, 0].tolist()
                       for logp in adapter_and_base_log_probs(model, prompt, response))
        gap = sum(abs(a - b) for a, b in zip(tuned, base, strict=True)) / len(response)
        if best is None or gap > best["adapter_base_gap"]:
            best = {"prompt_token_ids": prompt, "response_token_ids": response,
                    "logprobs": tuned, "base_logprobs": base, "adapter_base_gap": gap}
    if best is None:
        raise ValueError("a probe needs at least one (messages, response) candidate")
    return best


def write_version(
    model: Any,
    tokenizer: Any,
    adapters_root: Path,
    version: str,
    base_model: str,
    parent: str | None,
    probe_candidates: Sequence[tuple[list[dict[str, Any]], list[int]]],
    record: dict[str, Any] | None = None,
) -> Path:
    """Save the adapter and its manifest as `adapters_root/version`; returns the folder."""
    alias = version.split("@", 1)[0]
    target = Path(adapters_root) / version
    if target.exists():
        raise FileExistsError(f"{target} exists: versions are immutable")
    tmp = Path(adapters_root) / f".{version}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    files = {p.name: file_digest(p) for p in sorted(tmp.iterdir())
             if p.is_file() and p.suffix in (".safetensors", ".json")}
    manifest = {
        "version": version, "alias": alias, "parent": parent, "base_model": base_model,
        "created_at": utcnow().isoformat() + "Z", "files": files,
        "probe": choose_probe(model, tokenizer, probe_candidates),
        **(record or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    tmp.rename(target)
    return target
