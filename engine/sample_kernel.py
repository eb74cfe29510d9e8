"""The compiled sampler: one call samples every row of a step (numba, GIL released, prange).

It is engine/sampling.py's numpy chain -- `apply_penalties` then `sample_token` -- redone in
numba so that it picks the same token for the same logits, parameters and uniform u. The numpy
functions stay as the plain reference (tests/test_sample_kernel.py compares the two); the
semantics are in that module's docstring. To reproduce its arithmetic exactly:

  * penalties are float32 throughout (`np.float32(...)` on every constant: a Python float
    would promote the arithmetic to float64 in numba);
  * weights are float64 `exp((v - max) / T)`, cumulative sums are sequential (`np.cumsum`),
    and totals taken with `w.sum()` in numpy use numpy's pairwise summation (`_pairwise_sum`,
    numpy/_core/src/umath/loops_utils.h.src), over the same elements in the same order;
  * the candidate order is descending logit, ties by ascending id. Like the numpy code, the
    kernel never sorts the whole vocabulary when it does not have to: a histogram of the
    weights by logit (`_hist_weights`) says how deep the answer lies, and only the candidates
    above that depth are gathered and sorted (`_walk`); the rest are sorted only if rounding
    leaves the answer deeper.

NOTE: `math.exp` here is libm's; numpy's float64 exp may be a SIMD routine that differs in the
last ulp for some inputs. That moves a weight by ~1e-16 relative, so it can only change a draw
whose u lands within ~1e-16 of a boundary between two tokens; tests/test_sample_kernel.py
counts the agreement over thousands of random cases.

Each row gets an error code instead of raising, so the caller fails that row's request alone
with the message `error_message` gives (the same messages as the numpy functions).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

# per-row error codes
OK, BAD_LOGITS, NO_TOKEN, BAD_CONTEXT = 0, 1, 2, 3

# columns of the (rows, N_PARAMS) float64 parameter matrix (`param_row` builds a row)
TEMPERATURE, TOP_K, TOP_P, MIN_P, LOG_MIN_P, REPETITION, FREQUENCY, PRESENCE = range(8)
N_PARAMS = 8

# The depth histogram: bin b holds the candidates whose logit is b/scale .. (b+1)/scale below
# the best, the bins spread over the row's range of logits (at most _MAX_DEPTH logits: weights
# deeper than that are below e^-64 of the best); the last bin holds everything deeper. Equal
# logits always share a bin, so a band of bins never splits a tie.
_N_BINS = 2048
_MAX_DEPTH = 64.0
_EPS = 2.0 ** -53  # unit roundoff of float64
# How far past the target the histogram's (differently ordered) mass must reach before a band
# is trusted to hold the answer; only speed depends on it, since `_walk` widens if it does not.
_MARGIN = 1e-6


def param_row(temperature: float, top_k: int, top_p: float, min_p: float,
              repetition_penalty: float, frequency_penalty: float, presence_penalty: float
              ) -> np.ndarray:
    """One row of the parameter matrix, (N_PARAMS,) float64, from validated parameters."""
    row = np.zeros(N_PARAMS, np.float64)
    row[TEMPERATURE] = temperature
    row[TOP_K] = min(top_k, 2**53)               # exact as a float64; any k >= vocab is "off"
    row[TOP_P] = top_p
    row[MIN_P] = min_p
    # NOTE: Python's log (as the numpy code uses), not numba's, so the threshold is the same
    row[LOG_MIN_P] = math.log(min_p) if min_p > 0 else -math.inf
    row[REPETITION] = repetition_penalty
    row[FREQUENCY] = frequency_penalty
    row[PRESENCE] = presence_penalty
    return row


def error_message(code: int, vocab: int) -> str:
    """The message of a row's error code: the one the numpy functions raise."""
    return {BAD_LOGITS: "logits contain NaN or +inf",
            NO_TOKEN: "all logits are -inf: no token can be sampled",
            BAD_CONTEXT: f"context holds token ids outside [0, {vocab})"}[code]


