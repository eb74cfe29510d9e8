"""Submitting generations and consuming them: the stage between a prepared request and its
response.

A Generation turns the engine thread's token events into text with TextStream (UTF-8 safe, stop
strings held back and cut), tells the runner to stop at a stop string, and cancels the request
if the consumer goes away (a disconnected client): the `finally` in `events()` is what frees
its KV cache. `merged` consumes several at once (n choices, several prompts); `collect_states`
runs prompt-only requests for their hidden states.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine.engine import EngineError, SteeringTerm
from ..engine.sampling import SamplingParams
from ..engine.tokenizer import Tokenizer
from .errors import ApiError, GenerationError
from .http import SSE
from .prepare import GenerationSpec, max_new_tokens
from .runner import (
    Captured,
    Finished,
    FinishReason,
    GenerationRequest,
    PromptLogprobs,
    Runner,
    TokenEvent,
)
from .state import Model
from .textstream import TextStream


@dataclass
class Piece:
    """A sampled token (None for text released at the end) and the text it lets us emit."""

    token: int | None
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    text_offset: int = 0


@dataclass
class Outcome:
    finish_reason: str  # "stop" | "length"
    stop_type: str  # llama.cpp's: "eos" | "word" | "limit"
    stopping_word: str
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float
    generate_seconds: float
    seed: int
    text: str


class Generation:
    """A submitted request. Construction submits it (raising QueueFull or ValueError at once,
    before any response has started); `events()` yields its Pieces (and PromptLogprobs if asked),
    then one Outcome. Leaving `events()` early, or calling `cancel()`, cancels the request."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, request: GenerationRequest,
                 stop: tuple[str, ...] = (), at_start: bool = False) -> None:
        self.runner = runner
        self.request = request
        self.handle = runner.submit(request)
        self.stream = TextStream(tokenizer, stop, at_start=at_start)
        self.done = False

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.runner.cancel(self.handle.id)

    async def events(self) -> AsyncGenerator[Piece | PromptLogprobs | Captured | Outcome, None]:
        stream, request, handle = self.stream, self.request, self.handle
        n_tokens = 0
        eos = False
        try:
            while True:
                event = await handle.queue.get()
                if isinstance(event, PromptLogprobs | Captured):
                    yield event
                elif isinstance(event, TokenEvent):
                    if stream.stopped:
                        continue  # sampled before the runner heard about the stop string
                    n_tokens += 1
                    if event.token in request.stop_ids:
                        eos = True
                        continue
                    delta = stream.push(event.token)
                    offset = stream.text_offset[-1]
                    yield Piece(event.token, delta.text, event.logprob, event.top, offset)
                    if delta.stopped:
                        self.runner.finish(handle.id)
                elif isinstance(event, Finished):
                    self.done = True
                    if event.error is not None:
                        raise GenerationError(event.error)
                    if event.reason == FinishReason.CANCELLED and not stream.stopped:
                        raise GenerationError("the request was cancelled (server shutting down)")
                    tail = "" if stream.stopped else stream.finish()
                    if tail:
                        yield Piece(None, tail, text_offset=len(stream.text) - len(tail))
                    if stream.stopped:
                        finish, stop_type, word = "stop", "word", stream.stop_string or ""
                    elif eos:
                        finish, stop_type, word = "stop", "eos", ""
                    else:
                        finish, stop_type, word = "length", "limit", ""
                    yield Outcome(finish, stop_type, word, event.prompt_tokens, n_tokens,
                                  event.prompt_seconds, event.generate_seconds, event.seed,
                                  stream.text)
                    return
        finally:
            self.cancel()


# submitting and consuming several ---------------------------------------------------------------

def start_generations(model: Model, runner: Runner, specs: Sequence[GenerationSpec]
                      ) -> list[Generation]:
    """Submit every choice now, so a full queue is a 503 before any response has started."""
    started: list[Generation] = []
    try:
        for gen, stop, at_start in specs:
            started.append(Generation(runner, model.tokenizer, gen, stop, at_start))
    except EngineError as e:  # the steering, validated when its sequence is created
        for g in started:
            g.cancel()
        raise ApiError(400, f"steering: {e}", param="steering") from e
    except BaseException:
        for g in started:
            g.cancel()
        raise
    return started


async def merged(generations: list[Generation], sse: SSE | None = None
                 ) -> AsyncIterator[tuple[int, Any]]:
    """Events of several generations as (index, event), as they come; all cancelled on exit.

    Each is consumed by its own task, so one slow choice never holds back the others. A
    GenerationError propagates -- unless `sse` has started, where it ends the stream with an
    error event and sets `sse.failed` instead.
    """
    try:
        async for item in _merged(generations):
            yield item
    except GenerationError as e:
        if sse is None or not sse.started:
            raise
        await sse.fail(ApiError(500, str(e), "server_error"))


async def _merged(generations: list[Generation]) -> AsyncIterator[tuple[int, Any]]:
    streams = [g.events() for g in generations]
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except BaseException as e:  # hand it to the consumer
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for task, stream, generation in zip(tasks, streams, generations, strict=True):
            with contextlib.suppress(BaseException):  # its error, if any, was raised above
                await task
            await stream.aclose()
            generation.cancel()


async def collect_states(model: Model, runner: Runner, prompts: list[list[int]],
                         blocks: Sequence[int], steering: tuple[SteeringTerm, ...] = (),
                         final: bool = False) -> list[Captured]:
    """Hidden states of each prompt: `states` (len(CAPTURE_POINTS), len(blocks), T, dim) and,
    with `final`, the stream after the final norm (T, dim). Computed as requests with
    max_tokens=0 in the shared batch, in waves of --parallel prompts that share steps.

    NOTE: waves, because submitting every prompt at once would need --parallel + --max-queue
    places: a long input list would be a 503 on an idle server, retried forever.
    """
    for ids in prompts:
        max_new_tokens(runner, ids, 0)
    specs = [(GenerationRequest(ids, SamplingParams(temperature=0.0), 0,
                                capture_layers=tuple(blocks), capture_final=final,
                                steering=steering), (), False)
             for ids in prompts]
    parts: list[list[Captured]] = [[] for _ in prompts]
    wave = max(1, runner.scheduler.max_running)
    for start in range(0, len(specs), wave):
        async for i, event in merged(start_generations(model, runner,
                                                       specs[start:start + wave])):
            if isinstance(event, Captured):
                parts[start + i].append(event)
    return [Captured(np.concatenate([c.states for c in p], axis=2) if blocks else None,
                     np.concatenate([c.final for c in p]) if final else None) for p in parts]


def token_logprobs(tokenizer: Tokenizer, piece: Piece, with_ids: bool = False) -> dict:
    """A sampled token's logprob entry with its top alternatives, in the shape OpenAI's chat
    logprobs use ({token, logprob, bytes, top_logprobs}); llama.cpp's adds each token's id."""
    def entry(token: int, lp: float | None) -> dict:
        raw = tokenizer.piece_bytes(token)
        out = {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}
        return {"id": token, **out} if with_ids else out
    assert piece.token is not None
    return {**entry(piece.token, piece.logprob),
            "top_logprobs": [entry(t, lp) for t, lp in piece.top or []]}
