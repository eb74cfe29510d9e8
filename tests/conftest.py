"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# Real model and tokenizer files live beside the project, never inside it (../shared/models).
SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"


@pytest.fixture(scope="session")
def shared_models() -> Path:
    """Directory of the shared test models; skips the test when it is absent."""
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"shared models not found at {SHARED_MODELS}")
    return SHARED_MODELS


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory: pytest.TempPathFactory):
    """Model-key caches and steering stores of tests stay out of the user's ~/.cache."""
    import os

    old = os.environ.get("TILLER_CACHE_DIR")
    os.environ["TILLER_CACHE_DIR"] = str(tmp_path_factory.mktemp("tiller-cache"))
    yield
    if old is None:
        os.environ.pop("TILLER_CACHE_DIR", None)
    else:
        os.environ["TILLER_CACHE_DIR"] = old
