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
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..engine.engine import EngineError, SteeringTerm
from ..engine.sampling import SamplingParams
from ..engine.tokenizer import Tokenizer
from .errors import ApiError, GenerationError
from .http import SSE, Sent, SocketWriter
from .prepare import GenerationSpec, max_new_tokens
from .runner import (
    Captured,
    Finished,
    FinishReason,
    GenerationRequest,
    Handle,
    PromptLogprobs,
    PromptReadings,
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
    prob: float | None = None  # post_sampling_probs (TokenEvent's)
    top_probs: list[tuple[int, float]] | None = None
    event: TokenEvent | None = None  # the sampled token's readouts, hidden states, conditions


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
    decisions: list[tuple[int, float, bool]] = field(default_factory=list)  # Finished's
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache


RESUME = object()  # queued by the engine thread: flush what its socket writer left, go on


class Generation:
    """A submitted request. Construction submits it (raising QueueFull or ValueError at once,
    before any response has started); `events()` yields its Pieces (and PromptLogprobs if asked),
    then one Outcome. Leaving `events()` early, or calling `cancel()`, cancels the request."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, request: GenerationRequest,
                 stop: tuple[str, ...] = (), at_start: bool = False,
                 after: Generation | None = None) -> None:
        """`after`: the generation whose prompt computation this one waits for and reuses."""
        self.runner = runner
        self.request = request
        self.handle: Handle = runner.submit(request,
                                            after.handle if after is not None else None)
        self.stream = TextStream(tokenizer, stop, at_start=at_start)
        self.done = False
        # NOTE: the handler's own clock, for timings while the request runs (timings_per_token);
        # the final timings are the engine thread's, from Finished
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.n_tokens = 0
        # NOTE: awaited whenever events() is about to wait for the engine thread (merged() sets
        # it to the response's SSE.flush): what a burst of events queued is written then, once
        self.on_wait: Callable[[], Awaitable[None]] | None = None
        self.eos = False
        # the direct path (stream_directly): the response and a piece's frame
        self._sse: SSE | None = None
        self._render: Callable[[Piece], bytes | None] | None = None
        self._writer: SocketWriter | None = None
        self._taken = 0  # events read from the queue
        self._flushed = -1  # `_taken` when the response last had everything in its socket

    def timings(self) -> dict:
        """llama.cpp's `timings` so far: the prompt until the first token, generation since."""
        now = time.perf_counter()
        first = self.t_first or now
        return timings(len(self.request.prompt), self.n_tokens, first - self.t_submit,
                       now - first, self.handle.cached)

    def ready(self) -> bool:
        """An event is waiting: reading the next one would not wait for the engine thread."""
        return not self.handle.queue.empty()

    def cancel(self) -> None:
        """End the request (if it runs) and the direct path (if it was on); every way out of
        a generation calls this."""
        self.handle.direct = None
        if self._writer is not None:
            self._writer.close()
        if not self.done:
            self.done = True
            self.runner.cancel(self.handle.id)

    def stream_directly(self, sse: SSE, render: Callable[[Piece], bytes | None]) -> None:
        """Write this generation's token chunks from the engine thread, straight into the
        client's socket (SSE.socket_writer), whenever the event loop has nothing of this
        response left to write; `render` makes a piece's frame (None: the piece writes
        nothing). At N = 1 a token then costs no event-loop wake-up, task switch or aiohttp
        write, which on two cores take time from the engine's own threads.

        For a stream whose every token is one plain frame (no logprobs, readings or timings)
        and whose route keeps no per-token state of its own: the pieces written there never
        reach `events()`. Order is kept by counting: the engine thread writes a token only
        when the loop has read every event posted so far and the response's socket has taken
        all of it (`_take`); otherwise the token is queued as before."""
        self._writer = sse.socket_writer()
        if self._writer is not None:
            self._sse, self._render = sse, render
            self.handle.direct = self._take

    def _take(self, event: object) -> object | None:
        """Handle.direct, on the engine thread: None for a token dealt with here, else what
        to queue for events() (the event, its Piece if the socket took none of its frame, or
        RESUME if the socket took part of it)."""
        writer, render = self._writer, self._render
        assert writer is not None and render is not None
        if not isinstance(event, TokenEvent) or self._flushed != self.handle.posted:
            return event
        piece = self._piece(event)
        frame = None if piece is None else render(piece)
        if frame is None:
            return None
        sent = writer.write(frame)
        return None if sent is Sent.ALL else RESUME if sent is Sent.PART else piece

    def _piece(self, event: TokenEvent) -> Piece | None:
        """A sampled token's Piece, or None for one that emits nothing (an end-of-generation
        token, or one sampled before the runner heard about a stop string)."""
        stream = self.stream
        if stream.stopped:
            return None
        self.n_tokens += 1
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if event.token in self.request.stop_ids:
            self.eos = True
            return None
        delta = stream.push(event.token)
        if delta.stopped:
            self.runner.finish(self.handle.id)
        return Piece(event.token, delta.text, event.logprob, event.top, stream.text_offset[-1],
                     event.prob, event.top_probs, event)

    async def events(self) -> AsyncGenerator[
            Piece | PromptLogprobs | PromptReadings | Captured | Outcome, None]:
        stream, handle = self.stream, self.handle
        try:
            while True:
                if handle.queue.empty():
                    if self.on_wait is not None:
                        await self.on_wait()
                    if self._sse is not None and self._sse.idle():
                        self._flushed = self._taken
                event = await handle.queue.get()
                self._taken += 1
                if isinstance(event, PromptLogprobs | PromptReadings | Captured | Piece):
                    yield event  # a Piece: made on the engine thread (_take)
                elif isinstance(event, TokenEvent):
                    piece = self._piece(event)
                    if piece is not None:
                        yield piece
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
                    elif self.eos:
                        finish, stop_type, word = "stop", "eos", ""
                    else:
                        finish, stop_type, word = "length", "limit", ""
                    yield Outcome(finish, stop_type, word, event.prompt_tokens, self.n_tokens,
                                  event.prompt_seconds, event.generate_seconds, event.seed,
                                  stream.text, event.decisions, event.cached_tokens)
                    return
        finally:
            self.cancel()


# submitting and consuming several ---------------------------------------------------------------

def start_generations(model: Model, runner: Runner, specs: Sequence[GenerationSpec]
                      ) -> list[Generation]:
    """Submit every choice now, so a full queue is a 503 before any response has started."""
    started: list[Generation] = []
    leader: Generation | None = None
    try:
        for gen, stop, at_start in specs:
            g = Generation(runner, model.tokenizer, gen, stop, at_start,
                           leader if gen.follow else None)
            leader = leader if gen.follow else g
            started.append(g)
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

    Each is consumed by its own task, so one slow choice never holds back the others. With
    `sse`, its queued frames are flushed whenever no event is ready, before waiting for one
    (a generation's own wait included: it may skip events): the frames of a burst of events go
    out in one write, and no frame waits for the next token. A GenerationError propagates --
    unless `sse` has started, where it ends the stream with an error event and sets
    `sse.failed` instead.
    """
    try:
        async for item in _merged(generations, sse):
            yield item
    except GenerationError as e:
        if sse is None or not sse.started:
            raise
        await sse.fail(ApiError(500, str(e), "server_error"))


async def _merged(generations: list[Generation], sse: SSE | None
                  ) -> AsyncIterator[tuple[int, Any]]:
    if sse is not None:
        for g in generations:
            g.on_wait = sse.flush
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
            if sse is not None and queue.empty() and not any(g.ready() for g in generations):
                await sse.flush()
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
                         final: bool = False,
                         each: Sequence[tuple[SteeringTerm, ...]] | None = None
                         ) -> list[Captured]:
    """Hidden states of each prompt: `states` (len(CAPTURE_POINTS), len(blocks), T, dim) and,
    with `final`, the stream after the final norm (T, dim). Computed as requests with
    max_tokens=0 in the shared batch, in waves of --parallel prompts that share steps.
    `each`: every prompt's own steering (instead of `steering` for all).

    NOTE: waves, because submitting every prompt at once would need --parallel + --max-queue
    places: a long input list would be a 503 on an idle server, retried forever.
    """
    for ids in prompts:
        max_new_tokens(runner, ids, 0)
    steerings = list(each) if each is not None else [steering] * len(prompts)
    specs = [(GenerationRequest(ids, SamplingParams(temperature=0.0), 0,
                                capture_layers=tuple(blocks), capture_final=final,
                                steering=steer), (), False)
             for ids, steer in zip(prompts, steerings, strict=True)]
    parts: list[list[Captured]] = [[] for _ in prompts]
    wave = max(1, runner.scheduler.max_running)
    for start in range(0, len(specs), wave):
        async for i, event in merged(start_generations(model, runner,
                                                       specs[start:start + wave])):
            if isinstance(event, Captured):
                parts[start + i].append(event)
    return [Captured(np.concatenate([c.states for c in p], axis=2) if blocks else None,
                     np.concatenate([c.final for c in p]) if final else None) for p in parts]


# timings and probabilities, in the shapes clients read ---------------------------------------

def timings(prompt_n: int, predicted_n: int, prompt_seconds: float,
            predicted_seconds: float, cache_n: int = 0) -> dict:
    """llama.cpp's `timings` object: prompt_n counts the prompt tokens computed (its
    n_prompt_tokens_processed, c392e50 included), cache_n those reused from the prefix cache
    (newer llama-servers add it: the context used is prompt_n + cache_n + predicted_n)."""
    pms, gms = prompt_seconds * 1000, predicted_seconds * 1000
    prompt_n -= cache_n
    return {"cache_n": cache_n, "prompt_n": prompt_n, "prompt_ms": pms,
            "prompt_per_token_ms": pms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": prompt_n / prompt_seconds if prompt_seconds else 0.0,
            "predicted_n": predicted_n, "predicted_ms": gms,
            "predicted_per_token_ms": gms / predicted_n if predicted_n else 0.0,
            "predicted_per_second": predicted_n / predicted_seconds if predicted_seconds
            else 0.0}


def outcome_timings(outcomes: Iterable[Outcome]) -> dict:
    """The timings of a finished request. NOTE: with n choices (each its own sequence, its
    prompt computed for each), counts and times are summed over the choices: the rates are per
    sequence, as one choice's would be."""
    done = list(outcomes)
    return timings(sum(o.prompt_tokens for o in done), sum(o.completion_tokens for o in done),
                   sum(o.prompt_seconds for o in done), sum(o.generate_seconds for o in done),
                   sum(o.cached_tokens for o in done))


def token_logprobs(tokenizer: Tokenizer, piece: Piece) -> dict:
    """A sampled token's logprob entry with its top alternatives, in the shape OpenAI's chat
    logprobs use ({token, logprob, bytes, top_logprobs})."""
    def entry(token: int, lp: float | None) -> dict:
        raw = tokenizer.piece_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}
    assert piece.token is not None
    return {**entry(piece.token, piece.logprob),
            "top_logprobs": [entry(t, lp) for t, lp in piece.top or []]}


