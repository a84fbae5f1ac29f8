"""Fixtures of the tests on the real embedded model (marked `model`): the model itself, converted
once into the shared cache (tests/harness/model_edits.py's `MODEL_CACHE`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.model_edits import MODEL_CACHE


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from serving.model_cache import ensure_embedded_model

    return ensure_embedded_model(MODEL_CACHE, progress=False)
