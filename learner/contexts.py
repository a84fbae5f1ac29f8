"""Teacher contexts: where the feedback goes in the prompt the teacher sees.

Templates are data (`learner/templates/*.toml`), not code: a template names, per signal source,
the text appended to the conversation's last user message, with `{signal}` standing for the
feedback. The student sees the conversation without it. Placement matters more than anything
else measured on the embedded model (docs/experiments/2026-11-27-stand-alone-arms.md): right
after the question, phrased as an example answer.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from feedback import content_text
from learner.config import CONTEXT_SOURCES


def last_user_index(messages: list[dict[str, Any]]) -> int | None:
    """The index of the conversation's last user turn (None: it has none)."""
    return max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)


@dataclass(frozen=True)
class Template:
    name: str
    suffixes: dict[str, str]

    def teacher_messages(
        self, messages: list[dict[str, Any]], source: str, signal: str
    ) -> list[dict[str, Any]]:
        """The student's prompt with the signal placed in its last user turn."""
        if source not in self.suffixes:
            raise ValueError(f"template '{self.name}' has no placement for source '{source}'")
        out = copy.deepcopy(messages)
        last_user = last_user_index(out)
        if last_user is None:
            raise ValueError("a teacher context needs a user message to attach to")
        # Plain replacement, not str.format: feedback text may contain braces.
        suffix = self.suffixes[source].replace("{signal}", signal.strip())
        out[last_user]["content"] = content_text(out[last_user].get("content")) + suffix
        return out


def load_template(name_or_path: str) -> Template:
    """A shipped template by name (`sdft_example`) or a TOML file of the same shape."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        text, where = path.read_text(), str(path)
    else:
        entry = resources.files("learner").joinpath("templates", f"{name_or_path}.toml")
        if not entry.is_file():
            shipped = sorted(p.name.removesuffix(".toml")
                             for p in resources.files("learner").joinpath("templates").iterdir()
                             if p.name.endswith(".toml"))
            raise ValueError(f"learner.template: no template '{name_or_path}'; shipped: "
                             f"{', '.join(shipped)}, or give a path to a .toml file")
        text, where = entry.read_text(), f"template {name_or_path}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where} is not valid TOML: {exc}") from None
    suffixes = {}
    for source, spec in (data.get("sources") or {}).items():
        if source not in CONTEXT_SOURCES:
            raise ValueError(f"{where}: unknown source '{source}'; one of {', '.join(CONTEXT_SOURCES)}")
        if not isinstance(spec, dict) or "{signal}" not in str(spec.get("suffix", "")):
            raise ValueError(f"{where}: sources.{source}.suffix must be a string containing {{signal}}")
        suffixes[source] = spec["suffix"]
    return Template(str(data.get("name", name_or_path)), suffixes)
