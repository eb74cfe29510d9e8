"""OpenAI-compatible routes: POST /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from functools import partial
from typing import Any

from aiohttp import web

from .generation import (
    Outcome,
    Piece,
    merged,
    outcome_timings,
    start_generations,
    token_logprobs,
)
from .http import SSE, FrameTemplate, json_response, read_body
from .openapi import operation
from .prepare import chat_choices, completion_choices
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    StreamOptions,
)
from .readings import prepare_readings
from .runner import PromptLogprobs, PromptReadings
from .state import STATE, TOKENS, Model
from .steering_service import request_steering
from .tool_parser import ArgumentsDelta, CallStart, ContentDelta, Event, ToolCallParser
from .tools import ToolRequest


def _usage(prompt: int, completion: int, cached: int) -> dict:
    """`cached`: of the prompt tokens, those read from the prefix cache (n choices of a prompt
    count it once, as prompt_tokens do: its first choice's)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _token_text(model: Model, token: int) -> str:
    return model.tokenizer.piece_bytes(token).decode("utf-8", errors="replace")


def _text_frame(frame: FrameTemplate, piece: Piece) -> bytes | None:
    """A piece's chunk when it carries text only (Generation.stream_directly's `render`)."""
    return frame.frame(piece.text) if piece.text else None


async def _finish_stream(sse: SSE, finish_chunk: dict | None, options: StreamOptions | None,
                         usage: dict, timings: dict) -> None:
    """The end of a stream: the last choice's finish chunk, the usage chunk if asked for, and
    llama.cpp's `timings` on whichever of them is last; then [DONE]."""
    assert finish_chunk is not None  # every choice ends with an Outcome
    last = finish_chunk
    if options and options.include_usage:
        await sse.send(finish_chunk)
        last = {**finish_chunk, "choices": [], "usage": usage}
    await sse.send({**last, "timings": timings})
    await sse.send("[DONE]")


# /v1/completions ------------------------------------------------------------------------------


class _CompletionChoice:
    """Accumulates one choice's text and logprobs (OpenAI's completions logprobs shape)."""

    def __init__(self, model: Model, echo_text: str, prompt_ids: list[int], logprobs: int | None):
        self.model = model
        self.parts = [echo_text]  # NOTE: joined once at the end, not re-copied per token
        self.base = len(echo_text)
        self.logprobs = logprobs
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top: list[dict[str, float] | None] = []
        self.offsets: list[int] = []
        self.prompt_ids = prompt_ids

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts = ["".join(self.parts)]
        return self.parts[0]

    def add_prompt(self, event: PromptLogprobs) -> None:
        offset = 0
        for i, token in enumerate(self.prompt_ids):
            text = _token_text(self.model, token)
            self.tokens.append(text)
            self.token_logprobs.append(event.logprobs[i])
            top = event.top[i]
            self.top.append(None if top is None else
                            {_token_text(self.model, t): lp for t, lp in top})
            self.offsets.append(offset)
            offset += len(text)

    def add(self, piece: Piece) -> dict | None:
        """Record a piece; returns its logprobs fragment for a stream chunk."""
        self.parts.append(piece.text)
        if self.logprobs is None or piece.token is None:
            return None
        fragment: dict[str, Any] = {
            "tokens": [_token_text(self.model, piece.token)],
            "token_logprobs": [piece.logprob],
            "top_logprobs": [{_token_text(self.model, t): lp for t, lp in piece.top or []}],
            "text_offset": [self.base + piece.text_offset],
        }
        for key, dst in (("tokens", self.tokens), ("token_logprobs", self.token_logprobs),
                         ("top_logprobs", self.top), ("text_offset", self.offsets)):
            dst.extend(fragment[key])
        return fragment

    def logprobs_body(self) -> dict | None:
        if self.logprobs is None:
            return None
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top, "text_offset": self.offsets}


@operation("OpenAI text completion (stream: server-sent events)", CompletionRequest,
           CompletionResponse, stream=True)
