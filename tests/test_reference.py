"""Sanity tests of the plain-numpy reference forward pass that the engine is tested against."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from tiller.engine.config import ModelConfig
from tiller.engine.quant import quantize_q8_0

from tests.reference import (
    CAPTURE_NAMES,
    add_q8_weights,
    apply_rope,
    load_v0_legacy,
    q8_matmul,
    quantize_activations,
    random_weights,
    reference_forward,
    reference_generate,
)

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
STORIES = MODELS / "stories260K.bin"
TOKENIZER = MODELS / "tok512.bin"
needs_models = pytest.mark.skipif(not (STORIES.exists() and TOKENIZER.exists()),
                                  reason=f"real test models not found in {MODELS}")

PROMPT = [1, 403, 407, 261, 378]  # "<s>Once upon a time" in tok512
# run.c at temperature 0 (llama2.c README, stories260K); our 200 greedy tokens are a prefix.
GOLDEN_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. "
    "She said, \"I want to play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what "
    "to do.\"\n"
    "Lily didn't want to help her mom, so she said, \"I'm sorry, mom. I didn't know what to "
    "do.\" Her mom said, \"Don't worry, Lily. We can help you.")


def small_config(**overrides: int) -> ModelConfig:
    fields = {"dim": 32, "hidden_dim": 40, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
              "vocab_size": 50, "max_seq_len": 64}
    fields.update(overrides)
    return ModelConfig(**fields)


def read_pieces(path: Path, vocab_size: int) -> list[bytes]:
    """llama2.c tokenizer file: int32 max_len, then per token float32 score, int32 len, bytes."""
    raw = path.read_bytes()
    offset, pieces = 4, []
    for _ in range(vocab_size):
        _score, n = struct.unpack_from("<fi", raw, offset)
        pieces.append(raw[offset + 8:offset + 8 + n])
        offset += 8 + n
    assert offset == len(raw)
    return pieces


def decode(pieces: list[bytes], ids: list[int], prev: int) -> str:
    """run.c's decode: drop the space after BOS, turn <0xXX> pieces into raw bytes."""
    out = b""
    for tok in ids:
        piece = pieces[tok]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        if m := re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", piece):
            piece = bytes([int(m.group(1), 16)])
        out += piece
        prev = tok
    return out.decode("utf-8")


# ----------------------------------------------------------------------------------------------
# A second, loop-by-loop transcription of run.c's forward(), one token at a time


