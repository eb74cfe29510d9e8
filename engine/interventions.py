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


@dataclass
class StepLayout:
    """Where each request's rows of the step's outputs are: per request, gate rows
    (token offset, condition) and readout rows (token offset, readout), and prompt sums."""

    iv: StepInterventions
    gates: list[list[tuple[int, int, int]]]  # per request: (token, cond, gate row)
    readouts: list[list[tuple[int, int, int]]]  # per request: (token, readout, ro row)
    sums: list[list[tuple[int, int]]]  # per request: (cond, sum row)


def _i32(x: list[int]) -> np.ndarray:
    return np.asarray(x, np.int32).reshape(-1)


def _starts(keys: list[int], n: int) -> np.ndarray:
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


def step_arrays(seqs: list[SeqInterventions | None], positions: np.ndarray, starts: np.ndarray,
                n_layers: int, dim: int, empty: StepInterventions) -> StepLayout:
    """The step's tables for requests whose sequences carry `seqs` (token s's tokens are
    starts[s]:starts[s + 1], at `positions`)."""
    layout = StepLayout(empty, [[] for _ in seqs], [[] for _ in seqs], [[] for _ in seqs])
    if all(s is None for s in seqs):
        return layout
    vecs: list[np.ndarray] = []

    def vec(v: np.ndarray) -> int:
        vecs.append(np.asarray(v, np.float32).reshape(dim))
        return len(vecs) - 1

    ops: list[tuple[int, int, int, int, int, int, float, bool, int]] = []  # sort key first
    gates: list[tuple[int, int, int, bool, float]] = []
    sums: list[tuple[int, int, int]] = []
    ros: list[tuple[int, int, int]] = []
    for s, si in enumerate(seqs):
        if si is None:
            continue
        t0 = int(starts[s])
        pos = positions[starts[s]:starts[s + 1]]
        cvecs = [vec(c.vector) for c in si.conditions]
        gate_of: dict[tuple[int, int], int] = {}  # (token, cond) -> gate row
        for c, condition in enumerate(si.conditions):
            if condition.scope == "prompt" and c not in si.decisions:
                for j in np.nonzero(pos < si.prompt_len)[0].tolist():
                    layout.sums[s].append((c, len(sums)))
                    sums.append((condition.layer, t0 + j, len(sums)))
        for k, op in enumerate(si.ops):
            cond = si.conditions[op.cond] if op.cond >= 0 else None
            whole = -1  # a direction's one table row, shared by every token it applies to
            for i, p in enumerate(pos.tolist()):
                if not op.start <= p < op.end or (op.rows and p >= len(op.vector)):
                    continue
                gate = -1
                if cond is not None and cond.scope == "prompt":
                    decided = si.decisions.get(op.cond)
                    if p < si.prompt_len or decided is None or not decided[1]:
                        continue
                elif cond is not None:
                    key = (t0 + i, op.cond)
                    if key not in gate_of:
                        gate_of[key] = len(gates)
                        layout.gates[s].append((i, op.cond, len(gates)))
                        gates.append((cond.layer, t0 + i, cvecs[op.cond],
                                      cond.comparison == "less", cond.threshold))
                    gate = gate_of[key]
                if op.rows:
                    v = vec(op.vector[p])
                else:
                    if whole < 0:
                        whole = vec(op.vector)
                    v = whole
                # sorted by layer, then additions before the others, then entry order
                ops.append((op.layer, op.kind != 0, k, t0 + i, op.kind, v, op.value,
                            op.norm_match, gate))
        for r, ro in enumerate(si.readouts):
            v = vec(ro.vector)
            slot = ro.block * 4 + POINTS.index(ro.point)
            for i in range(len(pos)):
                layout.readouts[s].append((i, r, -1))
                ros.append((slot, t0 + i, v))
    if not (ops or gates or sums or ros):
        return layout
    # readout rows are sorted by slot (stable): remember each one's row after sorting
    ro_order = sorted(range(len(ros)), key=lambda j: ros[j][0])
    ro_row = np.empty(len(ros), np.int64)
    ro_row[ro_order] = np.arange(len(ros))
    j = 0
    for s in range(len(seqs)):
        layout.readouts[s] = [(i, r, int(ro_row[j + n])) for n, (i, r, _) in
                              enumerate(layout.readouts[s])]
        j += len(layout.readouts[s])
    ops.sort(key=lambda o: o[:3])
    g_order = sorted(range(len(gates)), key=lambda g: gates[g][0])
    g_row = np.empty(len(gates), np.int64)
    g_row[g_order] = np.arange(len(gates))
    for s in range(len(seqs)):
        layout.gates[s] = [(i, c, int(g_row[g])) for i, c, g in layout.gates[s]]
    a_order = sorted(range(len(sums)), key=lambda a: sums[a][0])
    a_rows = [sums[a] for a in a_order]
    gs = [gates[g] for g in g_order]
    rs = [ros[j] for j in ro_order]
    V = np.stack(vecs) if vecs else empty.vecs
    norms = np.linalg.norm(V.astype(np.float64), axis=1).astype(np.float32)
    layout.iv = StepInterventions(
        V, norms,
        _starts([o[0] for o in ops], n_layers + 1), _i32([o[3] for o in ops]),
        _i32([o[4] for o in ops]), _i32([o[5] for o in ops]),
        _i32([int(g_row[o[8]]) if o[8] >= 0 else -1 for o in ops]),
        np.asarray([o[6] for o in ops], np.float32).reshape(-1),
        np.asarray([o[7] for o in ops], np.bool_).reshape(-1),
        _starts([g[0] for g in gs], n_layers + 1), _i32([g[1] for g in gs]),
        _i32([g[2] for g in gs]), np.asarray([g[3] for g in gs], np.bool_).reshape(-1),
        np.asarray([g[4] for g in gs], np.float32).reshape(-1),
        np.zeros(len(gs), np.float32), np.zeros(len(gs), np.bool_),
        _starts([a[0] for a in a_rows], n_layers + 1), _i32([a[1] for a in a_rows]),
        # a sum row keeps its unsorted index: layout.sums names it
        _i32([a[2] for a in a_rows]), np.zeros((len(sums), dim), np.float32),
        _starts([r[0] for r in rs], n_layers * 4), _i32([r[1] for r in rs]),
        _i32([r[2] for r in rs]), np.zeros((len(rs), 2), np.float32))
    return layout


