"""Reliability under hostile-but-fair input (issue 10): every limit is a 400 or 413 naming its
field before any work is done, nothing heavy runs on the event loop, bodies are JSON.

The bad-input matrix drives every endpoint with malformed JSON, deep nesting, wrong types,
out-of-range values, over-limit sizes, unknown vector ids and bad formats; each row has its
expected status and `param`. It prints the numbers tried / 4xx / 5xx.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from decimal import Decimal, getcontext
from pathlib import Path

import numpy as np
import pytest
from tiller.engine.cvec import ControlVector, write_control_vector
from tiller.engine.engine import MAX_STEERING_NORM
from tiller.server.app import ServerConfig, create_app
from tiller.server.errors import ApiError
from tiller.server.features_routes import check_finite, embd_normalize
from tiller.server.http import MAX_JSON_DEPTH, encode_json, json_depth

MIB = 1024 * 1024
BUDGET = 100_000  # --max-feature-values of these tests: stories260K is 64 wide


@pytest.fixture(scope="module")
def config(shared_models: Path, tmp_path_factory) -> ServerConfig:
    return ServerConfig(model_path=shared_models / "stories260K.bin",
                        tokenizer_path=shared_models / "tok512.bin", parallel=2, max_waiting=4,
                        token_budget=64, max_body_bytes=MIB, max_feature_values=BUDGET,
                        steering_dir=tmp_path_factory.mktemp("steering"))


def strict_json(text: str) -> object:
    """JSON as RFC 8259 has it: NaN and Infinity are not numbers."""
    def refuse(name: str) -> object:
        raise ValueError(f"bare {name} in a JSON body")
    return json.loads(text, parse_constant=refuse)


# the matrix ---------------------------------------------------------------------------------------

JSON_POSTS = ["/v1/completions", "/v1/chat/completions", "/completion", "/tokenize", "/detokenize",
              "/v1/features", "/v1/embeddings", "/embedding", "/v1/steering"]
LONG = "word " * 120_000  # 600 kB: under the 1 MiB body limit, far over a 512-token context
DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

# (method, path, body: dict | bytes | None, status, param)
Row = tuple[str, str, object, int, str | None]
ROWS: list[Row] = []
for _path in JSON_POSTS:
    ROWS += [
        ("POST", _path, b"{not json", 400, None),
        ("POST", _path, DEEP, 400, None),
        ("POST", _path, b"[1, 2]", 400, None),
        ("POST", _path, b'{"prompt": "\xff\xfe"}', 400, None),
        ("POST", _path, b'{"x": "' + b"a" * (MIB + 10) + b'"}', 413, None),
    ]
ROWS += [
    # /v1/completions
    ("POST", "/v1/completions", {"prompt": [True, False]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "2"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2.0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": "1"}, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "x", "echo": 1}, 400, "echo"),
    ("POST", "/v1/completions", {"prompt": "x", "n": 17}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"], "n": 4}, 400, "n"),  # 8 > 2 + 4
    ("POST", "/v1/completions", {"prompt": ["a"] * 7}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": [99999]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("POST", "/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("POST", "/v1/completions", {"prompt": "x", "steering": [{"vector": "sv-nope"}]}, 404,
     "steering"),
    ("POST", "/v1/completions", {"prompt": "x", "steering": [
        {"add": LONG[:20000], "sub": "b", "layer": 1}]}, 400, "steering"),
    ("POST", "/v1/completions", {"prompt": "x", "steering": [
        {"vector": "v", "scale": "2"}]}, 400, "steering"),
    # /v1/chat/completions
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": 1, "content": "x"}]}, 400,
     "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400,
     "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": True}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "n": 7}, 400, "n"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "logprobs": "yes"}, 400, "logprobs"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "chat_template_kwargs": "x"}, 400,
     "chat_template_kwargs"),
    # /completion (llama.cpp)
    ("POST", "/completion", {"prompt": [True]}, 400, "prompt"),
    ("POST", "/completion", {"prompt": []}, 400, "prompt"),
    ("POST", "/completion", {"prompt": "x", "n_predict": "5"}, 400, "n_predict"),
    ("POST", "/completion", {"prompt": LONG}, 400, "prompt"),
    ("POST", "/completion", {"prompt": "x", "stream": 1}, 400, "stream"),
    ("POST", "/completion", {"prompt": "x", "seed": "1"}, 400, "seed"),
    # /tokenize, /detokenize
    ("POST", "/tokenize", {"content": 5}, 400, "content"),
    ("POST", "/tokenize", {}, 400, "content"),
    ("POST", "/tokenize", {"content": "x", "add_special": "no"}, 400, "add_special"),
    ("POST", "/detokenize", {"tokens": "1,2"}, 400, "tokens"),
    ("POST", "/detokenize", {"tokens": [True]}, 400, "tokens"),
    ("POST", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    # /v1/features
    ("POST", "/v1/features", {"input": "x", "positions": [0] * 2000}, 400, "positions"),
    ("POST", "/v1/features", {"input": "Once upon a time " * 25, "layers": [0] * 5,
                              "points": ["resid_pre", "attn_out", "mlp_out", "resid_post"]},
     400, "positions"),
    ("POST", "/v1/features", {"input": "x", "layers": "2"}, 400, "layers"),
    ("POST", "/v1/features", {"input": "x", "layers": [99]}, 400, "layers"),
    ("POST", "/v1/features", {"input": "x", "format": "csv"}, 400, "format"),
    ("POST", "/v1/features", {"input": "x", "points": ["x"]}, 400, "points"),
    ("POST", "/v1/features", {"input": [True]}, 400, "input"),
    ("POST", "/v1/features", {"input": "x", "positions": [999]}, 400, "positions"),
    ("POST", "/v1/features", {"input": LONG}, 400, "input"),
    ("POST", "/v1/features", {"input": "x", "steering": [{"vector": "sv-nope"}]}, 404,
     "steering"),
    # /v1/embeddings, /embedding
    ("POST", "/v1/embeddings", {"input": [[1, 2], True]}, 400, "input"),
    ("POST", "/v1/embeddings", {"input": "x", "normalize": "yes"}, 400, "normalize"),
    ("POST", "/v1/embeddings", {"input": "x", "layer": "2"}, 400, "layer"),
    ("POST", "/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400,
     "encoding_format"),
    ("POST", "/v1/embeddings", {"input": ["a"] * 5000}, 400, "input"),  # 5000 x 64 > budget
    ("POST", "/v1/embeddings", {"input": LONG}, 400, "input"),
    ("POST", "/embedding", {"content": "x", "embd_normalize": 1000.0}, 400, "embd_normalize"),
    ("POST", "/embedding", {"content": "x", "embd_normalize": -2}, 400, "embd_normalize"),
    ("POST", "/embedding", {"content": "x", "pooling": "max"}, 400, "pooling"),
    ("POST", "/embedding", {}, 400, "content"),
    ("POST", "/embedding", {"content": ["word " * 500] * 4}, 400, "content"),  # per-token
    # /v1/steering
    ("POST", "/v1/steering", {"method": "x"}, 400, "method"),
    ("POST", "/v1/steering", {"method": "actadd", "add": "word " * 700, "sub": "b",
                              "layer": 1}, 400, "add"),
    ("POST", "/v1/steering", {"method": "actadd", "add": "a", "sub": "word " * 700,
                              "layer": 1}, 400, "sub"),
    ("POST", "/v1/steering", {"method": "actadd", "add": "a", "sub": "b", "layer": "2"}, 400,
     "layer"),
    ("POST", "/v1/steering", {"method": "pca", "positive": ["a"] * 300,
                              "negative": ["b"] * 300}, 400, "positive"),
    ("POST", "/v1/steering", {"method": "pca", "positive": ["a"], "negative": ["b"]}, 400,
     "positive"),
    ("POST", "/v1/steering", {"method": "mean", "positive": ["a", "c"], "negative": ["b"]},
     400, "positive"),
    ("POST", "/v1/steering", {"method": "mean", "positive": ["a"], "negative": ["b"],
                              "layers": [99]}, 400, "layers"),
    ("POST", "/v1/steering", {"method": "mean", "positive": [LONG[:5000]],
                              "negative": ["b"]}, 400, "positive"),
    ("POST", "/v1/steering/import", b"", 400, None),
    ("POST", "/v1/steering/import", b"GGUF junk", 400, "file"),
    ("POST", "/v1/steering/import", b"x" * (MIB + 10), 413, None),
    ("GET", "/v1/steering/sv-nope", None, 404, None),
    ("GET", "/v1/steering/sv-nope?format=xml", None, 400, "format"),
    ("DELETE", "/v1/steering/sv-nope", None, 404, None),
]


async def test_bad_input_matrix(client):
    tried, client_errors, server_errors, wrong = 0, 0, 0, []
    for method, path, body, status, param in ROWS:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        response = await client.request(method, path, data=data,
                                        headers={"Content-Type": "application/json"})
        text = await response.text()
        tried += 1
        client_errors += 400 <= response.status < 500
        server_errors += response.status >= 500
        payload = strict_json(text)
        assert isinstance(payload, dict), (path, text[:200])
        error = payload.get("error", {})
        if response.status != status or error.get("param") != param:
            wrong.append((method, path, str(body)[:80], response.status, error))
        else:
            assert error["message"] and error["type"], (path, error)
    print(f"\nbad-input matrix: {tried} tried, {client_errors} 4xx, {server_errors} 5xx")
    assert not wrong, "\n".join(map(str, wrong))
    assert server_errors == 0 and client_errors == tried


async def test_limits_name_their_value(client):
    """The message says which limit, and how to change it."""
    response = await client.post("/v1/completions", data=b"x" * (MIB + 1))
    error = (await response.json())["error"]
    assert response.status == 413 and str(MIB) in error["message"]
    assert "--max-body-mb" in error["message"] and error["code"] == "request_too_large"
    response = await client.post("/v1/completions", data=DEEP)
    error = (await response.json())["error"]
    assert str(MAX_JSON_DEPTH) in error["message"] and error["code"] == "json_too_deep"
    response = await client.post("/v1/features", json={"input": "x", "positions": [0] * 2000})
    error = (await response.json())["error"]
    assert "--max-feature-values" in error["message"] and str(BUDGET) in error["message"]
    assert "2000 x 5 x 1 x 64" in error["message"]
    response = await client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 4})
    error = (await response.json())["error"]
    assert "--parallel 2 + --max-queue 4" in error["message"]
    response = await client.post("/v1/steering", json={
        "method": "actadd", "add": "word " * 700, "sub": "b", "layer": 1})
    error = (await response.json())["error"]
    assert error["code"] == "context_length_exceeded" and error["message"].startswith("add:")


def test_json_depth_counts_brackets_outside_strings():
    assert json_depth(b'{"a": [[1], {"b": 2}]}') == 3
    assert json_depth(b'{"a": "[[[[{{{"}') == 1
    assert json_depth(b'{"a": "\\\\", "b": [1]}') == 2  # an escaped backslash ends no string
    assert json_depth(b'{"a": "\\"[[["}') == 1  # an escaped quote does not end one
    assert json_depth(b"[" * 100_000) == 100_000
    assert json_depth(b"") == 0


async def test_an_8_mb_prompt_is_refused_at_once(aiohttp_client, config, model):
    """Refused by its length, never tokenized (tokenizing 8 MB took 14 s); a chat is refused
    by the template's own bound on its output."""
    client = await aiohttp_client(create_app(
        ServerConfig(**{**config.__dict__, "max_body_bytes": 9 * MIB}), model=model))
    prompt = "word " * (8 * MIB // 5)
    start = time.perf_counter()
    for path, body in (("/v1/completions", {"prompt": prompt}),
                       ("/completion", {"prompt": prompt}),
                       ("/v1/features", {"input": prompt}),
                       ("/v1/chat/completions", {"messages": [{"role": "user",
                                                               "content": prompt}]})):
        response = await client.post(path, json=body)
        error = (await response.json())["error"]
        assert response.status == 400 and error["param"] in ("prompt", "input", "messages")
        assert error["code"] == "context_length_exceeded" or "chat template" in error["message"]
    assert time.perf_counter() - start < 8.0


# work off the event loop -----------------------------------------------------------------------


async def health_while(client, heavy, interval: float = 0.05) -> tuple[list[float], object]:
    """/health latencies (s) of probes due every `interval` while `heavy` runs, and its result.

    NOTE: a probe's latency runs from when it was due, not from when the loop got round to
    sending it: a client arriving while the loop is blocked waits for the whole block, so work
    on the event loop shows in most probes (and in their median), not just in one.
    """
    task = asyncio.ensure_future(heavy)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def probe(due: float) -> float:
        await asyncio.sleep(max(0.0, due - loop.time()))
        response = await client.get("/health")
        assert response.status == 200
        return loop.time() - due

    probes = []
    due = start
    while not task.done():
        probes.append(asyncio.ensure_future(probe(due)))
        due += interval
        await asyncio.sleep(max(0.0, due - loop.time()))
    return list(await asyncio.gather(*probes)), await task


async def test_health_answers_while_text_is_tokenized(aiohttp_client, config, model):
    """Tokenizing 1 MB of distinct words takes seconds; on the event loop every /health would
    wait for it."""
    client = await aiohttp_client(create_app(
        ServerConfig(**{**config.__dict__, "max_body_bytes": 4 * MIB}), model=model))
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    text = bytes(rng.choice(letters, 1_000_000)).decode()
    text = " ".join(text[i:i + 7] for i in range(0, len(text), 7))  # no chunk cache helps

    async def tokenize() -> int:
        response = await client.post("/tokenize", json={"content": text})
        assert response.status == 200
        return len((await response.json())["tokens"])
    started = time.perf_counter()
    latencies, n_tokens = await health_while(client, tokenize())
    busy = time.perf_counter() - started
    median = statistics.median(latencies)
    print(f"\n/health during a {busy:.1f} s tokenize: median {median * 1000:.1f} ms over "
          f"{len(latencies)} probes, max {max(latencies) * 1000:.1f} ms")
    assert n_tokens > 500_000
    assert len(latencies) >= 5, f"only {len(latencies)} probes in {busy:.1f} s"
    assert median < max(0.1, busy / 8)  # on the loop: about busy / 2 (see health_while)


async def test_health_answers_while_features_are_encoded(aiohttp_client, config, model):
    """Millions of numbers take seconds to encode as JSON: on the pool, not the loop."""
    client = await aiohttp_client(create_app(
        ServerConfig(**{**config.__dict__, "max_feature_values": 8 * MIB}), model=model))
    body = {"input": "Once upon a time " * 20, "positions": list(range(80)) * 10,
            "layers": [0, 1, 2, 3, 4] * 2, "points": ["resid_pre", "resid_post"]}

    async def features() -> int:
        response = await client.post("/v1/features", json=body)
        assert response.status == 200
        return len(await response.read())
    started = time.perf_counter()
    latencies, size = await health_while(client, features())
    busy = time.perf_counter() - started
    median = statistics.median(latencies)
    print(f"\n/health during a {busy:.1f} s features request ({size / 1e6:.0f} MB): median "
          f"{median * 1000:.1f} ms over {len(latencies)} probes")
    assert size > 15e6
    assert len(latencies) >= 5, f"only {len(latencies)} probes in {busy:.1f} s"
    assert median < max(0.1, busy / 8)  # on the loop: about busy / 2 (see health_while)


# load that can never run is no 503 ---------------------------------------------------------------


async def test_a_pca_vector_of_many_pairs_builds_in_waves(client):
    """37 pairs are 74 prompts, more than --parallel 2 + --max-queue 4 places: built in waves
    of --parallel, never a 503 on an idle server."""
    response = await client.post("/v1/steering", json={
        "method": "pca", "positive": [f"I love thing {i}" for i in range(37)],
        "negative": [f"I hate thing {i}" for i in range(37)], "layers": [2]})
    assert response.status == 200, await response.text()
    assert (await response.json())["layers"] == [2]


async def test_many_embedding_inputs_run_in_waves(client):
    response = await client.post("/v1/embeddings", json={"input": [f"text {i}" for i in range(40)]})
    assert response.status == 200
    assert len((await response.json())["data"]) == 40


async def test_as_many_sequences_as_the_server_holds_run(client):
    response = await client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2,
                                                          "max_tokens": 2})
    assert response.status == 200 and len((await response.json())["choices"]) == 6


