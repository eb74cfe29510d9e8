"""What steering costs: a batch-16 decode step with every request steered differently against the
same step unsteered, and building an ActAdd vector against one forward pass of its prompts.

On a random-weight Q8_0 model shaped like stories110M (the weights' values do not change the
cost). The machine is shared and noisy, so every comparison is interleaved: the variants run
alternately on the same sequences (A B, B A, A B, ...), many times, and the medians are
compared; the median of the per-pair ratios is printed beside them.

    python bench/bench_steering.py [--reps 60] [--threads N] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numba
import numpy as np
from tiller.engine import simd
from tiller.engine.engine import Engine, SeqRequest, Sequence, SteeringTerm
from tiller.engine.steering import actadd_tokens, build_actadd
from tiller.engine.tokenizer import SpmTokenizer, Tokenizer
from tiller.engine.weights import build_weights

try:
    from bench.bench_engine import SHAPES, cpu_model, random_checkpoint
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from bench_engine import SHAPES, cpu_model, random_checkpoint

MODEL = "stories110M"
BATCH = 16
PROMPT_TOKENS = 8
WARMUP_STEPS = 4
TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/models/llama2-tokenizer.bin"
ACTADD_PAIRS = [("Love", "Hate"),  # llama.cpp's example
                ("Once upon a time there was a happy little dog who loved to play in the park",
                 "Once upon a time there was a sad little cat who hated the rain")]
ACTADD_SOURCE = 6
TARGET_OVERHEAD = 0.05  # the target for the steered batch-16 step


# -----------------------------------------------------------------------------------------------
# steering sets: 16 requests, each steered differently


def _direction(rng: np.random.Generator, dim: int) -> np.ndarray:
    return (rng.standard_normal(dim) * 0.05).astype(np.float32)


def steering_sets(kind: str, n_layers: int, dim: int, rows: int, rng: np.random.Generator
                  ) -> list[list[SteeringTerm]]:
    """BATCH different steering lists of one kind; layers spread over 0..n_layers.

    ActAdd rows cover `rows` positions, so every decoded position of the run gets its row (the
    worst case: a steering prompt at least as long as the sequence).
    """
    sets = []
    for i in range(BATCH):
        layer = i % (n_layers + 1)
        scale = 1.0 + i / 4
        actadd = SteeringTerm(layer, (rng.standard_normal((rows, dim)) * 0.05)
                              .astype(np.float32), scale)
        first = min(layer, n_layers + 1 - 4)
        four = [SteeringTerm(j, _direction(rng, dim), scale, every_position=True)
                for j in range(first, first + 4)]
        terms = {
            "actadd": [actadd],
            "control-1": [SteeringTerm(layer, _direction(rng, dim), scale, every_position=True)],
            "control-4": four,
            "control-all": [SteeringTerm(j, _direction(rng, dim), scale, every_position=True)
                            for j in range(n_layers + 1)],
            "mixed": [actadd, *four],
        }[kind]
        sets.append(terms)
    return sets


KINDS = {
    "actadd": "1 ActAdd row set per request (rows at every decoded position), layer i % 13",
    "control-1": "1 control vector per request at layer i % 13",
    "control-4": "control vectors on a range of 4 layers per request (llama.cpp layer range)",
    "control-all": "a control vector at every layer 0..12 per request (a full repeng file)",
    "mixed": "ActAdd rows + control vectors on 4 layers per request",
}


# -----------------------------------------------------------------------------------------------
# measurements


@dataclass
class Overhead:
    kind: str
    terms_per_step: int
    plain_ms: float  # median unsteered step
    steered_ms: float  # median steered step
    overhead: float  # steered / plain - 1, from the medians
    paired: float  # median over pairs of steered / plain - 1
    host_ms: float  # median host-side steering preparation (validation + flattening) per step


def interleaved(variants: list[Callable[[], None]], reps: int) -> list[list[float]]:
    """Seconds of each variant, run alternately (order rotated each rep) `reps` times."""
    times: list[list[float]] = [[] for _ in variants]
    for rep in range(reps):
        order = list(range(len(variants)))
        if rep % 2:
            order.reverse()
        for k in order:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def host_prep_seconds(engine: Engine, requests: list[SeqRequest]) -> float:
    """The step's host-side work that grows with steering: validating the batch and flattening
    the sequences' folded steering (folding itself happens once, in new_sequence).

    NOTE: calls the engine's private helpers, as Engine.step does, to split the overhead into
    Python bookkeeping and kernel work; update it if those helpers change.
    """
    positions = np.array([r.seq.length for r in requests], np.int32)
    starts = np.arange(len(requests) + 1)
    t0 = time.perf_counter()
    engine._validate(requests)
    engine._steering_arrays(requests, positions, starts)
    return time.perf_counter() - t0


def step_overhead(engine: Engine, kind: str, steering: list[list[SteeringTerm]], reps: int,
                  rng: np.random.Generator) -> Overhead:
    vocab = engine.config.vocab_size
    plain_seqs: list[Sequence] = [engine.new_sequence() for _ in range(BATCH)]
    steered_seqs: list[Sequence] = [engine.new_sequence(steering=terms) for terms in steering]
    try:
        for seqs in (plain_seqs, steered_seqs):
            engine.step([SeqRequest(s, rng.integers(1, vocab, PROMPT_TOKENS).tolist())
                         for s in seqs])

        def decode(seqs: list[Sequence]) -> Callable[[], None]:
            def run() -> None:
                tokens = rng.integers(1, vocab, BATCH).tolist()
                engine.step([SeqRequest(s, [t]) for s, t in zip(seqs, tokens, strict=True)])
            return run

        plain, steered = decode(plain_seqs), decode(steered_seqs)
        interleaved([plain, steered], WARMUP_STEPS // 2)
        a, b = interleaved([plain, steered], reps)
        host = [host_prep_seconds(engine, [SeqRequest(s, [1]) for s in steered_seqs])
                for _ in range(20)]
    finally:
        for s in plain_seqs + steered_seqs:
            engine.release(s)
    pa, pb = statistics.median(a), statistics.median(b)
    return Overhead(kind, sum(len(t) for t in steering), pa * 1e3, pb * 1e3, pb / pa - 1,
                    statistics.median(y / x for x, y in zip(a, b, strict=True)) - 1,
                    statistics.median(host) * 1e3)


@dataclass
class BuildCost:
    add: str
    sub: str
    tokens: int  # both prompts, padded
    build_ms: float  # build_actadd
    capture_ms: float  # one step with both prompts, capture on (what build_actadd runs)
    prefill_ms: float  # one plain step with both prompts (last-token logits, no capture)

    @property
    def vs_capture(self) -> float:
        return self.build_ms / self.capture_ms

    @property
    def vs_prefill(self) -> float:
        return self.build_ms / self.prefill_ms


def actadd_build_cost(engine: Engine, tok: Tokenizer, add: str, sub: str, reps: int
                      ) -> BuildCost:
    a, s = actadd_tokens(tok, add, sub)

    def one_step(**kwargs) -> Callable[[], None]:
        def run() -> None:
            seqs = [engine.new_sequence(), engine.new_sequence()]
            try:
                engine.step([SeqRequest(q, t, **kwargs) for q, t in zip(seqs, (a, s),
                                                                       strict=True)])
            finally:
                for q in seqs:
                    engine.release(q)
        return run

    variants = [lambda: build_actadd(engine, tok, add, sub, ACTADD_SOURCE),
                one_step(logits="none", capture_layers=[ACTADD_SOURCE]),
                one_step()]
    interleaved(variants, 2)
    times = interleaved(variants, reps)
    build, capture, prefill = (statistics.median(t) * 1e3 for t in times)
    return BuildCost(add, sub, 2 * len(a), build, capture, prefill)


# -----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=60,
                   help="interleaved A/B pairs per steering kind (default 60)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
    p.add_argument("--threads", type=int, default=None,
                   help=f"numba threads (default: all {numba.config.NUMBA_NUM_THREADS})")
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER,
                   help="32000-token llama2.c tokenizer.bin for the ActAdd prompts")
    p.add_argument("--json", nargs="?", const="bench_steering.json", default=None,
                   metavar="PATH")
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if bad := [k for k in args.kinds if k not in KINDS]:
        p.error(f"unknown kind(s) {bad}; choose from {', '.join(KINDS)}")
    if args.reps < 3:
        p.error("--reps must be at least 3")
    if args.threads is not None and not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        p.error(f"--threads must be in 1..{numba.config.NUMBA_NUM_THREADS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = SHAPES[MODEL]
    t0 = time.perf_counter()
    weights = build_weights(config, random_checkpoint(config), "q8_0")
    steps = PROMPT_TOKENS + WARMUP_STEPS + 2 * args.reps + 1
    engine = Engine(config, weights, max_tokens=max(256, BATCH * PROMPT_TOKENS),
                    kv_tokens=2 * BATCH * 16 * (steps // 16 + 2), threads=args.threads)
    engine.forward_all([1])  # compile or load the kernels before timing anything
    print(f"CPU: {cpu_model()}; numba threads {engine.threads}; VNNI "
          f"{'yes' if simd.HAS_VNNI else 'no'}; {MODEL}-shaped random Q8_0 model "
          f"(dim {config.dim}, {config.n_layers} layers, vocab {config.vocab_size}) ready in "
          f"{time.perf_counter() - t0:.1f}s")
    print(f"\nbatch {BATCH}, one token per sequence per step, {PROMPT_TOKENS}-token prompts; "
          f"{args.reps} interleaved pairs (unsteered, steered) per row; every request steered "
          "differently")
    print(f"{'steering':<12} {'terms':>5} {'plain ms':>9} {'steered ms':>10} {'overhead':>9} "
          f"{'paired':>7} {'host ms':>8} {'host %':>7}")
    rng = np.random.default_rng(0)
    rows = []
    for kind in args.kinds:
        steering = steering_sets(kind, config.n_layers, config.dim, steps, rng)
        r = step_overhead(engine, kind, steering, args.reps, rng)
        rows.append(r)
        print(f"{kind:<12} {r.terms_per_step:>5} {r.plain_ms:>9.1f} {r.steered_ms:>10.1f} "
              f"{r.overhead:>+9.1%} {r.paired:>+7.1%} {r.host_ms:>8.2f} "
              f"{r.host_ms / r.plain_ms:>7.1%}", flush=True)
    for kind in args.kinds:
        print(f"  {kind}: {KINDS[kind]}")
    print("  overhead = median steered / median unsteered - 1; paired = median over pairs of "
          "steered / unsteered - 1; host ms = validating and flattening the steering terms in "
          "Python per step (Engine._validate + _steering_arrays, timed apart), host % = host ms "
          "/ plain ms: the part of the overhead that is bookkeeping, not the kernels' additions")

    builds = []
    if args.tokenizer.exists():
        tok = SpmTokenizer.from_llama2c(args.tokenizer, vocab_size=config.vocab_size)
        print(f"\nbuilding an ActAdd vector (source layer {ACTADD_SOURCE}) vs one step with "
              f"both prompts' tokens ({args.reps} interleaved triples)")
        print(f"{'prompts':<34} {'tokens':>6} {'build ms':>9} {'capture ms':>10} "
              f"{'prefill ms':>10} {'build/capture':>13} {'build/prefill':>13}")
        for add, sub in ACTADD_PAIRS:
            b = actadd_build_cost(engine, tok, add, sub, args.reps)
            builds.append(b)
            name = f"{add!r} - {sub!r}"
            name = name if len(name) <= 34 else name[:31] + "..."
            print(f"{name:<34} {b.tokens:>6} {b.build_ms:>9.1f} {b.capture_ms:>10.1f} "
                  f"{b.prefill_ms:>10.1f} {b.vs_capture:>12.2f}x {b.vs_prefill:>12.2f}x",
                  flush=True)
        print("  capture = one Engine.step of both padded prompts with the source layer "
              "captured (logits off); prefill = the same step without capture, last-token "
              "logits")
    else:
        print(f"\nActAdd build cost skipped: {args.tokenizer} not found")

    print()
    for r in rows:
        ok = r.overhead < TARGET_OVERHEAD
        print(f"{'PASS' if ok else 'FAIL'}: batch-{BATCH} step steered by {r.kind} costs "
              f"{r.overhead:+.1%} vs unsteered (target < {TARGET_OVERHEAD:.0%})")
    for b in builds:
        print(f"build_actadd({b.add[:20]!r}...) = {b.vs_capture:.2f}x one capture step, "
              f"{b.vs_prefill:.2f}x one plain prefill of the same {b.tokens} tokens")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"cpu": cpu_model(), "threads": engine.threads, "model": MODEL, "batch": BATCH,
             "reps": args.reps, "target_overhead": TARGET_OVERHEAD,
             "overhead": [asdict(r) for r in rows],
             "actadd_build": [asdict(b) | {"vs_capture": b.vs_capture,
                                           "vs_prefill": b.vs_prefill} for b in builds]},
            indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
