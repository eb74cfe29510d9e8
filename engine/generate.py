"""A single-sequence generation loop over Engine.step: what the CLI runs (the server batches)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from .engine import Engine, SeqRequest
from .sampling import Sampler, SamplingParams


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_tok_s(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0


def generate(engine: Engine, prompt: list[int], params: SamplingParams, max_new_tokens: int,
             stop_ids: frozenset[int] = frozenset(), timings: Timings | None = None
             ) -> Iterator[int]:
    """Yield up to max_new_tokens sampled tokens after the prompt, stopping at a stop id or at
    the end of the context. The prompt is prefilled in chunks of engine.max_tokens."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token (usually BOS)")
    if len(prompt) > engine.config.max_seq_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is "
                         f"{engine.config.max_seq_len}")
    timings = timings if timings is not None else Timings()
    sampler = Sampler(params, prompt)
    seq = engine.new_sequence()
    try:
        start = time.perf_counter()
        for i in range(0, len(prompt), engine.max_tokens):
            chunk = prompt[i:i + engine.max_tokens]
            last = i + len(chunk) == len(prompt)
            logits = engine.step([SeqRequest(seq, chunk, logits="last" if last else "none")])[0]
        timings.prompt_tokens = len(prompt)
        timings.prompt_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(max_new_tokens):
            assert logits.logits is not None  # every step asks for the last logits
            token = sampler.sample(logits.logits)
            sampler.accept(token)
            timings.generated_tokens += 1
            timings.generate_seconds = time.perf_counter() - start
            if token in stop_ids:
                return
            yield token
            if seq.length >= engine.config.max_seq_len:
                return
            logits = engine.step([SeqRequest(seq, [token])])[0]
    finally:
        engine.release(seq)
