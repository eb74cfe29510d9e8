"""Steering moves what the built-in model writes, through the HTTP API: a small, fixed-seed
version of bench/builtin_steering.py (see there), in process through aiohttp's test client.

Happy/sad and dog/cat "mean" control vectors at layer 3, 64 seeds of 100 tokens at -2s, 0 and
2s (the bench's units). What is asserted held for each of 3 disjoint blocks of 64 seeds on the
shipped model: the share never falls and rises by at least 0.5 in all (the retrained model:
mood by 0.72-0.85, animal by 0.59-0.68); the unsteered share alone is not pinned. 64 seeds, not
32: a block of 32 stories holds only about a dozen dog or cat mentions, and seeds 0..31 gave the
dog share a rise of only 0.44 (0.44 -> 0.88). The NLL bound is well above what steered text
scores (under 0.6 per token in the bench) and under broken text (3 and more).
"""

from __future__ import annotations

import pytest
from tiller.server.app import ServerConfig, create_app, load_model

from bench.builtin_steering import (
    ANIMAL,
    DEFAULT_LAYERS,
    DEFAULT_UNITS,
    MOOD,
    run_attribute,
    session_post,
)
from tiller import BUILTIN_MODEL

SEEDS = range(64)
TOKENS = 100
MULTIPLES = (-2.0, 0.0, 2.0)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ServerConfig:
    # one scale's requests in one batch, as the bench does
    return ServerConfig(model_path=BUILTIN_MODEL, parallel=len(SEEDS),
                        steering_dir=tmp_path_factory.mktemp("steering"))


@pytest.fixture(scope="module")
def model(config):
    return load_model(config)


@pytest.fixture
async def post(aiohttp_client, config, model):
    return session_post(await aiohttp_client(create_app(config, model=model)))


@pytest.mark.parametrize("attribute", [MOOD, ANIMAL], ids=lambda a: a.name)
async def test_the_share_follows_the_scale(post, attribute):
    unit = DEFAULT_UNITS[attribute.name]
    rows = await run_attribute(post, attribute, DEFAULT_LAYERS, [m * unit for m in MULTIPLES],
                               SEEDS, TOKENS)
    shares = [r.share for r in rows]
    assert shares[0] <= shares[1] <= shares[2], shares
    assert shares[2] >= shares[0] + 0.5, shares
    # another subject, not broken text: the unsteered model still finds it plausible
    assert all(r.nll < 2.0 for r in rows), [r.nll for r in rows]
