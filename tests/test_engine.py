"""The engine's batched step against the numpy reference, and its invariances and errors."""

from __future__ import annotations

import numpy as np
import pytest
from tiller.engine.config import ModelConfig
from tiller.engine.engine import (
    BatchError,
    CacheFull,
    Engine,
    EngineError,
    SeqRequest,
    SteeringTerm,
)
from tiller.engine.forward import CAPTURE_POINTS
from tiller.engine.llama2c import random_tensors
from tiller.engine.weights import build_weights, dequantized

from tests.reference import add_q8_weights, reference_forward

# hidden 172 and dim 96 exercise padded rows and a ragged last group; 4 q heads on 2 kv heads
CONFIG = ModelConfig(dim=96, hidden_dim=172, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300,
                     max_seq_len=128)
TENSORS = random_tensors(CONFIG, seed=7)
RNG = np.random.default_rng(0)


def make_engine(dtype: str, config: ModelConfig = CONFIG, tensors=TENSORS, **kw) -> Engine:
    kw.setdefault("max_tokens", 64)
    return Engine(config, build_weights(config, tensors, dtype), **kw)


@pytest.fixture(scope="module")
def f32() -> Engine:
    return make_engine("f32")


@pytest.fixture(scope="module")
def q8() -> Engine:
    return make_engine("q8_0")


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, n).tolist()


def reference_weights(engine: Engine, quantized: bool) -> dict:
    weights = dequantized(engine.weights, engine.config)
    return add_q8_weights(weights) if quantized else weights


# agreement with the reference -------------------------------------------------------------------

def test_f32_logits_and_hidden_states_match_reference(f32):
    toks = tokens(40)
    got = f32.forward_all(toks, capture_layers=list(range(CONFIG.n_layers)))
    ref = reference_forward(reference_weights(f32, False), CONFIG, toks)
    scale = np.abs(ref["logits"]).max()
    np.testing.assert_allclose(got.logits, ref["logits"], atol=2e-5 * scale, rtol=0)
    for i, point in enumerate(CAPTURE_POINTS):
        np.testing.assert_allclose(got.captures[i], ref[point], atol=2e-5, rtol=1e-4,
                                   err_msg=point)


def test_f32_weights_are_the_checkpoint_tensors(f32):
    # f32 mode computes with the file's values exactly (no quantization anywhere)
    deq = dequantized(f32.weights, CONFIG)
    for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "token_embedding"):
        assert np.array_equal(deq[name], TENSORS[name]), name


def test_q8_matches_reference_on_the_same_quantized_weights(q8):
    # Both sides quantize activations with one rule, but float sums in different orders can
    # land a value on the other side of a rounding boundary; a flip then spreads to later
    # positions through attention. So: tight on a short prefix, and a bound on the whole.
    toks = tokens(48, seed=3)
    got = q8.forward_all(toks).logits
    ref = reference_forward(reference_weights(q8, True), CONFIG, toks, quantized=True,
                            capture=False)["logits"]
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got[:12], ref[:12], atol=1e-5 * scale, rtol=0)
    close = np.abs(got - ref).max(-1) <= 1e-5 * scale
    assert close.mean() >= 0.5
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_q8_close_to_fp32_model(q8):
    toks = tokens(64, seed=5)
    got = q8.forward_all(toks).logits
    ref = reference_forward(TENSORS, CONFIG, toks, capture=False)["logits"]
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


# invariances ----------------------------------------------------------------------------------

def run_alone(engine: Engine, prompt: list[int], decode: list[int]) -> list[np.ndarray]:
    seq = engine.new_sequence()
    out = [engine.step([SeqRequest(seq, prompt)])[0].logits]
    for t in decode:
        out.append(engine.step([SeqRequest(seq, [t])])[0].logits)
    engine.release(seq)
    return out