# JSON bodies are JSON ----------------------------------------------------------------------------


async def test_steering_at_the_engines_bound_still_answers_json(client, model, tmp_path):
    """The strongest steering the engine admits (MAX_STEERING_NORM) gives finite JSON or a 400
    naming `steering` -- never a bare NaN or Infinity in a 200."""
    config = model.engine.config
    path = tmp_path / "strong.gguf"
    layers = range(2, config.n_layers + 1)
    value = 0.9 * MAX_STEERING_NORM / (len(layers) * config.dim ** 0.5)
    directions = {layer: np.full(config.dim, value, np.float32) for layer in layers}
    write_control_vector(path, ControlVector(directions, "llama"), config.n_layers)
    response = await client.post("/v1/steering/import", data=path.read_bytes())
    assert response.status == 200, await response.text()
    steering = [{"vector": (await response.json())["id"]}]
    for route, body in (("/v1/features", {"input": "Once", "steering": steering}),
                        ("/v1/embeddings", {"input": "Once", "steering": steering}),
                        ("/embedding", {"content": "Once", "pooling": "none",
                                        "steering": steering})):
        response = await client.post(route, json=body)
        payload = strict_json(await response.text())  # fails on a bare NaN or Infinity
        if response.status != 200:
            assert response.status == 400, (route, payload)
            assert payload["error"]["param"] == "steering", (route, payload)  # type: ignore


