"""Sampling against plain-Python reimplementations, plus statistical and determinism checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tiller.engine.sampling import (
    Sampler,
    SamplingParams,
    _top_order,
    apply_penalties,
    candidates,
    logprobs,
    sample_token,
    sampling_probs,
    top_logprobs,
)

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# naive references: loops over the vocabulary, float64, written from the spec

def ref_penalties(logits: list[float], p: SamplingParams, context: list[int],
                  n_prompt: int) -> list[float]:
    out = list(logits)
    if p.repeat_last_n == 0:
        return out
    start = 0 if p.repeat_last_n == -1 else max(0, len(context) - p.repeat_last_n)
    for t in set(context[start:]):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    counts: dict[int, int] = {}
    for t in context[max(start, n_prompt):]:
        counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
        out[t] -= c * p.frequency_penalty + p.presence_penalty
    return out


def ref_candidates(logits: list[float], p: SamplingParams) -> list[int]:
    cands = sorted((i for i, x in enumerate(logits) if x != NEG_INF),
                   key=lambda i: (-logits[i], i))
    if p.top_k:
        cands = cands[: p.top_k]
    mx = logits[cands[0]]
    if p.top_p < 1:
        w = [math.exp(logits[i] - mx) for i in cands]
        total, acc = sum(w), 0.0
        for j, wj in enumerate(w):
            acc += wj
            if acc >= p.top_p * total:
                cands = cands[: j + 1]
                break
    if p.min_p > 0:
        cands = [i for i in cands if logits[i] - mx >= math.log(p.min_p)]
    return cands


def ref_sample(logits: list[float], p: SamplingParams, u: float) -> int:
    if p.temperature == 0:
        best = 0
        for i, x in enumerate(logits):
            if x > logits[best]:
                best = i
        return best
    cands = ref_candidates(logits, p)
    if (p.top_k == 0 or p.top_k >= len(logits)) and p.top_p >= 1 and p.min_p == 0:
        cands = sorted(cands)  # nothing truncated: the draw walks token ids in order
    mx = max(logits[i] for i in cands)
    w = [math.exp((logits[i] - mx) / p.temperature) for i in cands]
    target, acc = u * sum(w), 0.0
    for i, wi in zip(cands, w, strict=True):
        acc += wi
        if acc > target:
            return i
    return cands[-1]


def random_logits(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """Coarse values so ties happen, and a few -inf masks."""
    x = np.round(rng.standard_normal(vocab) * 2, 1).astype(np.float32)
    x[rng.random(vocab) < 0.1] = -np.inf
    x[rng.integers(vocab)] = 1.5                    # at least one finite logit
    return x


def random_params(rng: np.random.Generator, vocab: int) -> SamplingParams:
    return SamplingParams(
        temperature=float(rng.choice([0.0, 0.3, 1.0, 1.7])),
        top_k=int(rng.choice([0, 1, 3, vocab // 2, vocab + 5])),
        top_p=float(rng.choice([1.0, 0.9, 0.5, 0.05])),
        min_p=float(rng.choice([0.0, 0.05, 0.3, 1.0])),
    )


def as_list(x: np.ndarray) -> list[float]:
    return [float(v) for v in x]


# ---------------------------------------------------------------------------------------------
# against the references

def test_sample_token_matches_reference() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        vocab = int(rng.integers(1, 40))
        logits = random_logits(rng, vocab)
        p = random_params(rng, vocab)
        u = float(rng.random())
        assert sample_token(logits, p, u) == ref_sample(as_list(logits), p, u), (logits, p, u)


def test_candidates_match_reference() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        vocab = int(rng.integers(1, 40))
        logits = random_logits(rng, vocab)
        p = random_params(rng, vocab)
        got = candidates(logits, p).tolist()
        assert got == ref_candidates(as_list(logits), p), (logits, p)


def test_large_vocab_deep_draws_match_reference() -> None:
    # A flat distribution over 3000 tokens and u near 1 push the draw past several widenings of
    # the partial sort; the answer must equal the full-sort definition.
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal(3000) * 0.5).astype(np.float32)
    logits[::7] = np.round(logits[::7], 1)           # ties across chunk boundaries
    ref = as_list(logits)
    for p in (SamplingParams(), SamplingParams(temperature=2.0), SamplingParams(top_p=0.97),
              SamplingParams(min_p=0.2), SamplingParams(top_k=2500, top_p=0.99)):
        for u in (0.0, 0.01, 0.5, 0.9, 0.999, 0.99999):
            assert sample_token(logits, p, u) == ref_sample(ref, p, u), (p, u)


def test_rounding_short_of_the_target_picks_the_last_token_with_weight() -> None:
    # For these logits the running sum in candidate order ends just below u * total (the total
    # is summed in id order), so no token passes the target; tokens whose weight underflows to 0
    # must still never be drawn.
    logits = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    logits[[3, 500]] = -1e4
    u = float(np.nextafter(1.0, 0.0))
    last_with_weight = int(np.argsort(-logits, kind="stable")[-3])
    # top_k=999 of 1000 keeps the candidate-order draw (nothing is cut: -1e4 ranks last)
    assert sample_token(logits, SamplingParams(top_k=999), u) == last_with_weight
    # unfiltered, the draw walks ids in order: the last id with weight, never a zero-weight one
    logits[998:] = -1e4
    assert sample_token(logits, SamplingParams(), u) == 997


def test_top_k_on_real_vocab_size_matches_reference() -> None:
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(32000) * 3).astype(np.float32)
    logits[rng.integers(0, 32000, 100)] = 9.0        # a tie straddling the top_k cut
    p = SamplingParams(top_k=40, top_p=0.9, min_p=0.01)
    assert candidates(logits, p).tolist() == ref_candidates(as_list(logits), p)
    for u in (0.1, 0.6, 0.95):
        assert sample_token(logits, p, u) == ref_sample(as_list(logits), p, u)


def test_top_order_is_a_prefix_of_the_stable_sort() -> None:
    rng = np.random.default_rng(4)
    vals = rng.integers(0, 5, 200).astype(np.float32)   # heavy ties
    full = np.argsort(-vals, kind="stable")
    for m in range(1, 201, 7):
        np.testing.assert_array_equal(_top_order(vals, m), full[:m])


def test_penalties_match_reference() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        vocab = int(rng.integers(2, 30))
        logits = random_logits(rng, vocab)
        context = rng.integers(0, vocab, int(rng.integers(0, 40))).tolist()
        n_prompt = int(rng.integers(0, len(context) + 1))
        p = SamplingParams(
            repetition_penalty=float(rng.choice([1.0, 1.3, 0.7])),
            repeat_last_n=int(rng.choice([-1, 0, 1, 5, 64])),
            frequency_penalty=float(rng.choice([0.0, 0.5, -0.4])),
            presence_penalty=float(rng.choice([0.0, 0.25, -1.0])),
        )
        got = apply_penalties(logits, p, np.array(context), n_prompt)
        want = ref_penalties(as_list(logits), p, context, n_prompt)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        # tokens outside the window (or not generated, for frequency/presence) keep their
        # logits bitwise
        start = 0 if p.repeat_last_n == -1 else max(0, len(context) - p.repeat_last_n)
        touched: set[int] = set()
        if p.repeat_last_n != 0 and p.repetition_penalty != 1:
            touched |= set(context[start:])
        if p.repeat_last_n != 0 and (p.frequency_penalty or p.presence_penalty):
            touched |= set(context[max(start, n_prompt):])
        untouched = np.setdiff1d(np.arange(vocab), sorted(touched))
        assert np.array_equal(got[untouched], logits[untouched])


# ---------------------------------------------------------------------------------------------
# filters and penalties on hand-made cases

def probs_logits(*p: float) -> np.ndarray:
    return np.log(np.array(p, dtype=np.float64)).astype(np.float32)


@pytest.mark.parametrize("top_k, want", [(1, [1]), (2, [1, 3]), (3, [1, 3, 2]), (9, [1, 3, 2, 0])])
def test_top_k_keeps_the_k_largest(top_k: int, want: list[int]) -> None:
    logits = np.array([0.0, 3.0, 2.0, 3.0, -np.inf], np.float32)
    assert candidates(logits, SamplingParams(top_k=top_k)).tolist() == want


def test_top_k_tie_at_the_cut_keeps_lowest_ids() -> None:
    logits = np.array([1.0, 5.0, 1.0, 1.0, 1.0], np.float32)
    assert candidates(logits, SamplingParams(top_k=3)).tolist() == [1, 0, 2]


@pytest.mark.parametrize("top_p, want", [(0.45, [0]), (0.55, [0, 1]), (0.85, [0, 1, 2]),
                                         (1.0, [0, 1, 2])])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p: float, want: list[int]) -> None:
    logits = probs_logits(0.5, 0.3, 0.2)
    assert candidates(logits, SamplingParams(top_p=top_p)).tolist() == want


def test_top_p_that_keeps_one_token_is_deterministic() -> None:
    logits = probs_logits(0.1, 0.6, 0.3)
    p = SamplingParams(top_p=0.05)
    assert {sample_token(logits, p, u) for u in np.linspace(0, 0.999, 50)} == {1}


def test_top_p_normalizes_after_top_k() -> None:
    # Over the top 2 alone, token 0 holds 0.4 / 0.7 = 0.57 of the mass, so top_p = 0.55 keeps it
    # alone; over all four tokens it would need token 1 too.
    logits = probs_logits(0.4, 0.3, 0.2, 0.1)
    assert candidates(logits, SamplingParams(top_p=0.55)).tolist() == [0, 1]
    assert candidates(logits, SamplingParams(top_k=2, top_p=0.55)).tolist() == [0]


@pytest.mark.parametrize("min_p, want", [(0.3, [0, 1, 2]), (0.5, [0, 1]), (0.61, [0]),
                                         (1.0, [0])])
def test_min_p_keeps_tokens_within_a_ratio_of_the_best(min_p: float, want: list[int]) -> None:
    logits = probs_logits(0.5, 0.3, 0.2)             # ratios to the best: 1, 0.6, 0.4
    assert candidates(logits, SamplingParams(min_p=min_p)).tolist() == want


def test_min_p_one_keeps_every_tied_maximum() -> None:
    logits = np.array([2.0, 7.0, 1.0, 7.0], np.float32)
    assert candidates(logits, SamplingParams(min_p=1.0)).tolist() == [1, 3]


def test_all_neg_inf_but_one_always_gives_that_one() -> None:
    logits = np.full(50, -np.inf, np.float32)
    logits[17] = -3.0
    for p in (SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=5),
              SamplingParams(top_p=0.01, min_p=1.0, temperature=0.1)):
        for u in (0.0, 0.5, 0.9999):
            assert sample_token(logits, p, u) == 17
    assert logprobs(logits)[17] == 0.0
    assert top_logprobs(logits, 5) == [(17, 0.0)]


def test_penalties_change_exactly_the_expected_logits() -> None:
    logits = np.array([2.0, -1.0, 0.0, 3.0, 0.5], np.float32)
    context = np.array([0, 1, 2, 2, 3])                 # prompt [0, 1], generated [2, 2, 3]
    p = SamplingParams(repetition_penalty=2.0, repeat_last_n=-1, frequency_penalty=0.5,
                       presence_penalty=0.25)
    got = apply_penalties(logits, p, context, n_prompt=2)
    # repetition on {0, 1, 2, 3}; then 2 seen twice and 3 once among the generated tokens
    np.testing.assert_array_equal(got, [1.0, -2.0, 0.0 - 1.25, 1.5 - 0.75, 0.5])
    assert logits[0] == 2.0                             # input untouched

    window = SamplingParams(repetition_penalty=2.0, repeat_last_n=2, frequency_penalty=0.5,
                            presence_penalty=0.25)
    got = apply_penalties(logits, window, context, n_prompt=2)
    # the window is the last two tokens [2, 3], each generated once
    np.testing.assert_array_equal(got, [2.0, -1.0, -0.75, 0.75, 0.5])


def test_penalty_window_counts_prompt_for_repetition_only() -> None:
    logits = np.array([1.0, 1.0, 1.0], np.float32)
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0)
    got = apply_penalties(logits, p, np.array([0, 1]), n_prompt=1)
    np.testing.assert_array_equal(got, [0.5, -0.5, 1.0])


def test_penalties_off_return_logits_unchanged() -> None:
    logits = np.array([1.0, 2.0], np.float32)
    for p in (SamplingParams(), SamplingParams(repetition_penalty=1.5, repeat_last_n=0)):
        assert not p.has_penalties
        assert apply_penalties(logits, p, np.array([0, 1, 1]), 0) is logits


def test_sampler_penalizes_its_own_history() -> None:
    logits = np.array([5.0, 4.9, 0.0], np.float32)
    s = Sampler(SamplingParams(temperature=0, presence_penalty=1.0), prompt=[0])
    assert s.sample(logits) == 0                        # the prompt does not count
    s.accept(0)
    assert s.sample(logits) == 1                        # now token 0 is penalized
    s.accept(1)
    assert s.sample(logits) == 0
    r = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0])
    assert r.sample(logits) == 1                        # repetition counts the prompt


def test_penalty_context_grows_past_its_buffer() -> None:
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=0.001, repeat_last_n=-1))
    logits = np.zeros(3, np.float32)
    for _ in range(100):
        s.accept(s.sample(logits))
    # every step picks the least-used token, lowest id first
    assert s.sample(logits) == 1


# ---------------------------------------------------------------------------------------------
# greedy, seeds, statistics

def test_greedy_is_argmax_with_ties_to_lowest_id_and_ignores_seed() -> None:
    logits = np.array([-np.inf, 1.0, 4.0, 2.0, 4.0], np.float32)
    tokens = set()
    for seed in (0, 1, 2, None):
        s = Sampler(SamplingParams(temperature=0, seed=seed))
        tokens |= {s.sample(logits) for _ in range(5)}
    assert tokens == {2}


def token_stream(seed: int | None, steps: int = 60, vocab: int = 50) -> tuple[list[int], int]:
    rng = np.random.default_rng(99)                  # the logits sequence is fixed
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=seed))
    out = []
    for _ in range(steps):
        tok = s.sample(rng.standard_normal(vocab).astype(np.float32))
        s.accept(tok)
        out.append(tok)
    return out, s.seed


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    a, _ = token_stream(1234)
    b, _ = token_stream(1234)
    c, _ = token_stream(4321)
    assert a == b
    assert a != c


def test_unseeded_sampler_reports_a_seed_that_reproduces_it() -> None:
    a, seed = token_stream(None)
    assert isinstance(seed, int) and 0 <= seed < 2**32
    b, _ = token_stream(seed)
    assert a == b


def test_a_request_stream_does_not_depend_on_other_requests() -> None:
    logits = np.zeros(1000, np.float32)
    alone = Sampler(SamplingParams(seed=5))
    solo = [alone.sample(logits) for _ in range(30)]
    x, y = Sampler(SamplingParams(seed=5)), Sampler(SamplingParams(seed=6))
    interleaved = []
    for i in range(30):
        for _ in range(i % 3):
            y.sample(logits)
        interleaved.append(x.sample(logits))
    assert interleaved == solo


def draw_frequencies(logits: np.ndarray, params: SamplingParams, n: int = 20_000) -> np.ndarray:
    s = Sampler(params)
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=logits.size)
    return counts / n


def assert_close_to(freq: np.ndarray, p: np.ndarray, n: int = 20_000) -> None:
    # 4.5 standard errors per token: a false alarm is ~1e-5 per token, and the seed is fixed.
    tol = 4.5 * np.sqrt(p * (1 - p) / n) + 1e-12
    assert np.all(np.abs(freq - p) <= tol), (freq, p)


def test_draw_frequencies_follow_the_distribution() -> None:
    p = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = (np.log(p) + 3.0).astype(np.float32)     # softmax is shift-invariant
    assert_close_to(draw_frequencies(logits, SamplingParams(seed=7)), p)


def test_draw_frequencies_with_temperature_and_filters() -> None:
    p = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = np.log(p).astype(np.float32)
    # top_p 0.75 keeps {0, 1, 2}; temperature 0.5 squares the kept probabilities
    params = SamplingParams(temperature=0.5, top_p=0.75, seed=8)
    want = np.array([0.16, 0.09, 0.0225, 0.0, 0.0])
    assert_close_to(draw_frequencies(logits, params), want / want.sum())


# ---------------------------------------------------------------------------------------------
# log-probabilities

def test_logprobs_match_reference_and_are_stable() -> None:
    logits = np.array([1e4, 1e4 - 1.0, 1e4 - 30.0, -np.inf, 1e4 + 0.5], np.float32)
    got = logprobs(logits)
    assert got.dtype == np.float32
    finite = [float(x) for x in logits if x != NEG_INF]
    mx = max(finite)
    log_z = mx + math.log(sum(math.exp(x - mx) for x in finite))
    want = [float(x) - log_z if x != NEG_INF else NEG_INF for x in logits]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    assert got[3] == -np.inf
    assert math.isclose(float(np.exp(got.astype(np.float64)).sum()), 1.0, rel_tol=1e-6)


def test_top_logprobs_order_ties_and_limits() -> None:
    logits = np.array([1.0, 3.0, -np.inf, 3.0, 2.0], np.float32)
    lp = logprobs(logits)
    assert top_logprobs(logits, 3) == [(1, float(lp[1])), (3, float(lp[3])), (4, float(lp[4]))]
    assert [t for t, _ in top_logprobs(logits, 100)] == [1, 3, 4, 0]   # -inf never listed
    assert top_logprobs(logits, 0) == []


# ---------------------------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.01}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"repeat_last_n": -2}, "repeat_last_n"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"presence_penalty": float("-inf")}, "presence_penalty"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
])
def test_validation_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_numpy_scalars_are_accepted() -> None:
    p = SamplingParams(temperature=np.float32(0.7), top_k=np.int64(5), seed=np.uint32(3))
    assert sample_token(np.zeros(8, np.float32), p, 0.5) in range(5)


@pytest.mark.parametrize("logits, match", [
    (np.array([0.0, np.nan], np.float32), "NaN"),
    (np.array([0.0, np.inf], np.float32), r"\+inf"),
    (np.full(4, -np.inf, np.float32), "all logits are -inf"),
    (np.zeros((2, 3), np.float32), "1-D"),
    (np.zeros(0, np.float32), "1-D"),
])
def test_bad_logits_raise(logits: np.ndarray, match: str) -> None:
    for p in (SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=2)):
        with pytest.raises(ValueError, match=match):
            sample_token(logits, p, 0.5)
    with pytest.raises(ValueError, match=match):
        logprobs(logits)


def test_other_bad_arguments_raise() -> None:
    logits = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="u must be"):
        sample_token(logits, SamplingParams(), 1.0)
    with pytest.raises(ValueError, match="n must be"):
        top_logprobs(logits, -1)
    p = SamplingParams(repetition_penalty=1.1)
    with pytest.raises(ValueError, match="token ids outside"):
        apply_penalties(logits, p, np.array([4]), 0)
    with pytest.raises(ValueError, match="n_prompt"):
        apply_penalties(logits, p, np.array([1]), 2)


# ---------------------------------------------------------------------------------------------
# post-sampling probabilities (llama.cpp's post_sampling_probs)

def np_post_sampling(logits: np.ndarray, p: SamplingParams) -> dict[int, float]:
    """The truncated, tempered distribution in numpy, from the definitions: candidates by
    descending logit (ties by id), the first top_k, the shortest prefix whose temperature-1
    softmax mass reaches top_p, those within min_p of the best, then a softmax at the
    temperature over the survivors alone."""
    x = logits.astype(np.float64)
    ids = np.lexsort((np.arange(x.size), -x))
    ids = ids[np.isfinite(x[ids])]
    if p.temperature == 0:
        return {int(ids[0]): 1.0}
    if p.top_k:
        ids = ids[: p.top_k]
    if p.top_p < 1:
        mass = np.cumsum(np.exp(x[ids] - x[ids[0]]))
        ids = ids[: int(np.argmax(mass >= p.top_p * mass[-1])) + 1]
    ids = ids[x[ids] - x[ids[0]] >= (np.log(p.min_p) if p.min_p > 0 else -np.inf)]
    z = (x[ids] - x[ids[0]]) / p.temperature
    q = np.exp(z) / np.exp(z).sum()
    return {int(i): float(v) for i, v in zip(ids, q, strict=True) if v > 0}


def test_sampling_probs_match_the_numpy_distribution() -> None:
    rng = np.random.default_rng(11)
    for _ in range(300):
        vocab = int(rng.integers(1, 40))
        logits = random_logits(rng, vocab)
        p = random_params(rng, vocab)
        want = np_post_sampling(logits, p)
        token = int(rng.integers(vocab))
        prob, top = sampling_probs(logits, p, token, vocab)
        assert [t for t, _ in top] == sorted(want, key=lambda t: (-want[t], t))
        np.testing.assert_allclose([q for _, q in top], [want[t] for t, _ in top], rtol=1e-9)
        assert prob == pytest.approx(want.get(token, 0.0), rel=1e-9, abs=0)
        assert sampling_probs(logits, p, token, 2)[1] == top[:2]


def test_sampled_tokens_follow_the_reported_probabilities() -> None:
    logits = np.array([2.0, 1.5, 1.4, 0.3, -1.0, 0.9], np.float32)
    p = SamplingParams(temperature=0.7, top_k=4, top_p=0.9, seed=3)
    _, top = sampling_probs(logits, p, 0, 6)
    probs = np.zeros(6)
    for t, q in top:
        probs[t] = q
    assert_close_to(draw_frequencies(logits, p), probs)


def test_sampler_probs_see_the_penalties_of_the_draw() -> None:
    p = SamplingParams(temperature=1.0, repetition_penalty=2.0, repeat_last_n=-1, seed=1)
    sampler = Sampler(p, prompt=[0])
    logits = np.array([2.0, 1.0, 0.5], np.float32)
    prob, top = sampler.probs(logits, 0, 3)
    want = np_post_sampling(np.array([1.0, 1.0, 0.5], np.float32), p)  # 2.0 / 2 for token 0
    assert dict(top) == pytest.approx(want) and prob == pytest.approx(want[0])


def test_greedy_post_sampling_is_the_argmax_alone() -> None:
    logits = np.array([0.5, 3.0, 3.0, 1.0], np.float32)
    p = SamplingParams(temperature=0.0)
    assert sampling_probs(logits, p, 1, 5) == (1.0, [(1, 1.0)])
    assert sampling_probs(logits, p, 2, 0) == (0.0, [])