async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    model, runner = state.ready()
    body = state.config.sampling.fill(await read_body(request, CompletionRequest))
    steering = await request_steering(state, body)
    prepared = await state.run(completion_choices, model, runner, body, steering)
    prepared, readings = await prepare_readings(state, body, steering, prepared)
    generations = start_generations(model, runner, [c.spec for c in prepared])
    choices = [_CompletionChoice(model, c.echo, c.prompt, body.logprobs) for c in prepared]
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": model.name,
            "system_fingerprint": model.fingerprint}
    outcomes: dict[int, Outcome] = {}
    sse = SSE(request) if body.stream else None
    finish_chunk: dict | None = None  # held back: llama.cpp's timings go on the last chunk
    # NOTE: the chunk of a token with text only (no logprobs, readouts or timings), by far the
    # most common, is written from prebuilt bytes around its text
    frames = [FrameTemplate({**head, "choices": [{
        "index": i, "text": FrameTemplate.SLOT, "logprobs": None, "finish_reason": None}]})
        for i in range(len(choices))] if sse else []
    if sse:
        await sse.start()
        for i, c in enumerate(choices):
            if c.text and body.logprobs is None:  # echo: the prompt text comes first
                await sse.send({**head, "choices": [
                    {"index": i, "text": c.text, "logprobs": None, "finish_reason": None}]})
        if (len(generations) == 1 and body.logprobs is None and not body.timings_per_token
                and not readings[0].spec.active):
            generations[0].stream_directly(sse, partial(_text_frame, frames[0]))
    async for i, event in merged(generations, sse):
        choice = choices[i]
        if isinstance(event, PromptLogprobs):
            choice.add_prompt(event)
            if sse:
                await sse.send({**head, "choices": [{
                    "index": i, "text": choice.text, "logprobs": choice.logprobs_body(),
                    "finish_reason": None}]})
        elif isinstance(event, PromptReadings):
            readings[i].add_prompt(event)
        elif isinstance(event, Piece):
            fragment = choice.add(event)
            read = readings[i].add(event)
            if sse and event.text and not (fragment or read or body.timings_per_token):
                sse.send_frame(frames[i].frame(event.text))
            elif sse and (event.text or fragment):
                chunk = {**head, "choices": [{"index": i, "text": event.text,
                                              "logprobs": fragment, "finish_reason": None,
                                              **(read or {})}]}
                if body.timings_per_token:
                    chunk["timings"] = generations[i].timings()
                await sse.send(chunk)
        elif isinstance(event, Outcome):
            outcomes[i] = event
            if sse:
                if finish_chunk is not None:
                    await sse.send(finish_chunk)
                finish_chunk = {**head, "choices": [{"index": i, "text": "", "logprobs": None,
                                                     "finish_reason": event.finish_reason,
                                                     **readings[i].tail(event.decisions)}]}
    if sse and sse.failed:
        return sse.response
    prompt_tokens = sum(len(c.prompt_ids) for c in choices[::body.n])
    completion_tokens = sum(o.completion_tokens for o in outcomes.values())
    request[TOKENS] = completion_tokens
    usage = _usage(prompt_tokens, completion_tokens,
                   sum(outcomes[i].cached_tokens for i in range(0, len(choices), body.n)))
    timings = outcome_timings(outcomes[i] for i in range(len(choices)))
    if sse:
        await _finish_stream(sse, finish_chunk, body.stream_options, usage, timings)
        return await sse.close()
    return json_response({**head, "choices": [
        {"index": i, "text": c.text, "logprobs": c.logprobs_body(),
         "finish_reason": outcomes[i].finish_reason,
         **readings[i].body(outcomes[i].decisions)} for i, c in enumerate(choices)],
        "usage": usage, "timings": timings})


# /v1/chat/completions -------------------------------------------------------------------------


class _ChatChoice:
    """One chat choice's text, tool calls and logprobs. A token's logprob entry goes out with
    the chunk that carries its text: text held back (a partial UTF-8 character, the start of a
    stop string or of a tool call) keeps its tokens' entries pending until it is released, so
    every chunk with content has the logprobs of exactly the tokens it completes, and tokens
    whose text a stop string cut away are reported neither streamed nor whole.

    With tools, the text goes through the tool-call parser (server/tools.py): content comes out
    as content, and each call as OpenAI streams one: a delta with its index, id, type and name,
    then deltas with fragments of its arguments."""

    def __init__(self, model: Model, logprobs: bool, tools: ToolRequest | None = None) -> None:
        self.model = model
        self.logprobs = logprobs
        self.parts: list[str] = []  # NOTE: joined once at the end, not re-copied per token
        self.parser = None if tools is None else ToolCallParser(
            tools.format, tools.names, stream_arguments=tools.forced, parallel=tools.parallel)
        self.entries: list[dict] = []
        self.pending: list[dict] = []

    def add(self, piece: Piece) -> list[tuple[dict, list[dict]]]:
        """Record a piece; returns the deltas it releases, each with its logprob entries."""
        if self.logprobs and piece.token is not None:
            self.pending.append(token_logprobs(self.model.tokenizer, piece))
        if not piece.text:
            return []
        if self.parser is None:
            return self._deltas([ContentDelta(piece.text)])
        return self._deltas(self.parser.push(piece.text))

    def finish(self) -> list[tuple[dict, list[dict]]]:
        """The deltas of text the parser still held when the generation ended."""
        return [] if self.parser is None else self._deltas(self.parser.finish())

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def finish_reason(self, outcome: Outcome) -> str:
        calls = self.parser is not None and self.parser.calls
        return "tool_calls" if calls and outcome.finish_reason == "stop" \
            else outcome.finish_reason

    def message(self) -> dict:
        if self.parser is None or not self.parser.calls:
            return {"role": "assistant", "content": self.text}
        return {"role": "assistant", "content": self.text or None,
                "tool_calls": [c.as_openai() for c in self.parser.calls]}

    def _deltas(self, events: list[Event]) -> list[tuple[dict, list[dict]]]:
        out: list[tuple[dict, list[dict]]] = []
        for event in events:
            if isinstance(event, ContentDelta):
                self.parts.append(event.text)
                out.append(({"content": event.text}, []))
            elif isinstance(event, CallStart):
                out.append(({"tool_calls": [{
                    "index": event.index, "id": event.id, "type": "function",
                    "function": {"name": event.name, "arguments": ""}}]}, []))
            elif isinstance(event, ArgumentsDelta):
                out.append(({"tool_calls": [{
                    "index": event.index, "function": {"arguments": event.text}}]}, []))
        if out:
            entries, self.pending = self.pending, []
            self.entries += entries
            out[0] = (out[0][0], entries)
        return out


