"""mkdocs hooks (mkdocs.yml `hooks:`): write the generated pages before mkdocs collects files.

A page is written only when its text changed, so `mkdocs serve` does not rebuild for ever.
mkdocs loads this file by path with its folder on `sys.path`, hence the sibling import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from config_reference import render  # ops/docs/config_reference.py

GENERATED = {"reference/configuration.md": render}


def on_pre_build(config: Any, **_: Any) -> None:
    for page, make in GENERATED.items():
        path = Path(config["docs_dir"]) / page
        text = make()
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
