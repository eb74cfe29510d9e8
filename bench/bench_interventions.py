"""What interventions and readouts cost: a batch-16 decode step where every request has its own
scoped operator (ablate, clamp, cap, a gated addition ...) and two readouts, against the same
step with none.

On a random-weight Q8_0 model shaped like stories110M (the weights' values do not change the
cost). The machine is shared and noisy, so the variants run interleaved (A B, B A, ...) on the
same sequences, many times, and the medians are compared; the median of the per-pair ratios is
printed beside them. The host-side part (laying out the step's tables in Python) is timed apart,
built afresh and kept from the step before (what a steady decode step does).

    python bench/bench_interventions.py [--reps 60] [--threads N] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tiller.engine import simd
from tiller.engine.engine import Condition, Engine, Readout, SeqRequest, Sequence, SteeringTerm
from tiller.engine.interventions import step_arrays
from tiller.engine.weights import build_weights

try:
    from bench.bench_engine import SHAPES, cpu_model, random_checkpoint
    from bench.bench_steering import interleaved
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from bench_engine import SHAPES, cpu_model, random_checkpoint
    from bench_steering import interleaved

MODEL = "stories110M"
BATCH = 16
PROMPT_TOKENS = 8
PREFILL_TOKENS = 128
TARGET_OVERHEAD = 0.05


def _unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def intervention(i: int, n_layers: int, dim: int, prompt: int, context: int,
                 rng: np.random.Generator) -> tuple[list[SteeringTerm], list[Readout]]:
    """Request i's scoped operator and two readouts; layers and kinds vary across the batch."""
    layer = 1 + i % n_layers
    d = _unit(rng, dim)
    kinds = [
        dict(op="ablate", positions="generated"),
        dict(op="clamp", value=1.0, positions="generated", norm_match=True),
        dict(op="cap", value=0.5, positions=(prompt, context)),
        dict(op="add", scale=2.0, positions="generated",
             when=Condition(_unit(rng, dim), layer - 1, 0.0, scope="token")),
    ]
    term = SteeringTerm(layer, d, every_position=True, **kinds[i % len(kinds)])
    reads = [Readout(_unit(rng, dim), i % n_layers, "resid_pre"),
             Readout(_unit(rng, dim), (i + 5) % n_layers, "resid_post")]
    return [term], reads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=60, help="interleaved pairs (default 60)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", nargs="?", const="bench_interventions.json", default=None,
                   metavar="PATH")
    args = p.parse_args(argv)
    config = SHAPES[MODEL]
    t0 = time.perf_counter()
    weights = build_weights(config, random_checkpoint(config), "q8_0")
    steps = PROMPT_TOKENS + 2 * args.reps + 8
    engine = Engine(config, weights, max_tokens=max(256, BATCH * PROMPT_TOKENS),
                    kv_tokens=2 * BATCH * 16 * (steps // 16 + 2), threads=args.threads)
    engine.forward_all([1])
    print(f"CPU: {cpu_model()}; numba threads {engine.threads}; VNNI "
          f"{'yes' if simd.HAS_VNNI else 'no'}; {MODEL}-shaped random Q8_0 model "
          f"(dim {config.dim}, {config.n_layers} layers) ready in {time.perf_counter() - t0:.1f}s")
    rng = np.random.default_rng(0)
    vocab = config.vocab_size
    plain: list[Sequence] = [engine.new_sequence() for _ in range(BATCH)]
    sets = [intervention(i, config.n_layers, config.dim, PROMPT_TOKENS, config.max_seq_len, rng)
            for i in range(BATCH)]
    steered: list[Sequence] = [engine.new_sequence(t, r, prompt_len=PROMPT_TOKENS)
                               for t, r in sets]
    try:
        for seqs in (plain, steered):
            engine.step([SeqRequest(s, rng.integers(1, vocab, PROMPT_TOKENS).tolist())
                         for s in seqs])

        def decode(seqs: list[Sequence]) -> Callable[[], None]:
            def run() -> None:
                tokens = rng.integers(1, vocab, BATCH).tolist()
                engine.step([SeqRequest(s, [t]) for s, t in zip(seqs, tokens, strict=True)])
            return run

        interleaved([decode(plain), decode(steered)], 4)
        a, b = interleaved([decode(plain), decode(steered)], args.reps)
        def host_ms(positions: np.ndarray, starts: np.ndarray, reps: int) -> float:
            times = []
            for _ in range(reps):
                h0 = time.perf_counter()
                step_arrays([s.interventions for s in steered], positions, starts,
                            config.n_layers, config.dim, engine._layouts.empty)
                times.append(time.perf_counter() - h0)
            return statistics.median(times) * 1e3

        decode_positions = np.array([s.length for s in steered], np.int32)
        host = host_ms(decode_positions, np.arange(BATCH + 1), 200)
        kept = []  # what a steady decode step pays: the engine's StepLayouts keeps its tables
        for _ in range(200):
            h0 = time.perf_counter()
            engine._layouts([s.interventions for s in steered], decode_positions,
                            np.arange(BATCH + 1))
            kept.append(time.perf_counter() - h0)
        kept_host = statistics.median(kept) * 1e3
        # the tables of a prefill step: each request's first PREFILL_TOKENS tokens at once
        prefill_host = host_ms(np.tile(np.arange(PREFILL_TOKENS, dtype=np.int32), BATCH),
                               np.arange(BATCH + 1) * PREFILL_TOKENS, 30)
    finally:
        for s in plain + steered:
            engine.release(s)
    pa, pb = statistics.median(a), statistics.median(b)
    overhead = pb / pa - 1
    paired = statistics.median(y / x for x, y in zip(a, b, strict=True)) - 1
    print(f"\nbatch {BATCH}, one token per sequence per step; {args.reps} interleaved pairs")
    print(f"{'plain ms':>9} {'intervened ms':>13} {'overhead':>9} {'paired':>7} {'host ms':>8} "
          f"{'kept ms':>8} {'prefill host ms':>16}")
    print(f"{pa * 1e3:>9.1f} {pb * 1e3:>13.1f} {overhead:>+9.1%} {paired:>+7.1%} "
          f"{host:>8.3f} {kept_host:>8.3f} {prefill_host:>16.3f}")
    print("  every request: one scoped operator (ablate / clamp+norm_match / cap / token-gated "
          "add, in turn) and two readouts; host ms = laying out the step's tables in Python "
          f"(median of 200 decode layouts; prefill: {BATCH} x {PREFILL_TOKENS} tokens, of 30); "
          "kept ms = a decode step whose tables the engine keeps from the step before")
    ok = overhead < TARGET_OVERHEAD
    print(f"\n{'PASS' if ok else 'FAIL'}: batch-{BATCH} step with interventions and readouts "
          f"costs {overhead:+.1%} vs none (target < {TARGET_OVERHEAD:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"cpu": cpu_model(), "threads": engine.threads, "model": MODEL, "batch": BATCH,
             "reps": args.reps, "plain_ms": pa * 1e3, "intervened_ms": pb * 1e3,
             "overhead": overhead, "paired": paired, "host_ms": host, "kept_host_ms": kept_host,
             "prefill_host_ms": prefill_host}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
