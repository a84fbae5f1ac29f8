"""The layout stays one-way: `make lint`'s import-direction check (import-linter's contracts in
pyproject.toml: the packages, serving's rooms, what the learner may use of serving) passes on
the tree and fails on an upward import added on purpose."""

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
    assert "3 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(("module", "upward", "refusal"), [
    # the bottom reaching the top
    ("feedback/events.py", "learner.config", "feedback is not allowed to import learner"),
    # one layer up
    ("store/writer.py", "serving.versions.registry", "store is not allowed to import serving"),
    # the CLI re-creating the old cycle
    ("serving/entrypoints/cli.py", "learner.cli", "serving is not allowed to import learner"),
    # inside serving: an engine reaching for the registry that drives it
    ("serving/engine/manager.py", "serving.versions.registry",
     "serving.engine is not allowed to import serving.versions"),
    # inside serving: the shell reaching into a room
    ("serving/client.py", "serving.gateway.app",
     "serving.client is not allowed to import serving.gateway"),
    # the learner reaching past serving's shell
    ("learner/daemon.py", "serving.engine.manager",
     "learner is not allowed to import serving.engine"),
])
def test_an_upward_import_fails_the_check(tmp_path, module, upward, refusal):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "data", "templates"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / module, "a") as fh:
        fh.write(f"\nimport {upward}  # noqa: E402,F401\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0, out.stdout
    assert refusal in out.stdout, out.stdout
