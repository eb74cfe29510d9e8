"""llama-server's server-wide settings in process: CORS (--cors-origin), sampling defaults
(--temp ... -n) and start-up control vectors (--control-vector), through aiohttp's client."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tiller.engine.cvec import (
    ControlVector,
    ControlVectorError,
    load_control_vectors,
    write_control_vector,
)
from tiller.server.app import ServerConfig, create_app, load_model
from tiller.server.cors import normalize_origins
from tiller.server.defaults import SamplingDefaults
from tiller.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LlamaCompletionRequest,
)
from tiller.server.state import startup_steering

from tests.test_server import GOLDEN_TEXT, make_client, sse_events

APP = "http://app.example:3000"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def config(shared_models: Path, tmp_path_factory) -> ServerConfig:
    return ServerConfig(model_path=shared_models / "stories260K.bin",
                        tokenizer_path=shared_models / "tok512.bin", parallel=4,
                        token_budget=64, steering_dir=tmp_path_factory.mktemp("steering"))


@pytest.fixture(scope="module")
def model(config):
    return load_model(config)


def preflight(origin: str, headers: str = "authorization, content-type") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": headers}


# CORS ------------------------------------------------------------------------------------------

async def test_without_cors_origins_there_is_no_cors(aiohttp_client, config, model):
    client = await make_client(aiohttp_client, config, model)
    response = await client.options("/v1/chat/completions", headers=preflight(APP))
    assert response.status == 405  # the router's answer: no preflight handling at all
    assert "Access-Control-Allow-Origin" not in response.headers
    response = await client.get("/health", headers={"Origin": APP})
    assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers


async def test_preflight_from_an_allowed_origin_needs_no_api_key(aiohttp_client, config, model):
    client = await make_client(aiohttp_client, config, model, cors_origins=(APP,),
                               api_keys=("k",))
    response = await client.options("/v1/chat/completions", headers=preflight(
        APP, "Authorization, Content-Type, x-stainless-os"))
    assert response.status == 204, await response.text()
    h = response.headers
    assert h["Access-Control-Allow-Origin"] == APP
    assert {"GET", "POST", "DELETE"} <= {m.strip() for m in
                                          h["Access-Control-Allow-Methods"].split(",")}
    allowed = {x.strip().lower() for x in h["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-stainless-os"} <= allowed
    assert int(h["Access-Control-Max-Age"]) > 0
    assert "Origin" in h["Vary"]
    assert "Access-Control-Allow-Credentials" not in h
    # a preflight of a path that only takes GET, or of no route at all, is answered the same
    assert (await client.options("/props", headers=preflight(APP))).status == 204


async def test_preflight_from_another_origin_is_refused(aiohttp_client, config, model):
    client = await make_client(aiohttp_client, config, model, cors_origins=(APP,))
    for origin in ("http://evil.example", "http://app.example:3001", "https://app.example:3000"):
        response = await client.options("/v1/completions", headers=preflight(origin))
        assert response.status == 403
        assert not any(k.startswith("Access-Control-Allow") for k in response.headers)
        error = (await response.json())["error"]
        assert error["code"] == "cors_origin_not_allowed" and origin in error["message"]


async def test_cors_headers_on_successes_errors_and_streams(aiohttp_client, config, model):
    client = await make_client(aiohttp_client, config, model, cors_origins=(APP,),
                               api_keys=("k",))
    auth = {"Origin": APP, "Authorization": "Bearer k"}
    cases = [
        (await client.get("/health", headers={"Origin": APP}), 200),  # public
        (await client.get("/props", headers={"Origin": APP}), 401),  # no key
        (await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": -1},
                           headers=auth), 400),
        (await client.get("/no/such/path", headers=auth), 404),
        (await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                           headers=auth), 200),
    ]
    for response, status in cases:
        assert response.status == status, await response.text()
        assert response.headers["Access-Control-Allow-Origin"] == APP, response.url
        assert "Origin" in response.headers["Vary"]
    # a page may read Retry-After and the like
    assert "Retry-After" in cases[-1][0].headers["Access-Control-Expose-Headers"]
    stream = await client.post("/v1/completions", headers=auth, json={
        "prompt": PROMPT, "max_tokens": 3, "stream": True})
    assert stream.headers["Access-Control-Allow-Origin"] == APP
    events = await sse_events(stream)
    assert events[-1] == "[DONE]" and len(events) > 2
    # the same requests from an origin not allowed are served, without CORS headers
    other = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                              headers={**auth, "Origin": "http://evil.example"})
    assert other.status == 200 and "Access-Control-Allow-Origin" not in other.headers


async def test_cors_on_a_server_error(aiohttp_client, config, tmp_path):
    """A 503 from the error middleware (the model failed to load) carries the headers too."""
    cfg = replace(config, model_path=tmp_path / "missing.bin", cors_origins=("*",))
    client = await aiohttp_client(create_app(cfg))
    response = await client.get("/health", headers={"Origin": "http://any.example"})
    assert response.status == 503
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert (await response.json())["error"]["type"] == "unavailable_error"


async def test_any_origin_with_a_star(aiohttp_client, config, model):
    client = await make_client(aiohttp_client, config, model, cors_origins=("*",))
    response = await client.options("/completion", headers=preflight("null"))
    assert response.status == 204 and response.headers["Access-Control-Allow-Origin"] == "*"
    response = await client.get("/health", headers={"Origin": "https://x.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    # a request without Origin (curl, a server) is no CORS request
    assert "Access-Control-Allow-Origin" not in (await client.get("/health")).headers


def test_cors_origins_are_normalized_and_checked():
    assert normalize_origins(["HTTP://App.Example:3000/", "*", "http://app.example:3000"]) == (
        "http://app.example:3000", "*")
    for bad in ("app.example", "http://", "localhost:3000", "http://a.example/path"):
        with pytest.raises(ValueError, match="--cors-origin"):
            normalize_origins([bad])


# sampling defaults -----------------------------------------------------------------------------

def test_defaults_fill_only_omitted_fields():
    d = SamplingDefaults.from_flags(0.3, 7, 0.5, 0.1, 42, 1.2, 20)
    c = d.fill(CompletionRequest.model_validate({"prompt": "x", "temperature": 1.0}))
    assert (c.temperature, c.top_k, c.top_p, c.min_p, c.seed, c.repetition_penalty) == (
        1.0, 7, 0.5, 0.1, 42, 1.2)  # 1.0 was given: OpenAI's default value, but given
    assert c.max_tokens == 20
    assert d.fill(CompletionRequest.model_validate({"prompt": "x", "max_tokens": 50})
                  ).max_tokens == 20  # -n is a ceiling, as in llama-server
    assert d.fill(CompletionRequest.model_validate({"prompt": "x", "max_tokens": 5})
                  ).max_tokens == 5
    chat = d.fill(ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 99}))
    assert chat.max_completion_tokens == 20 and chat.temperature == 0.3
    llama = d.fill(LlamaCompletionRequest.model_validate({"prompt": "x", "n_predict": -1,
                                                          "seed": 3}))
    assert (llama.n_predict, llama.seed, llama.repeat_penalty, llama.top_k) == (20, 3, 1.2, 7)
    # no flags: the endpoints' own defaults, untouched
    none = SamplingDefaults.from_flags(None, None, None, None, -1, None, -1)
    assert none == SamplingDefaults()
    body = LlamaCompletionRequest.model_validate({"prompt": "x"})
    assert none.fill(body) is body and body.temperature == 0.8 and body.n_predict == -1


@pytest.mark.parametrize("kwargs,flag", [
    ({"temperature": -0.5}, "--temp"), ({"top_p": 0.0}, "--top-p"), ({"min_p": 2.0}, "--min-p"),
    ({"top_k": -1}, "--top-k"), ({"repeat_penalty": 0.0}, "--repeat-penalty"),
    ({"temperature": float("nan")}, "--temp"),
])
def test_defaults_out_of_range_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        SamplingDefaults(**kwargs)
    with pytest.raises(ValueError, match="--seed"):
        SamplingDefaults.from_flags(None, None, None, None, -2, None, None)


async def test_server_defaults_apply_to_all_three_endpoints(aiohttp_client, config, model):
    sampling = SamplingDefaults.from_flags(0.0, None, None, None, None, None, 8)
    client = await make_client(aiohttp_client, config, model, sampling=sampling)
    # OpenAI's defaults would be temperature 1 and 16 tokens: the server's are greedy and 8
    body = await (await client.post("/v1/completions", json={"prompt": PROMPT})).json()
    greedy = body["choices"][0]["text"]
    assert GOLDEN_TEXT.startswith(greedy) and body["usage"]["completion_tokens"] == 8
    chat = await (await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}]})).json()
    assert chat["usage"]["completion_tokens"] <= 8
    llama = await (await client.post("/completion", json={"prompt": PROMPT})).json()
    assert llama["content"] == greedy and llama["tokens_predicted"] == 8
    settings = llama["generation_settings"]
    assert settings["temperature"] == 0.0 and settings["top_k"] == 40  # llama.cpp's, unset
    # a request's own fields win
    own = await (await client.post("/completion", json={
        "prompt": PROMPT, "temperature": 1.5, "seed": 5, "n_predict": 3})).json()
    assert own["generation_settings"]["temperature"] == 1.5 and own["tokens_predicted"] == 3
    props = await (await client.get("/props")).json()
    d = props["default_generation_settings"]
    assert (d["temperature"], d["n_predict"], d["top_k"], d["top_p"], d["min_p"]) == (
        0.0, 8, 40, 0.95, 0.05)
    assert d["params"]["temperature"] == 0.0 and d["n_ctx"] > 0


async def test_props_without_flags_reports_llama_cpp_defaults(aiohttp_client, config, model):
    client = await make_client(aiohttp_client, config, model)
    d = (await (await client.get("/props")).json())["default_generation_settings"]
    assert (d["temperature"], d["top_k"], d["top_p"], d["min_p"], d["seed"], d["n_predict"],
            d["repeat_penalty"]) == (0.8, 40, 0.95, 0.05, -1, -1, 1.0)


# start-up control vectors ---------------------------------------------------------------------

def write_cv(path: Path, directions: dict[int, np.ndarray], n_layers: int) -> Path:
    write_control_vector(path, ControlVector(directions), n_layers)
    return path


def test_control_vectors_are_scaled_summed_and_limited_to_the_layer_range(tmp_path):
    dim, n = 8, 5
    a = write_cv(tmp_path / "a.gguf", {k: np.full(dim, k, np.float32) for k in (2, 3, 4, 5)}, n)
    b = write_cv(tmp_path / "b.gguf", {3: np.ones(dim, np.float32)}, n)
    total = load_control_vectors([(a, 1.0), (b, -2.0)], dim, n)
    assert sorted(total) == [2, 3, 4, 5]
    np.testing.assert_array_equal(total[3], np.full(dim, 3 - 2.0))
    # llama.cpp layers 2..3 are direction.2 and direction.3: tiller layers 3 and 4
    ranged = load_control_vectors([(a, 0.5)], dim, n, (2, 3))
    assert sorted(ranged) == [3, 4]
    np.testing.assert_array_equal(ranged[4], np.full(dim, 2.0))
    with pytest.raises(ControlVectorError, match=str(a)):
        load_control_vectors([(a, 1.0)], dim + 1, n)  # made for another width


async def test_startup_control_vector_applies_unless_the_request_steers(
        aiohttp_client, config, model, tmp_path):
    c = model.engine.config
    rng = np.random.default_rng(0)
    directions = {layer: (rng.standard_normal(c.dim) * 4).astype(np.float32)
                  for layer in range(2, c.n_layers + 1)}
    path = write_cv(tmp_path / "cv.gguf", directions, c.n_layers)
    cfg = replace(config, control_vectors=((path, 0.8),))
    steered_model = replace(model, default_steering=startup_steering(cfg, model.engine))
    client = await aiohttp_client(create_app(cfg, model=steered_model))
    body = {"prompt": PROMPT, "n_predict": 12, "temperature": 0}

    async def content(extra: dict) -> str:
        response = await client.post("/completion", json={**body, **extra})
        payload = await response.json()
        assert response.status == 200, payload
        return str(payload["content"])

    default, off = await content({}), await content({"steering": []})
    assert default != off  # the start-up vector steers a request that says nothing
    plain = await make_client(aiohttp_client, config, model)
    unsteered = await (await plain.post("/completion", json=body)).json()
    assert off == unsteered["content"]  # "steering": [] turns it off
    # a request's own steering replaces it: the same file imported, at the same scale, steers
    # exactly as the default did
    imported = await (await client.post("/v1/steering/import", data=path.read_bytes())).json()
    own = await content({"steering": [{"vector": imported["id"], "scale": 0.8}]})
    assert own == default
    # OpenAI endpoints follow the same rule
    v1 = await (await client.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 12, "temperature": 0})).json()
    assert v1["choices"][0]["text"] == default


# --chat-template -------------------------------------------------------------------------------

# llama.cpp's tests/test-chat-template.cpp conversation, and what llm_chat_apply_template writes
# for the built-in names (BOS excluded: the tokenizer adds it)
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]
EXPECTED = {
    "llama2": "[INST] You are a helpful assistant\nHello [/INST]Hi there</s>[INST] Who are you "
              "[/INST]   I am an assistant   </s>[INST] Another question [/INST]",
    "llama2-sys": "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi "
                  "there</s>[INST] Who are you [/INST]   I am an assistant   </s>[INST] "
                  "Another question [/INST]",
    "chatml": "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
              "Hello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\n"
              "Who are you<|im_end|>\n<|im_start|>assistant\n   I am an assistant   <|im_end|>\n"
              "<|im_start|>user\nAnother question<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>"
              "assistant<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nWho are you<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\nI am an assistant<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nAnother question<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\n",
    "gemma": "<start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n"
             "<start_of_turn>model\nHi there<end_of_turn>\n<start_of_turn>user\nWho are you"
             "<end_of_turn>\n<start_of_turn>model\nI am an assistant<end_of_turn>\n"
             "<start_of_turn>user\nAnother question<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n"
            "<|assistant|>\nHi there<|end|>\n<|user|>\nWho are you<|end|>\n<|assistant|>\n"
            "   I am an assistant   <|end|>\n<|user|>\nAnother question<|end|>\n<|assistant|>\n",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_chat_templates_render_as_llama_cpp(name):
    from tiller.server.chat import ChatTemplate, template_source

    template = ChatTemplate(template_source(name), "<s>", "</s>")
    assert template.render([dict(m) for m in CONVERSATION]) == EXPECTED[name]


async def test_chat_template_flag_replaces_the_models(aiohttp_client, config, model):
    from tiller.server.chat import template_source
    cfg = replace(config, chat_template=template_source("llama2"))
    client = await aiohttp_client(create_app(cfg, model=load_model(cfg)))
    props = await (await client.get("/props")).json()
    assert props["chat_template"] == template_source("llama2")
    with pytest.raises(ValueError, match="not a built-in template"):
        template_source("mistral-v9")