def llama_probs(tokenizer: Tokenizer, piece: Piece, post_sampling: bool) -> dict:
    """One entry of llama.cpp's `completion_probabilities`: {id, token, bytes, logprob,
    top_logprobs} (the model's distribution), or with `post_sampling` {id, token, bytes, prob,
    top_probs} (the distribution the sampler chain drew from)."""
    def entry(token: int, value: float | None) -> dict:
        raw = tokenizer.piece_bytes(token)
        return {"id": token, "token": _llama_text(raw), "bytes": list(raw),
                ("prob" if post_sampling else "logprob"): value}
    assert piece.token is not None
    if post_sampling:
        return {**entry(piece.token, piece.prob),
                "top_probs": [entry(t, p) for t, p in piece.top_probs or []]}
    return {**entry(piece.token, piece.logprob),
            "top_logprobs": [entry(t, lp) for t, lp in piece.top or []]}


def _llama_text(raw: bytes) -> str:
    """A token's text as llama.cpp sends it: a UTF-8 sequence left incomplete at its end is cut
    off (its validate_utf8), other invalid bytes are replaced; `bytes` keeps them all."""
    end = len(raw)
    for i in range(1, min(4, len(raw)) + 1):
        c = raw[-i]
        need = 2 if c & 0xE0 == 0xC0 else 3 if c & 0xF0 == 0xE0 else 4 if c & 0xF8 == 0xF0 else 0
        if i < need:
            end = len(raw) - i
            break
    return raw[:end].decode("utf-8", errors="replace")