def naive_run_c(weights: dict, cfg: ModelConfig, tokens: list[int]) -> dict[str, np.ndarray]:
    L, d, hd = cfg.n_layers, cfg.dim, cfg.head_dim
    key_cache = np.zeros((L, len(tokens), cfg.kv_dim), np.float32)
    value_cache = np.zeros_like(key_cache)
    caps = {name: np.zeros((L, len(tokens), d), np.float32) for name in CAPTURE_NAMES}
    classifier = weights.get("classifier", weights["token_embedding"])
    logits = []

    def rmsnorm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        ss = 1.0 / math.sqrt(sum(float(v) * float(v) for v in x) / len(x) + cfg.norm_eps)
        return (w * (ss * x)).astype(np.float32)

    for pos, token in enumerate(tokens):
        x = weights["token_embedding"][token].copy()
        for layer in range(L):
            caps["resid_pre"][layer, pos] = x
            xb = rmsnorm(x, weights["attn_norm"][layer])
            q = weights["wq"][layer] @ xb
            k = weights["wk"][layer] @ xb
            v = weights["wv"][layer] @ xb
            for i in range(0, d, 2):
                val = pos * (1.0 / cfg.rope_theta ** ((i % hd) / hd))
                fcr, fci = math.cos(val), math.sin(val)
                for vec in (q, k) if i < cfg.kv_dim else (q,):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
            key_cache[layer, pos], value_cache[layer, pos] = k, v
            att_out = np.zeros(d, np.float32)
            for h in range(cfg.n_heads):
                qh = q[h * hd:(h + 1) * hd]
                kvh = h // (cfg.n_heads // cfg.n_kv_heads)
                att = np.array([qh @ key_cache[layer, t, kvh * hd:(kvh + 1) * hd]
                                for t in range(pos + 1)]) / math.sqrt(hd)
                att = np.exp(att - att.max())
                att /= att.sum()
                for t in range(pos + 1):
                    att_out[h * hd:(h + 1) * hd] += att[t] * value_cache[layer, t,
                                                                         kvh * hd:(kvh + 1) * hd]
            attn = weights["wo"][layer] @ att_out
            x = x + attn
            xb = rmsnorm(x, weights["ffn_norm"][layer])
            h1, h3 = weights["w1"][layer] @ xb, weights["w3"][layer] @ xb
            mlp = weights["w2"][layer] @ (h1 * (1.0 / (1.0 + np.exp(-h1))) * h3)
            x = x + mlp
            caps["attn_out"][layer, pos], caps["mlp_out"][layer, pos] = attn, mlp
            caps["resid_post"][layer, pos] = x
        logits.append(classifier @ rmsnorm(x, weights["final_norm"]))
    return {"logits": np.array(logits), **caps}


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("shared", [True, False])
def test_matches_loop_by_loop_run_c(n_kv_heads: int, shared: bool) -> None:
    cfg = small_config(n_kv_heads=n_kv_heads)
    weights = random_weights(cfg, seed=n_kv_heads, shared_classifier=shared)
    tokens = [1, 7, 3, 49, 0, 7, 22]
    got = reference_forward(weights, cfg, tokens)
    want = naive_run_c(weights, cfg, tokens)
    for name in ("logits", *CAPTURE_NAMES):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_gqa_equals_multi_head_with_repeated_kv_heads() -> None:
    cfg = small_config(n_heads=4, n_kv_heads=2)
    mha = small_config(n_heads=4, n_kv_heads=4)
    weights = random_weights(cfg, seed=3)
    hd = cfg.head_dim
    # NOTE: query head h reads kv head h // kv_mul, so repeating each kv head's rows kv_mul
    # times gives the equivalent multi-head model.
    expanded = dict(weights)
    for name in ("wk", "wv"):
        w = weights[name].reshape(cfg.n_layers, cfg.n_kv_heads, hd, cfg.dim)
        expanded[name] = np.repeat(w, cfg.kv_mul, axis=1).reshape(cfg.n_layers, cfg.dim, cfg.dim)
    tokens = [1, 5, 9, 13, 2, 2, 40]
    got = reference_forward(weights, cfg, tokens)
    want = reference_forward(expanded, mha, tokens)
    for name in ("logits", *CAPTURE_NAMES):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_captures_compose_the_residual_stream() -> None:
    cfg = small_config(n_layers=3)
    out = reference_forward(random_weights(cfg), cfg, [1, 2, 3, 4])
    np.testing.assert_allclose(out["resid_post"],
                               out["resid_pre"] + out["attn_out"] + out["mlp_out"], atol=1e-5)
    np.testing.assert_array_equal(out["resid_pre"][1:], out["resid_post"][:-1])
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (4, cfg.vocab_size)


def test_causality() -> None:
    cfg = small_config()
    weights = random_weights(cfg, seed=1)
    a = [1, 10, 20, 30, 40, 11, 12, 13]
    b = a[:4] + [5, 6, 7, 8]
    la = reference_forward(weights, cfg, a)
    lb = reference_forward(weights, cfg, b)
    prefix = reference_forward(weights, cfg, a[:4])
    # NOTE: numpy's BLAS picks kernels by row count, so 4 and 8 rows may round differently
    for name in ("logits", "resid_post"):
        np.testing.assert_allclose(la[name][..., :4, :], lb[name][..., :4, :], atol=1e-6)
        np.testing.assert_allclose(la[name][..., :4, :], prefix[name], rtol=1e-5, atol=1e-5)
    assert not np.allclose(la["logits"][4:], lb["logits"][4:])