@operation("OpenAI chat completion (stream: server-sent events of ChatCompletionChunk)",
           ChatCompletionRequest, ChatCompletionResponse, stream=True)
async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    model, runner = state.ready()
    body = state.config.sampling.fill(await read_body(request, ChatCompletionRequest))
    steering = await request_steering(state, body)
    prepared = await state.run(chat_choices, model, runner, body, steering)
    prepared, readings = await prepare_readings(state, body, steering, prepared)
    generations = start_generations(model, runner, [c.spec for c in prepared])
    ids = prepared[0].prompt
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    head = {"id": rid, "created": int(time.time()), "model": model.name,
            "system_fingerprint": model.fingerprint}
    choices = [_ChatChoice(model, body.logprobs, c.tools) for c in prepared]
    outcomes: dict[int, Outcome] = {}
    sse = SSE(request) if body.stream else None
    chunk_head = {**head, "object": "chat.completion.chunk"}
    # NOTE: a content delta without logprobs, readouts or timings is written from prebuilt bytes
    plain = not body.logprobs and not body.timings_per_token
    frames = [FrameTemplate({**chunk_head, "choices": [{
        "index": i, "delta": {"content": FrameTemplate.SLOT}, "logprobs": None,
        "finish_reason": None}]}) for i in range(body.n)] if sse else []
    if sse:
        await sse.start()
        for i in range(body.n):
            await sse.send({**chunk_head, "choices": [{
                "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}]})
        if (len(generations) == 1 and plain and choices[0].parser is None
                and not readings[0].spec.active):
            generations[0].stream_directly(sse, partial(_text_frame, frames[0]))
    finish_chunk: dict | None = None  # held back: llama.cpp's timings go on the last chunk
    async for i, event in merged(generations, sse):
        if isinstance(event, PromptReadings):
            readings[i].add_prompt(event)
        elif isinstance(event, Piece | Outcome):
            deltas = choices[i].add(event) if isinstance(event, Piece) else choices[i].finish()
            read = readings[i].add(event) if isinstance(event, Piece) else None
            if read and not deltas:  # NOTE: text the tool parser holds back has readings too
                deltas = [({}, [])]
            for delta, entries in deltas:
                if sse is None:
                    break
                if plain and read is None and len(delta) == 1 and "content" in delta:
                    sse.send_frame(frames[i].frame(delta["content"]))
                    continue
                chunk = {**chunk_head, "choices": [{
                    "index": i, "delta": delta,
                    "logprobs": {"content": entries} if body.logprobs else None,
                    "finish_reason": None, **(read or {})}]}
                read = None
                if body.timings_per_token:
                    chunk["timings"] = generations[i].timings()
                await sse.send(chunk)
        if isinstance(event, Outcome):
            outcomes[i] = event
            if sse:
                if finish_chunk is not None:
                    await sse.send(finish_chunk)
                finish_chunk = {**chunk_head, "choices": [{
                    "index": i, "delta": {}, "logprobs": None,
                    "finish_reason": choices[i].finish_reason(event),
                    **readings[i].tail(event.decisions)}]}
    if sse and sse.failed:
        return sse.response
    completion_tokens = sum(o.completion_tokens for o in outcomes.values())
    request[TOKENS] = completion_tokens
    usage = _usage(len(ids), completion_tokens, outcomes[0].cached_tokens)
    timings = outcome_timings(outcomes[i] for i in range(body.n))
    if sse:
        await _finish_stream(sse, finish_chunk, body.stream_options, usage, timings)
        return await sse.close()
    return json_response({**head, "object": "chat.completion", "choices": [
        {"index": i, "message": c.message(),
         "logprobs": {"content": c.entries} if body.logprobs else None,
         "finish_reason": c.finish_reason(outcomes[i]),
         **readings[i].body(outcomes[i].decisions)} for i, c in enumerate(choices)],
        "usage": usage, "timings": timings})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/completions", completions)
    router.add_post("/v1/chat/completions", chat_completions)
    router.add_post("/chat/completions", chat_completions)
