"""Sampling cost per engine step: the numpy reference vs the compiled batched kernel.

B rows of a `--vocab` (32,000) vocabulary are sampled per step, as the server's engine thread
does after each forward step:

- **numpy**: `apply_penalties` + `sample_token` once per row, serially (what
  `Sampler.sample` did before engine/sample_kernel.py);
- **kernel**: one `sample_batch` call for all B rows (prange over rows), at 1 and 2 threads.

Settings: temperature 0.8 with top_p 0.95 (the issue's load), greedy, llama.cpp's /completion
defaults (0.8, top_k 40, top_p 0.95, min_p 0.05), and temperature 0.8 top_p 0.95 with
repetition/frequency/presence penalties over a 64-token window. Two logit
shapes: "zipf" (a trained model's: a few likely tokens and a long tail, -1.1 log rank plus
noise), "random" (normal, sd 1) and "narrow" (normal, sd 0.05, a random-weight model's: top_p
0.95 keeps most of the vocabulary).
Each figure is the median over `--steps` steps of ms per step, and per row.

    python bench/bench_sampling.py [--vocab 32000] [--steps 30] [--rows 1 4 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np
from tiller.engine.sampling import (
    Sampler,
    SamplingParams,
    apply_penalties,
    sample_batch,
    sample_token,
)

SETTINGS = {
    "t0.8 top_p0.95": {"temperature": 0.8, "top_p": 0.95},
    "greedy": {"temperature": 0.0},
    "llama.cpp defaults": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05},
    "t0.8 top_p0.95 penalties": {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1,
                                 "frequency_penalty": 0.3, "presence_penalty": 0.2,
                                 "repeat_last_n": 64},
}


def make_logits(rng: np.random.Generator, rows: int, vocab: int, shape: str) -> np.ndarray:
    if shape == "zipf":
        ranks = np.arange(1, vocab + 1, dtype=np.float64)
        base = -1.1 * np.log(ranks)
        out = np.stack([rng.permutation(base) + rng.normal(0, 0.3, vocab) for _ in range(rows)])
    else:
        out = rng.standard_normal((rows, vocab)) * (0.05 if shape == "narrow" else 1.0)
    return out.astype(np.float32)


def make_samplers(rows: int, settings: dict, vocab: int, rng: np.random.Generator
                  ) -> list[Sampler]:
    samplers = []
    for r in range(rows):
        sampler = Sampler(SamplingParams(**settings, seed=r),
                          rng.integers(vocab, size=40).tolist())
        for t in rng.integers(vocab, size=40):
            sampler.accept(int(t))
        samplers.append(sampler)
    return samplers


def numpy_step(samplers: list[Sampler], logits: np.ndarray) -> None:
    for s, row in zip(samplers, logits, strict=True):
        pen = apply_penalties(row, s.params, s._tokens[: s._n], s.n_prompt)
        u = 0.0 if s.params.greedy else float(s.rng.random())
        sample_token(pen, s.params, u)


def time_steps(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    max_threads = min(2, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    warm = make_samplers(2, SETTINGS["t0.8 top_p0.95 penalties"], args.vocab, rng)
    sample_batch(warm, make_logits(rng, 2, args.vocab, "zipf"))  # compile / load the cache

    print(f"vocab {args.vocab}, median of {args.steps} steps: ms per step (ms per row)")
    header = ["logits", "setting", "B", "numpy"] + [f"kernel {t}t" for t in
                                                    range(1, max_threads + 1)]
    print(" | ".join(header))
    for shape in ("zipf", "random", "narrow"):
        for name, settings in SETTINGS.items():
            for rows in args.rows:
                logits = make_logits(rng, rows, args.vocab, shape)
                samplers = make_samplers(rows, settings, args.vocab, rng)
                cells = [shape, name, str(rows)]
                ms = time_steps(lambda s=samplers, x=logits: numpy_step(s, x), args.steps)
                cells.append(f"{ms:.2f} ({ms / rows:.3f})")
                for threads in range(1, max_threads + 1):
                    ms = time_steps(lambda s=samplers, x=logits, t=threads:
                                    sample_batch(s, x, threads=t), args.steps)
                    cells.append(f"{ms:.2f} ({ms / rows:.3f})")
                print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
