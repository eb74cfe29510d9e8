"""What the route modules share: prompts to tokens, limits, sampling, n choices, SSE."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from aiohttp import web

from engine.sampling import SamplingParams
from server.app import STATE, Model
from server.errors import ApiError
from server.generation import Generation, GenerationError
from server.runner import Captured, GenerationRequest, Runner
from server.textstream import normalize_stop


def tokenize_prompt(model: Model, prompt: str | list, field: str = "prompt") -> list[int]:
    """A string (BOS + text) or token ids (used as given) -> ids, validated against the vocab."""
    tok = model.tokenizer
    if isinstance(prompt, str):
        return tok.encode(prompt, bos=True)
    ids: list[int] = []
    for i, part in enumerate(prompt):  # llama.cpp allows strings and ids mixed
        if isinstance(part, str):
            ids.extend(tok.encode(part, bos=not ids))
        elif isinstance(part, int) and not isinstance(part, bool):
            if not 0 <= part < tok.vocab_size:
                raise ApiError(400, f"{field}[{i}]: token id {part} outside "
                               f"0..{tok.vocab_size - 1}", param=field)
            ids.append(part)
        else:
            raise ApiError(400, f"{field}[{i}]: expected a token id or a string", param=field)
    if not ids:
        raise ApiError(400, f"{field}: empty prompt", param=field)
    return ids


def max_new_tokens(runner: Runner, prompt: list[int], requested: int | None,
                   field: str = "max_tokens") -> int:
    """Check prompt + requested tokens fit the context; None means 'as many as fit'."""
    limit = runner.context_limit()
    room = limit - len(prompt)
    if room < 0 or (requested is not None and requested > room):
        wanted = len(prompt) + (requested or 0)
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, "
                       f"you requested {wanted} tokens ({len(prompt)} in the prompt, "
                       f"{requested or 0} for the completion). Please reduce the prompt or "
                       f"{field}.", param=field if room >= 0 else "prompt",
                       code="context_length_exceeded")
    return room if requested is None else requested


def stop_strings(stop: Any, field: str = "stop") -> tuple[str, ...]:
    try:
        return normalize_stop(stop)
    except ValueError as e:
        raise ApiError(400, str(e), param=field) from e


def sampling(temperature: float, top_p: float, top_k: int, min_p: float, seed: int | None,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, repeat_last_n: int = -1) -> SamplingParams:
    try:
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              seed=seed, repetition_penalty=repetition_penalty,
                              frequency_penalty=frequency_penalty,
                              presence_penalty=presence_penalty, repeat_last_n=repeat_last_n)
    except ValueError as e:
        raise ApiError(400, str(e)) from e


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of n gets seed + i: reproducible as a whole, different from its siblings."""
    return None if seed is None else (seed + index) % 2**63


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


def start_generations(request: web.Request,
                      specs: list[tuple[GenerationRequest, tuple[str, ...], bool]]
                      ) -> list[Generation]:
    """Submit every choice now, so a full queue is a 503 before any response has started."""
    model, runner = request.app[STATE].ready()
    started: list[Generation] = []
    try:
        for gen, stop, at_start in specs:
            started.append(Generation(runner, model.tokenizer, gen, stop, at_start))
    except BaseException:
        for g in started:
            g.cancel()
        raise
    return started


class SSE:
    """A server-sent events response: `data: <json>` lines, flushed as they are written."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.started = False
        self.failed = False
        self.response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass events through unbuffered
        })

    async def start(self) -> None:
        await self.response.prepare(self.request)
        self.started = True

    async def send(self, data: dict | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        await self.response.write(f"data: {text}\n\n".encode())

    async def close(self) -> web.StreamResponse:
        await self.response.write_eof()
        return self.response

    async def fail(self, error: ApiError) -> web.StreamResponse:
        """After the stream has started an error can only be an event: OpenAI's clients raise
        on a `data: {"error": ...}` event, and so does tiller_client."""
        self.failed = True
        await self.send({"error": {"message": error.message, "type": error.type,
                                   "param": error.param, "code": error.code}})
        return await self.close()


async def collect_states(request: web.Request, prompts: list[list[int]], blocks: list[int],
                         steering: tuple = ()) -> list[np.ndarray]:
    """Hidden states of each prompt, (len(CAPTURE_POINTS), len(blocks), T, dim), computed as
    requests with max_tokens=0 in the shared batch: submitted together, they share steps."""
    _, runner = request.app[STATE].ready()
    for ids in prompts:
        max_new_tokens(runner, ids, 0)
    specs = [(GenerationRequest(ids, SamplingParams(temperature=0.0), 0,
                                capture_layers=tuple(blocks), steering=steering), (), False)
             for ids in prompts]
    parts: list[list[np.ndarray]] = [[] for _ in prompts]
    async for i, event in merged(start_generations(request, specs)):
        if isinstance(event, Captured):
            parts[i].append(event.states)
    return [np.concatenate(p, axis=2) for p in parts]


def token_logprobs(model: Model, piece: Any, with_ids: bool = False) -> dict:
    """A sampled token's logprob entry with its top alternatives, in the shape OpenAI's chat
    logprobs use ({token, logprob, bytes, top_logprobs}); llama.cpp's adds each token's id."""
    def entry(token: int, lp: float) -> dict:
        raw = model.tokenizer.piece_bytes(token)
        out = {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}
        return {"id": token, **out} if with_ids else out
    return {**entry(piece.token, piece.logprob),
            "top_logprobs": [entry(t, lp) for t, lp in piece.top or []]}
