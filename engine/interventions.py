"""Interventions and readouts beyond plain addition: scoped entries, the ablate/clamp/cap
operators, conditional steering (CAST) and readouts, as per-token work inside the jitted step.

A sequence's steering terms are split once, when it is created (Engine.new_sequence): plain
additions at every position (or at an ActAdd vector's own positions) are folded as before
(FoldedSteering, applied by forward._steer); everything else becomes an `Op` here. Each step,
`step_arrays` lays the ops, conditions and readouts of the batch's tokens out as flat tables
(`StepInterventions`), sorted by layer, and the kernels below run them at the hooks of
forward_step. A batch with none gets the same empty tables every step: no per-step cost.

Order at a stream layer l, for one token: conditions read the stream (before anything at l
changes it), then the folded additions, then the ops -- additions first, then ablate, clamp
and cap in the order of their entries; readouts of block l's `resid_pre` see the result.

Operators, with d the unit direction and c = x . d:
- add:    x += scale * v
- ablate: x -= c d
- clamp:  x += (value - c) d
- cap:    x += (min(c, value) - c) d   (Neuronpedia's projection cap)
with norm_match, x is then rescaled to the norm it had before the operator.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
from numba import njit

from . import kernels as K

OPS = ("add", "ablate", "clamp", "cap")
POINTS = ("resid_pre", "attn_out", "mlp_out", "resid_post")  # forward.CAPTURE_POINTS' order
Positions = Literal["all", "prompt", "generated"] | tuple[int, int] | None


@dataclass(frozen=True)
class Condition:
    """CAST's condition: the cosine of the stream at `layer` (before that layer's
    interventions) with `vector`, compared with `threshold`. scope "prompt": decided once from
    the mean prompt stream, the entry then applies to generated positions only if it holds;
    "token": decided per token inside the step (layer <= the entry's layer)."""

    vector: np.ndarray  # (dim,)
    layer: int
    threshold: float
    comparison: Literal["greater", "less"] = "greater"
    scope: Literal["prompt", "token"] = "prompt"
    label: int = -1  # the caller's name for it (the server's steering entry), for reports


@dataclass(frozen=True)
class Readout:
    """The projection of a block's hidden state at `point` on `vector`, per token."""

    vector: np.ndarray  # (dim,)
    block: int
    point: str = "resid_pre"


@dataclass(frozen=True, eq=False)
class Op:
    """One non-folded steering entry at one layer, resolved for its sequence."""

    entry: int  # the request's steering entry, for reports
    layer: int
    kind: int  # index in OPS
    vector: np.ndarray  # (dim,) (unit unless add) or (P, dim) ActAdd rows (add only)
    rows: bool
    value: float
    norm_match: bool
    start: int  # positions [start, end)
    end: int
    cond: int  # index into SeqInterventions.conditions, or -1


@dataclass(eq=False)
class SeqInterventions:
    """What a sequence carries besides its folded additions, and its conditions' state."""

    ops: list[Op]
    conditions: list[Condition]
    cond_entries: list[int]  # the entry of each condition
    readouts: list[Readout]
    prompt_len: int
    sums: np.ndarray  # (n_conditions, dim) float64: prompt-mode sums of the prompt's stream
    decisions: dict[int, tuple[float, bool]] = field(default_factory=dict)  # cond -> (cos, fired)
    # the positions where what applies to one token may change: between two of them a decode
    # token's tables are the same (StepLayouts keeps them); an ActAdd row is each its own
    breaks: list[int] = field(init=False)

    def __post_init__(self) -> None:
        breaks = {self.prompt_len}
        for op in self.ops:
            breaks.update((op.start, op.end))
            if op.rows:
                breaks.update(range(op.start, min(op.end, len(op.vector)) + 1))
        self.breaks = sorted(breaks)


class StepInterventions(NamedTuple):
    """Flat tables of one step; rows of each table are sorted by layer (or readout slot) and
    `*_start[l]:*_start[l + 1]` are layer l's. See the kernels for their use."""

    vecs: np.ndarray  # (V, dim) f32
    vec_norm: np.ndarray  # (V,) f32
    op_start: np.ndarray  # (n_layers + 2,) int32
    op_token: np.ndarray  # (K,) int32
    op_kind: np.ndarray
    op_vec: np.ndarray
    op_gate: np.ndarray  # index into the gate rows, -1: unconditional
    op_value: np.ndarray  # (K,) f32
    op_norm: np.ndarray  # (K,) bool
    gate_start: np.ndarray
    gate_token: np.ndarray
    gate_vec: np.ndarray
    gate_less: np.ndarray  # (G,) bool
    gate_thr: np.ndarray  # (G,) f32
    gate_cos: np.ndarray  # (G,) f32 out
    gate_on: np.ndarray  # (G,) bool out
    sum_start: np.ndarray
    sum_token: np.ndarray
    sum_row: np.ndarray
    sums: np.ndarray  # (A, dim) f32 out
    ro_start: np.ndarray  # (n_layers * 4 + 1,): slot = block * 4 + point
    ro_token: np.ndarray
    ro_vec: np.ndarray
    ro_out: np.ndarray  # (R, 2) f32 out: projection on the unit direction, cosine


@dataclass(eq=False)
class StepLayout:
    """Where each request's rows of the step's outputs are: per request, gate rows
    (token offset, condition), readout rows (token offset, readout), and prompt sums."""

    iv: StepInterventions
    # per request: gate rows (n_tokens, n_conditions), -1 where none (a prompt condition, or no
    # op of the condition at that token); None: the request has no token condition
    gates: list[np.ndarray | None]
    readouts: list[np.ndarray | None]  # per request: ro rows (n_tokens, n_readouts), or None
    sums: list[list[tuple[int, int]]]  # per request: (cond, sum row)
    _plan: tuple | None = None  # readings(): the index arrays it takes, made on first use

    def readings(self) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
        """Per request, its readouts (n_tokens, n_readouts, 2: projection, cosine) and token
        conditions (n_tokens, n_conditions, 2: cosine, 1/0; NaN where not evaluated), or None.
        Fresh arrays: every request's rows are taken with one fancy index per table."""
        if self.iv.ro_start[-1] == 0 and all(g is None for g in self.gates):
            return [(None, None)] * len(self.gates)  # no readouts, no token conditions
        if self._plan is None:
            self._plan = (_concat(self.readouts), _concat(self.gates))
        (ro_rows, ro_parts), (g_rows, g_parts) = self._plan
        ro = self.iv.ro_out[ro_rows]
        gates = np.full((len(g_rows), 2), np.nan, np.float32)
        hit = g_rows >= 0
        if hit.any():
            gates[hit, 0] = self.iv.gate_cos[g_rows[hit]]
            gates[hit, 1] = self.iv.gate_on[g_rows[hit]]
        return [(None if r is None else ro[r[0]:r[1]].reshape(r[2], r[3], 2),
                 None if g is None else gates[g[0]:g[1]].reshape(g[2], g[3], 2))
                for r, g in zip(ro_parts, g_parts, strict=True)]

    def reset(self) -> None:
        """Clear the outputs, for the same tables to run another step."""
        for out in (self.iv.gate_cos, self.iv.gate_on, self.iv.sums, self.iv.ro_out):
            out.fill(0)


def _concat(per_request: list[np.ndarray | None]) -> tuple[np.ndarray, list]:
    """Index arrays (n, m) of the requests that have one, flattened into one, and each one's
    (first, end, n, m) in it (None for the others)."""
    parts: list[tuple[int, int, int, int] | None] = []
    at = 0
    for a in per_request:
        if a is None:
            parts.append(None)
        else:
            parts.append((at, at + a.size, *a.shape))
            at += a.size
    arrays = [a.reshape(-1) for a in per_request if a is not None]
    return (np.concatenate(arrays) if arrays else np.zeros(0, np.int64)), parts


def _starts(keys: np.ndarray, n: int) -> np.ndarray:
    """(n + 1,) offsets of sorted keys' runs: rows of key k are starts[k]:starts[k + 1]."""
    return np.searchsorted(np.asarray(keys, np.int64), np.arange(n + 1)).astype(np.int32)


def empty_step(n_layers: int, dim: int) -> StepInterventions:
    z = np.zeros(0, np.int32)
    f = np.zeros(0, np.float32)
    b = np.zeros(0, np.bool_)
    return StepInterventions(
        np.zeros((1, dim), np.float32), np.ones(1, np.float32), np.zeros(n_layers + 2, np.int32),
        z, z, z, z, f, b, np.zeros(n_layers + 2, np.int32), z, z, b, f, f.copy(), b.copy(),
        np.zeros(n_layers + 2, np.int32), z, z, np.zeros((0, dim), np.float32),
        np.zeros(n_layers * 4 + 1, np.int32), z, z, np.zeros((0, 2), np.float32))


def _ranges(first: list[int], counts: list[int], total: int, step: list[int] | None = None
            ) -> np.ndarray:
    """Runs first[c], first[c] + step[c], ... of counts[c] values each, concatenated: the
    tokens (or table rows) of every chunk without a Python loop over them."""
    if total == len(counts):  # one token per chunk (decode): no runs to lay out
        return np.asarray(first, np.int64)
    n = np.asarray(counts, np.int64)
    within = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
    if step is not None:
        within *= np.repeat(np.asarray(step, np.int64), n)
    return np.repeat(np.asarray(first, np.int64), n) + within


def _column(values: list, counts: list[int], total: int, dtype: type) -> np.ndarray:
    """values[c] repeated counts[c] times, concatenated."""
    a: np.ndarray = np.asarray(values, dtype).reshape(-1)
    return a if total == len(counts) else np.repeat(a, counts)


def step_arrays(seqs: list[SeqInterventions | None], positions: np.ndarray, starts: np.ndarray,
                n_layers: int, dim: int, empty: StepInterventions) -> StepLayout:
    """The step's tables for requests whose sequences carry `seqs` (token s's tokens are
    starts[s]:starts[s + 1], at consecutive `positions`, as Engine.step lays them out).

    An op applies to one run of a sequence's tokens (its scope intersected with theirs), so
    each op, prompt sum and readout is one chunk (first token, count) and the tables are built
    from the chunks with a few numpy calls: no Python loop over tokens (a 512-token prefill
    with an op costs what a decode token does). Only token conditions keep a per-token array,
    as several ops may share one condition's gate rows over different runs."""
    layout = StepLayout(empty, [None] * len(seqs), [None] * len(seqs), [[] for _ in seqs])
    if all(s is None for s in seqs):
        return layout
    vecs: list[np.ndarray] = []  # (dim,) directions and (n, dim) blocks, stacked at the end
    n_vecs = 0

    def vec(v: np.ndarray) -> int:
        """Add a direction or a block of rows; the index of its first row."""
        nonlocal n_vecs
        vecs.append(v)
        n_vecs += 1 if v.ndim == 1 else len(v)
        return n_vecs - (1 if v.ndim == 1 else len(v))

    # ops: per chunk (layer, additions first, entry, kind, value, norm, first token, count,
    # first vec row, vec step) and its gate rows (None: ungated)
    ops: list[tuple[int, bool, int, int, float, bool, int, int, int, int]] = []
    op_gates: list[np.ndarray | None] = []
    gates: list[tuple[int, int, bool, float, np.ndarray]] = []  # layer, vec, less, thr, tokens
    n_gates = 0
    sums: list[tuple[int, int, int]] = []  # layer, first token, count
    n_sums = 0
    ros: list[tuple[int, int, int, int]] = []  # slot, first token, count, vec
    ro_blocks: list[tuple[int, int, int, int]] = []  # request, first ro row, readouts, tokens
    n_ros = 0
    for s, si in enumerate(seqs):
        if si is None:
            continue
        t0 = int(starts[s])
        n = int(starts[s + 1]) - t0
        if not n:
            continue
        p0 = int(positions[t0])
        cvecs = [vec(c.vector) for c in si.conditions]
        gate_rows = np.full((n, len(si.conditions)), -1, np.int64)  # before sorting; -1: none
        if any(c.scope == "token" for c in si.conditions):
            layout.gates[s] = gate_rows
        for c, condition in enumerate(si.conditions):
            if condition.scope == "prompt" and c not in si.decisions:
                m = max(0, min(n, si.prompt_len - p0))
                layout.sums[s].extend((c, r) for r in range(n_sums, n_sums + m))
                sums.append((condition.layer, t0, m))
                n_sums += m
        for k, op in enumerate(si.ops):
            cond = si.conditions[op.cond] if op.cond >= 0 else None
            lo, hi = max(op.start, p0), min(op.end, p0 + n)
            if op.rows:
                hi = min(hi, len(op.vector))
            if cond is not None and cond.scope == "prompt":
                decided = si.decisions.get(op.cond)
                if decided is None or not decided[1]:
                    continue
                lo = max(lo, si.prompt_len)
            if hi <= lo:
                continue
            i0, m = lo - p0, hi - lo
            gate = None
            if cond is not None and cond.scope == "token":
                g = gate_rows[:, op.cond]
                idx = np.arange(i0, i0 + m)
                new = idx[g[idx] < 0]  # a (token, condition) is one gate row, however many ops
                g[new] = np.arange(n_gates, n_gates + len(new))
                gates.append((cond.layer, cvecs[op.cond], cond.comparison == "less",
                              cond.threshold, t0 + new))
                n_gates += len(new)
                gate = g[idx]
            if op.rows:  # ActAdd: the row of each token's position
                v, step = vec(op.vector[lo:hi]), 1
            else:  # a direction's one table row, shared by every token it applies to
                v, step = vec(op.vector), 0
            ops.append((op.layer, op.kind != 0, k, op.kind, op.value, op.norm_match, t0 + i0, m,
                        v, step))
            op_gates.append(gate)
        if si.readouts:  # rows n_ros + r * n + i, before sorting: readout r, token i
            ro_blocks.append((s, n_ros, len(si.readouts), n))
            n_ros += len(si.readouts) * n
        for ro in si.readouts:
            ros.append((ro.block * 4 + POINTS.index(ro.point), t0, n, vec(ro.vector)))
    if not (ops or gates or sums or ros):
        return layout

    # every table sorted by layer (readouts by slot), stably: rows keep their gathering order
    # within a key; ops by layer, then additions before the others, then entry order
    oc = [x[7] for x in ops]
    on = sum(oc)
    o_layer = _column([x[0] for x in ops], oc, on, np.int64)
    o = np.lexsort((_column([x[2] for x in ops], oc, on, np.int64),
                    _column([x[1] for x in ops], oc, on, np.int64), o_layer))
    gc = [len(g[4]) for g in gates]
    gn = sum(gc)
    g_layer = _column([g[0] for g in gates], gc, gn, np.int64)
    g_order = np.argsort(g_layer, kind="stable")
    g_row = np.empty(gn, np.int64)
    g_row[g_order] = np.arange(gn)
    if gates:
        for s, rows in enumerate(layout.gates):
            if rows is not None:
                layout.gates[s] = np.where(rows >= 0, g_row[rows], -1)
    o_gate = np.full(on, -1, np.int64)
    at = 0
    for rows_of, c in zip(op_gates, oc, strict=True):
        if rows_of is not None:
            o_gate[at:at + c] = g_row[rows_of]
        at += c
    ac = [a[2] for a in sums]
    a_layer = _column([a[0] for a in sums], ac, n_sums, np.int64)
    a_order = np.argsort(a_layer, kind="stable")
    rc = [r[2] for r in ros]
    rn = sum(rc)
    r_slot = _column([r[0] for r in ros], rc, rn, np.int64)
    r_order = np.argsort(r_slot, kind="stable")
    if ros:
        ro_row = np.empty(rn, np.int64)
        ro_row[r_order] = np.arange(rn)
        for s, first, n_readouts, n in ro_blocks:
            layout.readouts[s] = ro_row[first:first + n_readouts * n].reshape(n_readouts, n).T
    V = np.vstack(vecs).astype(np.float32, copy=False) if vecs else empty.vecs
    norms = np.sqrt(np.einsum("ij,ij->i", V, V, dtype=np.float64)).astype(np.float32)
    i32 = np.int32
    layout.iv = StepInterventions(
        V, norms,
        _starts(o_layer[o], n_layers + 1),
        _ranges([x[6] for x in ops], oc, on)[o].astype(i32),
        _column([x[3] for x in ops], oc, on, i32)[o],
        _ranges([x[8] for x in ops], oc, on, [x[9] for x in ops])[o].astype(i32),
        o_gate[o].astype(i32),
        _column([x[4] for x in ops], oc, on, np.float32)[o],
        _column([x[5] for x in ops], oc, on, np.bool_)[o],
        _starts(g_layer[g_order], n_layers + 1),
        (np.concatenate([g[4] for g in gates]) if gates else g_layer)[g_order].astype(i32),
        _column([g[1] for g in gates], gc, gn, i32)[g_order],
        _column([g[2] for g in gates], gc, gn, np.bool_)[g_order],
        _column([g[3] for g in gates], gc, gn, np.float32)[g_order],
        np.zeros(gn, np.float32), np.zeros(gn, np.bool_),
        _starts(a_layer[a_order], n_layers + 1),
        _ranges([a[1] for a in sums], ac, n_sums)[a_order].astype(i32),
        # a sum row keeps its unsorted index: layout.sums names it
        a_order.astype(i32), np.zeros((n_sums, dim), np.float32),
        _starts(r_slot[r_order], n_layers * 4),
        _ranges([r[1] for r in ros], rc, rn)[r_order].astype(i32),
        _column([r[3] for r in ros], rc, rn, i32)[r_order], np.zeros((rn, 2), np.float32))
    return layout


class StepLayouts:
    """step_arrays, keeping the last decode step's tables: a batch of the same sequences, one
    token each, at positions where what applies to each is the same (the same interval of its
    `breaks`, the same prompt decisions), runs the same tables again with their outputs cleared.
    Steady decoding builds none, where a layout costs ~0.1 ms of Python on a cache the forward
    pass has just flushed (three times what it costs warm)."""

    def __init__(self, n_layers: int, dim: int) -> None:
        self.n_layers, self.dim = n_layers, dim
        self.empty = empty_step(n_layers, dim)
        self._key: tuple | None = None
        self._layout: StepLayout | None = None

    def __call__(self, seqs: list[SeqInterventions | None], positions: np.ndarray,
                 starts: np.ndarray) -> StepLayout:
        key = None
        if len(positions) == len(seqs):  # every request one token (each has at least one)
            # the sequences themselves, not their ids: the key keeps them alive, so an id
            # cannot come back as another sequence's
            key = tuple(None if si is None else (si, bisect_right(si.breaks, p), len(si.decisions))
                        for si, p in zip(seqs, positions.tolist(), strict=True))
            if key == self._key and self._layout is not None:
                self._layout.reset()
                return self._layout
        layout = step_arrays(seqs, positions, starts, self.n_layers, self.dim, self.empty)
        if layout.iv is not self.empty:  # a batch without entries costs nothing to lay out
            self._key, self._layout = key, layout
        return layout


# kernels -----------------------------------------------------------------------------------


@njit(**K._opts)
def any_interventions(iv) -> bool:
    return iv.op_start[-1] > 0 or iv.gate_start[-1] > 0 or iv.sum_start[-1] > 0


@njit(**K._opts)
def any_readouts(iv) -> bool:
    return iv.ro_start[-1] > 0


@njit(**K._opts)
def _dot(a, b):
    """sum of a[j] * b[j] (each product float32, as the operands) in float64, in four
    interleaved partial sums added pairwise at the end: four independent add chains, where one
    chain waits out an add's latency per element (these sums run serially inside the step)."""
    s0 = s1 = s2 = s3 = 0.0
    n = a.shape[0]
    j = 0
    while j + 4 <= n:
        s0 += a[j] * b[j]
        s1 += a[j + 1] * b[j + 1]
        s2 += a[j + 2] * b[j + 2]
        s3 += a[j + 3] * b[j + 3]
        j += 4
    while j < n:
        s0 += a[j] * b[j]
        j += 1
    return (s0 + s1) + (s2 + s3)


@njit(**K._opts)
def observe(x, iv, layer):
    """Before anything at `layer` changes the stream: token conditions (cosine with the
    condition vector, compared with the threshold) and the prompt sums of prompt conditions.
    x: (T, dim)"""
    for g in range(iv.gate_start[layer], iv.gate_start[layer + 1]):
        t = iv.gate_token[g]
        d = _dot(x[t], iv.vecs[iv.gate_vec[g]])
        n = _dot(x[t], x[t])
        cos = d / (np.sqrt(n) * iv.vec_norm[iv.gate_vec[g]]) if n > 0.0 else 0.0
        iv.gate_cos[g] = cos
        iv.gate_on[g] = cos < iv.gate_thr[g] if iv.gate_less[g] else cos > iv.gate_thr[g]
    for a in range(iv.sum_start[layer], iv.sum_start[layer + 1]):
        t = iv.sum_token[a]
        r = iv.sum_row[a]
        for j in range(x.shape[1]):
            iv.sums[r, j] += x[t, j]


@njit(**K._opts)
def apply_ops(x, iv, layer):
    """The ops of `layer`, row by row in table order (a token's ops in their order).
    x: (T, dim)"""
    for k in range(iv.op_start[layer], iv.op_start[layer + 1]):
        g = iv.op_gate[k]
        if g >= 0 and not iv.gate_on[g]:
            continue
        t = iv.op_token[k]
        v = iv.vecs[iv.op_vec[k]]
        n0 = _dot(x[t], x[t]) if iv.op_norm[k] else 0.0
        kind = iv.op_kind[k]
        if kind == 0:
            for j in range(x.shape[1]):
                x[t, j] += v[j]
        else:
            c = _dot(x[t], v)
            target = 0.0 if kind == 1 else iv.op_value[k]
            if kind == 3 and c < target:
                target = c
            delta = np.float32(target - c)
            for j in range(x.shape[1]):
                x[t, j] += delta * v[j]
        if iv.op_norm[k]:
            n1 = _dot(x[t], x[t])
            if n1 > 0.0:
                ratio = np.float32(np.sqrt(n0 / n1))
                for j in range(x.shape[1]):
                    x[t, j] *= ratio


@njit(**K._opts)
def readout(v_all, iv, slot):
    """Readouts at `slot` (block * 4 + point) of the point's vectors v_all (T, dim): the
    projection on the unit direction and the cosine."""
    for r in range(iv.ro_start[slot], iv.ro_start[slot + 1]):
        t = iv.ro_token[r]
        d = _dot(v_all[t], iv.vecs[iv.ro_vec[r]])
        n = _dot(v_all[t], v_all[t])
        proj = d / iv.vec_norm[iv.ro_vec[r]]
        iv.ro_out[r, 0] = proj
        iv.ro_out[r, 1] = proj / np.sqrt(n) if n > 0.0 else 0.0
