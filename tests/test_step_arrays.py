"""The step's intervention tables (engine/interventions.step_arrays, built from runs of tokens
with numpy) against a plain per-token reading of the same entries: which ops act on each token
at each layer and in what order, with which gate; the prompt sums; the readouts."""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict

import numpy as np
import pytest
from tiller.engine.interventions import (
    OPS,
    POINTS,
    Condition,
    Op,
    Readout,
    SeqInterventions,
    StepLayout,
    StepLayouts,
    empty_step,
    step_arrays,
)

LAYERS, DIM = 4, 8


def _key(v: np.ndarray) -> bytes:
    return np.asarray(v, np.float32).tobytes()


def _gate_key(c: Condition) -> tuple:
    return (c.layer, _key(c.vector), c.comparison == "less", np.float32(c.threshold))


def reference(seqs: list[SeqInterventions | None], positions: np.ndarray, starts: np.ndarray
              ) -> tuple[dict, dict, dict]:
    """Per token and layer, the ops in the order they run; per (request, condition), the
    (token, layer) pairs summed; per (request, readout, token), (slot, vector)."""
    ops: dict[tuple[int, int], list[tuple]] = defaultdict(list)
    sums: dict[tuple[int, int], set] = defaultdict(set)
    ros: dict[tuple[int, int, int], tuple] = {}
    for s, si in enumerate(seqs):
        if si is None:
            continue
        for t in range(starts[s], starts[s + 1]):
            p = int(positions[t])
            for c, cond in enumerate(si.conditions):
                if cond.scope == "prompt" and c not in si.decisions and p < si.prompt_len:
                    sums[s, c].add((t, cond.layer))
            found = []
            for k, op in enumerate(si.ops):
                cond = si.conditions[op.cond] if op.cond >= 0 else None
                if not op.start <= p < op.end or (op.rows and p >= len(op.vector)):
                    continue
                gate = None
                if cond is not None and cond.scope == "prompt":
                    decided = si.decisions.get(op.cond)
                    if p < si.prompt_len or decided is None or not decided[1]:
                        continue
                elif cond is not None:
                    gate = _gate_key(cond)
                v = op.vector[p] if op.rows else op.vector
                found.append(((op.layer, op.kind != 0, k),
                              (op.kind, _key(v), np.float32(op.value), op.norm_match, gate)))
            for (layer, _, _), row in sorted(found, key=lambda f: f[0]):
                ops[t, layer].append(row)
            for r, ro in enumerate(si.readouts):
                ros[s, r, t - starts[s]] = (ro.block * 4 + POINTS.index(ro.point), _key(ro.vector))
    return dict(ops), dict(sums), ros


def read_tables(layout: StepLayout, starts: np.ndarray) -> tuple[dict, dict, dict]:
    """The same three maps, read back from the tables the kernels run."""
    iv = layout.iv

    def layer_of(start: np.ndarray, row: int) -> int:
        return int(np.searchsorted(start, row, side="right") - 1)

    ops: dict[tuple[int, int], list[tuple]] = defaultdict(list)
    for k in range(int(iv.op_start[-1])):
        t, g = int(iv.op_token[k]), int(iv.op_gate[k])
        gate = None
        if g >= 0:
            assert int(iv.gate_token[g]) == t  # a gate row is this token's
            gate = (layer_of(iv.gate_start, g), _key(iv.vecs[iv.gate_vec[g]]),
                    bool(iv.gate_less[g]), iv.gate_thr[g])
        ops[t, layer_of(iv.op_start, k)].append(
            (int(iv.op_kind[k]), _key(iv.vecs[iv.op_vec[k]]), iv.op_value[k], bool(iv.op_norm[k]),
             gate))
    row_of_sum = {int(iv.sum_row[a]): (int(iv.sum_token[a]), layer_of(iv.sum_start, a))
                  for a in range(int(iv.sum_start[-1]))}
    sums: dict[tuple[int, int], set] = defaultdict(set)
    for s, entries in enumerate(layout.sums):
        for c, row in entries:
            sums[s, c].add(row_of_sum[row])
    ros = {}
    for s, rows in enumerate(layout.readouts):
        for (i, r), row in np.ndenumerate(rows if rows is not None else np.zeros((0, 0), int)):
            assert int(iv.ro_token[row]) == starts[s] + i
            ros[s, r, i] = (layer_of(iv.ro_start, row), _key(iv.vecs[iv.ro_vec[row]]))
    # every gate row the ops use is listed once, at its (token, condition) of its request
    listed = []
    for s, rows in enumerate(layout.gates):
        for (i, _), g in np.ndenumerate(rows if rows is not None else np.zeros((0, 0), int)):
            if g >= 0:
                assert int(iv.gate_token[g]) == starts[s] + i
                listed.append(int(g))
    assert sorted(listed) == list(range(len(iv.gate_token)))
    assert len(iv.gate_cos) == len(iv.gate_on) == int(iv.gate_start[-1])
    assert iv.sums.shape == (len(row_of_sum), DIM)
    np.testing.assert_allclose(iv.vec_norm, np.linalg.norm(iv.vecs.astype(np.float64), axis=1),
                               rtol=1e-6)
    return dict(ops), dict(sums), ros


