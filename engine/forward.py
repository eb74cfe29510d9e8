"""One batched forward step: many sequences, each at its own position, in one jitted call.

The batch is flat (as in vLLM): T tokens, token t belonging to sequence seq_index[t] at
position positions[t]. A sequence may contribute many tokens (prefill, processed as a matrix)
or one (decode). Its keys and values go to the KV-cache blocks listed in its block-table row.

Hooks are plain arguments:
- steering: before layer l, token t's residual stream gets `steer_vecs[steer_index[t, l]]`
  added (index -1: nothing); l = n_layers is the stream after the last layer, before the final
  norm (where llama.cpp's control vector for its last layer goes);
- capture: for layers with cap_slot[l] >= 0 and tokens with cap_rows[t] >= 0,
  cap_out[point, cap_slot[l], cap_rows[t]] receives the point's (dim,) vector, points in
  CAPTURE_POINTS order;
- final capture: tokens with final_rows[t] >= 0 get the stream after the final norm (what the
  classifier reads, embeddings' default) in final_out[final_rows[t]];
- logits: tokens with want_logits[t] get the final norm and classifier, their rows of `logits`
  in token order; other tokens (the inside of a prefill) skip them;
- interventions (`iv`, engine/interventions.py): at each stream layer, conditions read the
  stream first, then the additions above, then the ops (ablate, clamp, cap, gated or scoped
  additions); readouts read each capture point. Empty tables cost nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from . import interventions as IV
from . import kernels as K

CAPTURE_POINTS = ("resid_pre", "attn_out", "mlp_out", "resid_post")


class Workspace(NamedTuple):
    """Preallocated activations for up to max_tokens tokens per step."""

    x: np.ndarray  # (T, dim) residual stream
    xb: np.ndarray  # (T, dim) normalized
    xa: np.ndarray  # (T, max_pad) int8 | f32 matmul input
    xs: np.ndarray  # (T, max_pad/32) f32 activation scales
    xc: np.ndarray  # (T, max_pad/32) int32 group sums for the weights' +128 (engine/simd.py)
    qkv: np.ndarray  # (T, q_dim + 2 kv_dim)
    att: np.ndarray  # (T, q_dim)
    proj: np.ndarray  # (T, dim)
    h13: np.ndarray  # (T, 2 hidden)
    hact: np.ndarray  # (T, hidden)
    scores: np.ndarray  # (n_threads, K.ATT_ROWS, max_seq_len rounded up to 32) f32
    weights: np.ndarray  # scores itself, or uint16 of its shape: bfloat16 values' weights
    qb: np.ndarray  # (T, q_dim) uint16: queries as bfloat16 for bfloat16 keys, else (T, 0)


@njit(**K._opts)
def _capture(cap_out, point, slot, cap_rows, v):
    for t in range(v.shape[0]):
        r = cap_rows[t]
        if r >= 0:
            cap_out[point, slot, r, :] = v[t]


@njit(parallel=True, **K._opts)
def _steer(x, steer_index, steer_vecs, layer):
    for t in prange(x.shape[0]):
        i = steer_index[t, layer]
        if i >= 0:
            for j in range(x.shape[1]):
                x[t, j] += steer_vecs[i, j]


@njit(**K._opts)
def _capture_final(final_out, final_rows, x, w, eps):
    for t in range(x.shape[0]):
        r = final_rows[t]
        if r >= 0:
            K.rmsnorm_row(final_out[r], x[t], w, eps)


@njit(**K._opts)
def _inputs(ws, T, n):
    """The workspace's matmul-input buffers for T rows of padded width n."""
    return ws.xa[:T, :n], ws.xs[:T, :n // 32], ws.xc[:T, :n // 32]  # xs, xc: (T, 0) in f32


@njit(**K._opts)
def _any_steering(steer_index):
    for t in range(steer_index.shape[0]):
        for layer in range(steer_index.shape[1]):
            if steer_index[t, layer] >= 0:
                return True
    return False


@njit(**K._opts)
def forward_step(w, ws, dims, eps, tokens, positions, seq_index, block_tables, k_cache, v_cache,
                 steer_index, steer_vecs, cap_slot, cap_rows, cap_out, final_rows, final_out,
                 want_logits, logits, iv):
    """Run every layer for T tokens; see the module docstring for the hook arguments.

    dims = (n_layers, dim, hidden_dim, n_heads, n_kv_heads, head_dim)
    """
    n_layers, dim, hidden, n_heads, n_kv_heads, head_dim = dims
    T = tokens.shape[0]
    x = ws.x[:T]
    xb = ws.xb[:T]
    qkv = ws.qkv[:T]
    att = ws.att[:T]
    proj = ws.proj[:T]
    h13 = ws.h13[:T]
    hact = ws.hact[:T]
    xa_d, xs_d, xc_d = _inputs(ws, T, K.in_width(w.wqkv[0]))  # inputs of width dim
    xa_q, xs_q, xc_q = _inputs(ws, T, K.in_width(w.wo[0]))  # inputs of width q_dim (wo's)
    xa_h, xs_h, xc_h = _inputs(ws, T, K.in_width(w.w2[0]))  # inputs of width hidden_dim
    steering = _any_steering(steer_index)
    intervening = IV.any_interventions(iv)
    reading = IV.any_readouts(iv)
    K.embed(x, tokens, w.embedding, w.embedding_scales)
    for layer in range(n_layers):
        if intervening:
            IV.observe(x, iv, layer)
        if steering:
            _steer(x, steer_index, steer_vecs, layer)
        if intervening:
            IV.apply_ops(x, iv, layer)
        slot = cap_slot[layer]
        if slot >= 0:
            _capture(cap_out, 0, slot, cap_rows, x)
        if reading:
            IV.readout(x, iv, layer * 4)
        # attention
        K.norm_load(xb, x, w.attn_norm[layer], eps, xa_d, xs_d, xc_d)
        K.linear(qkv, xa_d, xs_d, xc_d, w.wqkv[layer], w.wqkv_scales[layer])
        if w.bqkv.shape[1] > 0:  # qwen2
            K.add_rows(qkv, w.bqkv[layer])
        if w.q_norm.shape[1] > 0:  # qwen3: each head of q and k RMS-normalized before rope
            K.head_norms(qkv, w.q_norm[layer], w.k_norm[layer], n_heads, n_kv_heads, head_dim,
                         eps)
        K.rope_store_kv(qkv, ws.qb[:T], positions, w.rope_cos, w.rope_sin, n_heads, n_kv_heads,
                        head_dim, k_cache, v_cache, layer, seq_index, block_tables)
        K.attention(att, qkv, ws.qb[:T], k_cache, v_cache, layer, positions, seq_index,
                    block_tables, n_heads, n_kv_heads, head_dim, ws.scores, ws.weights)
        K.load_activations(att, xa_q, xs_q, xc_q)
        K.linear(proj, xa_q, xs_q, xc_q, w.wo[layer], w.wo_scales[layer])
        if slot >= 0:
            _capture(cap_out, 1, slot, cap_rows, proj)
        if reading:
            IV.readout(proj, iv, layer * 4 + 1)
        # feed-forward: the residual add is fused with its norm and quantization
        K.add_norm_load(x, proj, xb, w.ffn_norm[layer], eps, xa_d, xs_d, xc_d)
        K.linear(h13, xa_d, xs_d, xc_d, w.w13[layer], w.w13_scales[layer])
        K.swiglu_load(hact, h13, xa_h, xs_h, xc_h)
        K.linear(proj, xa_h, xs_h, xc_h, w.w2[layer], w.w2_scales[layer])
        if slot >= 0:
            _capture(cap_out, 2, slot, cap_rows, proj)
        if reading:
            IV.readout(proj, iv, layer * 4 + 2)
        K.add_into(x, proj)
        if slot >= 0:
            _capture(cap_out, 3, slot, cap_rows, x)
        if reading:
            IV.readout(x, iv, layer * 4 + 3)
    if intervening:
        IV.observe(x, iv, n_layers)
    if steering:
        _steer(x, steer_index, steer_vecs, n_layers)
    if intervening:
        IV.apply_ops(x, iv, n_layers)
    _capture_final(final_out, final_rows, x, w.final_norm, eps)
    # classifier, only for the tokens whose logits are wanted, in token order
    n_out = 0
    for t in range(T):
        if want_logits[t]:
            xb[n_out, :] = x[t]
            n_out += 1
    if n_out > 0:
        xa, xs, xc = _inputs(ws, n_out, K.in_width(w.classifier))
        K.norm_load(att[:n_out, :dim], xb[:n_out], w.final_norm, eps, xa, xs, xc)
        K.linear(logits[:n_out], xa, xs, xc, w.classifier, w.classifier_scales)
