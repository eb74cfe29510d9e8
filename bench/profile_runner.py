"""Where the engine thread's time goes: cProfile of `Runner`'s engine thread under load.

Builds a random-weight stories15M-shaped model (32,000-token vocabulary, as
bench/bench_server.py does), starts a Runner with `--parallel` slots, keeps it full with
requests of `--max-tokens` tokens at temperature 0.8, top_p 0.95 (no HTTP: the handlers'
side only drains the queues), and profiles the engine thread alone for `--requests`
requests. Prints generated tok/s, the share of the thread's time inside Engine.step, and the
top functions by cumulative and by own time.

    python bench/profile_runner.py [--parallel 16] [--requests 48] [--max-tokens 64]
                                   [--threads N] [--top 25]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

from tiller.engine.config import ModelConfig
from tiller.engine.engine import Engine
from tiller.engine.llama2c import random_tensors, write_llama2c
from tiller.engine.loader import load_checkpoint
from tiller.engine.sampling import SamplingParams
from tiller.server.runner import Finished, GenerationRequest, Runner

STORIES15M = ModelConfig(288, 768, 6, 6, 6, 32000, 256)


async def drive(runner: Runner, args: argparse.Namespace) -> int:
    """Keep `parallel` requests in flight until `requests` have finished -> tokens generated."""
    generated = 0
    pending: set[asyncio.Task] = set()

    async def one(i: int) -> int:
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=i)
        handle = runner.submit(GenerationRequest(list(range(1, 17)), params, args.max_tokens))
        while True:
            event = await handle.queue.get()
            if isinstance(event, Finished):
                return event.completion_tokens

    started = 0
    while started < args.requests or pending:
        while started < args.requests and len(pending) < args.parallel:
            pending.add(asyncio.create_task(one(started)))
            started += 1
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        generated += sum(t.result() for t in done)
    return generated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_llama2c(Path(tmp) / "random-stories15M.bin", STORIES15M,
                             random_tensors(STORIES15M, 0), "v0")
        engine = Engine.from_checkpoint(load_checkpoint(path), max_tokens=256,
                                        kv_sequences=args.parallel, threads=args.threads)

    async def run() -> tuple[int, float, cProfile.Profile]:
        loop = asyncio.get_running_loop()
        warm = Runner(engine, max_running=args.parallel)  # compile / load the kernels
        warm.start(loop)
        await drive(warm, argparse.Namespace(**{**vars(args), "requests": 2}))
        warm.stop()
        runner = Runner(engine, max_running=args.parallel)
        profile = cProfile.Profile()
        thread_main = runner._run
        runner._run = lambda: profile.runcall(thread_main)  # type: ignore[method-assign]
        runner.start(loop)
        start = time.perf_counter()
        generated = await drive(runner, args)
        seconds = time.perf_counter() - start
        runner.stop()
        return generated, seconds, profile

    generated, seconds, profile = asyncio.run(run())
    stats = pstats.Stats(profile)
    step = [v[3] for k, v in stats.stats.items()  # type: ignore[attr-defined]
            if k[2] == "step" and k[0].endswith("engine.py")]
    idle = [v[3] for k, v in stats.stats.items()  # type: ignore[attr-defined]
            if k[2] == "wait" and k[0].endswith("threading.py")]
    print(f"{generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tok/s "
          f"(parallel {args.parallel}, {engine.threads} threads)")
    busy = max(stats.total_tt - sum(idle), 1e-9)  # type: ignore[attr-defined]
    print(f"engine thread busy {busy:.2f} s, of which Engine.step {sum(step):.2f} s "
          f"({100 * sum(step) / busy:.0f}%); waiting for work {sum(idle):.2f} s")
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(key).print_stats(args.top)
        print(out.getvalue().split("\n", 4)[-1])


if __name__ == "__main__":
    main()