@pytest.mark.parametrize("dtype", ["q8_0", "f32"])
def test_batch_invariance_bitwise(dtype, q8, f32):
    engine = q8 if dtype == "q8_0" else f32
    prompts = [tokens(9, 1), tokens(3, 2), tokens(17, 3)]
    decodes = [tokens(6, 11), tokens(6, 12), tokens(6, 13)]
    alone = [run_alone(engine, p, d) for p, d in zip(prompts, decodes, strict=True)]
    # together: staggered so one sequence prefills while others decode
    seqs = [engine.new_sequence() for _ in prompts]
    together: list[list[np.ndarray]] = [[], [], []]
    schedule = {0: [0], 1: [1], 2: [2]}  # step at which each sequence's prompt goes in
    cursor = [None, None, None]
    for step in range(12):
        batch, who = [], []
        for i in range(3):
            if schedule[i][0] == step:
                batch.append(SeqRequest(seqs[i], prompts[i]))
                cursor[i] = 0
            elif cursor[i] is not None and cursor[i] < len(decodes[i]):
                batch.append(SeqRequest(seqs[i], [decodes[i][cursor[i]]]))
                cursor[i] += 1
            else:
                continue
            who.append(i)
        if not batch:
            continue
        for i, res in zip(who, engine.step(batch), strict=True):
            together[i].append(res.logits)
    for i in range(3):
        assert len(together[i]) == len(alone[i])
        for a, b in zip(alone[i], together[i], strict=True):
            assert np.array_equal(a, b)
    for s in seqs:
        engine.release(s)


def test_thread_count_invariance_bitwise():
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: nothing to compare")
    toks = tokens(30, 9)
    one = make_engine("q8_0", threads=1).forward_all(toks).logits
    many = make_engine("q8_0", threads=numba.config.NUMBA_NUM_THREADS).forward_all(toks).logits
    assert np.array_equal(one, many)


def test_chunked_prefill_equals_one_shot_bitwise(q8):
    toks = tokens(37, 4)
    whole = q8.forward_all(toks).logits
    seq = q8.new_sequence()
    parts = [q8.step([SeqRequest(seq, toks[i:i + 10], logits="all")])[0].logits
             for i in range(0, 37, 10)]
    q8.release(seq)
    assert np.array_equal(np.concatenate(parts), whole)


# hooks ------------------------------------------------------------------------------------------

