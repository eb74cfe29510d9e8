"""Attention over a long history: one `Engine.step` of a prompt chunk (the new tokens of a
conversation's next turn) after H tokens already in the KV cache (attached from the prefix
cache, so only the chunk is computed), and a 512-token prefill; stories110M-shaped random
weights by default. What grows with H is the chunk's attention over the history.

    python bench/bench_attention.py [--threads N] [--chunk 39] [--histories 0,400,880]
                                    [--repeats 9] [--cpu] [--model M.gguf] [--cache-type bf16]

Medians over --repeats; --cpu times the process's CPU time (steadier than wall time on a busy
machine; use it with --threads 1). To compare two checkouts, run each with PYTHONPATH pointing
at a `tiller/` view of it, alternating.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from bench_engine import SHAPES, random_checkpoint
from tiller.engine.engine import Engine, SeqRequest
from tiller.engine.kvcache import CACHE_TYPES
from tiller.engine.weights import build_weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a model file (default: stories110M-shaped "
                   "random weights)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chunk", type=int, default=39, help="new tokens per step")
    p.add_argument("--histories", default="0,400,880", help="cached tokens before the chunk")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--cpu", action="store_true", help="process CPU time, not wall time")
    p.add_argument("--cache-type", choices=CACHE_TYPES,
                   help="the KV cache's type, keys and values (default: the engine's)")
    args = p.parse_args()
    kwargs = {"max_tokens": 512, "threads": args.threads, "cache_type_k": args.cache_type,
              "cache_type_v": args.cache_type}
    if args.model is not None:
        engine = Engine.load(args.model, **kwargs)  # type: ignore[arg-type]
    else:
        config = SHAPES["stories110M"]
        engine = Engine(config, build_weights(config, random_checkpoint(config), "q8_0"),
                        **kwargs)  # type: ignore[arg-type]
    clock = time.process_time if args.cpu else time.perf_counter
    histories = [int(h) for h in args.histories.split(",")]
    rng = np.random.default_rng(0)
    vocab = engine.config.vocab_size
    history = rng.integers(3, vocab, max(histories) + 1).tolist()
    cached = engine.new_sequence()  # puts the history's blocks in the prefix cache
    for i in range(0, len(history), 512):
        engine.step([SeqRequest(cached, history[i:i + 512], logits="none")])

    def timed(seq, tokens) -> float:
        t0 = clock()
        engine.step([SeqRequest(seq, tokens)])
        return clock() - t0

    clock_name = "CPU" if args.cpu else "wall"
    print(f"{engine.config.dim}-dim x {engine.config.n_layers} layers, threads "
          f"{engine.threads}, {engine.cache.type_k} KV cache, {clock_name} time, "
          f"medians of {args.repeats}")
    for h in histories:
        times = []
        for _ in range(args.repeats):
            seq = engine.new_sequence()
            chunk = rng.integers(3, vocab, args.chunk).tolist()  # never cached before
            reused = engine.attach_prefix(seq, history[:h] + chunk)
            assert reused == h, (reused, h)
            times.append(timed(seq, chunk))
            engine.release(seq)
        print(f"{args.chunk} tokens after {h:4d}: {statistics.median(times) * 1e3:7.2f} ms")
    times = []
    for _ in range(max(3, args.repeats // 3)):
        seq = engine.new_sequence()
        times.append(timed(seq, rng.integers(3, vocab, 512).tolist()))
        engine.release(seq)
    print(f"prefill 512:           {statistics.median(times) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
