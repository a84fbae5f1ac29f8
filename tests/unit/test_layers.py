"""The layout stays one-way: `make lint`'s import-direction check (import-linter's layers
contract in pyproject.toml) passes on the tree and fails on an upward import added on purpose."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("feedback", "store", "serving", "learner", "ops")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_every_package_imports_only_those_below_it():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(("module", "upward"), [
    ("feedback/events.py", "learner.config"),  # the bottom reaching the top
    ("store/writer.py", "serving.registry"),   # one layer up
    ("serving/cli.py", "learner.cli"),         # the CLI re-creating the old cycle
])
def test_an_upward_import_fails_the_check(tmp_path, module, upward):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "data", "templates"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / module, "a") as fh:
        fh.write(f"\nimport {upward}  # noqa: E402,F401\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0, out.stdout
    below = module.split("/")[0]
    assert f"{below} is not allowed to import {upward.split('.')[0]}" in out.stdout, out.stdout
