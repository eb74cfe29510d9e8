"""Structured outputs' cost per step: batch 16, every sequence constrained by a JSON schema,
against the same 16 sequences unconstrained, through the server's Runner (engine step, masks,
sampling: the engine thread's whole loop).

The model is random-weight and shaped like stories15M with the llama2 tokenizer (32000 tokens,
as the masks are over the whole vocabulary), or a real llama2.c model with --model. A random
model's flat distribution samples freely among the allowed tokens, which keeps the matchers
busy (strings, numbers, keys) rather than on forced bytes.

    python bench/bench_structured.py [--steps 48] [--batch 16] [--threads N]
                                     [--model stories15M.bin] [--repeats 3] [--mask-threads N]
                                     [--tools]

--tools constrains the sequences by a forced tool call instead (server/tools.py's grammar:
`<tool_call>` blocks in Lark around the same schema as the arguments of a tool, parallel calls
allowed), as `tool_choice: "required"` does.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from bench_engine import SHAPES, random_checkpoint
from tiller.engine.engine import Engine
from tiller.engine.llama2c import load_llama2c
from tiller.engine.sampling import Sampler, SamplingParams
from tiller.engine.tokenizer import SpmTokenizer, Tokenizer
from tiller.engine.weights import build_weights
from tiller.server.constraints import (
    GrammarSpec,
    MaskBatch,
    Vocabulary,
    apply_mask,
    json_schema_grammar,
)
from tiller.server.runner import Finished, GenerationRequest, Runner
from tiller.server.tools import ToolFormat, ToolRequest, tool_grammar

MODELS = Path(__file__).resolve().parents[1].parent / "shared/models"
TOKENIZER = MODELS / "llama2-tokenizer.bin"
PROMPT_TOKENS = 8
WARMUP_STEPS = 3
# long enough that no sequence finishes within the measured steps
SCHEMA = {"type": "array", "maxItems": 200, "items": {
    "type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "sleepy"]},
        "tags": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 8}},
        "score": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5}},
    "required": ["name", "age", "mood", "tags", "score"], "additionalProperties": False}}


def bench_grammar(tools: bool) -> GrammarSpec:
    if not tools:
        return json_schema_grammar(SCHEMA, "bench")
    tool = {"type": "function", "function": {"name": "record", "parameters": {
        "type": "object", "properties": {"items": SCHEMA}, "required": ["items"],
        "additionalProperties": False}}}
    spec = tool_grammar(ToolRequest([tool], "required", True, ToolFormat.HERMES,
                                    frozenset({"record"})))
    assert spec is not None
    return spec


def build_engine(model: Path | None, batch: int, steps: int, threads: int | None
                 ) -> tuple[Engine, Tokenizer]:
    tokenizer = SpmTokenizer.from_llama2c(TOKENIZER)
    kv = batch * (PROMPT_TOKENS + WARMUP_STEPS + steps + 16)
    kwargs = {"max_tokens": batch * PROMPT_TOKENS, "kv_tokens": kv, "kv_sequences": batch,
              "threads": threads}
    if model is not None:
        return Engine.from_checkpoint(load_llama2c(model), **kwargs), tokenizer
    config = SHAPES["stories15M"]
    return Engine(config, build_weights(config, random_checkpoint(config), "q8_0"),
                  **kwargs), tokenizer


async def step_times(runner: Runner, requests: list[GenerationRequest]) -> list[float]:
    """Wall time of each step in which all the requests decoded a token (the time between
    the ends of consecutive full-batch steps: scheduling, engine, masks and sampling)."""
    ends: list[tuple[float, int]] = []
    runner.on_step = lambda _seconds, size: ends.append((time.perf_counter(), size))
    handles = [runner.submit(r) for r in requests]
    for handle in handles:
        while not isinstance(await handle.queue.get(), Finished):
            pass
    full = len(requests)
    return [b - a for (a, na), (b, nb) in zip(ends, ends[1:], strict=False)
            if na == nb == full][WARMUP_STEPS:]


def requests(tokenizer: Tokenizer, vocabulary: Vocabulary | None, batch: int, steps: int,
             rng: np.random.Generator, grammar: GrammarSpec) -> list[GenerationRequest]:
    return [GenerationRequest(rng.integers(3, tokenizer.vocab_size, PROMPT_TOKENS).tolist(),
                              SamplingParams(temperature=1.0, seed=i), steps + WARMUP_STEPS,
                              constraint=None if vocabulary is None
                              else vocabulary.constraint(grammar))
            for i in range(batch)]


def sampling_cpu(vocabulary: Vocabulary, batch: int, steps: int, grammar: GrammarSpec
                 ) -> tuple[float, float, float]:
    """CPU seconds per step of the runner's sampling, without the engine: (unconstrained,
    constrained, of which masks) for `batch` sequences over random logits, the matchers
    advanced by the tokens drawn. CPU time (all threads) rather than wall time, because the
    machine is shared: another process's load changes the wall time, not the work."""
    rng = np.random.default_rng(2)
    constraints = [vocabulary.constraint(grammar) for _ in range(batch)]
    samplers = [Sampler(SamplingParams(temperature=1.0, seed=i)) for i in range(2 * batch)]
    masks = MaskBatch()
    free = constrained = in_masks = 0.0
    for _ in range(steps):
        logits = rng.standard_normal((batch, vocabulary.n_vocab)).astype(np.float32)
        t0 = time.process_time()
        for i in range(batch):
            samplers[batch + i].sample(logits[i])
        t1 = time.process_time()
        allowed = masks.compute([c for c in constraints if c is not None])
        t2 = time.process_time()
        for i, c in enumerate(constraints):
            assert c is not None
            c.consume(samplers[i].sample(apply_mask(logits[i], allowed[i])))
        t3 = time.process_time()
        free, constrained, in_masks = free + t1 - t0, constrained + t3 - t1, in_masks + t2 - t1
    return free / steps, constrained / steps, in_masks / steps


