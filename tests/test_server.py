"""The HTTP server in process, through aiohttp's test client and the official openai SDK."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from tiller.server.app import ServerConfig, create_app, load_model

from tests.test_real_model import GOLDEN

GOLDEN_TEXT = ", there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def config(shared_models: Path, tmp_path_factory) -> ServerConfig:
    return ServerConfig(model_path=shared_models / "stories260K.bin",
                        tokenizer_path=shared_models / "tok512.bin", parallel=8,
                        token_budget=64, steering_dir=tmp_path_factory.mktemp("steering"))


def make_client(aiohttp_client, config, model, **changes):
    fields = {**config.__dict__, **changes}
    return aiohttp_client(create_app(ServerConfig(**fields), model=model))


async def sse_events(response) -> list:
    """The data payloads of a server-sent event stream, JSON-decoded ('[DONE]' kept as is)."""
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = []
    async for line in response.content:
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def post(client, path: str, body: dict, status: int = 200) -> dict:
    response = await client.post(path, json=body)
    payload = await response.json()
    assert response.status == status, payload
    return payload


# generation --------------------------------------------------------------------------------------

async def test_health_models_and_props(client, model):
    assert (await client.get("/health")).status == 200
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "stories260K.bin"
    assert models["data"][0]["meta"]["key"] == model.key and len(model.key) == 64
    props = await (await client.get("/props")).json()
    assert props["total_slots"] == 8 and props["model_key"] == model.key


async def test_greedy_completion_is_the_golden_story(client, model):
    body = await post(client, "/v1/completions",
                      {"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0})
    choice = body["choices"][0]
    assert choice["text"] == model.tokenizer.decode([1, 403, 407, 261, 378, *GOLDEN[:30]])[16:]
    assert choice["text"].startswith(GOLDEN_TEXT[:40]) and choice["finish_reason"] == "length"
    # other tests' requests leave rows in the prefix cache (every prompt's BOS, say)
    cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 <= cached <= 4  # the last prompt token is always computed
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35,
                             "prompt_tokens_details": {"cached_tokens": cached}}
    assert body["system_fingerprint"] == model.fingerprint and body["object"] == "text_completion"


async def test_token_id_prompts_and_several_prompts(client):
    body = await post(client, "/v1/completions", {"prompt": [[1, 403, 407, 261, 378], "Once"],
                                                 "max_tokens": 5, "temperature": 0})
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == GOLDEN_TEXT[:len(body["choices"][0]["text"])]


async def test_streaming_equals_non_streaming(client):
    request = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0.9, "seed": 7,
               "stream": True, "stream_options": {"include_usage": True}}
    events = await sse_events(await client.post("/v1/completions", json=request))
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    chunks = [e for e in events[:-2]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    whole = await post(client, "/v1/completions", {**request, "stream": False})
    assert text == whole["choices"][0]["text"] and usage == whole["usage"]


async def test_stop_strings_cut_the_text(client):
    body = await post(client, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 60,
                                                 "temperature": 0, "stop": ["park", "Lily."]})
    choice = body["choices"][0]
    assert choice["text"] == ", there was a little girl named "
    assert choice["finish_reason"] == "stop"
    # streamed: no part of the stop string leaks
    events = await sse_events(await client.post("/v1/completions", json={
        "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "stop": "Lily.",
        "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]


async def test_seeded_choices_are_reproducible_and_differ(client):
    request = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 1.0, "n": 3,
               "seed": 123}
    a = await post(client, "/v1/completions", request)
    b = await post(client, "/v1/completions", request)
    texts = [c["text"] for c in a["choices"]]
    assert texts == [c["text"] for c in b["choices"]] and len(set(texts)) > 1


async def test_logprobs_and_echo(client):
    body = await post(client, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 5,
                                                 "temperature": 0, "logprobs": 2, "echo": True})
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith("Once upon a time,")
    assert len(lp["tokens"]) == 5 + 5 and lp["token_logprobs"][0] is None
    assert all(x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
    # greedy: the chosen token is the most likely one
    for token, top in zip(lp["tokens"][5:], lp["top_logprobs"][5:], strict=True):
        assert max(top, key=top.get) == token
    assert lp["text_offset"] == sorted(lp["text_offset"])


async def test_chat_stream_and_whole(client):
    request = {"messages": [{"role": "system", "content": "Tell a story."},
                            {"role": "user", "content": [{"type": "text", "text": "Once"}]}],
               "max_tokens": 12, "temperature": 0}
    whole = await post(client, "/v1/chat/completions", request)
    assert whole["object"] == "chat.completion"
    message = whole["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    events = await sse_events(await client.post("/v1/chat/completions",
                                                json={**request, "stream": True}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == message["content"] and events[-2]["choices"][0]["finish_reason"] == "length"


async def test_llama_cpp_completion_tokenize_detokenize(client):
    body = await post(client, "/completion", {"prompt": "Once upon a time", "n_predict": 12,
                                            "temperature": 0, "n_probs": 2})
    assert body["content"] == GOLDEN_TEXT[:len(body["content"])] and body["stop"] is True
    assert body["tokens_predicted"] == 12 and body["tokens_evaluated"] == 5
    assert body["stop_type"] == "limit" and body["timings"]["predicted_n"] == 12
    assert len(body["completion_probabilities"]) == 12
    tok = await post(client, "/tokenize", {"content": "Once upon", "with_pieces": True})
    # the SentencePiece dummy prefix shows, as in llama.cpp
    assert [t["piece"] for t in tok["tokens"]] == [" Once", " upon"]
    ids = [t["id"] for t in tok["tokens"]]
    assert (await post(client, "/detokenize", {"tokens": ids}))["content"] == "Once upon"
    assert (await post(client, "/tokenize", {"content": "Hi", "add_special": True}))[
        "tokens"][0] == 1


async def test_metrics_and_openapi(client):
    await post(client, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    text = await (await client.get("/metrics")).text()
    for name in ("tiller_requests_total{route=\"/v1/completions\",status=\"200\"} 1",
                 "tiller_generated_tokens_total", "tiller_queue_depth", "tiller_running_sequences",
                 "tiller_kv_cache_usage_ratio", "tiller_batch_size_bucket", "tiller_step_seconds"):
        assert name in text, name
    sampling = [line for line in text.splitlines()
                if line.startswith("tiller_sampling_seconds_total ")]
    assert len(sampling) == 1 and float(sampling[0].split()[1]) > 0  # two tokens were sampled
    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    schema = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert schema["$ref"].endswith("CompletionRequest")
    assert "temperature" in spec["components"]["schemas"]["CompletionRequest"]["properties"]


# errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body,param,fragment", [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature", "greater than"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", "greater than"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens", "integer"),
    ("/v1/completions", {"temperature": 1}, "prompt", "required"),
    ("/v1/completions", {"prompt": []}, "prompt", "empty"),
    ("/v1/completions", {"prompt": [1, 99999]}, "prompt", "outside"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix", "not supported"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", ""]}, "stop", "empty"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n", "greater than"),
    ("/v1/chat/completions", {"messages": []}, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages",
     "wizard"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages", "image_url"),
    ("/completion", {"prompt": "x", "n_predict": -2}, "n_predict", "greater than"),
    ("/detokenize", {"tokens": [5, -1]}, "tokens", "outside"),
])
async def test_invalid_fields_are_400_naming_the_field(client, path, body, param, fragment):
    error = (await post(client, path, body, status=400))["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]


async def test_context_length_exceeded(client):
    error = (await post(client, "/v1/completions", {"prompt": "Once", "max_tokens": 600},
                        status=400))["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert "512" in error["message"]


async def test_bad_json_404_405_413(client):
    response = await client.post("/v1/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    assert response.status == 400 and "JSON" in (await response.json())["error"]["message"]
    response = await client.get("/nowhere")
    assert response.status == 404 and (await response.json())["error"]["type"] == \
        "not_found_error"
    response = await client.get("/v1/completions")
    assert response.status == 405 and "POST" in response.headers["Allow"]
    assert "error" in await response.json()
    response = await client.post("/v1/completions", data=b"x" * (9 * 1024 * 1024))
    assert response.status == 413 and "error" in await response.json()


async def test_api_key(aiohttp_client, config, model):
    client = await make_client(aiohttp_client, config, model, api_keys=("sekrit",))
    assert (await client.get("/health")).status == 200  # public
    assert (await client.get("/v1/models")).status == 200  # public
    response = await client.post("/v1/completions", json={"prompt": "x"})
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "invalid_api_key"
    response = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                                 headers={"Authorization": "Bearer wrong"})
    assert response.status == 401
    response = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                                 headers={"Authorization": "Bearer sekrit"})
    assert response.status == 200


async def test_overload_is_503_with_retry_after(aiohttp_client, config, model):
    client = await make_client(aiohttp_client, config, model, parallel=1, max_waiting=0)
    busy = await client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 400,
                                                       "stream": True})
    await busy.content.readline()  # it is running
    response = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert (await response.json())["error"]["code"] == "server_busy"
    busy.close()


# concurrency and cancellation ------------------------------------------------------------------

async def stream_text(client, seed: int, max_tokens: int = 48) -> str:
    events = await sse_events(await client.post("/v1/completions", json={
        "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 1.0,
        "seed": seed, "stream": True}))
    return "".join(e["choices"][0]["text"] for e in events[:-1])


async def test_eight_concurrent_streams_equal_their_solo_runs(client):
    solo = [await stream_text(client, seed) for seed in range(8)]
    together = await asyncio.gather(*(stream_text(client, seed) for seed in range(8)))
    assert list(together) == solo
    assert len(set(solo)) > 1


async def test_disconnected_clients_free_their_sequences(client):
    async def leave_early(i: int) -> None:
        response = await client.post("/v1/completions", json={
            "prompt": "Once upon a time", "max_tokens": 300, "stream": True, "seed": i})
        for _ in range(3):
            await response.content.readline()
        response.close()  # hang up mid-stream

    await asyncio.gather(*(leave_early(i) for i in range(20)))
    for _ in range(100):
        slots = await client.get("/slots")
        state = await slots.json()
        idle = not any(s["is_processing"] for s in state)
        if idle and slots.headers["X-KV-Blocks-Used"] == "0" and \
                slots.headers["X-Queue-Waiting"] == "0":
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"sequences still running: {state}, headers {dict(slots.headers)}")
    metrics = await (await client.get("/metrics")).text()
    assert "tiller_running_sequences 0" in metrics and "tiller_kv_blocks_used 0" in metrics


# the official openai client ------------------------------------------------------------------

async def test_openai_sdk(aiohttp_server, config, model):
    openai = pytest.importorskip("openai")
    server = await aiohttp_server(create_app(config, model=model))
    client = openai.AsyncOpenAI(base_url=f"http://{server.host}:{server.port}/v1",
                                api_key="unused")
    completion = await client.completions.create(model="stories260K.bin",
                                                 prompt="Once upon a time", max_tokens=20,
                                                 temperature=0)
    assert completion.choices[0].text.startswith(GOLDEN_TEXT[:30])
    assert completion.usage.completion_tokens == 20
    chat = await client.chat.completions.create(
        model="stories260K.bin", messages=[{"role": "user", "content": "Once"}], max_tokens=8,
        temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    stream = await client.chat.completions.create(
        model="stories260K.bin", messages=[{"role": "user", "content": "Once"}], max_tokens=8,
        temperature=0, stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == chat.choices[0].message.content
    assert usage.completion_tokens == chat.usage.completion_tokens
    streamed = await client.completions.create(model="x", prompt="Once upon a time",
                                               max_tokens=20, temperature=0, stream=True)
    assert "".join([c.choices[0].text async for c in streamed]) == completion.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model="x", prompt="Once", max_tokens=5000)
    assert err.value.code == "context_length_exceeded"
    models = await client.models.list()
    assert models.data[0].id == "stories260K.bin"
    await client.close()


async def test_an_engine_failure_is_a_500_and_the_server_goes_on(client, model, monkeypatch):
    real_step = model.engine.step
    calls = []

    def fail_once(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("kernel exploded")
        return real_step(batch)

    monkeypatch.setattr(model.engine, "step", fail_once)
    error = (await post(client, "/v1/completions", {"prompt": "Once", "max_tokens": 3},
                        status=500))["error"]
    assert "kernel exploded" in error["message"] and error["type"] == "server_error"
    body = await post(client, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 5,
                                                 "temperature": 0})
    assert body["choices"][0]["text"] == GOLDEN_TEXT[:len(body["choices"][0]["text"])]
    slots = await client.get("/slots")
    assert slots.headers["X-KV-Blocks-Used"] == "0"


async def test_an_engine_failure_mid_stream_is_an_error_event(client, model, monkeypatch):
    real_step = model.engine.step
    calls = []

    def fail_third(batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("kernel exploded")
        return real_step(batch)

    monkeypatch.setattr(model.engine, "step", fail_third)
    response = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Once"}], "max_tokens": 20, "stream": True})
    assert response.status == 200  # the stream had started
    events = await sse_events(response)
    assert events[-1]["error"]["type"] == "server_error"
    assert "kernel exploded" in events[-1]["error"]["message"]
    assert "[DONE]" not in events


async def test_a_gguf_model_brings_its_tokenizer_and_chat_template(aiohttp_client, tmp_path):
    import gguf
    from tiller.engine.config import ModelConfig
    from tiller.engine.llama2c import random_tensors
    from tiller.engine.loader import load_tokenizer

    from tests.test_gguf import write_gguf

    cfg = ModelConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                      vocab_size=300, max_seq_len=64)
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    path = write_gguf(tmp_path / "model.gguf", cfg, random_tensors(cfg, seed=1),
                      kv={"tokenizer.chat_template": (gguf.GGUFValueType.STRING, template)})
    config = ServerConfig(model_path=path, parallel=2, token_budget=32,
                          steering_dir=tmp_path / "steering")
    model = load_model(config)
    assert model.chat_template.source == template
    client = await aiohttp_client(create_app(config, model=model))
    body = await post(client, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "ab"}], "max_tokens": 3, "temperature": 0})
    expected = load_tokenizer(path).encode("<|user|>ab<|assistant|>", bos=True)
    assert body["usage"]["prompt_tokens"] == len(expected)
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "model.gguf"


async def test_a_gguf_model_with_a_byte_level_bpe_vocabulary(aiohttp_client, tmp_path):
    """A Llama model whose GGUF vocabulary is byte-level BPE (as Llama 3 and Qwen 2 ship):
    special tokens in the rendered chat prompt, a completion prompt and /tokenize's text are
    tokens (all of it, as in llama.cpp), unless /tokenize's `parse_special` is false."""
    import gguf
    from tiller.engine.bpe import BYTE_TO_CHAR, BpeTokenizer
    from tiller.engine.config import ModelConfig
    from tiller.engine.llama2c import random_tensors
    from tiller.engine.loader import load_tokenizer

    from tests.test_gguf import write_gguf

    tokens = [*BYTE_TO_CHAR, "ab", "Ġab", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * 258 + [3] * 3
    cfg = ModelConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                      vocab_size=len(tokens), max_seq_len=64)
    S, A = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    kv = {"tokenizer.ggml.model": (S, "gpt2"), "tokenizer.ggml.pre": (S, "qwen2"),
          "tokenizer.ggml.tokens": (A, tokens), "tokenizer.ggml.token_type": (A, types),
          "tokenizer.ggml.merges": (A, ["a b", "Ġ ab"]),
          "tokenizer.ggml.bos_token_id": (gguf.GGUFValueType.UINT32, 258),
          "tokenizer.ggml.eos_token_id": (gguf.GGUFValueType.UINT32, 260)}
    path = write_gguf(tmp_path / "model.gguf", cfg, random_tensors(cfg, seed=2), kv=kv,
                      tokenizer=False)
    tok = load_tokenizer(path)
    assert isinstance(tok, BpeTokenizer) and not tok.add_bos and tok.end_ids == {260}
    config = ServerConfig(model_path=path, parallel=2, token_budget=32,
                          steering_dir=tmp_path / "steering")
    client = await aiohttp_client(create_app(config, model=load_model(config)))
    body = await post(client, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "ab <|im_end|>"}], "max_tokens": 3,
        "temperature": 0})
    prompt = "<|im_start|>user\nab <|im_end|><|im_end|>\n<|im_start|>assistant\n"
    assert body["usage"]["prompt_tokens"] == len(tok.encode(prompt, special=True))
    tokenized = await post(client, "/tokenize", {"content": "ab ab<|im_end|>"})
    assert tokenized["tokens"] == [256, 257, 260]
    tokenized = await post(client, "/tokenize", {"content": "ab ab<|im_end|>",
                                                 "parse_special": False})
    assert tokenized["tokens"] == [256, 257] + [ord(c) for c in "<|im_end|>"]
    assert (await post(client, "/detokenize", {"tokens": [256, 257, 260]}))["content"] == "ab ab"
    body = await post(client, "/v1/completions", {"prompt": "ab<|im_end|>", "max_tokens": 1,
                                                  "temperature": 0})
    assert body["usage"]["prompt_tokens"] == 2  # "ab" and <|im_end|> (no BOS in this vocab)
    body = await post(client, "/v1/completions", {"prompt": "é ab", "max_tokens": 4,
                                                  "temperature": 0, "echo": True})
    assert body["choices"][0]["text"].startswith("é ab")


async def test_chat_logprobs(client, model):
    body = await post(client, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Once"}], "max_tokens": 4, "temperature": 0,
        "logprobs": True, "top_logprobs": 2})
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])  # greedy
    assert "".join(e["token"] for e in content) == body["choices"][0]["message"]["content"]