def sample_rows(logits: np.ndarray, params: np.ndarray, context: np.ndarray,
                context_start: np.ndarray, generated_start: np.ndarray, u: np.ndarray,
                threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sample one token per row -> (tokens (rows,) int64, errors (rows,) int32).

    logits (rows, vocab) float32: each row's raw logits (grammar masks already at -inf).
    params (rows, N_PARAMS) float64: `param_row` of each row.
    context (n,) int64, context_start (rows + 1,) int64: row r's penalty window is
      context[context_start[r]:context_start[r + 1]] (empty: no penalties), and its generated
      tokens start at context[generated_start[r]] (generated_start (rows,) int64).
    u (rows,) float64 in [0, 1): each row's uniform (ignored by greedy rows).
    threads: numba threads for this call (None: the calling thread's setting, left as it was).
    A row's token is -1 where its error code is not OK.
    """
    if logits.ndim != 2 or logits.dtype != np.float32 or logits.shape[1] == 0:
        raise ValueError(f"logits must be (rows, vocab) float32 with vocab > 0, got "
                         f"{logits.dtype} {logits.shape}")
    rows = logits.shape[0]
    if params.shape != (rows, N_PARAMS) or params.dtype != np.float64:
        raise ValueError(f"params must be ({rows}, {N_PARAMS}) float64, got "
                         f"{params.dtype} {params.shape}")
    if context.ndim != 1 or context.dtype != np.int64:
        raise ValueError(f"context must be 1-D int64, got {context.dtype} {context.shape}")
    for name, array, size in (("context_start", context_start, rows + 1),
                              ("generated_start", generated_start, rows)):
        if array.shape != (size,) or array.dtype != np.int64:
            raise ValueError(f"{name} must be ({size},) int64, got {array.dtype} {array.shape}")
    if context_start[0] != 0 or context_start[-1] != context.size \
            or (np.diff(context_start) < 0).any():
        raise ValueError("context_start must rise from 0 to len(context)")
    if ((generated_start < context_start[:-1]) | (generated_start > context_start[1:])).any():
        raise ValueError("generated_start must lie inside each row's window")
    if u.shape != (rows,) or u.dtype != np.float64 or not ((u >= 0) & (u < 1)).all():
        raise ValueError(f"u must be ({rows},) float64 in [0, 1)")
    tokens = np.empty(rows, np.int64)
    errors = np.empty(rows, np.int32)
    previous = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(threads)  # thread-local in numba; restored below
    try:
        _sample_rows(np.ascontiguousarray(logits), params, context, context_start,
                     generated_start, u, tokens, errors)
    finally:
        if threads is not None:
            numba.set_num_threads(previous)
    return tokens, errors


@njit(nogil=True, parallel=True, cache=True)
def _sample_rows(logits, params, context, context_start, generated_start, u, tokens, errors):
    """logits (rows, vocab) f32, params (rows, N_PARAMS) f64, context (n,) i64,
    context_start (rows + 1,) i64, generated_start (rows,) i64, u (rows,) f64
    -> tokens (rows,) i64, errors (rows,) i32. Rows are independent: one per prange step."""
    for r in prange(logits.shape[0]):
        window = context[context_start[r]:context_start[r + 1]]
        token, error = _sample_row(logits[r], params[r], window,
                                   generated_start[r] - context_start[r], u[r])
        tokens[r] = token
        errors[r] = error


@njit(nogil=True, cache=True)
def _sample_row(row, prm, window, gen_offset, u):
    """One row: (token, error code). row (vocab,) f32 raw logits; window (w,) i64 the penalty
    window, its generated tokens from window[gen_offset] on."""
    vocab = row.size
    for j in range(vocab):
        if not row[j] < np.inf:                      # NaN or +inf
            return -1, BAD_LOGITS
    x = row
    if window.size:
        for t in window:
            if t < 0 or t >= vocab:
                return -1, BAD_CONTEXT
        x = row.copy()
        _penalize(x, window, gen_offset, np.float32(prm[REPETITION]),
                  np.float32(prm[FREQUENCY]), np.float32(prm[PRESENCE]))
        for t in window:                             # a penalty can overflow a huge logit
            if not x[t] < np.inf:
                return -1, BAD_LOGITS

    temperature = prm[TEMPERATURE]
    if temperature == 0:                             # greedy: first maximum = lowest id
        best = 0
        for j in range(1, vocab):
            if x[j] > x[best]:
                best = j
        if x[best] == -np.inf:
            return -1, NO_TOKEN
        return best, OK
    top_k = int(prm[TOP_K])
    top_p = prm[TOP_P]
    min_p = prm[MIN_P]
    if (top_k == 0 or top_k >= vocab) and top_p >= 1 and min_p == 0:
        return _draw_in_id_order(x, temperature, u)
    return _draw_filtered(x, top_k, top_p, min_p, prm[LOG_MIN_P], temperature, u)


@njit(nogil=True, cache=True)
def _penalize(x, window, gen_offset, penalty, frequency, presence):
    """apply_penalties in place on x (vocab,) f32; penalty, frequency, presence are float32."""
    if penalty != 1:
        ids = np.sort(window)
        for k in range(ids.size):
            t = ids[k]
            if k > 0 and t == ids[k - 1]:
                continue                             # each distinct token once
            v = x[t]
            x[t] = v / penalty if v > 0 else v * penalty
    if frequency != 0 or presence != 0:
        ids = np.sort(window[gen_offset:])
        k = 0
        while k < ids.size:
            t = ids[k]
            count = 1
            while k + count < ids.size and ids[k + count] == t:
                count += 1
            x[t] = x[t] - (np.float32(count) * frequency + presence)
            k += count


@njit(nogil=True, cache=True)
def _draw_in_id_order(x, temperature, u):
    """sampling._draw_in_id_order: inverse CDF over token ids in id order (nothing filtered)."""
    mx = x.max()
    if mx == -np.inf:
        return -1, NO_TOKEN
    mx64 = np.float64(mx)
    w = np.empty(x.size, np.float64)
    total = 0.0                                      # the cumsum's last entry, sequential
    for j in range(x.size):
        w[j] = math.exp((np.float64(x[j]) - mx64) / temperature)
        total += w[j]
    target = u * total
    running = 0.0
    for j in range(x.size):
        running += w[j]
        if running > target:
            return j, OK
    for j in range(x.size - 1, -1, -1):              # rounding left the sum short of target
        if w[j] > 0:
            return j, OK
    return -1, NO_TOKEN                              # unreachable: w[argmax] = 1


@njit(nogil=True, cache=True)
def _draw_filtered(x, top_k, top_p, min_p, log_min_p, temperature, u):
    """sampling._filter then the draw of sample_token, on penalized logits x (vocab,)."""
    # the candidates: finite logits, in id order (`ids` None in numpy: positions are ids)
    vocab = x.size
    n = 0
    highest = np.float32(-np.inf)
    lowest = np.float32(np.inf)
    for j in range(vocab):                           # one pass: count, max and min
        v = x[j]
        if v > -np.inf:
            n += 1
            highest = max(highest, v)
            lowest = min(lowest, v)
    if n == 0:
        return -1, NO_TOKEN
    if n == vocab:
        vals = x
        ids = np.arange(0)                           # empty: a position is its id
    else:
        vals = np.empty(n, np.float32)
        ids = np.empty(n, np.int64)
        k = 0
        for j in range(vocab):
            if x[j] > -np.inf:
                vals[k] = x[j]
                ids[k] = j
                k += 1
    mx64 = np.float64(highest)
    scale = _depth_scale(mx64, np.float64(lowest))
    if not 0 < top_k < n:
        pos = _draw_by_bins(vals, mx64, scale, top_p, min_p, log_min_p, temperature, u)
        if pos >= 0:
            return (pos if ids.size == 0 else ids[pos]), OK
        # else too close to call without numpy's exact order: the sorting path below

    # sorted: the survivors svals/spos (positions into vals), in candidate order
    is_sorted = False
    spos = np.arange(0)
    if 0 < top_k < n:
        spos = _top_order(vals, mx64, scale, top_k)
        is_sorted = True
    if not (top_p == 1 and min_p == 0):
        if is_sorted:
            m = spos.size
            limit = m
            if min_p > 0:
                limit = 0
                for q in range(m):
                    if np.float64(vals[spos[q]]) - mx64 >= log_min_p:
                        limit += 1
            keep = limit
            if top_p < 1:
                w = np.empty(m, np.float64)
                for q in range(m):
                    w[q] = math.exp(np.float64(vals[spos[q]]) - mx64)
                target = top_p * _pairwise_sum(w, 0, m)
                running = 0.0
                for q in range(limit):
                    running += w[q]
                    if running >= target:
                        keep = q + 1
                        break
            spos = spos[:keep]
        else:
            limit = n
            if min_p > 0:
                limit = 0
                for j in range(n):
                    if np.float64(vals[j]) - mx64 >= log_min_p:
                        limit += 1
            if top_p < 1:
                # NOTE: top_p normalizes over every candidate left, at temperature 1
                w = np.empty(n, np.float64)
                count = np.zeros(_N_BINS, np.int64)
                mass = np.zeros(_N_BINS, np.float64)
                _hist_weights(vals, mx64, scale, 1.0, w, count, mass)
                target = top_p * _pairwise_sum(w, 0, n)
                order, i = _walk(vals, w, mx64, scale, count, mass, target, False, limit)
                spos = order[:limit if i < 0 else i + 1]
                is_sorted = True
            elif limit < n:                          # min_p alone: the logits above its cut
                band = np.empty(limit, np.int64)
                k = 0
                for j in range(n):
                    if np.float64(vals[j]) - mx64 >= log_min_p:
                        band[k] = j
                        k += 1
                spos = _sort_band(vals, band)
                is_sorted = True

    if is_sorted:                                    # the draw over a short sorted list
        m = spos.size
        w = np.empty(m, np.float64)
        top = np.float64(vals[spos[0]])
        for q in range(m):
            w[q] = math.exp((np.float64(vals[spos[q]]) - top) / temperature)
        target = u * _pairwise_sum(w, 0, m)
        running = 0.0
        pick = -1
        for q in range(m):
            running += w[q]
            if running > target:
                pick = q
                break
        if pick < 0:                                 # weights fall along the list
            pick = -1
            for q in range(m):
                if w[q] > 0:
                    pick += 1
        pos = spos[pick]
    else:                                            # nothing truncated, but not id order
        w = np.empty(n, np.float64)
        count = np.zeros(_N_BINS, np.int64)
        mass = np.zeros(_N_BINS, np.float64)
        _hist_weights(vals, mx64, scale, temperature, w, count, mass)
        target = u * _pairwise_sum(w, 0, n)
        order, i = _walk(vals, w, mx64, scale, count, mass, target, True, n)
        if i < 0:                                    # `order` is then complete
            i = -1
            for j in range(n):
                if w[j] > 0:
                    i += 1
        pos = order[i]
    return (pos if ids.size == 0 else ids[pos]), OK


@njit(nogil=True, cache=True)
def _pairwise_sum(a, start, n):
    """numpy's pairwise sum of a[start:start + n] (float64), bit for bit: blocks of at most
    128 summed by `_pairwise_block`, halved at multiples of 8 above, and the halves' sums
    added as the recursion would (left + right).

    NOTE: the recursion is unrolled into an explicit stack: numba's cache=True can crash on
    self-recursive functions."""
    if n <= 128:
        return _pairwise_block(a, start, n)
    # frames of the depth-first walk (depth <= log2(n / 128) + 1 < 64); phase 0: left half
    # next, 1: right half next, 2: both summed
    f_start = np.empty(64, np.int64)
    f_n = np.empty(64, np.int64)
    f_phase = np.empty(64, np.int64)
    sums = np.empty(64, np.float64)
    n_sums = 0
    top = 0
    f_start[0], f_n[0], f_phase[0] = start, n, 0
    while top >= 0:
        s, m, phase = f_start[top], f_n[top], f_phase[top]
        if m <= 128:
            sums[n_sums] = _pairwise_block(a, s, m)
            n_sums += 1
            top -= 1
            continue
        half = m // 2
        half -= half % 8
        if phase == 0:
            f_phase[top] = 1
            top += 1
            f_start[top], f_n[top], f_phase[top] = s, half, 0
        elif phase == 1:
            f_phase[top] = 2
            top += 1
            f_start[top], f_n[top], f_phase[top] = s + half, m - half, 0
        else:
            sums[n_sums - 2] = sums[n_sums - 2] + sums[n_sums - 1]
            n_sums -= 1
            top -= 1
    return sums[0]


@njit(nogil=True, cache=True)
def _pairwise_block(a, start, n):
    """numpy's pairwise sum of n <= 128 elements: a plain loop under 8, else 8 accumulators."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[start + i]
        return res
    r0, r1, r2, r3 = a[start], a[start + 1], a[start + 2], a[start + 3]
    r4, r5, r6, r7 = a[start + 4], a[start + 5], a[start + 6], a[start + 7]
    i = 8
    while i < n - n % 8:
        j = start + i
        r0 += a[j]
        r1 += a[j + 1]
        r2 += a[j + 2]
        r3 += a[j + 3]
        r4 += a[j + 4]
        r5 += a[j + 5]
        r6 += a[j + 6]
        r7 += a[j + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[start + i]
        i += 1
    return res


@njit(nogil=True, cache=True)
def _depth_scale(mx64, mn64):
    """Bins per logit for the row's histogram: its range of logits (max mx64, min mn64) over
    the bins, so that a flat row (a random-weight model's) is spread as thinly as a peaked
    one."""
    depth = min(mx64 - mn64, _MAX_DEPTH)
    return (_N_BINS - 1) / depth if depth > 1e-30 else 1.0  # (no inf * 0)


@njit(nogil=True, cache=True, inline="always")
def _bin(v, mx64, scale):
    """Depth bin of logit v (f32) below the best mx64, at `scale` bins per logit."""
    q = (mx64 - np.float64(v)) * scale
    return _N_BINS - 1 if q >= _N_BINS - 1 else int(q)


@njit(nogil=True, cache=True)
def _hist_weights(vals, mx64, scale, temperature, w, count, mass):
    """w[j] = exp((vals[j] - max) / T) (the numpy formula), and per depth bin the number of
    candidates and their weight."""
    for j in range(vals.size):
        d = np.float64(vals[j]) - mx64
        wj = math.exp(d / temperature)
        w[j] = wj
        b = _bin(vals[j], mx64, scale)
        count[b] += 1
        mass[b] += wj


@njit(nogil=True, cache=True, inline="always")
def _in_prefix(v, j, vstar, pstar):
    """Whether position j of value v lies in the candidate-order prefix that ends at value
    vstar, position pstar (descending value, ties by position)."""
    return v > vstar or (v == vstar and j <= pstar)


@njit(nogil=True, cache=True)
def _prefix_weights(vals, mx64, scale, temperature, vstar, pstar, every, w, count, mass):
    """`_hist_weights` with the histogram restricted to the prefix (vstar, pstar); w of every
    candidate if `every` (for an exact total over all), else of the prefix's only."""
    for j in range(vals.size):
        inside = _in_prefix(vals[j], j, vstar, pstar)
        if every or inside:
            wj = math.exp((np.float64(vals[j]) - mx64) / temperature)
            w[j] = wj
            if inside:
                b = _bin(vals[j], mx64, scale)
                count[b] += 1
                mass[b] += wj


@njit(nogil=True, cache=True)
def _draw_by_bins(vals, mx64, scale, top_p, min_p, log_min_p, temperature, u):
    """top_p, min_p and the draw over unsorted candidates vals (n,) without sorting them:
    -> the drawn position, or -1 when rounding makes it too close to call (then the caller
    takes the sorting path, which follows numpy's order exactly).

    numpy walks the candidates in sorted order, summing weights one by one. Here the depth
    histogram's bin weights stand in for the sum over whole bins, and only the bin where the
    sum reaches its target is sorted. Summed in another order, a prefix sum differs from
    numpy's by at most 2 n eps S (n terms, S the total: the textbook bound for sums of
    nonnegative terms, for both orders); a decision with a larger margin than that is the one
    numpy makes, and a closer one (probability ~1e-11 for a random u) goes to the exact path.
    The kept set is a prefix of candidate order, named by its last (value, position).
    """
    n = vals.size
    vstar = np.float32(-np.inf)                      # the prefix: everything
    pstar = n
    limit = n
    if min_p > 0:                                    # min_p's prefix: logits above its cut
        limit = 0
        vstar = np.float32(np.inf)
        for j in range(n):
            if np.float64(vals[j]) - mx64 >= log_min_p:
                limit += 1
                vstar = min(vstar, vals[j])
    w = np.empty(n, np.float64)
    count = np.zeros(_N_BINS, np.int64)
    mass = np.zeros(_N_BINS, np.float64)
    if top_p < 1:
        # NOTE: top_p normalizes over every candidate left, at temperature 1, exactly as numpy
        _prefix_weights(vals, mx64, scale, 1.0, vstar, pstar, True, w, count, mass)
        found, pos = _walk_bins(vals, w, mx64, scale, count, mass, vstar, pstar,
                                top_p * _pairwise_sum(w, 0, n), 0.0, False)
        if found < 0:
            return -1
        if found == 1:                               # else none reached it: keep `limit`
            vstar, pstar = vals[pos], pos
    # numpy draws over a sorted copy of the survivors when anything truncated them, and then
    # its total is a pairwise sum in that order: only known to within the bound
    sorted_total = top_p < 1 or limit < n
    count[:] = 0
    mass[:] = 0.0
    _prefix_weights(vals, mx64, scale, temperature, vstar, pstar, not sorted_total, w, count,
                    mass)
    if sorted_total:
        total = mass.sum()
        bound = (2.0 * count.sum() + 16.0) * _EPS * total
    else:
        total = _pairwise_sum(w, 0, n)
        bound = 0.0
    found, pos = _walk_bins(vals, w, mx64, scale, count, mass, vstar, pstar, u * total, bound,
                            True)
    return pos if found == 1 else -1


@njit(nogil=True, cache=True)
def _walk_bins(vals, w, mx64, scale, count, mass, vstar, pstar, target, target_error, strict):
    """Walk the prefix (vstar, pstar) of vals in candidate order, summing w, to the first
    position whose running sum is > target (strict) or >= target -> (1, position); (0, -1)
    when the sum never gets there; (-1, -1) when a running sum lies within rounding of the
    target (target_error: how far numpy's target may be from this one)."""
    total = mass.sum()
    margin = target_error + (2.0 * count.sum() + 16.0) * _EPS * total
    running = 0.0
    for b in range(_N_BINS):
        if count[b] == 0:
            continue
        if running + mass[b] < target - margin:      # the whole bin stays short of it
            running += mass[b]
            continue
        band = _gather_prefix_bin(vals, mx64, scale, b, vstar, pstar, count[b])
        for q in range(band.size):
            running += w[band[q]]
            if running - target > margin:            # > and >= agree beyond the margin
                return 1, band[q]
            if running - target >= -margin:
                return -1, -1
    return 0, -1


@njit(nogil=True, cache=True)
def _gather_prefix_bin(vals, mx64, scale, b, vstar, pstar, size):
    """The `size` positions of depth bin b inside the prefix (vstar, pstar) (the histogram
    counted them), in candidate order."""
    band = np.empty(size, np.int64)
    k = 0
    for j in range(vals.size):
        if _bin(vals[j], mx64, scale) == b and _in_prefix(vals[j], j, vstar, pstar):
            band[k] = j
            k += 1
    return _sort_band(vals, band)


@njit(nogil=True, cache=True)
def _sort_band(vals, band):
    """Positions `band` (ascending) sorted by descending value, ties by position."""
    keys = np.empty(band.size, np.float32)
    for k in range(band.size):
        keys[k] = -vals[band[k]]
    return band[np.argsort(keys, kind="mergesort")]  # stable: ties stay by position


@njit(nogil=True, cache=True)
def _gather_bins(vals, mx64, scale, low, high):
    """Positions whose depth bin is in [low, high], ascending, sorted into candidate order."""
    k = 0
    for j in range(vals.size):
        b = _bin(vals[j], mx64, scale)
        if low <= b <= high:
            k += 1
    band = np.empty(k, np.int64)
    k = 0
    for j in range(vals.size):
        b = _bin(vals[j], mx64, scale)
        if low <= b <= high:
            band[k] = j
            k += 1
    return _sort_band(vals, band)


@njit(nogil=True, cache=True)
def _top_order(vals, mx64, scale, m):
    """sampling._top_order: positions of the m largest vals, descending, ties by position."""
    count = np.zeros(_N_BINS, np.int64)
    for j in range(vals.size):
        count[_bin(vals[j], mx64, scale)] += 1
    total = 0
    last = _N_BINS - 1
    for b in range(_N_BINS):
        total += count[b]
        if total >= m:
            last = b
            break
    return _gather_bins(vals, mx64, scale, 0, last)[:m]


@njit(nogil=True, cache=True)
def _walk(vals, w, mx64, scale, count, mass, target, strict, limit):
    """sampling._first_passing: walk vals in candidate order summing w (sequentially) ->
    (order, i): i the first index with running sum > target (strict) or >= target, among the
    first `limit`; -1 if none, and then `order` holds at least `limit` positions."""
    # the shallowest band of bins that holds the answer, going by the histogram
    last = _N_BINS - 1
    seen = 0
    reach = 0.0
    for b in range(_N_BINS):
        seen += count[b]
        reach += mass[b]
        if seen >= limit or reach > target * (1.0 + _MARGIN):
            last = b
            break
    order = _gather_bins(vals, mx64, scale, 0, last)
    running = 0.0
    q = 0
    while True:
        while q < min(order.size, limit):
            running += w[order[q]]
            if running > target or (not strict and running == target):
                return order, q
            q += 1
        if q >= limit or last == _N_BINS - 1:
            return order, -1
        # rounding kept the answer deeper than the histogram said: the rest, sorted
        rest = _gather_bins(vals, mx64, scale, last + 1, _N_BINS - 1)
        order = np.concatenate((order, rest))
        last = _N_BINS - 1
