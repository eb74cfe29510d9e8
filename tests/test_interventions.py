"""Scoped entries, operators, conditional steering (CAST) and readouts in the engine's step,
against the numpy reference forward with the same intervention written here in plain numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from tiller.engine.engine import (
    Condition,
    Engine,
    EngineError,
    Readout,
    SeqRequest,
    SteeringTerm,
)
from tiller.engine.forward import CAPTURE_POINTS

from tests.reference import reference_forward
from tests.test_engine import CONFIG, make_engine, reference_weights

DIM = CONFIG.dim
L = CONFIG.n_layers


@pytest.fixture(scope="module")
def f32() -> Engine:
    return make_engine("f32")


@pytest.fixture(scope="module")
def weights(f32):
    return reference_weights(f32, False)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape or (DIM,)).astype(np.float32)


# the reference: the same interventions as plain numpy over a teacher-forced forward ----------


@dataclass
class Case:
    terms: list[SteeringTerm]
    readouts: list[Readout]
    prompt: list[int]
    generated: list[int]


def _scope(term: SteeringTerm, prompt_len: int) -> tuple[int, int]:
    p = term.positions
    if p is None or p == "all":
        return 0, 10**9
    if p == "prompt":
        return 0, prompt_len
    if p == "generated":
        return prompt_len, 10**9
    return p


def _cos(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    x64, v64 = x.astype(np.float64), v.astype(np.float64)
    return (x64 @ v64) / (np.linalg.norm(x64, axis=-1) * np.linalg.norm(v64))


def _operate(x: np.ndarray, term: SteeringTerm, p: int) -> np.ndarray:
    """One entry on one token's stream (dim,), float64."""
    before = np.linalg.norm(x)
    v = np.asarray(term.vectors, np.float64)
    if term.op == "add":
        if not term.every_position:  # ActAdd rows: row p at position p
            v = v[p]
        x = x + term.scale * v.reshape(-1)
    else:
        u = v.reshape(-1) / np.linalg.norm(v)
        c = x @ u
        target = {"ablate": 0.0, "clamp": term.value, "cap": min(c, term.value)}[term.op]
        x = x + (target - c) * u
    if term.norm_match:
        x = x * before / np.linalg.norm(x)
    return x


