"""The configuration reference is generated from the config dataclasses (ops/docs): every key
has a docstring, and the page names every key with its default and environment variable."""

from __future__ import annotations

import dataclasses

from ops.docs import config_reference
from ops.docs.config_reference import documented_sections, field_docs, render, undocumented


def test_every_config_key_has_a_docstring():
    assert undocumented() == [], "document these fields (a docstring right under the field)"


def test_a_field_without_a_docstring_is_reported(monkeypatch):
    @dataclasses.dataclass
    class Section:
        told: int = 1
        """Documented."""
        untold: str = ""

    assert field_docs(Section) == {"told": "Documented."}
    monkeypatch.setattr(config_reference, "sections", lambda: {"extra": Section})
    assert undocumented() == ["extra.untold"]


def test_the_page_names_every_key_with_its_default_and_environment_variable():
    page = render()
    for section, cls in documented_sections():
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}" if section else f.name
            assert f"### `{key}`" in page
    assert "### `server.port`\n\n`int`, default `8000`, environment `SDLOOP_SERVER__PORT`" in page
    assert "environment `SDLOOP_DATA_DIR`" in page
