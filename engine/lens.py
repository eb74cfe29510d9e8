"""The logit lens: a layer's residual stream read through the model's final norm and
classifier, as if the layers after it were skipped (nostalgebraist, 2020).

In numpy, on the classifier the engine computes with (its Q8_0 rows deinterleaved and decoded,
or its f32 rows), a block of vocabulary rows at a time so that a 32000-token classifier is never
held decoded whole; it runs on the server's worker pool, never inside a step.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .quant import dequantize_q8_0
from .simd import ROW_BLOCK
from .weights import Weights, deinterleave

_ROWS = 4096  # vocabulary rows decoded at a time
assert _ROWS % ROW_BLOCK == 0  # a block of rows starts on an interleaved block


def lens_logits(weights: Weights, config: ModelConfig, h: np.ndarray) -> np.ndarray:
    """(n, vocab) float32 logits of hidden states h (n, dim): final RMSNorm, then classifier."""
    h = np.asarray(h, np.float32)
    if h.ndim != 2 or h.shape[1] != config.dim:
        raise ValueError(f"hidden states must be (n, {config.dim}), got {h.shape}")
    x64 = h.astype(np.float64)
    inv = 1.0 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + config.norm_eps)
    x = (weights.final_norm.astype(np.float64) * (x64 * inv)).astype(np.float32)
    out = np.empty((len(h), config.vocab_size), np.float32)
    values, scales = weights.classifier, weights.classifier_scales
    vocab = config.vocab_size
    for start in range(0, vocab, _ROWS):
        n = min(_ROWS, vocab - start)
        if values.dtype == np.float32:
            w = values[start:start + n, :config.dim]
        else:  # interleaved in ROW_BLOCK-row blocks (engine/weights.py); _ROWS is a multiple
            blocks = slice(start // ROW_BLOCK, -(-(start + n) // ROW_BLOCK))
            v, s = deinterleave(values[blocks], scales[blocks], n)
            q = (v.astype(np.int16) - 128).astype(np.int8)
            w = dequantize_q8_0(q, s)[:, :config.dim]
        out[:, start:start + n] = x @ w.T
    return out


def top_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens of each row (ids (n, k) int64, logprobs (n, k) float32), most
    likely first; ties by the lower id."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    return ids.astype(np.int64), np.take_along_axis(lp, ids, axis=1).astype(np.float32)
