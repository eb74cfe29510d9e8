"""The runner hands the sampler a step's rows of logits without copying them when they are
consecutive rows of the engine's logits array, and a stacked copy otherwise; the values are
always np.stack's."""

from __future__ import annotations

import numpy as np
from tiller.server.runner import _batch


def test_consecutive_rows_of_one_array_are_a_view() -> None:
    logits = np.random.default_rng(0).standard_normal((5, 11)).astype(np.float32)
    rows = [logits[1], logits[2], logits[3]]
    batch = _batch(rows)
    assert np.shares_memory(batch, logits)
    assert np.array_equal(batch, np.stack(rows))


def test_anything_else_is_stacked() -> None:
    logits = np.random.default_rng(1).standard_normal((5, 11)).astype(np.float32)
    masked = logits[2].copy()
    masked[3] = -np.inf
    cases = [
        [logits[1], logits[3]],                  # a gap
        [logits[2], logits[1]],                  # out of order
        [logits[0], masked],                     # a masked copy (a grammar's)
        [logits[:, :4][0], logits[:, :4][1]],    # rows of a column slice
        [logits.astype(np.float64)[0]],          # not float32
    ]
    for rows in cases:
        batch = _batch(rows)
        assert not np.shares_memory(batch, logits)
        assert batch.dtype == np.float32
        assert np.array_equal(batch, np.stack(rows).astype(np.float32))