def test_non_finite_states_are_a_400_naming_the_steering():
    finite = np.ones((2, 3), np.float32)
    check_finite([finite], ())
    with pytest.raises(ApiError) as e:
        check_finite([finite, np.array([1.0, np.nan], np.float32)], (object(),))  # type: ignore
    assert e.value.status == 400 and e.value.param == "steering"
    assert e.value.code == "non_finite_result"
    with pytest.raises(ApiError) as e:  # unsteered states that overflow are the server's fault
        check_finite([np.array([np.inf], np.float32)], ())
    assert e.value.status == 500


def test_json_bodies_refuse_non_finite_numbers():
    with pytest.raises(ApiError) as e:
        encode_json({"x": [1.0, float("nan")]})
    assert e.value.status == 500 and e.value.code == "non_finite_result"


@pytest.mark.parametrize("p", [0, 1, 2, 3, 7, 1000])
def test_embd_normalize_matches_a_float64_reference_without_overflow(p):
    rng = np.random.default_rng(p)
    v = (rng.standard_normal(64) * 300).astype(np.float32)  # 300**1000 overflows float64
    getcontext().prec = 50
    exact = [Decimal(float(x)) for x in v]
    top = max(abs(x) for x in exact)
    if p == 0:
        want = [float(x * Decimal(32760) / top) for x in exact]
    else:
        norm = sum(abs(x) ** p for x in exact) ** (Decimal(1) / Decimal(p))
        want = [float(x / norm) for x in exact]
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow is harmless
        got = embd_normalize(v, p)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6, atol=1e-30)
    assert not embd_normalize(np.zeros(4, np.float32), p).any()


