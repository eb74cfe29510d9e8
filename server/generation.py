"""One request's generation as the HTTP layer sees it: text pieces, then an outcome.

Turns the engine thread's token events into text with TextStream (UTF-8 safe, stop strings
held back and cut), tells the runner to stop at a stop string, and cancels the request if the
consumer goes away (a disconnected client): the `finally` below is what frees its KV cache.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.tokenizer import Tokenizer
from server.runner import (
    Captured,
    Finished,
    FinishReason,
    GenerationRequest,
    PromptLogprobs,
    Runner,
    TokenEvent,
)
from server.textstream import TextStream


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


class GenerationError(RuntimeError):
    """The engine failed on this request (a bug, logged on the engine thread)."""


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

    async def events(self) -> AsyncIterator[Piece | PromptLogprobs | Captured | Outcome]:
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