# kernels -----------------------------------------------------------------------------------


@njit(**K._opts)
def any_interventions(iv) -> bool:
    return iv.op_start[-1] > 0 or iv.gate_start[-1] > 0 or iv.sum_start[-1] > 0


@njit(**K._opts)
def any_readouts(iv) -> bool:
    return iv.ro_start[-1] > 0


@njit(**K._opts)
def observe(x, iv, layer):
    """Before anything at `layer` changes the stream: token conditions (cosine with the
    condition vector, compared with the threshold) and the prompt sums of prompt conditions.
    x: (T, dim)"""
    for g in range(iv.gate_start[layer], iv.gate_start[layer + 1]):
        t = iv.gate_token[g]
        v = iv.vecs[iv.gate_vec[g]]
        d = 0.0
        n = 0.0
        for j in range(x.shape[1]):
            d += x[t, j] * v[j]
            n += x[t, j] * x[t, j]
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
        n0 = 0.0
        if iv.op_norm[k]:
            for j in range(x.shape[1]):
                n0 += x[t, j] * x[t, j]
        kind = iv.op_kind[k]
        if kind == 0:
            for j in range(x.shape[1]):
                x[t, j] += v[j]
        else:
            c = 0.0
            for j in range(x.shape[1]):
                c += x[t, j] * v[j]
            target = 0.0 if kind == 1 else iv.op_value[k]
            if kind == 3 and c < target:
                target = c
            delta = np.float32(target - c)
            for j in range(x.shape[1]):
                x[t, j] += delta * v[j]
        if iv.op_norm[k]:
            n1 = 0.0
            for j in range(x.shape[1]):
                n1 += x[t, j] * x[t, j]
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
        v = iv.vecs[iv.ro_vec[r]]
        d = 0.0
        n = 0.0
        for j in range(v_all.shape[1]):
            d += v_all[t, j] * v[j]
            n += v_all[t, j] * v_all[t, j]
        proj = d / iv.vec_norm[iv.ro_vec[r]]
        iv.ro_out[r, 0] = proj
        iv.ro_out[r, 1] = proj / np.sqrt(n) if n > 0.0 else 0.0