def reference_edit(case: Case, decisions: dict[int, bool], gates: dict, sums: dict):
    """edit(layer, x, positions) for reference_forward: conditions read the stream first, then
    additions (plain ones, then the others), then ablate/clamp/cap in entry order."""
    P = len(case.prompt)

    def edit(layer: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        out = x.astype(np.float64)
        for i, term in enumerate(case.terms):
            w = term.when
            if w is not None and w.layer == layer:
                if w.scope == "token":
                    for t, p in enumerate(positions):
                        c = _cos(x[t], w.vector)
                        gates[i, int(p)] = (c, c < w.threshold if w.comparison == "less"
                                            else c > w.threshold)
                else:
                    sums[i] = x[positions < P].astype(np.float64).sum(axis=0)
        order = sorted(range(len(case.terms)), key=lambda i: case.terms[i].op != "add")
        for i in order:
            term = case.terms[i]
            if term.layer != layer:
                continue
            start, end = _scope(term, P)
            for t, p in enumerate(int(p) for p in positions):
                rows = term.op == "add" and not term.every_position
                if not start <= p < end or (rows and p >= len(term.vectors)):
                    continue
                w = term.when
                if w is not None and w.scope == "prompt" and (p < P or not decisions[i]):
                    continue
                if w is not None and w.scope == "token" and not gates[i, p][1]:
                    continue
                out[t] = _operate(out[t], term, p)
        return out.astype(np.float32)

    return edit


def reference(weights, case: Case, config=CONFIG):
    """Teacher-forced logits, captures, prompt decisions and token conditions of the case."""
    decisions: dict[int, bool] = {}
    gates: dict = {}
    sums: dict = {}
    if any(t.when is not None and t.when.scope == "prompt" for t in case.terms):
        # the prompt alone first: the decision needs its mean stream, and the entry may sit at
        # an earlier layer than its condition
        reference_forward(weights, config, case.prompt, edit=reference_edit(
            case, decisions, gates, sums))
        for i, term in enumerate(case.terms):
            w = term.when
            if w is not None and w.scope == "prompt":
                c = _cos(sums[i], w.vector)
                decisions[i] = c < w.threshold if w.comparison == "less" else c > w.threshold
    ref = reference_forward(weights, config, case.prompt + case.generated,
                            edit=reference_edit(case, decisions, gates, sums))
    return ref, decisions, gates


def run_batch(engine: Engine, cases: list[Case]):
    """All cases in shared steps: the prompts in two chunks, then one token a step."""
    seqs = [engine.new_sequence(c.terms, c.readouts, prompt_len=len(c.prompt)) for c in cases]
    logits: list[list[np.ndarray]] = [[] for _ in cases]
    reads: list[list[np.ndarray]] = [[] for _ in cases]
    gates: list[list[np.ndarray]] = [[] for _ in cases]
    try:
        def step(parts):
            reqs = [SeqRequest(seqs[i], toks, logits="all") for i, toks in parts]
            for (i, _), res in zip(parts, engine.step(reqs), strict=True):
                logits[i].append(res.logits)
                if res.readouts is not None:
                    reads[i].append(res.readouts)
                if res.gates is not None:
                    gates[i].append(res.gates)

        step([(i, c.prompt[:3]) for i, c in enumerate(cases)])
        step([(i, c.prompt[3:]) for i, c in enumerate(cases)])
        for g in range(max(len(c.generated) for c in cases)):
            step([(i, [c.generated[g]]) for i, c in enumerate(cases) if g < len(c.generated)])
        return [(np.concatenate(lg), np.concatenate(r) if r else None,
                 np.concatenate(gt) if gt else None, s.interventions)
                for lg, r, gt, s in zip(logits, reads, gates, seqs, strict=True)]
    finally:
        for s in seqs:
            engine.release(s)


def check(weights, case: Case, got) -> None:
    logits, reads, gates, si = got
    ref, decisions, ref_gates = reference(weights, case)
    scale = np.abs(ref["logits"]).max()
    np.testing.assert_allclose(logits, ref["logits"], atol=3e-5 * scale, rtol=0)
    for k, ro in enumerate(case.readouts):
        h = ref[ro.point][ro.block].astype(np.float64)
        v = ro.vector.astype(np.float64)
        proj = h @ v / np.linalg.norm(v)
        np.testing.assert_allclose(reads[:, k, 0], proj, atol=1e-4 * np.abs(proj).max())
        np.testing.assert_allclose(reads[:, k, 1], proj / np.linalg.norm(h, axis=-1),
                                   atol=1e-5)
    for i, term in enumerate(case.terms):
        w = term.when
        if w is None:
            continue
        k = si.cond_entries.index(i)
        if w.scope == "prompt":
            assert si.decisions[k][1] == decisions[i]
        else:
            n = len(case.prompt) + len(case.generated)
            want = [ref_gates.get((i, p), (np.nan, np.nan)) for p in range(n)]
            got_on = gates[:, k, 1]
            want_on = np.array([float(on) for _, on in want])
            np.testing.assert_array_equal(np.isnan(got_on), np.isnan(want_on))
            np.testing.assert_array_equal(got_on[~np.isnan(got_on)], want_on[~np.isnan(want_on)])


PROMPT = np.random.default_rng(1).integers(0, CONFIG.vocab_size, 9).tolist()
GEN = np.random.default_rng(2).integers(0, CONFIG.vocab_size, 6).tolist()


def control(layer: int, seed: int, **kw) -> SteeringTerm:
    return SteeringTerm(layer, rand(seed), every_position=True, **kw)


CASES = {
    "add_generated": [control(1, 10, scale=2.0, positions="generated")],
    "add_prompt": [control(2, 11, scale=-1.5, positions="prompt")],
    "add_range_norm_match": [control(1, 12, positions=(4, 11), norm_match=True)],
    "actadd_range": [SteeringTerm(1, rand(13, 7, DIM), 1.5, positions=(2, 12))],
    "actadd_one_row_generated": [SteeringTerm(2, rand(34, 1, DIM), 2.0, positions=(0, 5),
                                              norm_match=True)],
    "ablate": [control(1, 14, op="ablate"), control(3, 14, op="ablate")],
    "ablate_norm_match_prompt": [control(2, 15, op="ablate", norm_match=True,
                                         positions="prompt")],
    "clamp": [control(1, 16, op="clamp", value=3.0, positions=(0, 12))],
    "cap": [control(2, 17, op="cap", value=-0.2)],
    "cap_norm_match_generated": [control(0, 18, op="cap", value=0.0, norm_match=True,
                                         positions="generated")],
    "mixed_order": [control(1, 19, op="clamp", value=1.0), control(1, 20, scale=3.0),
                    control(1, 21, scale=0.5, positions="generated"),
                    control(1, 19, op="ablate")],
    "cast_prompt_fires": [control(1, 22, scale=3.0, when=Condition(rand(23), 2, -1.0))],
    "cast_prompt_holds": [control(2, 22, scale=3.0,
                                  when=Condition(rand(23), 2, -1.0, "less"))],
    "cast_token": [control(2, 24, op="clamp", value=2.0,
                           when=Condition(rand(25), 1, 0.0, scope="token")),
                   control(3, 26, scale=2.0, when=Condition(rand(27), 3, 0.0, "less", "token"))],
}
READOUTS = [Readout(rand(30), 0, "resid_pre"), Readout(rand(31), 1, "attn_out"),
            Readout(rand(32), 2, "mlp_out"), Readout(rand(33), 2, "resid_post")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_entry_equals_the_reference(f32, weights, name):
    case = Case(CASES[name], READOUTS[:2], PROMPT, GEN)
    got = run_batch(f32, [case])[0]
    check(weights, case, got)
    # and the intervention did something: the unsteered logits differ
    plain = reference_forward(weights, CONFIG, PROMPT + GEN)["logits"]
    fired = name != "cast_prompt_holds"
    assert fired == (not np.allclose(got[0], plain, atol=1e-4))


def test_cast_reports_its_decisions(f32):
    fires, holds = (run_batch(f32, [Case(CASES[n], [], PROMPT, GEN)])[0][3]
                    for n in ("cast_prompt_fires", "cast_prompt_holds"))
    assert fires.decisions[0][1] and not holds.decisions[0][1]
    assert fires.decisions[0][0] == pytest.approx(holds.decisions[0][0], abs=1e-6)
    tokens = run_batch(f32, [Case(CASES["cast_token"], [], PROMPT, GEN)])[0][2]
    on = tokens[:, 0, 1]
    assert 0 < np.nansum(on) < len(on)  # the token condition is decided per token, both ways


def test_a_mixed_batch_equals_the_reference_and_each_solo_run_bitwise(f32, weights):
    names = sorted(CASES)
    cases = [Case(CASES[n], [READOUTS[i % 4], READOUTS[(i + 1) % 4]],
                  PROMPT[: 5 + i % 4], GEN[: 3 + i % 3]) for i, n in enumerate(names)]
    cases.append(Case([], READOUTS, PROMPT, GEN))  # readouts only
    cases.append(Case([], [], PROMPT, GEN))  # nothing at all
    together = run_batch(f32, cases)
    for case, got in zip(cases, together, strict=True):
        check(weights, case, got)
        alone = run_batch(f32, [case])[0]
        np.testing.assert_array_equal(got[0], alone[0])
        if got[1] is not None:
            np.testing.assert_array_equal(got[1], alone[1])


def test_q8_readouts_see_the_engine_captures(weights):
    q8 = make_engine("q8_0")
    terms = CASES["mixed_order"]
    tokens = PROMPT + GEN
    seq = q8.new_sequence(terms, READOUTS, prompt_len=len(PROMPT))
    res = q8.step([SeqRequest(seq, tokens, logits="all", capture_layers=(0, 1, 2))])[0]
    for k, ro in enumerate(READOUTS):
        h = res.captures[CAPTURE_POINTS.index(ro.point), ro.block].astype(np.float64)
        proj = h @ ro.vector / np.linalg.norm(ro.vector.astype(np.float64))
        np.testing.assert_allclose(res.readouts[:, k, 0], proj, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("term", "message"), [
    (control(1, 1, op="twist"), "unknown op"),
    (control(1, 1, positions=(5, 5)), "empty"),
    (control(1, 1, positions=(0, CONFIG.max_seq_len + 1)), "past the context"),
    (SteeringTerm(1, rand(1, 4, DIM), op="ablate"), "needs a direction"),
    (control(1, 1, op="ablate", scale=1.0).__class__(1, np.zeros(DIM, np.float32),
                                                      every_position=True, op="clamp"),
     "not zero"),
    (control(1, 1, when=Condition(rand(2), 2, 0.0, scope="token")), "at or before"),
    (control(1, 1, when=Condition(rand(2)[:5], 1, 0.0)), "width"),
    (control(1, 1, when=Condition(rand(2), L + 1, 0.0)), "when.layer"),
])
def test_bad_entries_are_refused(f32, term, message):
    with pytest.raises(EngineError, match=message):
        f32.new_sequence([term], prompt_len=4)


def test_bad_readouts_are_refused(f32):
    with pytest.raises(EngineError, match="block"):
        f32.new_sequence([], [Readout(rand(1), L, "resid_pre")])
    with pytest.raises(EngineError, match="width"):
        f32.new_sequence([], [Readout(rand(1)[:7], 0, "resid_pre")])
