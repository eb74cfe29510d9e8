"""/v1/features, /v1/embeddings and llama.cpp's /embedding against the numpy reference, on
stories260K in fp32 (so hidden states agree to float rounding)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from tiller.engine.steering import actadd_tokens
from tiller.server.app import ServerConfig, create_app, load_model

from tests.reference import load_v0_legacy, reference_forward, rmsnorm
from tests.test_server import post, sse_events

POINTS = ["resid_pre", "attn_out", "mlp_out", "resid_post"]
ATOL = 2e-5
# longer than the token budget below, so its prefill (and capture) comes in chunks
STORY = ("Once upon a time, there was a little boy named Tim. Tim liked to play with his red "
         "ball in the garden. One day, the ball rolled away and went under a big tree. Tim was "
         "sad. He asked his friend, a small bird, to help him.")


@pytest.fixture(scope="module")
def config(shared_models: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerConfig:
    return ServerConfig(model_path=shared_models / "stories260K.bin",
                        tokenizer_path=shared_models / "tok512.bin", parallel=4,
                        token_budget=32, dtype="f32",
                        steering_dir=tmp_path_factory.mktemp("steering"))


@pytest.fixture(scope="module")
def model(config):
    return load_model(config)


@pytest.fixture(scope="module")
def reference(shared_models: Path):
    ref_config, weights = load_v0_legacy(shared_models / "stories260K.bin")
    cache: dict[tuple[int, ...], dict[str, np.ndarray]] = {}

    def forward(tokens: list[int], steering: dict | None = None) -> dict[str, np.ndarray]:
        if steering:
            return reference_forward(weights, ref_config, tokens, steering=steering)
        key = tuple(tokens)
        if key not in cache:
            cache[key] = reference_forward(weights, ref_config, tokens)
        return cache[key]

    forward.config, forward.weights = ref_config, weights
    return forward


@pytest.fixture
async def client(aiohttp_client, config, model):
    return await aiohttp_client(create_app(config, model=model))


async def post_bytes(client, path: str, body: dict) -> bytes:
    response = await client.post(path, json=body)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "application/octet-stream"
    return await response.read()


def read_safetensors(raw: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A minimal reader that checks what the format requires: an 8-byte little-endian header
    length, a JSON header, data buffers that tile the rest of the file exactly."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    assert (8 + n) % 8 == 0  # data aligned
    metadata = header.pop("__metadata__", {})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    dtypes = {"F32": "<f4", "I64": "<i8"}
    spans, out = [], {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        spans.append((start, end))
        out[name] = np.frombuffer(data[start:end], dtypes[info["dtype"]]).reshape(info["shape"])
    spans.sort()
    assert spans[0][0] == 0 and spans[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    return out, metadata


# /v1/features ------------------------------------------------------------------------------------


async def test_features_equal_the_reference_hidden_states(client, model, reference):
    body = await post(client, "/v1/features", {"input": STORY, "layers": [0, -1, 2, -4],
                                              "points": POINTS})
    ids = model.tokenizer.encode(STORY, bos=True)
    assert len(ids) > 32  # prefilled in chunks
    assert body["tokens"] == ids and len(body["pieces"]) == len(ids)
    assert body["pieces"][:2] == ["<s>", " Once"]
    assert body["layers"] == [0, 4, 2, 1] and body["points"] == POINTS
    assert body["positions"] == list(range(len(ids))) and body["model"] == "stories260K.bin"
    assert body["shape"] == [4, len(ids), 64]
    ref = reference(ids)
    for point in POINTS:
        got = np.asarray(body["data"][point], dtype=np.float32)
        assert got.shape == (4, len(ids), 64)
        np.testing.assert_allclose(got, ref[point][[0, 4, 2, 1]], atol=ATOL, rtol=0,
                                   err_msg=point)
    # what a forward hook sees: block l's input is block l-1's output
    pre = np.asarray(body["data"]["resid_pre"])
    post_ = np.asarray(body["data"]["resid_post"])
    np.testing.assert_array_equal(pre[2], post_[3])
    np.testing.assert_allclose(post_[0], pre[0] + np.asarray(body["data"]["attn_out"][0])
                               + np.asarray(body["data"]["mlp_out"][0]), atol=1e-6)


@pytest.mark.parametrize("positions,want", [("last", [4]), ([0, -1, 2, 2], [0, 4, 2, 2]),
                                            ("all", [0, 1, 2, 3, 4])])
async def test_features_positions_and_defaults(client, reference, positions, want):
    ids = [1, 403, 407, 261, 378]  # token ids as given, no BOS added
    body = await post(client, "/v1/features", {"input": ids, "positions": positions})
    assert body["tokens"] == ids and body["positions"] == want
    assert body["layers"] == [0, 1, 2, 3, 4] and body["points"] == ["resid_post"]
    assert list(body["data"]) == ["resid_post"] and body["shape"] == [5, len(want), 64]
    np.testing.assert_allclose(np.asarray(body["data"]["resid_post"], dtype=np.float32),
                               reference(ids)["resid_post"][:, want], atol=ATOL, rtol=0)


async def test_npz_and_safetensors_hold_the_json_numbers(client, model):
    request = {"input": "Once upon a time", "layers": [1, -1], "points": ["mlp_out", "resid_pre"],
               "positions": [0, -1]}
    body = await post(client, "/v1/features", request)
    npz = np.load(io.BytesIO(await post_bytes(client, "/v1/features",
                                              {**request, "format": "npz"})))
    assert sorted(npz.files) == ["layers", "mlp_out", "pieces", "positions", "resid_pre",
                                 "tokens"]
    raw = await post_bytes(client, "/v1/features", {**request, "format": "safetensors"})
    mine, metadata = read_safetensors(raw)
    assert metadata["model"] == "stories260K.bin" and metadata["model_key"] == model.key
    assert json.loads(metadata["pieces"]) == body["pieces"] == list(npz["pieces"])
    for arrays in (npz, mine):
        assert arrays["tokens"].tolist() == body["tokens"]
        assert arrays["layers"].tolist() == [1, 4] and arrays["positions"].tolist() == [0, 4]
        for point in ("mlp_out", "resid_pre"):
            assert arrays[point].dtype == np.float32 and arrays[point].shape == (2, 2, 64)
            np.testing.assert_array_equal(arrays[point], np.asarray(body["data"][point],
                                                                    dtype=np.float32))
    try:
        from safetensors.numpy import load
    except ImportError:
        return
    theirs = load(raw)
    assert set(theirs) == set(mine)
    for name, array in mine.items():
        np.testing.assert_array_equal(theirs[name], array)


async def test_steered_features_equal_the_steered_reference(client, model, reference):
    entry = {"add": "Love", "sub": "Hate", "source_layer": 2, "layer": 2, "mul": 4.0}
    ids = model.tokenizer.encode("Once upon a time", bos=True)
    body = await post(client, "/v1/features", {"input": ids, "points": POINTS,
                                              "steering": [entry]})
    a, s = actadd_tokens(model.tokenizer, "Love", "Hate")
    rows = reference(a)["resid_pre"][2] - reference(s)["resid_pre"][2]
    ref = reference(ids, steering={2: 4.0 * rows})
    for point in POINTS:
        np.testing.assert_allclose(np.asarray(body["data"][point], dtype=np.float32),
                                   ref[point], atol=1e-4, rtol=0, err_msg=point)
    plain = reference(ids)["resid_pre"]
    assert not np.allclose(ref["resid_pre"][2], plain[2])  # the steering did something
    np.testing.assert_allclose(np.asarray(body["data"]["resid_pre"][1]), plain[1], atol=ATOL)


# embeddings ------------------------------------------------------------------------------------


def expected_embedding(reference, ids: list[int], pooling: str, normalize: bool,
                       layer: int | None) -> np.ndarray:
    ref = reference(ids)
    if layer is None:
        h = rmsnorm(ref["resid_post"][-1], reference.weights["final_norm"],
                    reference.config.norm_eps)
    else:
        h = ref["resid_post"][layer]
    v = {"mean": h.mean(axis=0), "first": h[0], "last": h[-1]}[pooling].astype(np.float64)
    return v / np.linalg.norm(v) if normalize else v


@pytest.mark.parametrize("pooling,normalize,layer", [
    ("mean", True, None), ("last", False, None), ("first", True, None), ("mean", False, 1),
    ("last", True, -1), ("mean", True, -5)])
async def test_embeddings_are_pooled_reference_states(client, model, reference, pooling,
                                                      normalize, layer):
    texts = ["Once upon a time", "The cat sat on the mat."]
    request: dict = {"input": texts, "model": "x", "pooling": pooling, "normalize": normalize}
    if layer is not None:
        request["layer"] = layer
    body = await post(client, "/v1/embeddings", request)
    assert body["object"] == "list" and body["model"] == "stories260K.bin"
    prompts = [model.tokenizer.encode(t, bos=True) for t in texts]
    n = sum(map(len, prompts))
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    assert [d["index"] for d in body["data"]] == [0, 1]
    for item, ids in zip(body["data"], prompts, strict=True):
        assert item["object"] == "embedding"
        got = np.asarray(item["embedding"])
        want = expected_embedding(reference, ids, pooling, normalize,
                                  None if layer is None else layer % 5)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
        if normalize:
            assert abs(np.linalg.norm(got) - 1) < 1e-5


async def test_embeddings_base64_and_token_inputs(client):
    ids = [[1, 403, 407, 261, 378], [1, 403]]
    floats = await post(client, "/v1/embeddings", {"input": ids})
    packed = await post(client, "/v1/embeddings", {"input": ids, "encoding_format": "base64"})
    for f, b in zip(floats["data"], packed["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.asarray(f["embedding"], dtype=np.float32))
    one = await post(client, "/v1/embeddings", {"input": ids[0]})  # one prompt as token ids
    assert len(one["data"]) == 1 and one["data"][0]["embedding"] == floats["data"][0]["embedding"]
    text = await post(client, "/v1/embeddings", {"input": "Once upon a time"})
    assert text["data"][0]["embedding"] == floats["data"][0]["embedding"]
    assert text["usage"]["prompt_tokens"] == 5


async def test_openai_sdk_embeddings(aiohttp_server, config, model):
    openai = pytest.importorskip("openai")
    server = await aiohttp_server(create_app(config, model=model))
    base = f"http://{server.host}:{server.port}"
    sdk = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
    try:
        one = await sdk.embeddings.create(model="stories260K.bin", input="Once upon a time")
        batch = await sdk.embeddings.create(model="stories260K.bin",
                                            input=["Once upon a time", "The cat sat."])
        ids = await sdk.embeddings.create(model="x", input=[[1, 403, 407, 261, 378]],
                                          encoding_format="float")
    finally:
        await sdk.close()
    assert len(one.data) == 1 and len(one.data[0].embedding) == 64
    assert one.usage.prompt_tokens == 5 and one.model == "stories260K.bin"
    assert [d.index for d in batch.data] == [0, 1] and batch.usage.total_tokens > 5
    # the SDK asks for base64 unless told otherwise: the same floats as the JSON numbers
    assert one.data[0].embedding == batch.data[0].embedding == ids.data[0].embedding
    assert abs(np.linalg.norm(one.data[0].embedding) - 1) < 1e-5


async def test_llama_cpp_embedding(client, model, reference):
    ids = model.tokenizer.encode("Once upon a time", bos=True)
    body = await post(client, "/embedding", {"content": "Once upon a time"})
    # llama.cpp's default for a Llama model is pooling "none": every token, final norm, raw
    assert isinstance(body, list) and body[0]["index"] == 0
    want = rmsnorm(reference(ids)["resid_post"][-1], reference.weights["final_norm"], 1e-5)
    np.testing.assert_allclose(np.asarray(body[0]["embedding"]), want, atol=ATOL, rtol=0)
    pooled = await post(client, "/embedding", {"content": ["Once upon a time", [1, 403]],
                                               "pooling": "mean"})
    assert [p["index"] for p in pooled] == [0, 1] and len(pooled[0]["embedding"]) == 1
    openai = await post(client, "/v1/embeddings", {"input": [ids, [1, 403]]})
    for p, o in zip(pooled, openai["data"], strict=True):
        np.testing.assert_allclose(p["embedding"][0], o["embedding"], atol=1e-7)
    raw = await post(client, "/embeddings", {"input": "Once upon a time", "pooling": "cls",
                                             "embd_normalize": -1})
    np.testing.assert_allclose(raw[0]["embedding"][0], want[0], atol=ATOL)
    taxicab = await post(client, "/embedding", {"content": "Once", "pooling": "last",
                                                "embd_normalize": 1})
    assert abs(np.abs(taxicab[0]["embedding"][0]).sum() - 1) < 1e-5
    mixed = await post(client, "/embedding", {"content": [1, " upon", 407], "pooling": "last"})
    assert len(mixed) == 1  # strings and ids mixed: one prompt, as llama.cpp reads it


async def test_steered_embeddings_see_the_steering_after_the_last_block(client, model,
                                                                       reference):
    # steering layer -1 is the stream after the last block: before the final norm
    entry = {"add": "Love", "sub": "Hate", "source_layer": -1, "layer": -1, "mul": 3.0}
    ids = model.tokenizer.encode("Once upon a time there was", bos=True)
    body = await post(client, "/embedding", {"content": ids, "steering": [entry]})
    a, s = actadd_tokens(model.tokenizer, "Love", "Hate")
    rows = reference(a)["resid_post"][-1] - reference(s)["resid_post"][-1]
    assert len(rows) < len(ids)  # rows for the first positions only
    stream = reference(ids)["resid_post"][-1].copy()
    stream[:len(rows)] += 3.0 * rows
    want = rmsnorm(stream, reference.weights["final_norm"], 1e-5)
    np.testing.assert_allclose(np.asarray(body[0]["embedding"]), want, atol=1e-4, rtol=0)
    plain = await post(client, "/embedding", {"content": ids})
    # position 0 is BOS in both prompts: their difference starts at position 1
    assert not np.allclose(plain[0]["embedding"][1], body[0]["embedding"][1], atol=1e-3)
    np.testing.assert_allclose(plain[0]["embedding"][-1], body[0]["embedding"][-1], atol=1e-6)


# concurrency ---------------------------------------------------------------------------------


async def test_features_during_a_stream_leave_it_alone(client):
    request = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 1.0, "seed": 3,
               "stream": True}

    async def stream() -> str:
        events = await sse_events(await client.post("/v1/completions", json=request))
        return "".join(e["choices"][0]["text"] for e in events[:-1])

    async def readouts() -> list:
        out = []
        for i in range(4):
            out.append(await post(client, "/v1/features", {"input": STORY[:40 + 20 * i],
                                                          "points": POINTS}))
            out.append(await post(client, "/v1/embeddings", {"input": [STORY[:30], "Tim"]}))
        return out

    solo_text = await stream()
    solo_reads = await readouts()
    text, reads = await asyncio.gather(stream(), readouts())
    assert text == solo_text and len(text) > 40
    assert reads == solo_reads  # batch invariance: bitwise the same numbers


# errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,param,fragment", [
    ("/v1/features", {"input": "x", "layers": [5]}, "layers", "outside 0..4"),
    ("/v1/features", {"input": "x", "layers": [1, -6]}, "layers", "layers[1]"),
    ("/v1/features", {"input": "x", "layers": []}, "layers", "at least 1"),
    ("/v1/features", {"input": "x", "points": ["resid_mid"]}, "points", "resid_pre"),
    ("/v1/features", {"input": [1, 403], "positions": [2]}, "positions", "outside"),
    ("/v1/features", {"input": [1, 403], "positions": [-3]}, "positions", "2 tokens"),
    ("/v1/features", {"input": "x", "positions": "middle"}, "positions", "all"),
    ("/v1/features", {"input": "x", "positions": []}, "positions", "empty"),
    ("/v1/features", {"input": ""}, "input", "empty"),
    ("/v1/features", {"input": []}, "input", "empty"),
    ("/v1/features", {"input": [1, 9999]}, "input", "outside"),
    ("/v1/features", {"layers": [0]}, "input", "required"),
    ("/v1/features", {"input": "x", "format": "pickle"}, "format", "npz"),
    ("/v1/features", {"input": "x", "steering": [{"scale": 2}]}, "steering", "vector"),
    ("/v1/embeddings", {"input": ""}, "input", "empty"),
    ("/v1/embeddings", {"input": ["a", ""]}, "input", "empty"),
    ("/v1/embeddings", {"input": [[1, 2], []]}, "input", "empty"),
    ("/v1/embeddings", {"input": "x", "layer": 5}, "layer", "outside"),
    ("/v1/embeddings", {"input": "x", "pooling": "max"}, "pooling", "mean"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format", "base64"),
    ("/v1/embeddings", {"input": "x", "dimensions": 8}, "dimensions", "not supported"),
    ("/embedding", {"pooling": "mean"}, "content", "must be provided"),
    ("/embedding", {"content": "x", "embd_normalize": -2}, "embd_normalize", "greater"),
    ("/embedding", {"content": []}, "content", "empty"),
    ("/embedding", {"content": "x", "layer": -9}, "layer", "outside"),
])
async def test_invalid_fields_are_400_naming_the_field(client, path, body, param, fragment):
    error = (await post(client, path, body, status=400))["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert fragment in error["message"], error


@pytest.mark.parametrize("path,field", [("/v1/features", "input"), ("/v1/embeddings", "input"),
                                        ("/embedding", "content")])
async def test_too_long_for_the_context(client, path, field):
    error = (await post(client, path, {field: [1] + [403] * 600}, status=400))["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == field
    assert "512" in error["message"]


async def test_unknown_steering_vector_is_404(client):
    error = (await post(client, "/v1/features", {"input": "x", "steering": [{"vector": "nope"}]},
                        status=404))["error"]
    assert error["code"] == "steering_vector_not_found"