def test_rope_identity_at_position_zero_and_norm_preserving() -> None:
    rng = np.random.default_rng(0)
    head_dim, n_heads = 16, 3
    x = rng.standard_normal((5, n_heads * head_dim)).astype(np.float32)
    positions = np.array([0, 1, 7, 100, 511])
    y = apply_rope(x, positions, head_dim, 10000.0)
    np.testing.assert_array_equal(y[0], x[0])
    pair_norms = np.hypot(x[:, 0::2], x[:, 1::2]), np.hypot(y[:, 0::2], y[:, 1::2])
    np.testing.assert_allclose(*pair_norms, rtol=1e-5)
    assert not np.allclose(y[1:], x[1:])
    # the first pair of each head turns by exactly `pos` radians (freq 1), the rest more slowly
    angle = np.arctan2(y[1, 1], y[1, 0]) - np.arctan2(x[1, 1], x[1, 0])
    assert math.isclose(math.remainder(angle - 1.0, 2 * math.pi), 0.0, abs_tol=1e-5)


# ----------------------------------------------------------------------------------------------
# Q8_0 mode


def test_activation_quantizer_matches_engine_convention() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 70)).astype(np.float32)  # ragged last group of 6
    x[1, 32:64] = 0.0                                      # an all-zero group
    q, s = quantize_activations(x)
    qt = quantize_q8_0(x)
    np.testing.assert_array_equal(q, qt.values)
    np.testing.assert_array_equal(s, qt.scales)
    assert s.shape == (3, 3) and s[1, 1] == 0 and not q[1, 32:64].any()
    # amax 127 makes 127 / amax exactly 1: halves round to even
    q, s = quantize_activations(np.array([[127.0, 0.5, 1.5, 2.5, -2.5, -127.0]], np.float32))
    assert q.tolist() == [[127, 0, 2, 2, -2, -127]] and s.tolist() == [[1.0]]


def test_q8_matmul_integer_dots_are_exact() -> None:
    rng = np.random.default_rng(1)
    n, d = 70, 5
    w = rng.integers(-127, 128, (d, n)).astype(np.int8)
    x = rng.integers(-126, 127, (2, n)).astype(np.float32)
    x[:, ::32] = 127  # amax 127 in every group -> activation scale 1 and q == x
    out = q8_matmul(x, w, np.ones((d, 3), np.float32))
    np.testing.assert_array_equal(out, x.astype(np.int64) @ w.T.astype(np.int64))


def test_q8_matmul_equals_dequantized_product() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((9, 100)).astype(np.float32)
    x = rng.standard_normal((4, 100)).astype(np.float32)
    qt = quantize_q8_0(w)
    xq, xs = quantize_activations(x)
    want = quantize_q8_0(x).dequantize() @ qt.dequantize().T
    np.testing.assert_allclose(q8_matmul(x, qt.values, qt.scales), want, rtol=1e-5, atol=1e-5)
    assert xq.dtype == np.int8 and xs.dtype == np.float32


def test_quantized_mode_close_to_fp32() -> None:
    cfg = small_config(dim=64, hidden_dim=172, n_layers=3, n_heads=8, n_kv_heads=4,
                       vocab_size=256)
    weights = add_q8_weights(random_weights(cfg, seed=5, shared_classifier=False))
    tokens = list(np.random.default_rng(5).integers(0, cfg.vocab_size, 60))
    fp = reference_forward(weights, cfg, tokens)
    q8 = reference_forward(weights, cfg, tokens, quantized=True)
    agree = np.mean(fp["logits"].argmax(-1) == q8["logits"].argmax(-1))
    assert agree >= 0.9, agree
    rel = np.linalg.norm(q8["logits"] - fp["logits"]) / np.linalg.norm(fp["logits"])
    assert 0 < rel < 0.05, rel


