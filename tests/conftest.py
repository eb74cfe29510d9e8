"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numba
import pytest
import tiller.engine  # noqa: F401  (sets numba's cache folder from the engine's source)

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
    """Model-key caches and steering stores of tests stay out of the user's ~/.cache; compiled
    kernels stay shared (servers and CLIs the tests start would otherwise recompile them)."""
    saved = {k: os.environ.get(k) for k in ("TILLER_CACHE_DIR", "NUMBA_CACHE_DIR")}
    os.environ.setdefault("NUMBA_CACHE_DIR", numba.config.CACHE_DIR)
    os.environ["TILLER_CACHE_DIR"] = str(tmp_path_factory.mktemp("tiller-cache"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True, scope="session")
def _one_package():
    """tiller is imported as `tiller.*` only: the checkout's engine/ and server/ folders must
    never load as top-level packages (a second copy of every module)."""
    yield
    strays = sorted(name for name in sys.modules if name.split(".")[0] in ("engine", "server"))
    assert not strays, f"modules imported outside the tiller package: {strays}"


# an in-process server: a module defines `config` (a ServerConfig); these load its model once
# per module and give each test a client of a fresh app around it


@pytest.fixture(scope="module")
def model(config):
    from tiller.server.app import load_model

    return load_model(config)


@pytest.fixture
async def client(aiohttp_client, config, model):
    from tiller.server.app import create_app

    return await aiohttp_client(create_app(config, model=model))