def test_steering_matches_reference_with_the_same_addition(f32):
    toks = tokens(20, 6)
    actadd = RNG.standard_normal((5, CONFIG.dim)).astype(np.float32)  # positions 0..4 only
    control = RNG.standard_normal(CONFIG.dim).astype(np.float32)
    terms = [SteeringTerm(layer=1, vectors=actadd, scale=2.0),
             SteeringTerm(layer=2, vectors=control, scale=0.5, every_position=True),
             SteeringTerm(layer=2, vectors=actadd[:2], scale=-1.0),
             # after the last layer, before the final norm
             SteeringTerm(layer=CONFIG.n_layers, vectors=control, scale=0.25,
                          every_position=True)]
    got = f32.forward_all(toks, steering=terms, capture_layers=[0, 1, 2])
    layer2 = np.tile(0.5 * control, (20, 1))
    layer2[:2] -= actadd[:2]
    ref = reference_forward(reference_weights(f32, False), CONFIG, toks,
                            steering={1: 2.0 * actadd, 2: layer2, CONFIG.n_layers: 0.25 * control})
    np.testing.assert_allclose(got.logits, ref["logits"], atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(got.captures[0], ref["resid_pre"], atol=5e-5, rtol=1e-4)
    unsteered = f32.forward_all(toks).logits
    assert not np.allclose(unsteered, got.logits)


def test_steering_and_capture_stay_within_their_request(q8):
    toks_a, toks_b = tokens(8, 21), tokens(8, 22)
    alone_a = run_alone(q8, toks_a, tokens(3, 23))
    vec = RNG.standard_normal((8, CONFIG.dim)).astype(np.float32)
    sa = q8.new_sequence()
    sb = q8.new_sequence(steering=[SteeringTerm(0, vec, 4.0), SteeringTerm(1, vec, -3.0, False)])
    steered = SeqRequest(sb, toks_b, capture_layers=[1])
    res = q8.step([SeqRequest(sa, toks_a), steered])
    got_a = [res[0].logits]
    assert res[0].captures is None and res[1].captures.shape == (4, 1, 8, CONFIG.dim)
    for t in tokens(3, 23):
        other = SeqRequest(sb, [5])
        got_a.append(q8.step([SeqRequest(sa, [t]), other])[0].logits)
    for a, b in zip(alone_a, got_a, strict=True):
        assert np.array_equal(a, b)
    q8.release(sa)
    q8.release(sb)


# the KV cache and errors -------------------------------------------------------------------

def test_kv_blocks_are_returned_and_reused(q8):
    free = q8.cache.free_blocks
    seq = q8.new_sequence()
    q8.step([SeqRequest(seq, tokens(40))])
    assert q8.cache.free_blocks == free - 3  # 40 positions in blocks of 16
    q8.release(seq)
    assert q8.cache.free_blocks == free and seq.length == 0


def test_cache_full_is_reported_before_any_change():
    engine = make_engine("q8_0", kv_tokens=32)
    a, b = engine.new_sequence(), engine.new_sequence()
    engine.step([SeqRequest(a, tokens(20))])
    with pytest.raises(CacheFull):
        engine.step([SeqRequest(a, [1]), SeqRequest(b, tokens(20))])
    assert a.length == 20 and b.length == 0 and engine.cache.free_blocks == 0
    assert b.blocks == [] and len(a.blocks) == 2


@pytest.mark.parametrize("make_request,error,match", [
    (lambda s: [SeqRequest(s, [])], BatchError, "no tokens"),
    (lambda s: [SeqRequest(s, [CONFIG.vocab_size])], EngineError, "token ids"),
    (lambda s: [SeqRequest(s, [-1])], EngineError, "token ids"),
    (lambda s: [SeqRequest(s, [1] * 65)], BatchError, "max_tokens"),
    (lambda s: [SeqRequest(s, [1]), SeqRequest(s, [2])], BatchError, "twice"),
    (lambda s: [SeqRequest(s, [1], capture_layers=[3])], EngineError, "capture layer"),
    (lambda s: [SeqRequest(s, [1], logits="some")], EngineError, "logits"),
    (lambda s: [], BatchError, "at least one"),
])
def test_bad_requests_are_rejected_without_side_effects(q8, make_request, error, match):
    seq = q8.new_sequence()
    free = q8.cache.free_blocks
    with pytest.raises(error, match=match):
        q8.step(make_request(seq))
    assert seq.length == 0 and q8.cache.free_blocks == free


@pytest.mark.parametrize("terms,match", [
    ([SteeringTerm(-1, np.zeros((1, 96), np.float32))], "steering layer"),
    ([SteeringTerm(4, np.zeros((1, 96), np.float32))], "steering layer"),
    ([SteeringTerm(0, np.zeros((1, 95), np.float32))], "shape"),
    ([SteeringTerm(0, np.zeros((1, 96), np.float32), scale=float("nan"))], "finite"),
])
def test_bad_steering_is_rejected_when_the_sequence_is_created(q8, terms, match):
    free = q8.cache.free_blocks
    with pytest.raises(EngineError, match=match):
        q8.new_sequence(steering=terms)
    assert q8.cache.free_blocks == free


def test_context_overflow_is_an_error(q8):
    seq = q8.new_sequence()
    q8.step([SeqRequest(seq, tokens(64))])
    q8.step([SeqRequest(seq, tokens(63))])
    with pytest.raises(EngineError, match="context"):
        q8.step([SeqRequest(seq, [1, 2])])
    q8.step([SeqRequest(seq, [1])])  # exactly max_seq_len is fine
    assert seq.length == CONFIG.max_seq_len
    q8.release(seq)
