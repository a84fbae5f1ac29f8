"""The configuration reference page, generated from the config dataclasses themselves.

Every key's text is its field's attribute docstring (the string under the field, as Sphinx
autodoc reads it), its default and type come from the dataclass: the page cannot drift from
the code, and a field nobody documented is found (`undocumented`, tested in
tests/unit/test_config_reference.py). The sections are what the installed packages register
under the `sdloop.config` entry points, as `load_config` assembles them.

`python -m ops.docs.config_reference` prints the page; `make docs` writes it through
ops/docs/mkdocs_hooks.py.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from typing import Any

from serving.config import ENV_PREFIX, RootConfig, sections

INTRO = """\
# Configuration reference

Every key sdloop reads, by section, with its type, default and environment variable. A key is
set, from lowest to highest precedence, by its default here, the TOML file given with
`--config` (a `[section]` table per section), an environment variable
`SDLOOP_<SECTION>__<KEY>` (lists as JSON), and a command-line flag where the command has one.
[How configuration works](../guide/configuration.md) shows the file and the overrides.

This page is generated from the config dataclasses' field docstrings at `make docs`
(`ops/docs/config_reference.py`): edit the docstring in the code, not this page.
"""


def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string statement right under it), by name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, after in zip(body, body[1:] + [None], strict=True):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def documented_sections() -> list[tuple[str, type]]:
    """The root keys, then each registered section, as `load_config` builds the Config."""
    return [("", RootConfig), *sections().items()]


def undocumented() -> list[str]:
    """Every config key whose field has no docstring, as `section.key`."""
    missing = []
    for name, cls in documented_sections():
        docs = field_docs(cls)
        missing += [_key(name, f.name) for f in dataclasses.fields(cls) if f.name not in docs]
    return missing


def render() -> str:
    out = [INTRO]
    for name, cls in documented_sections():
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        out.append(f"## `[{name}]`\n" if name else "## Top-level keys\n")
        if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):
            out.append(inspect.cleandoc(cls.__doc__) + "\n")
        for f in dataclasses.fields(cls):
            env = ENV_PREFIX + (f"{name}__{f.name}" if name else f.name).upper()
            out.append(f"### `{_key(name, f.name)}`\n")
            out.append(f"`{_type_name(hints[f.name])}`, default `{_default(f)}`, "
                       f"environment `{env}`\n")
            out.append(docs.get(f.name, "*Not documented.*") + "\n")
    return "\n".join(out)


def _key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is list:
        return f"list[{_type_name(typing.get_args(typ)[0])}]"
    return getattr(typ, "__name__", str(typ))


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return json.dumps(value) if isinstance(value, str | list | bool) else str(value)


if __name__ == "__main__":
    print(render())