def random_seq(rng: np.random.Generator, prompt_len: int) -> SeqInterventions:
    def unit() -> np.ndarray:
        v = rng.standard_normal(DIM).astype(np.float32)
        return v / np.linalg.norm(v)

    conds = [Condition(unit(), int(rng.integers(0, LAYERS)), float(rng.uniform(-0.5, 0.5)),
                       ("greater", "less")[int(rng.integers(2))], scope)
             for scope in ("token", "prompt", "prompt", "prompt")]
    decisions = {2: (0.3, True), 3: (-0.1, False)}  # cond 1 undecided: its prompt is summed
    ops = []
    for k in range(int(rng.integers(3, 9))):
        kind = int(rng.integers(len(OPS)))
        rows = kind == 0 and rng.random() < 0.4
        vector = (rng.standard_normal((int(rng.integers(2, 30)), DIM)).astype(np.float32)
                  if rows else unit())
        start = int(rng.integers(0, 20))
        end = start + int(rng.integers(1, 40)) if rng.random() < 0.7 else 10**9
        cond = int(rng.integers(-1, 4)) if rng.random() < 0.6 else -1
        ops.append(Op(k, int(rng.integers(0, LAYERS + 1)), kind, vector, rows,
                      float(rng.uniform(-1, 1)), bool(rng.random() < 0.5), start, end, cond))
    # two ops on one token condition over different runs share its gate rows
    ops.append(Op(len(ops), 1, 0, unit(), False, 0.0, False, 3, 12, 0))
    ops.append(Op(len(ops), 2, 1, unit(), False, 0.0, True, 8, 25, 0))
    readouts = [Readout(unit(), int(rng.integers(0, LAYERS)), POINTS[int(rng.integers(4))])
                for _ in range(int(rng.integers(0, 3)))]
    return SeqInterventions(ops, conds, [0, 1, 2, 3], readouts, prompt_len,
                            np.zeros((len(conds), DIM)), decisions)


@pytest.mark.parametrize("seed", range(12))
def test_tables_equal_the_per_token_reading(seed: int):
    rng = np.random.default_rng(seed)
    seqs: list[SeqInterventions | None] = []
    runs = []
    for s in range(6):
        prompt_len = int(rng.integers(2, 20))
        # a whole prompt, a prefill chunk in the middle, or a decode token
        first, n = [(0, prompt_len), (int(rng.integers(0, 25)), int(rng.integers(1, 16))),
                    (int(rng.integers(prompt_len, 40)), 1)][s % 3]
        seqs.append(None if s == 4 else random_seq(rng, prompt_len))
        runs.append(np.arange(first, first + n, dtype=np.int32))
    positions = np.concatenate(runs)
    starts = np.cumsum([0] + [len(r) for r in runs])
    layout = step_arrays(seqs, positions, starts, LAYERS, DIM, empty_step(LAYERS, DIM))
    want = reference(seqs, positions, starts)
    assert want[0]  # the case has ops to compare
    assert read_tables(layout, starts) == want


def test_no_entries_give_the_shared_empty_tables():
    empty = empty_step(LAYERS, DIM)
    seq = SeqInterventions([], [], [], [], 3, np.zeros((0, DIM)))
    layout = step_arrays([None, seq], np.arange(4, dtype=np.int32), np.array([0, 2, 4]), LAYERS,
                         DIM, empty)
    assert layout.iv is empty


def test_decode_tables_are_kept_between_breaks_and_equal_the_reading():
    """StepLayouts runs a decode batch's tables again while no sequence crosses one of its
    breaks (a scope's end, an ActAdd row, the prompt's end) or gets a decision: each step's
    tables still equal the per-token reading, and a crossing builds new ones."""
    rng = np.random.default_rng(5)
    seqs: list[SeqInterventions | None] = [random_seq(rng, 6), None, random_seq(rng, 9)]
    layouts = StepLayouts(LAYERS, DIM)
    starts = np.arange(len(seqs) + 1)
    previous, kept = None, 0
    for step in range(45):
        if step == 30:
            seqs[0].decisions[1] = (0.5, True)  # cond 1 decided: its ops start at once
        positions = np.array([step, 3 + step, 40 - step], np.int32)
        layout = layouts(seqs, positions, starts)
        assert read_tables(layout, starts) == reference(seqs, positions, starts)
        if previous is not None:
            same = step != 30 and all(
                si is None or bisect_right(si.breaks, p) == bisect_right(si.breaks, p - d)
                for si, p, d in zip(seqs, positions.tolist(), (1, 1, -1), strict=True))
            assert (layout is previous) == same
            kept += same
        # what a step wrote is cleared when the tables run again
        assert not (layout.iv.ro_out.any() or layout.iv.gate_on.any() or layout.iv.sums.any())
        for out in (layout.iv.ro_out, layout.iv.gate_on, layout.iv.sums):
            out.fill(1)
        previous = layout
    assert kept > 10
