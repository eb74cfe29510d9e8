"""Steering vectors built from prompts, against the numpy reference's hidden states."""

from __future__ import annotations

import numpy as np
import pytest
from tiller.engine.engine import Engine, EngineError, SeqRequest
from tiller.engine.steering import (
    actadd_term,
    actadd_tokens,
    build_actadd,
    build_control,
    control_terms,
    newline_token,
)
from tiller.engine.tokenizer import SpmTokenizer

from tests.reference import load_v0_legacy, reference_forward


@pytest.fixture(scope="module")
def model(shared_models):
    path = shared_models / "stories260K.bin"
    engine = Engine.load(path, dtype="f32", max_tokens=64)
    tok = SpmTokenizer.from_llama2c(shared_models / "tok512.bin", vocab_size=512)
    config, weights = load_v0_legacy(path)
    return engine, tok, config, weights


def test_actadd_pads_the_shorter_prompt_with_newlines(model):
    _, tok, _, _ = model
    a, s = actadd_tokens(tok, "Love", "Hate and anger")
    assert len(a) == len(s) and a[0] == s[0] == tok.bos_id
    short = tok.encode("Love", bos=True)
    assert a[:len(short)] == short and set(a[len(short):]) == {newline_token(tok)}
    assert tok.piece(newline_token(tok)) == "<0x0A>"


@pytest.mark.parametrize("source", [0, 2, 5, -1])
def test_actadd_is_the_difference_of_the_reference_hidden_states(model, source):
    engine, tok, config, weights = model
    rows = build_actadd(engine, tok, "Love", "Hate and anger", source)
    a, s = actadd_tokens(tok, "Love", "Hate and anger")
    ra, rs = (reference_forward(weights, config, t) for t in (a, s))
    layer = source % (config.n_layers + 1)
    if layer == config.n_layers:
        want = ra["resid_post"][-1] - rs["resid_post"][-1]
    else:
        want = ra["resid_pre"][layer] - rs["resid_pre"][layer]
    assert rows.shape == (len(a), config.dim)
    np.testing.assert_allclose(rows, want, atol=2e-5, rtol=1e-4)


def test_steered_generation_equals_the_reference_with_the_same_addition(model):
    engine, tok, config, weights = model
    rows = build_actadd(engine, tok, "Love", "Hate", 1)
    prompt = tok.encode("Once upon a time", bos=True)
    seq = engine.new_sequence(steering=[actadd_term(rows, 3, 4.0)])
    got = engine.step([SeqRequest(seq, prompt, logits="all")])[0].logits
    engine.release(seq)
    ref = reference_forward(weights, config, prompt, steering={3: 4.0 * rows}, capture=False)
    np.testing.assert_allclose(got, ref["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["mean", "pca"])
def test_control_vectors_from_contrastive_pairs(model, method):
    engine, tok, config, weights = model
    pos = ["The cat was happy", "She smiled and laughed", "What a great day"]
    neg = ["The cat was sad", "She frowned and cried", "What a terrible day"]
    got = build_control(engine, tok, pos, neg, [1, 3, config.n_layers], method)
    assert sorted(got) == [1, 3, config.n_layers]

    def last(text, layer):
        r = reference_forward(weights, config, tok.encode(text, bos=True))
        return (r["resid_post"][-1] if layer == config.n_layers else r["resid_pre"][layer])[-1]

    for layer, vec in got.items():
        diffs = np.stack([last(p, layer) - last(n, layer) for p, n in zip(pos, neg, strict=True)])
        if method == "mean":
            np.testing.assert_allclose(vec, diffs.mean(0), atol=2e-5, rtol=1e-4)
        else:
            assert abs(np.linalg.norm(vec) - 1) < 1e-5
            u = np.linalg.svd(diffs - diffs.mean(0), full_matrices=False)[2][0]
            assert abs(abs(float(vec @ u)) - 1) < 1e-4  # the same axis
            assert float(diffs.mean(0) @ vec) >= 0  # positives project higher
    terms = control_terms(got, 2.0, layers=[3])
    assert [t.layer for t in terms] == [3] and terms[0].every_position


def test_bad_layers_and_prompts(model):
    engine, tok, config, _ = model
    with pytest.raises(EngineError, match="source layer"):
        build_actadd(engine, tok, "a", "b", config.n_layers + 1)
    with pytest.raises(EngineError, match="same"):
        build_control(engine, tok, ["a"], ["b", "c"], [1])
    with pytest.raises(EngineError, match="two prompt pairs"):
        build_control(engine, tok, ["a"], ["b"], [1], "pca")
    with pytest.raises(EngineError, match="context"):
        build_actadd(engine, tok, "word " * 600, "b", 1)
