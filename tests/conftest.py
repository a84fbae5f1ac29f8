"""Hooks and fixtures every test package shares: markers by directory, skips that fail under CI,
and a real store writer on a DuckDB file of its own.

Every test is marked by where it lives (`pytest -m unit`, `-m "not integration and not model"`):
tests/unit `unit`, tests/integration `integration`, tests/learner `model`.

Under CI (`CI=true`, as `.ci/run` is run) a skipped test fails: CI has every tool and package
the suite needs (`make test` installs them), so a skip there is a check that silently did not
run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from store import StoreWriter

SKIPS_FAIL = os.environ.get("CI") == "true"
TESTS = Path(__file__).resolve().parent
# The marker each test directory's tests get (registered in pyproject.toml).
MARKER_OF_DIRECTORY = {"unit": "unit", "integration": "integration", "learner": "model"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            directory = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:  # not under tests/
            continue
        marker = MARKER_OF_DIRECTORY.get(directory)
        if marker is not None:
            item.add_marker(marker)


def _fail_a_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if SKIPS_FAIL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may be: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    _fail_a_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _fail_a_skip(outcome.get_result())


@pytest.fixture()
def writer(tmp_path) -> Iterator[StoreWriter]:
    w = StoreWriter(tmp_path / "store.duckdb").open()
    yield w
    w.close()
