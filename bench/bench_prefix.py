"""The prefix cache through the server's Runner (scheduler, engine thread, sampling): a chat
client re-sending a growing conversation, and n choices of one prompt.

TTFT is the time from submit to the first sampled token. The conversation's next turn is
measured with the cache (its history was computed by the turn before) and with
`cache_prompt: false`, against a one-line prompt (the issue's target: the next turn's TTFT
within 1.5x of a one-line prompt's, whatever the history). The model is random-weight and
shaped like stories110M (context 1024), or a real llama2.c model with --model.

    python bench/bench_prefix.py [--threads N] [--repeats 5] [--model stories110M.bin]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import numpy as np
from bench_engine import SHAPES, random_checkpoint
from tiller.engine.engine import Engine
from tiller.engine.llama2c import load_llama2c
from tiller.engine.sampling import SamplingParams
from tiller.engine.weights import build_weights
from tiller.server.runner import Finished, GenerationRequest, Runner, TokenEvent

ONE_LINE = 16  # tokens of the short prompt
TURN = 24  # tokens a turn adds (the reply plus the next question)
HISTORIES = (128, 384, 768)
N_CHOICES = 4


def build_engine(model: Path | None, threads: int | None) -> Engine:
    kwargs = {"max_tokens": 256, "kv_sequences": 4, "threads": threads}
    if model is not None:
        return Engine.from_checkpoint(load_llama2c(model), **kwargs)
    config = SHAPES["stories110M"]
    return Engine(config, build_weights(config, random_checkpoint(config), "q8_0"), **kwargs)


async def ttft(runner: Runner, prompt: list[int], cache: bool, max_tokens: int = 1,
               n: int = 1) -> float:
    """Seconds until every one of n choices has its first token (they run to the end)."""
    t0 = time.perf_counter()
    gens = [GenerationRequest(prompt, SamplingParams(temperature=0.8, seed=i), max_tokens,
                              cache_prompt=cache, follow=i > 0) for i in range(n)]
    handles = []
    for gen in gens:
        handles.append(runner.submit(gen, handles[0] if gen.follow else None))
    firsts = []
    for handle in handles:
        first = None
        while not isinstance(event := await handle.queue.get(), Finished):
            if first is None and isinstance(event, TokenEvent):
                first = time.perf_counter() - t0
        assert first is not None and event.error is None, event.error
        firsts.append(first)
    return max(firsts)


async def run(args: argparse.Namespace) -> None:
    engine = build_engine(args.model, args.threads)
    runner = Runner(engine, max_running=4, token_budget=256)
    runner.start(asyncio.get_running_loop())
    rng = np.random.default_rng(0)
    vocab = engine.config.vocab_size
    results: dict[str, list[float]] = {}
    try:
        await ttft(runner, rng.integers(3, vocab, 64).tolist(), False)  # warm-up
        for _ in range(args.repeats):
            short = rng.integers(3, vocab, ONE_LINE).tolist()
            results.setdefault("one-line prompt", []).append(await ttft(runner, short, False))
            for h in HISTORIES:
                history = rng.integers(3, vocab, h).tolist()
                await ttft(runner, history, True)  # the turn before: computes the history
                turn = history + rng.integers(3, vocab, TURN).tolist()
                # NOTE: cache on first: a run with the cache off still leaves its blocks (and
                # rows) cached, and the turn would then find itself, not just its history
                results.setdefault(f"turn after {h} tokens, cache on", []).append(
                    await ttft(runner, turn, True))
                results.setdefault(f"turn after {h} tokens, cache off", []).append(
                    await ttft(runner, turn, False))
            prompt = rng.integers(3, vocab, 384).tolist()
            for cache in (False, True):
                before = runner.stats.prompt_tokens
                key = f"n={N_CHOICES} of a 384-token prompt, cache {'on' if cache else 'off'}"
                results.setdefault(key, []).append(
                    await ttft(runner, prompt if cache else prompt[::-1], cache, n=N_CHOICES))
                results.setdefault(key + " (prompt tokens computed)", []).append(
                    runner.stats.prompt_tokens - before)
    finally:
        runner.stop()
    model = args.model.name if args.model else "random stories110M shape"
    print(f"{model}, {engine.threads} threads, medians of {args.repeats}:")
    base = statistics.median(results["one-line prompt"])
    for name, values in results.items():
        m = statistics.median(values)
        if name.endswith("computed)"):
            print(f"  {name:52s} {m:9.0f}")
        else:
            print(f"  {name:52s} {m * 1e3:7.1f} ms TTFT  ({m / base:4.2f}x one line)")
    s = engine.cache.stats
    print(f"cache: {s.hit_tokens} of {s.lookups} looked-up prompt tokens hit, "
          f"{s.evictions} evictions")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a llama2.c model (default: random weights)")
    p.add_argument("--threads", type=int)
    p.add_argument("--repeats", type=int, default=5)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