def test_quantized_mode_needs_q8_weights() -> None:
    cfg = small_config()
    with pytest.raises(ValueError, match="wq_q8"):
        reference_forward(random_weights(cfg), cfg, [1, 2], quantized=True)


# ----------------------------------------------------------------------------------------------
# Steering


def test_zero_steering_changes_nothing() -> None:
    cfg = small_config(n_layers=3)
    weights = random_weights(cfg, seed=2)
    tokens = [1, 4, 8, 15, 16, 23, 42]
    base = reference_forward(weights, cfg, tokens)
    steered = reference_forward(weights, cfg, tokens, steering={
        0: np.zeros(cfg.dim, np.float32), 2: np.zeros((3, cfg.dim), np.float32)})
    for name in base:
        np.testing.assert_array_equal(base[name], steered[name], err_msg=name)


def test_steering_enters_at_its_layer_and_positions() -> None:
    cfg = small_config(n_layers=4)
    weights = random_weights(cfg, seed=4)
    tokens = [1, 4, 8, 15, 16, 23, 42]
    layer, t_s = 2, 3
    vec = np.random.default_rng(4).standard_normal((t_s, cfg.dim)).astype(np.float32)
    base = reference_forward(weights, cfg, tokens)
    steered = reference_forward(weights, cfg, tokens, steering={layer: vec})
    np.testing.assert_array_equal(steered["resid_pre"][:layer], base["resid_pre"][:layer])
    np.testing.assert_array_equal(steered["resid_post"][:layer], base["resid_post"][:layer])
    np.testing.assert_allclose(steered["resid_pre"][layer, :t_s],
                               base["resid_pre"][layer, :t_s] + vec, atol=1e-6)
    np.testing.assert_array_equal(steered["resid_pre"][layer, t_s:],
                                  base["resid_pre"][layer, t_s:])
    # later positions feel the steered ones only through attention, so they do change downstream
    assert not np.allclose(steered["logits"][t_s:], base["logits"][t_s:])

    everywhere = reference_forward(weights, cfg, tokens, steering={layer: vec[0]})
    np.testing.assert_allclose(everywhere["resid_pre"][layer],
                               base["resid_pre"][layer] + vec[0], atol=1e-6)


@pytest.mark.parametrize("steering, message", [
    ({5: np.zeros(32, np.float32)}, "out of range"),
    ({-1: np.zeros(32, np.float32)}, "out of range"),
    ({0: np.zeros(31, np.float32)}, "must be"),
    ({0: np.zeros((1, 2, 32), np.float32)}, "must be"),
])
def test_bad_steering_is_rejected(steering: dict, message: str) -> None:
    cfg = small_config()
    with pytest.raises(ValueError, match=message):
        reference_forward(random_weights(cfg), cfg, [1, 2], steering=steering)


def test_bad_tokens_are_rejected() -> None:
    cfg = small_config(max_seq_len=4)
    weights = random_weights(cfg)
    with pytest.raises(ValueError, match="token ids"):
        reference_forward(weights, cfg, [1, cfg.vocab_size])
    with pytest.raises(ValueError, match="non-empty"):
        reference_forward(weights, cfg, [])
    with pytest.raises(ValueError, match="max_seq_len"):
        reference_forward(weights, cfg, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="max_seq_len"):
        reference_generate(weights, cfg, [1, 2], 3)


# ----------------------------------------------------------------------------------------------
# Generation and the v0 file format


@pytest.mark.parametrize("quantized", [False, True])
def test_generate_agrees_with_teacher_forcing(quantized: bool) -> None:
    cfg = small_config()
    weights = add_q8_weights(random_weights(cfg, seed=6))
    steering = {1: np.full((6, cfg.dim), 0.3, np.float32)}
    for steer in (None, steering):
        ids = reference_generate(weights, cfg, [1, 2, 3], 12, quantized=quantized, steering=steer)
        full = reference_forward(weights, cfg, [1, 2, 3] + ids, quantized=quantized,
                                 steering=steer, capture=False)
        assert set(full) == {"logits"}
        assert full["logits"][2:-1].argmax(-1).tolist() == ids