async def run(args: argparse.Namespace) -> None:
    engine, tokenizer = build_engine(args.model, args.batch, args.steps, args.threads)
    vocabulary = Vocabulary(tokenizer, engine.config.vocab_size)
    t0 = time.perf_counter()
    vocabulary.ll_tokenizer()
    print(f"tokenizer bridge: {tokenizer.vocab_size} tokens in "
          f"{(time.perf_counter() - t0) * 1e3:.1f} ms (once per model)")
    runner = Runner(engine, max_running=args.batch, token_budget=args.batch * PROMPT_TOKENS)
    if args.mask_threads:
        runner.masks = MaskBatch(args.mask_threads)
    runner.start(asyncio.get_running_loop())
    rng = np.random.default_rng(0)
    grammar = bench_grammar(args.tools)
    free: list[float] = []
    constrained: list[float] = []
    try:
        for i in range(args.repeats):  # interleaved: the machine's drift hits both alike
            for vocab in (None, vocabulary) if i % 2 else (vocabulary, None):
                times = await step_times(runner, requests(tokenizer, vocab, args.batch,
                                                          args.steps, rng, grammar))
                (free if vocab is None else constrained).extend(times)
    finally:
        runner.stop()
    f, c = statistics.median(free), statistics.median(constrained)
    model = args.model.name if args.model else "random stories15M shape"
    print(f"{model}, {'tool calls' if args.tools else 'JSON schema'}, "
          f"vocab {engine.config.vocab_size}, batch {args.batch}, "
          f"{engine.threads} engine threads, {len(free)} and {len(constrained)} steps "
          "(median):")
    print(f"  unconstrained  {f * 1e3:8.2f} ms/step (quartiles "
          f"{np.percentile(free, 25) * 1e3:.2f}-{np.percentile(free, 75) * 1e3:.2f})")
    print(f"  constrained    {c * 1e3:8.2f} ms/step (quartiles "
          f"{np.percentile(constrained, 25) * 1e3:.2f}-"
          f"{np.percentile(constrained, 75) * 1e3:.2f})")
    print(f"  overhead       {(c - f) * 1e3:8.2f} ms/step = {(c - f) / args.batch * 1e3:.3f} "
          f"ms/token ({(c / f - 1) * 100:+.1f}%)")
    free_cpu, constrained_cpu, masks_cpu = sampling_cpu(vocabulary, args.batch, args.steps,
                                                        grammar)
    print(f"sampling alone, CPU ms per step of {args.batch} sequences (no engine):")
    print(f"  unconstrained  {free_cpu * 1e3:8.2f}")
    print(f"  constrained    {constrained_cpu * 1e3:8.2f}  (masks {masks_cpu * 1e3:.2f}, "
          f"+{(constrained_cpu - free_cpu) / args.batch * 1e3:.3f} ms per token)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=48, help="decode steps per run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--mask-threads", type=int, default=None,
                        help="llguidance threads for the masks (default: its own choice)")
    parser.add_argument("--tools", action="store_true",
                        help="a forced tool call's grammar instead of the bare JSON schema")
    parser.add_argument("--model", type=Path, default=None,
                        help="a llama2.c model using the llama2 tokenizer (default: random)")
    args = parser.parse_args(argv)
    if not TOKENIZER.exists():
        print(f"{TOKENIZER} not found", file=sys.stderr)
        return 1
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
