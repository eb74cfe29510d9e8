"""llama.cpp-compatible routes: /completion, /tokenize, /detokenize, /apply-template, /props,
/slots."""

from __future__ import annotations

from functools import partial

from aiohttp import web

from .. import __version__
from .errors import ApiError
from .generation import (
    Generation,
    Outcome,
    Piece,
    llama_probs,
    merged,
    outcome_timings,
    start_generations,
)
from .http import SSE, FrameTemplate, encode_json, json_bytes, json_response, read_body
from .openapi import operation
from .prepare import llama_choice, render_chat
from .protocol import (
    ApplyTemplateRequest,
    ApplyTemplateResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    LlamaCompletionRequest,
    LlamaCompletionResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from .readings import prepare_readings
from .runner import PromptReadings
from .state import STATE, TOKENS, Model
from .steering_service import request_steering


def _token_frame(frame: FrameTemplate, generation: Generation, piece: Piece) -> bytes | None:
    """A token's chunk when it carries text only (Generation.stream_directly's `render`)."""
    if not piece.text or piece.token is None:
        return None
    return frame.frame(piece.text, piece.token, generation.n_tokens)


@operation("llama.cpp completion", LlamaCompletionRequest, LlamaCompletionResponse,
           stream=True)
async def completion(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    model, runner = state.ready()
    body = state.config.sampling.fill(await read_body(request, LlamaCompletionRequest))
    if body.id_slot >= state.config.parallel:
        raise ApiError(400, f"id_slot: {body.id_slot} is no slot of this server (0.."
                       f"{state.config.parallel - 1}, or -1 for any)", param="id_slot")
    steering = await request_steering(state, body)
    choice = await state.run(llama_choice, model, runner, body, steering)
    (choice,), (readings,) = await prepare_readings(state, body, steering, [choice])
    (generation,) = start_generations(model, runner, [choice.spec])
    ids, n_new = choice.prompt, choice.spec[0].max_tokens
    sse = SSE(request) if body.stream else None
    # NOTE: a token's chunk without probabilities, readouts or timings (the common one) is
    # written from prebuilt bytes around its text, token id and count
    frame = FrameTemplate({
        "content": FrameTemplate.SLOT, "tokens": [FrameTemplate.SLOT], "stop": False,
        "id_slot": max(body.id_slot, 0), "tokens_predicted": FrameTemplate.SLOT,
        "tokens_evaluated": len(ids)}, slots=3)
    plain = not body.n_probs and not body.timings_per_token
    if sse:
        await sse.start()
        if plain and not readings.spec.active:
            generation.stream_directly(sse, partial(_token_frame, frame, generation))
    parts: list[str] = []  # the text, joined once at the end
    tokens, probs = [], []
    outcome: Outcome | None = None
    async for _, event in merged([generation], sse):
        if isinstance(event, PromptReadings):
            readings.add_prompt(event)
        elif isinstance(event, Piece):
            read = readings.add(event)
            parts.append(event.text)
            if event.token is not None:
                tokens.append(event.token)
            entry = None
            if body.n_probs and event.token is not None:
                entry = llama_probs(model.tokenizer, event, body.post_sampling_probs)
                probs.append(entry)
            if sse and plain and event.text and event.token is not None and not read:
                sse.send_frame(frame.frame(event.text, event.token, generation.n_tokens))
            elif sse and (event.text or entry):
                chunk: dict = {"content": event.text, "tokens": [] if event.token is None
                               else [event.token], "stop": False, "id_slot": max(body.id_slot, 0),
                               "tokens_predicted": generation.n_tokens,
                               "tokens_evaluated": len(ids)}
                if entry:
                    chunk["completion_probabilities"] = [entry]
                chunk.update(read or {})
                if body.timings_per_token:
                    chunk["timings"] = generation.timings()
                await sse.send(chunk)
        elif isinstance(event, Outcome):
            outcome = event
    if sse and sse.failed:
        return sse.response
    assert outcome is not None
    content = "".join(parts)
    request[TOKENS] = outcome.completion_tokens
    final = {"content": "" if sse else content,
             "tokens": tokens if body.return_tokens and not sse else [],
             "id_slot": max(body.id_slot, 0), "stop": True, "model": model.name,
             "tokens_predicted": outcome.completion_tokens, "tokens_evaluated": len(ids),
             "generation_settings": _settings(body, n_new, outcome.seed),
             "prompt": model.tokenizer.decode(ids), "has_new_line": "\n" in outcome.text,
             "truncated": False, "stop_type": outcome.stop_type,
             # NOTE: from the generation, not from the pieces seen here: a stream's pieces may
             # have been written on the engine thread (stream_directly)
             "stopping_word": outcome.stopping_word,
             "tokens_cached": len(ids) + generation.n_tokens - generation.eos,
             "timings": outcome_timings([outcome])}
    if body.n_probs and not sse:
        final["completion_probabilities"] = probs
    final.update(readings.tail(outcome.decisions) if sse else readings.body(outcome.decisions))
    if sse:
        await sse.send(final)
        return await sse.close()
    return json_response(final)


def _settings(body: LlamaCompletionRequest, n_predict: int, seed: int) -> dict:
    return {"n_predict": n_predict, "seed": seed, "temperature": body.temperature,
            "top_k": body.top_k, "top_p": body.top_p, "min_p": body.min_p,
            "repeat_penalty": body.repeat_penalty, "repeat_last_n": body.repeat_last_n,
            "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty, "stop": body.stop,
            "n_probs": body.n_probs, "ignore_eos": body.ignore_eos,
            "post_sampling_probs": body.post_sampling_probs,
            "timings_per_token": body.timings_per_token, "samplers": list(body.chain())}


@operation("llama.cpp apply-template: the chat template's rendering of a conversation",
           ApplyTemplateRequest, ApplyTemplateResponse)
async def apply_template(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model, _ = state.ready()
    body = await read_body(request, ApplyTemplateRequest)
    prompt = await state.run(render_chat, model, body, body.add_generation_prompt)
    return json_response({"prompt": prompt})


def _tokens(model: Model, body: TokenizeRequest) -> bytes:
    """/tokenize's body (on the worker pool: megabytes of text take seconds)."""
    tok = model.tokenizer
    ids = tok.encode(body.content, bos=body.add_special, special=body.parse_special)
    if not body.with_pieces:
        return encode_json({"tokens": ids})
    pieces = []
    for i in ids:
        raw = tok.piece_bytes(i) if i != tok.bos_id else tok.piece(i).encode()
        try:
            piece: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)  # llama.cpp sends bytes of a partial character as a list
        pieces.append({"id": i, "piece": piece})
    return encode_json({"tokens": pieces})


@operation("llama.cpp tokenize", TokenizeRequest, TokenizeResponse)
async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model, _ = state.ready()
    body = await read_body(request, TokenizeRequest)
    return json_bytes(await state.run(_tokens, model, body))


def _text(model: Model, tokens: list[int]) -> bytes:
    vocab = model.tokenizer.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"tokens: id {bad[0]} outside 0..{vocab - 1}", param="tokens")
    return encode_json({"content": model.tokenizer.decode(tokens)})


@operation("llama.cpp detokenize", DetokenizeRequest, DetokenizeResponse)
async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model, _ = state.ready()
    body = await read_body(request, DetokenizeRequest)
    return json_bytes(await state.run(_text, model, body.tokens))


@operation("llama.cpp server properties")
async def props(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model, runner = state.ready()
    c = model.engine.config
    settings = state.config.sampling.report()
    return web.json_response({
        # flat as older llama-servers report them, and under "params" as newer ones do
        "default_generation_settings": {"n_ctx": runner.context_limit(), **settings,
                                        "params": settings},
        "total_slots": state.config.parallel,
        "model_path": str(state.config.model_path),
        "model_alias": model.name,
        "model_key": model.key,
        "model_uuid": model.uuid,
        "system_fingerprint": model.fingerprint,
        "chat_template": model.chat_template.source,
        "bos_token": model.tokenizer.piece(model.tokenizer.bos_id),
        "eos_token": model.tokenizer.piece(model.tokenizer.eos_id),
        "build_info": f"tiller {__version__}",
        "modalities": {"vision": False, "audio": False},
        "model": {"n_ctx_train": c.max_seq_len, "n_embd": c.dim, "n_layer": c.n_layers,
                  "n_head": c.n_heads, "n_head_kv": c.n_kv_heads, "n_vocab": c.vocab_size,
                  "dtype": model.engine.dtype},
    })


@operation("llama.cpp slot states")
async def slots(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _, runner = state.ready()
    snap = runner.snapshot()
    out = []
    running = snap["running"]
    for i in range(state.config.parallel):
        busy = i < len(running)
        rid, n_prompt, n_out, computed = running[i] if busy else ("", 0, 0, 0)
        out.append({"id": i, "is_processing": busy, "id_task": rid, "n_ctx":
                    runner.context_limit(), "n_prompt_tokens": n_prompt, "n_decoded": n_out,
                    "n_past": computed})
    return web.json_response(out, headers={
        "X-Queue-Waiting": str(snap["waiting"]),
        "X-KV-Blocks-Used": str(snap["kv_blocks_used"])})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/completion", completion)
    router.add_post("/completions", completion)
    router.add_post("/tokenize", tokenize)
    router.add_post("/detokenize", detokenize)
    router.add_post("/apply-template", apply_template)
    router.add_get("/props", props)
    router.add_get("/slots", slots)
