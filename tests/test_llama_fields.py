"""llama-server's own fields, through the HTTP server: /apply-template, `timings` (also in chat
and per token), mixed prompts, `completion_probabilities` with and without
`post_sampling_probs` (against a numpy computation of the sampler's distribution), logprobs on
every streamed chat chunk (read with the official openai SDK), and the request fields that are
accepted, implemented or refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiller.server.app import ServerConfig, create_app
from tiller.server.generation import _llama_text

from tests.test_server import GOLDEN_TEXT, post, sse_events

# cache_n: prompt tokens reused from the prefix cache, not counted in prompt_n
TIMING_KEYS = {"cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
               "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second"}
ONCE = [1, 403, 407, 261, 378]  # BOS + "Once upon a time"
CHAT = [{"role": "user", "content": "Once"}]


@pytest.fixture(scope="module")
def config(shared_models: Path, tmp_path_factory) -> ServerConfig:
    return ServerConfig(model_path=shared_models / "stories260K.bin",
                        tokenizer_path=shared_models / "tok512.bin", parallel=4,
                        token_budget=64, steering_dir=tmp_path_factory.mktemp("steering"))


def check_timings(t: dict, prompt_n: int, predicted_n: int) -> None:
    assert set(t) == TIMING_KEYS
    assert t["prompt_n"] + t["cache_n"] == prompt_n and t["predicted_n"] == predicted_n
    for part in ("prompt", "predicted"):
        n, ms = t[f"{part}_n"], t[f"{part}_ms"]
        assert ms >= 0
        if n and ms:
            assert t[f"{part}_per_token_ms"] == pytest.approx(ms / n)
            assert t[f"{part}_per_second"] == pytest.approx(1000 * n / ms)


# /apply-template ---------------------------------------------------------------------------------

async def test_apply_template_renders_what_chat_continues(client, model):
    messages = [{"role": "system", "content": "Tell a story."}, *CHAT]
    body = await post(client, "/apply-template", {"messages": messages})
    assert body == {"prompt": model.chat_template.render(messages, add_generation_prompt=True)
                    .removeprefix(model.chat_template.bos_token or "")}
    assert body["prompt"].endswith("<|im_start|>assistant\n")  # ChatML: tok512 has no template
    bare = await post(client, "/apply-template", {"messages": messages,
                                                  "add_generation_prompt": False})
    assert body["prompt"].startswith(bare["prompt"]) and bare["prompt"] != body["prompt"]
    # the rendering sent to /completion is the chat request, token for token
    chat = await post(client, "/v1/chat/completions", {"messages": messages, "max_tokens": 10,
                                                       "temperature": 0})
    done = await post(client, "/completion", {"prompt": body["prompt"], "n_predict": 10,
                                              "temperature": 0})
    assert done["content"] == chat["choices"][0]["message"]["content"]
    assert done["tokens_evaluated"] == chat["usage"]["prompt_tokens"]
    error = (await post(client, "/apply-template", {"messages": []}, status=400))["error"]
    assert error["param"] == "messages"


# timings -----------------------------------------------------------------------------------------

async def test_completion_timings_whole_and_per_token(client):
    body = await post(client, "/completion", {"prompt": "Once upon a time", "n_predict": 8,
                                              "temperature": 0})
    check_timings(body["timings"], 5, 8)
    events = await sse_events(await client.post("/completion", json={
        "prompt": "Once upon a time", "n_predict": 8, "temperature": 0, "stream": True,
        "timings_per_token": True}))
    chunks, final = events[:-1], events[-1]
    assert chunks and all(c["stop"] is False for c in chunks) and final["stop"] is True
    done = [c["timings"]["predicted_n"] for c in chunks]
    assert done == sorted(done) and done[-1] <= 8
    for c in chunks:
        check_timings(c["timings"], 5, c["timings"]["predicted_n"])
        assert c["tokens_predicted"] == c["timings"]["predicted_n"]
    check_timings(final["timings"], 5, 8)
    plain = await sse_events(await client.post("/completion", json={
        "prompt": "Once", "n_predict": 3, "stream": True}))
    assert not any("timings" in c for c in plain[:-1]) and "timings" in plain[-1]


async def test_chat_timings_whole_last_chunk_and_per_token(client):
    request = {"messages": CHAT, "max_tokens": 6, "temperature": 0}
    whole = await post(client, "/v1/chat/completions", request)
    usage = whole["usage"]
    check_timings(whole["timings"], usage["prompt_tokens"], usage["completion_tokens"])
    events = await sse_events(await client.post("/v1/chat/completions",
                                                json={**request, "stream": True}))
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"][0]["finish_reason"] == "length"
    check_timings(last["timings"], usage["prompt_tokens"], usage["completion_tokens"])
    assert not any("timings" in e for e in events[:-2])
    # with usage, the usage chunk is last and carries them; per token, every content chunk too
    events = await sse_events(await client.post("/v1/chat/completions", json={
        **request, "stream": True, "stream_options": {"include_usage": True},
        "timings_per_token": True}))
    # (the same but for cached_tokens: the chat prompt has 2 full blocks, cached by now)
    assert events[-2]["usage"] | {"prompt_tokens_details": None} == \
        usage | {"prompt_tokens_details": None} and events[-2]["choices"] == []
    check_timings(events[-2]["timings"], usage["prompt_tokens"], usage["completion_tokens"])
    content = [e for e in events[1:-2] if e["choices"][0]["delta"].get("content")]
    assert content and all("timings" in e for e in content)
    assert "timings" not in events[-3]  # the finish chunk, no longer the last one


async def test_openai_completion_timings(client):
    request = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "n": 2}
    whole = await post(client, "/v1/completions", request)
    # two choices, each its own sequence: counts summed over them
    check_timings(whole["timings"], 10, whole["usage"]["completion_tokens"])
    events = await sse_events(await client.post("/v1/completions", json={
        **request, "stream": True, "timings_per_token": True}))
    text = [e for e in events[:-2] if e["choices"][0]["text"]]
    assert text and all(e["timings"]["prompt_n"] + e["timings"]["cache_n"] == 5 for e in text)
    # the second choice follows the first: all but the last prompt token come from its cache
    second = [e for e in text if e["choices"][0]["index"] == 1]
    assert second and all(e["timings"]["cache_n"] == 4 for e in second)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    check_timings(events[-2]["timings"], 10, 10)


# prompts of token ids and strings ---------------------------------------------------------------

@pytest.mark.parametrize("prompt,evaluated", [
    (["Once", 407, 261, 378], 5),         # a string first: BOS, as llama.cpp
    ([1, 403, "upon a time"], 5),         # later strings: no BOS of their own
    ([*ONCE[:2], "upon", 261, "time"], 5),
    ([403, 407, 261, 378], 4),            # ids first: as given, no BOS added
])
async def test_mixed_prompts_follow_llama_cpps_bos_rule(client, prompt, evaluated):
    body = await post(client, "/completion", {"prompt": prompt, "n_predict": 6,
                                              "temperature": 0})
    assert body["tokens_evaluated"] == evaluated
    if evaluated == 5:
        assert body["content"] == GOLDEN_TEXT[:len(body["content"])]


# completion_probabilities ------------------------------------------------------------------------

def numpy_post_sampling(top_logprobs: list[dict], top_k: int, top_p: float, min_p: float,
                        temperature: float) -> dict[int, float]:
    """llama.cpp's chain (top_k -> top_p -> min_p -> temperature) over the model's top
    log-probabilities, in numpy: enough when top_k is no more than the tokens listed."""
    ids = np.array([e["id"] for e in top_logprobs])
    lp = np.array([e["logprob"] for e in top_logprobs], np.float64)
    order = np.lexsort((ids, -lp))[:top_k]
    ids, lp = ids[order], lp[order]
    mass = np.cumsum(np.exp(lp - lp[0]))
    keep = int(np.argmax(mass >= top_p * mass[-1])) + 1
    ids, lp = ids[:keep], lp[:keep]
    within = lp - lp[0] >= np.log(min_p)
    ids, lp = ids[within], lp[within]
    w = np.exp((lp - lp[0]) / temperature)
    return dict(zip(ids.tolist(), (w / w.sum()).tolist(), strict=True))


async def test_n_probs_in_llama_cpps_shape(client, model):
    body = await post(client, "/completion", {"prompt": "Once upon a time", "n_predict": 6,
                                              "temperature": 0, "n_probs": 3})
    probs = body["completion_probabilities"]
    assert len(probs) == 6
    for entry in probs:
        assert set(entry) == {"id", "token", "bytes", "logprob", "top_logprobs"}
        assert bytes(entry["bytes"]) == model.tokenizer.piece_bytes(entry["id"])
        assert entry["token"] == bytes(entry["bytes"]).decode()
        top = entry["top_logprobs"]
        assert len(top) == 3 and all(set(t) == {"id", "token", "bytes", "logprob"} for t in top)
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["id"] == entry["id"] and top[0]["logprob"] == entry["logprob"]  # greedy
        assert np.exp([t["logprob"] for t in top]).sum() <= 1 + 1e-6
    assert "".join(e["token"] for e in probs) == body["content"]


@pytest.mark.parametrize("raw,text", [
    (b"\xc3", ""), (b"a\xe2\x82", "a"), (b"\xc3\xa1", "\u00e1"), (b"\xa1", "\ufffd"),
    (b"ab", "ab"), (b"\xf0\x9f\x98", ""), (b"\xf0\x9f\x98\x80", "\U0001f600"),
])
def test_token_text_cuts_an_incomplete_character_at_its_end(raw, text):
    assert _llama_text(raw) == text


async def test_post_sampling_probs_are_the_samplers_distribution(client):
    chain = {"top_k": 12, "top_p": 0.97, "min_p": 0.01, "temperature": 1.5}
    request = {"prompt": "Once upon a time", "n_predict": 12, "seed": 5, "n_probs": 20, **chain}
    raw = await post(client, "/completion", request)
    after = await post(client, "/completion", {**request, "post_sampling_probs": True})
    assert after["content"] == raw["content"]  # the same draws: only the report differs
    for model_probs, entry in zip(raw["completion_probabilities"],
                                  after["completion_probabilities"], strict=True):
        assert set(entry) == {"id", "token", "bytes", "prob", "top_probs"}
        assert entry["id"] == model_probs["id"]
        want = numpy_post_sampling(model_probs["top_logprobs"], **chain)
        got = {t["id"]: t["prob"] for t in entry["top_probs"]}
        assert list(got) == sorted(want, key=lambda t: (-want[t], t))
        for token, p in want.items():
            assert got[token] == pytest.approx(p, rel=1e-4, abs=1e-6)
        assert sum(got.values()) == pytest.approx(1.0)
        assert entry["prob"] == pytest.approx(want[entry["id"]], rel=1e-4, abs=1e-6)
    assert max(len(e["top_probs"]) for e in after["completion_probabilities"]) >= 5
    # streamed: the same entries, one chunk each
    events = await sse_events(await client.post("/completion", json={
        **request, "post_sampling_probs": True, "stream": True}))
    streamed = [e for c in events[:-1] for e in c.get("completion_probabilities", [])]
    assert streamed == after["completion_probabilities"]
    # greedy: the argmax alone, with probability 1
    greedy = await post(client, "/completion", {**request, "temperature": 0,
                                                "post_sampling_probs": True})
    for entry in greedy["completion_probabilities"]:
        assert entry["prob"] == 1.0
        assert [(t["id"], t["prob"]) for t in entry["top_probs"]] == [(entry["id"], 1.0)]


# logprobs on every streamed chat chunk (the openai SDK) -----------------------------------------

async def test_every_streamed_chat_chunk_with_content_has_its_logprobs(aiohttp_server, config,
                                                                       model):
    openai = pytest.importorskip("openai")
    server = await aiohttp_server(create_app(config, model=model))
    client = openai.AsyncOpenAI(base_url=f"http://{server.host}:{server.port}/v1",
                                api_key="unused")
    request = {"model": "stories260K.bin", "messages": CHAT, "max_tokens": 24,
               "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = await client.chat.completions.create(**request)
    text = whole.choices[0].message.content
    words = text.split()
    # a stop string whose start shows up in the text, so that text is held back, then released
    # with a later token's: chunks that complete several tokens
    stop = f"{words[1]} {words[2]} zzz"
    whole = await client.chat.completions.create(**request, stop=[stop])
    assert whole.choices[0].message.content == text
    want = whole.choices[0].logprobs.content
    stream = await client.chat.completions.create(**request, stop=[stop], stream=True,
                                                  extra_body={"timings_per_token": True})
    entries, several = [], False
    async for chunk in stream:
        if not chunk.choices or not chunk.choices[0].delta.content:
            continue
        got = chunk.choices[0].logprobs.content
        assert got and "".join(e.token for e in got) == chunk.choices[0].delta.content
        assert all(len(e.top_logprobs) == 2 for e in got)
        assert chunk.model_extra["timings"]["predicted_n"] >= len(entries) + len(got)
        several |= len(got) > 1
        entries += got
    assert several
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in want]
    assert "".join(e.token for e in entries) == text
    await client.close()


# request fields: accepted, implemented, refused -------------------------------------------------

async def test_return_tokens_id_slot_and_cache_prompt(client, model):
    request = {"prompt": "Once upon a time", "n_predict": 6, "temperature": 0}
    plain = await post(client, "/completion", request)
    assert plain["tokens"] == []  # as llama.cpp: only with return_tokens (or streamed)
    body = await post(client, "/completion", {**request, "return_tokens": True, "id_slot": 3,
                                              "cache_prompt": False})
    assert model.tokenizer.decode([*ONCE, *body["tokens"]]).endswith(body["content"])
    assert len(body["tokens"]) == 6 and body["content"] == plain["content"]
    assert body["id_slot"] == 3
    error = (await post(client, "/completion", {**request, "id_slot": 4}, status=400))["error"]
    assert error["param"] == "id_slot" and "0..3" in error["message"]


async def test_samplers_choose_the_chain(client):
    request = {"prompt": "Once upon a time", "n_predict": 16, "seed": 9, "temperature": 1.3,
               "top_k": 5, "top_p": 0.6, "min_p": 0.2}
    full = await post(client, "/completion", request)
    for samplers in (["penalties", "dry", "top_k", "typ_p", "top_p", "min_p", "xtc",
                      "temperature"], "edkypmxt"):
        same = await post(client, "/completion", {**request, "samplers": samplers})
        assert same["content"] == full["content"]
    only = await post(client, "/completion", {**request, "samplers": ["top_k", "temperature"]})
    off = await post(client, "/completion", {**request, "top_p": 1.0, "min_p": 0.0})
    assert only["content"] == off["content"] != full["content"]
    assert only["generation_settings"]["samplers"] == ["top_k", "temperature"]


async def test_repeat_penalty_and_window_on_the_openai_routes(client):
    # llama.cpp's names mean on /v1/completions what they mean on /completion
    same = {"prompt": "Once upon a time", "seed": 5, "temperature": 1.0, "top_k": 0,
            "top_p": 1.0, "min_p": 0.0}
    for penalty in ({"repeat_penalty": 1.8, "repeat_last_n": 8}, {"repeat_penalty": 1.8}):
        native = await post(client, "/completion", {**same, "n_predict": 24,
                                                    "repeat_last_n": -1, **penalty})
        openai = await post(client, "/v1/completions", {**same, "max_tokens": 24, **penalty})
        assert openai["choices"][0]["text"] == native["content"]
    plain = await post(client, "/v1/completions", {**same, "max_tokens": 24})
    assert plain["choices"][0]["text"] != openai["choices"][0]["text"]
    # the alias is repetition_penalty, and a window of 0 turns the penalties off
    chat = {"messages": CHAT, "max_tokens": 16, "seed": 2}
    alias = await post(client, "/v1/chat/completions", {**chat, "repeat_penalty": 1.8})
    named = await post(client, "/v1/chat/completions", {**chat, "repetition_penalty": 1.8})
    off = await post(client, "/v1/chat/completions", {**chat, "repeat_penalty": 1.8,
                                                      "repeat_last_n": 0})
    free = await post(client, "/v1/chat/completions", chat)
    assert alias["choices"] == named["choices"]
    assert off["choices"][0]["message"] == free["choices"][0]["message"]
    assert alias["choices"][0]["message"] != free["choices"][0]["message"]


async def test_samplers_and_off_fields_in_chat(client):
    request = {"messages": CHAT, "max_tokens": 12, "seed": 4, "temperature": 1.2, "top_k": 6,
               "top_p": 0.5}
    only = await post(client, "/v1/chat/completions", {**request, "samplers": "kt",
                                                       "typical_p": 1, "dry_multiplier": 0})
    off = await post(client, "/v1/chat/completions", {**request, "top_p": 1.0})
    full = await post(client, "/v1/chat/completions", request)
    assert only["choices"][0]["message"] == off["choices"][0]["message"] != \
        full["choices"][0]["message"]
    error = (await post(client, "/v1/chat/completions", {**request, "typical_p": 0.5},
                        status=400))["error"]
    assert error["param"] == "typical_p"


@pytest.mark.parametrize("fields,param,fragment", [
    ({"samplers": ["temperature", "top_k"]}, "samplers", "in the order"),
    ({"samplers": ["top_k", "top_k"]}, "samplers", "once each"),
    ({"samplers": ["mirostat"]}, "samplers", "unknown sampler"),
    ({"samplers": "kq"}, "samplers", "unknown sampler"),
    ({"typical_p": 0.9}, "typical_p", "not supported"),
    ({"dry_multiplier": 0.8}, "dry_multiplier", "not supported"),
    ({"xtc_probability": 0.5}, "xtc_probability", "not supported"),
    ({"mirostat": 2}, "mirostat", "not supported"),
    ({"n_cmpl": 2}, "n_cmpl", "not supported"),
    ({"lora": [{"id": 0, "scale": 1.0}]}, "lora", "not supported"),
    ({"response_fields": ["content"]}, "response_fields", "not supported"),
    ({"return_progress": True}, "return_progress", "not supported"),
    ({"post_sampling_probs": 1}, "post_sampling_probs", "boolean"),
])
async def test_fields_that_would_be_silently_wrong_are_refused(client, fields, param, fragment):
    error = (await post(client, "/completion", {"prompt": "Once", "n_predict": 2, **fields},
                        status=400))["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert error["type"] == "invalid_request_error"


async def test_the_off_values_clients_send_are_accepted(client):
    # what llama.cpp's web UI sends with every request
    body = await post(client, "/completion", {
        "prompt": "Once upon a time", "n_predict": 4, "temperature": 0, "typical_p": 1.0,
        "dynatemp_range": 0.0, "dynatemp_exponent": 1.0, "dry_multiplier": 0.0,
        "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": -1,
        "xtc_probability": 0.0, "xtc_threshold": 0.1, "top_n_sigma": -1, "mirostat": 0,
        "min_keep": 0, "n_keep": 0, "cache_prompt": True, "timings_per_token": False,
        "samplers": "edkypmxt"})
    assert body["content"] == GOLDEN_TEXT[:len(body["content"])]


async def test_openapi_lists_the_route_and_fields(client):
    spec = await (await client.get("/openapi.json")).json()
    assert "/apply-template" in spec["paths"]
    schemas = spec["components"]["schemas"]
    llama = schemas["LlamaCompletionRequest"]["properties"]
    for name in ("post_sampling_probs", "timings_per_token", "return_tokens", "id_slot",
                 "samplers", "cache_prompt"):
        assert name in llama, name
    assert "timings_per_token" in schemas["ChatCompletionRequest"]["properties"]
    assert "timings" in schemas["ChatCompletionResponse"]["properties"]
    assert {"prob", "top_probs", "top_logprobs"} <= set(schemas["LlamaTokenProbs"]["properties"])