async def test_embedding_with_a_large_p_is_a_unit_vector(client):
    response = await client.post("/embedding", json={"content": "Once upon a time",
                                                     "pooling": "mean", "embd_normalize": 1000})
    (item,) = strict_json(await response.text())  # type: ignore[misc]
    v = np.asarray(item["embedding"][0], np.float64)
    assert response.status == 200 and np.abs(v).max() > 0.5
    top = np.abs(v).max()
    assert np.sum((np.abs(v) / top) ** 1000) ** (1 / 1000) * top == pytest.approx(1.0, rel=1e-5)


# authentication --------------------------------------------------------------------------------


async def test_401_says_how_to_authenticate_and_the_scheme_is_case_insensitive(
        aiohttp_client, config, model):
    client = await aiohttp_client(create_app(
        ServerConfig(**{**config.__dict__, "api_keys": ("sekrit",)}), model=model))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"},
                    {"Authorization": "Basic sekrit"}):
        response = await client.post("/tokenize", json={"content": "x"}, headers=headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["error"]["code"] == "invalid_api_key"
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = await client.post("/tokenize", json={"content": "x"},
                                     headers={"Authorization": f"{scheme}  sekrit "})
        assert response.status == 200, scheme


# the OpenAPI document is as strict as the server ------------------------------------------------


async def test_openapi_types_are_strict_and_limits_documented(client):
    spec = await (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    steering = schemas["SteeringCreateRequest"]["properties"]
    assert {"type": "array", "items": {"type": "string"}, "minItems": 1,
            "maxItems": 256} in steering["positive"]["anyOf"]
    features = spec["paths"]["/v1/features"]["post"]["responses"]
    assert {"413", "404", "507"} <= set(features)
    assert "application/octet-stream" in features["200"]["content"]
    download = spec["paths"]["/v1/steering/{id}"]["get"]
    assert [p["name"] for p in download["parameters"]] == ["id", "format"]
    assert download["parameters"][1]["schema"]["enum"] == ["json", "npy", "gguf"]
    upload = spec["paths"]["/v1/steering/import"]["post"]["requestBody"]["content"]
    assert list(upload) == ["application/octet-stream"]
