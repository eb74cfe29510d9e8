"""The compiled batched sampler (engine/sample_kernel.py) against the numpy reference
(`apply_penalties` + `sample_token`): the same token for the same logits, params and uniform,
on thousands of random cases; a batch equals its rows sampled alone at any thread count."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from tiller.engine.sample_kernel import (
    BAD_CONTEXT,
    BAD_LOGITS,
    NO_TOKEN,
    OK,
    _depth_scale,
    _draw_by_bins,
    _pairwise_sum,
    param_row,
    sample_rows,
)
from tiller.engine.sampling import (
    Sampler,
    SamplingParams,
    apply_penalties,
    sample_batch,
    sample_token,
)

VOCABS = [7, 8, 9, 31, 127, 128, 129, 500, 2049]
BIG_VOCABS = [32000, 128256]


def make_logits(rng: np.random.Generator, vocab: int, kind: str) -> np.ndarray:
    """Logits of a few shapes: coarse (ties), peaked, flat, narrow, real-like; some masked."""
    if kind == "coarse":
        x = np.round(rng.standard_normal(vocab) * 2, 1)
    elif kind == "peaked":
        x = rng.standard_normal(vocab)
        x[rng.integers(vocab, size=3)] += 15
    elif kind == "flat":
        x = np.full(vocab, 0.25) + (rng.random(vocab) < 0.1) * 1e-3
    elif kind == "narrow":  # a random-weight model's: close logits, most survive top_p
        x = rng.standard_normal(vocab) * 0.05
    else:  # "normal": a trained model's spread
        x = rng.standard_normal(vocab) * 3
    x = x.astype(np.float32)
    if rng.random() < 0.3:  # a grammar mask
        x[rng.random(vocab) < rng.choice([0.1, 0.9, 0.999])] = -np.inf
        x[rng.integers(vocab)] = np.float32(rng.standard_normal())  # something allowed
    return x


def random_params(rng: np.random.Generator, vocab: int, seed: int) -> SamplingParams:
    return SamplingParams(
        temperature=float(rng.choice([0.0, 0.3, 0.8, 1.0, 1.7])),
        top_k=int(rng.choice([0, 1, 3, 40, vocab // 2, vocab, vocab + 5])),
        top_p=float(rng.choice([1.0, 1.0, 0.999, 0.95, 0.5, 0.05])),
        min_p=float(rng.choice([0.0, 0.0, 0.05, 0.3, 1.0])),
        repetition_penalty=float(rng.choice([1.0, 1.3, 0.8])),
        frequency_penalty=float(rng.choice([0.0, 0.5, -1.0])),
        presence_penalty=float(rng.choice([0.0, 0.7, -0.3])),
        repeat_last_n=int(rng.choice([-1, 0, 1, 5, 64])),
        seed=seed,
    )


def reference(logits: np.ndarray, params: SamplingParams, context: np.ndarray,
              n_prompt: int) -> int:
    """The numpy chain with the uniform a fresh Sampler of this seed draws first."""
    penalized = apply_penalties(logits, params, context, n_prompt)
    u = 0.0 if params.greedy else float(
        np.random.Generator(np.random.PCG64(params.seed)).random())
    return sample_token(penalized, params, u)


def random_case(rng: np.random.Generator, vocab: int, seed: int
                ) -> tuple[np.ndarray, SamplingParams, np.ndarray, int]:
    kind = str(rng.choice(["coarse", "peaked", "flat", "narrow", "normal"]))
    logits = make_logits(rng, vocab, kind)
    params = random_params(rng, vocab, seed)
    n_prompt = int(rng.integers(0, 80))
    n_generated = int(rng.integers(0, 80))
    # repeats, so that counts and distinct tokens matter
    pool = rng.integers(vocab, size=max(1, min(vocab, 12)))
    context = rng.choice(pool, size=n_prompt + n_generated).astype(np.int64)
    return logits, params, context, n_prompt


def sampler_for(params: SamplingParams, context: np.ndarray, n_prompt: int) -> Sampler:
    sampler = Sampler(params, context[:n_prompt])
    for t in context[n_prompt:]:
        sampler.accept(int(t))
    return sampler


def test_pairwise_sum_is_numpys_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    for n in [*range(0, 300), 1000, 8191, 8192, 8193, 32000, 128256]:
        a = np.exp(rng.standard_normal(n) * 5)
        assert _pairwise_sum(a, 0, n) == a.sum(), n


def test_the_kernel_picks_the_numpy_token_on_thousands_of_random_cases() -> None:
    rng = np.random.default_rng(1)
    mismatches = []
    n_cases = 3000
    for case in range(n_cases):
        vocab = int(rng.choice(VOCABS))
        logits, params, context, n_prompt = random_case(rng, vocab, seed=case)
        want = reference(logits, params, context, n_prompt)
        got = sampler_for(params, context, n_prompt).sample(logits)
        if got != want:
            mismatches.append((case, vocab, params, got, want))
    # NOTE: numba's libm exp and numpy's SIMD exp differ in the last ulp for ~5% of inputs;
    # that can flip a draw only when u lies within ~1e-16 of a boundary, so zero are expected
    assert not mismatches, mismatches[:5]


def test_large_vocabularies_match_numpy() -> None:
    rng = np.random.default_rng(2)
    for case in range(120):
        vocab = BIG_VOCABS[case % 2]
        logits, params, context, n_prompt = random_case(rng, vocab, seed=10_000 + case)
        want = reference(logits, params, context, n_prompt)
        got = sampler_for(params, context, n_prompt).sample(logits)
        assert got == want, (case, vocab, params)


@pytest.mark.parametrize("vocab", [7, 129, 32000])
def test_extreme_uniforms_match_numpy(vocab: int) -> None:
    # u at 0 and just below 1 exercise the first candidate and the rounding fallback at the end
    rng = np.random.default_rng(3)
    us = [0.0, 1e-300, 1e-12, 0.5, 1 - 1e-12, float(np.nextafter(1.0, 0.0))]
    for i in range(40):
        logits = make_logits(rng, vocab, ["coarse", "peaked", "flat", "normal"][i % 4])
        params = random_params(rng, vocab, seed=i)
        params = SamplingParams(**{**params.__dict__, "temperature": 0.9,
                                   "repeat_last_n": 0})
        row = param_row(params.temperature, params.top_k, params.top_p, params.min_p, 1.0, 0.0,
                        0.0)
        got, errors = sample_rows(np.tile(logits, (len(us), 1)), np.tile(row, (len(us), 1)),
                                  np.empty(0, np.int64), np.zeros(len(us) + 1, np.int64),
                                  np.zeros(len(us), np.int64), np.array(us))
        assert (errors == OK).all()
        assert got.tolist() == [sample_token(logits, params, u) for u in us], (i, params)


def test_penalty_windows_and_prompt_splits_match_numpy() -> None:
    rng = np.random.default_rng(4)
    vocab = 50
    for case in range(400):
        logits = make_logits(rng, vocab, "coarse")
        n_prompt = int(rng.integers(0, 30))
        context = rng.integers(vocab, size=n_prompt + int(rng.integers(0, 30)))
        params = SamplingParams(temperature=0.0, repetition_penalty=float(rng.choice([1, 1.5])),
                                frequency_penalty=float(rng.choice([0, 0.4, -2])),
                                presence_penalty=float(rng.choice([0, 1.1, -0.6])),
                                repeat_last_n=int(rng.choice([-1, 0, 1, 7, 29, 100])))
        assert sampler_for(params, context, n_prompt).sample(logits) == \
            reference(logits, params, context, n_prompt), (case, params)


def test_the_histogram_path_decides_clear_draws_and_defers_close_ones() -> None:
    # Without sorting, _draw_by_bins must give numpy's token whenever it answers; it answers
    # almost always on spread logits and defers (-1) when a running sum can equal its target
    # (equal weights: top_p 0.5 of 64 equal logits ends exactly on a token).
    rng = np.random.default_rng(6)
    answered = 0
    for i in range(200):
        vocab = int(rng.choice([50, 4000, 32000]))
        x = (rng.standard_normal(vocab) * rng.choice([0.5, 3.0])).astype(np.float32)
        params = SamplingParams(temperature=float(rng.choice([0.5, 0.8, 1.3])),
                                top_p=float(rng.choice([1.0, 0.95, 0.3])),
                                min_p=float(rng.choice([0.0, 0.0, 0.05])))
        if params.top_p == 1 and params.min_p == 0:
            continue  # the id-order draw, not this path
        u = float(rng.random())
        log_min_p = math.log(params.min_p) if params.min_p else -math.inf
        mx = np.float64(x.max())
        scale = _depth_scale(mx, np.float64(x.min()))
        pos = _draw_by_bins(x, mx, scale, params.top_p, params.min_p, log_min_p,
                            params.temperature, u)
        if pos >= 0:
            answered += 1
            assert pos == sample_token(x, params, u), (i, params, u)
    assert answered >= 120
    flat = np.zeros(64, np.float32)
    assert _draw_by_bins(flat, 0.0, 1.0, 0.5, 0.0, -math.inf, 1.0, 0.3) == -1
    assert Sampler(SamplingParams(top_p=0.5, seed=3)).sample(flat) == \
        reference(flat, SamplingParams(top_p=0.5, seed=3), np.empty(0, np.int64), 0)


def batch_cases(seed: int, rows: int, vocab: int
                ) -> tuple[list[Sampler], list[Sampler], np.ndarray]:
    rng = np.random.default_rng(seed)
    cases = [random_case(rng, vocab, seed=1000 * seed + r) for r in range(rows)]
    batch = [sampler_for(p, c, n) for _, p, c, n in cases]
    alone = [sampler_for(p, c, n) for _, p, c, n in cases]
    return batch, alone, np.stack([x for x, *_ in cases])


@pytest.mark.parametrize("threads", [1, 2])
def test_a_batch_equals_each_row_alone_at_any_thread_count(threads: int) -> None:
    if threads > numba.config.NUMBA_NUM_THREADS:  # type: ignore[attr-defined]
        pytest.skip("needs 2 numba threads")
    for seed in range(6):
        batch, alone, logits = batch_cases(seed, rows=16, vocab=3000)
        for _ in range(4):  # several steps: each sampler's uniforms and context advance
            tokens, errors = sample_batch(batch, logits, threads=threads)
            assert errors == [None] * len(batch)
            solo = [s.sample(row) for s, row in zip(alone, logits, strict=True)]
            assert tokens.tolist() == solo
            for t, s, a in zip(tokens, batch, alone, strict=True):
                s.accept(int(t))
                a.accept(int(t))
            logits = np.roll(logits, 1, axis=1)


def test_batch_composition_does_not_change_a_row() -> None:
    # the same sampler state sampled inside two different batches gives the same token
    _, _, logits = batch_cases(7, rows=8, vocab=700)
    first = batch_cases(7, rows=8, vocab=700)[0]
    second = batch_cases(7, rows=8, vocab=700)[0]
    a, _ = sample_batch(first, logits)
    order = [7, 3, 5, 1, 0, 2, 6, 4]
    b, _ = sample_batch([second[i] for i in order], logits[order])
    assert [int(a[i]) for i in order] == b.tolist()


def test_error_rows_fail_alone_with_the_numpy_messages() -> None:
    vocab = 20
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((5, vocab)).astype(np.float32)
    logits[1, 3] = np.nan
    logits[2, :] = -np.inf
    logits[3, 7] = np.inf
    params = [SamplingParams(temperature=0.7, seed=1), SamplingParams(seed=2),
              SamplingParams(temperature=0.0, seed=3), SamplingParams(top_k=3, seed=4),
              SamplingParams(top_p=0.5, seed=5)]
    samplers = [Sampler(p) for p in params]
    tokens, errors = sample_batch(samplers, logits)
    messages = []
    for r, p in enumerate(params):
        try:
            sample_token(logits[r], p, 0.5)
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    assert errors == messages
    assert messages[0] is None and messages[4] is None and None not in messages[1:4]
    for r in (0, 4):  # the healthy rows are sampled as if alone
        assert tokens[r] == Sampler(params[r]).sample(logits[r])
    assert (tokens[1:4] == -1).all()


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_a_penalty_that_overflows_a_logit_is_an_error_row() -> None:
    logits = np.zeros(10, np.float32)
    logits[4] = 3e38
    params = SamplingParams(repetition_penalty=0.5, repeat_last_n=-1, seed=0)
    with pytest.raises(ValueError, match="NaN or \\+inf") as numpy_error:
        sample_token(apply_penalties(logits, params, np.array([4]), 1), params, 0.5)
    with pytest.raises(ValueError) as kernel_error:
        Sampler(params, [4]).sample(logits)
    assert str(kernel_error.value) == str(numpy_error.value)


def test_error_codes_of_sample_rows() -> None:
    logits = np.zeros((3, 4), np.float32)
    logits[1] = -np.inf
    logits[2, 0] = np.nan
    row = param_row(1.0, 0, 1.0, 0.0, 1.3, 0.0, 0.0)
    _, errors = sample_rows(logits, np.tile(row, (3, 1)), np.array([0, 9], np.int64),
                            np.array([0, 1, 1, 2], np.int64), np.array([1, 1, 2], np.int64),
                            np.full(3, 0.5))
    assert errors.tolist() == [OK, NO_TOKEN, BAD_LOGITS]
    _, errors = sample_rows(logits[:1], row[None], np.array([9], np.int64),
                            np.array([0, 1], np.int64), np.array([1], np.int64), np.zeros(1))
    assert errors.tolist() == [BAD_CONTEXT]


@pytest.mark.parametrize("kwargs,match", [
    ({"logits": np.zeros((2, 3), np.float64)}, "logits must be"),
    ({"params": np.zeros((2, 5))}, "params must be"),
    ({"u": np.array([0.5, 1.0])}, "u must be"),
    ({"context_start": np.array([0, 5, 1], np.int64)}, "context_start must"),
    ({"generated_start": np.array([0, 3], np.int64)}, "generated_start must"),
])
def test_sample_rows_refuses_bad_arrays(kwargs: dict, match: str) -> None:
    args = {"logits": np.zeros((2, 3), np.float32),
            "params": np.tile(param_row(1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0), (2, 1)),
            "context": np.zeros(2, np.int64), "context_start": np.array([0, 1, 2], np.int64),
            "generated_start": np.array([0, 1], np.int64), "u": np.array([0.1, 0.2])}
    with pytest.raises(ValueError, match=match):
        sample_rows(**{**args, **kwargs})
