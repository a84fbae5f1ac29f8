"""The questions a candidate must keep answering right: the shipped retention set, or one of
the operator's own (`learner.retention_set`), read and checked without torch so that a bad
file is refused when the config loads, not minutes into a round."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

KEY = "learner.retention_set"


def retention_set(path: str = "") -> dict[str, Any]:
    """`{"questions": [{"q": …, "a": [key, …]}, …], "drift_prompts": [str, …]}` from `path`,
    or the shipped set (~300 general short-answer questions) when it is empty. Raises
    ValueError naming the key and what to fix."""
    if not path:
        return json.loads(resources.files("learner").joinpath("data", "retention.json").read_text())
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{KEY}: cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{KEY}: {path} is not JSON: {exc}") from None
    _check(data, path)
    return data


def _check(data: Any, path: str) -> None:
    shape = ('{"questions": [{"q": "What is the capital of France?", "a": ["Paris"]}, …], '
             '"drift_prompts": ["Tell me about your day.", …]}')
    if not isinstance(data, dict):
        raise ValueError(f"{KEY}: {path} must hold a JSON object like {shape}")
    questions, prompts = data.get("questions"), data.get("drift_prompts")
    if not isinstance(questions, list) or not questions:
        raise ValueError(f"{KEY}: {path} needs a non-empty \"questions\" list, like {shape}")
    for n, q in enumerate(questions):
        if not (isinstance(q, dict) and isinstance(q.get("q"), str) and q["q"].strip()
                and isinstance(q.get("a"), list) and q["a"]
                and all(isinstance(k, str) and k.strip() for k in q["a"])):
            raise ValueError(f"{KEY}: {path}: questions[{n}] must be {{\"q\": a question, \"a\": "
                             f"[the words a right answer says, at least one]}}")
    if not isinstance(prompts, list) or not prompts or not all(
            isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{KEY}: {path} needs a non-empty \"drift_prompts\" list of texts, "
                         f"like {shape}")


def shipped_prompts(name: str) -> list[str]:
    """The prompts of one of the shipped pools (`learner/data/<name>`): the anchor and
    near-miss pools the round and the preserved subspace both read."""
    return json.loads(resources.files("learner").joinpath("data", name).read_text())["prompts"]