def write_v0(path: Path, cfg: ModelConfig, weights: dict[str, np.ndarray]) -> None:
    vocab = cfg.vocab_size if "classifier" not in weights else -cfg.vocab_size
    header = [cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, vocab,
              cfg.max_seq_len]
    rope = np.zeros((cfg.max_seq_len, cfg.head_dim // 2), np.float32)
    order = ["token_embedding", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2",
             "w3", "final_norm"]
    tensors = [weights[n] for n in order] + [rope, rope]
    tensors += [weights["classifier"]] if "classifier" in weights else []
    path.write_bytes(np.array(header, np.int32).tobytes()
                     + b"".join(np.ascontiguousarray(t, np.float32).tobytes() for t in tensors))


@pytest.mark.parametrize("shared", [True, False])
def test_load_v0_round_trip(tmp_path: Path, shared: bool) -> None:
    cfg = small_config()
    weights = random_weights(cfg, seed=8, shared_classifier=shared)
    write_v0(tmp_path / "m.bin", cfg, weights)
    loaded_cfg, loaded = load_v0_legacy(tmp_path / "m.bin")
    assert loaded_cfg == ModelConfig(**{**cfg.__dict__, "shared_classifier": shared})
    assert loaded.keys() == weights.keys()
    for name, w in weights.items():
        np.testing.assert_array_equal(loaded[name], w, err_msg=name)


def test_load_v0_rejects_wrong_size(tmp_path: Path) -> None:
    cfg = small_config()
    write_v0(tmp_path / "m.bin", cfg, random_weights(cfg))
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="expected"):
        load_v0_legacy(tmp_path / "short.bin")
    (tmp_path / "tiny.bin").write_bytes(data[:12])
    with pytest.raises(ValueError, match="too short"):
        load_v0_legacy(tmp_path / "tiny.bin")


@needs_models
def test_prompt_tokens_spell_once_upon_a_time() -> None:
    pieces = read_pieces(TOKENIZER, 512)
    assert pieces[1] == b"\n<s>\n"
    assert decode(pieces, PROMPT[1:], prev=1) == "Once upon a time"


@needs_models
def test_stories260k_greedy_golden() -> None:
    cfg, weights = load_v0_legacy(STORIES)
    assert (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
            cfg.vocab_size, cfg.max_seq_len) == (64, 172, 5, 8, 4, 512, 512)
    assert cfg.shared_classifier and "classifier" not in weights
    ids = reference_generate(weights, cfg, PROMPT, 200)
    text = "Once upon a time" + decode(read_pieces(TOKENIZER, 512), ids, prev=PROMPT[-1])
    assert text.startswith(", there was a little girl named Lily. She loved to play outside in "
                           "the park.", len("Once upon a time"))
    assert len(text) > 450 and GOLDEN_TEXT.startswith(text)


@needs_models
def test_stories260k_quantized_tracks_fp32() -> None:
    cfg, weights = load_v0_legacy(STORIES)
    weights = add_q8_weights(weights)
    ids = reference_generate(weights, cfg, PROMPT, 40, quantized=True)
    pieces = read_pieces(TOKENIZER, 512)
    assert decode(pieces, ids, prev=PROMPT[-1]).startswith(
        ", there was a little girl named Lily. She loved to play outside in the park.")
    tokens = PROMPT + reference_generate(weights, cfg, PROMPT, 200)
    fp = reference_forward(weights, cfg, tokens, capture=False)["logits"].argmax(-1)
    q8 = reference_forward(weights, cfg, tokens, quantized=True, capture=False)["logits"]
    assert np.mean(fp == q8.argmax(-1)) > 0.95
