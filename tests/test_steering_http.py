"""Steering over HTTP: /v1/steering and the `steering` field of generation requests."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from tiller.engine.engine import Engine
from tiller.engine.steering import build_actadd, build_control
from tiller.engine.tokenizer import SpmTokenizer
from tiller.server.app import ServerConfig, create_app
from tiller.server.steering_dir import DirectoryStore
from tiller.server.steering_store import SteeringVector, vector_id

from tests.test_cvec import hand_made
from tests.test_server import post, sse_events
from tests.test_steering_store import DAMAGE, control, damaged_bytes


@pytest.fixture(scope="module")
def config(shared_models: Path, tmp_path_factory) -> ServerConfig:
    return ServerConfig(model_path=shared_models / "stories260K.bin",
                        tokenizer_path=shared_models / "tok512.bin", parallel=8,
                        token_budget=64, dtype="f32",
                        steering_dir=tmp_path_factory.mktemp("steering"))


@pytest.fixture(scope="module")
def offline(shared_models):
    """The same model outside the server, for independent builds of the same vectors."""
    engine = Engine.load(shared_models / "stories260K.bin", dtype="f32", max_tokens=64)
    return engine, SpmTokenizer.from_llama2c(shared_models / "tok512.bin", vocab_size=512)


async def npy(client, vid: str) -> np.ndarray:
    response = await client.get(f"/v1/steering/{vid}", params={"format": "npy"})
    assert response.status == 200
    return np.load(io.BytesIO(await response.read()))


async def complete(client, steering=None, seed=5, max_tokens=40, **extra) -> str:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.8,
            "seed": seed, **extra}
    if steering is not None:
        body["steering"] = steering
    return (await post(client, "/v1/completions", body))["choices"][0]["text"]


async def test_actadd_vector_is_built_once_and_named_by_its_request(client, model, offline):
    request = {"method": "actadd", "add": "dog", "sub": "cat", "layer": 2}
    made = await post(client, "/v1/steering", request)
    again = await post(client, "/v1/steering", request)
    assert made["id"] == again["id"] == vector_id(model.key, {**request})
    assert made["kind"] == "actadd" and made["model_key"] == model.key and made["layers"] == [2]
    rows = await npy(client, made["id"])
    engine, tok = offline
    np.testing.assert_allclose(rows, build_actadd(engine, tok, "dog", "cat", 2), atol=1e-5)
    listed = await (await client.get("/v1/steering")).json()
    assert made["id"] in [v["id"] for v in listed["data"]]
    other = await post(client, "/v1/steering", {**request, "add": "dogs"})
    assert other["id"] != made["id"]


async def test_steering_changes_text_and_inline_equals_stored(client):
    made = await post(client, "/v1/steering", {"method": "actadd", "add": "dog", "sub": "cat",
                                              "layer": 1})
    plain = await complete(client)
    stored = await complete(client, [{"vector": made["id"], "layer": 3, "scale": 8.0}])
    inline = await complete(client, [{"add": "dog", "sub": "cat", "source_layer": 1,
                                      "layer": 3, "mul": 8.0}])
    assert stored == inline != plain
    # the same through llama.cpp's /completion
    llama = {"prompt": "Once upon a time", "n_predict": 40, "temperature": 0.8, "seed": 5,
             "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    body = await post(client, "/completion", {**llama, "steering": [
        {"vector": made["id"], "layer": 3, "scale": 8.0}]})
    plain_body = await post(client, "/completion", llama)
    assert body["content"] == stored and plain_body["content"] == plain


async def test_requests_with_different_steering_share_a_batch_without_interference(client):
    made = await post(client, "/v1/steering", {"method": "actadd", "add": "happy",
                                              "sub": "sad", "layer": 2})
    settings = [None, [{"vector": made["id"], "layer": 2, "scale": 6.0}],
                [{"vector": made["id"], "layer": 4, "scale": -6.0}],
                [{"add": "ball", "sub": "tree", "layer": 1, "mul": 5.0}], None]
    solo = [await complete(client, s, seed=i) for i, s in enumerate(settings)]
    together = await asyncio.gather(*(complete(client, s, seed=i)
                                      for i, s in enumerate(settings)))
    assert list(together) == solo


@pytest.mark.parametrize("method", ["mean", "pca"])
async def test_control_vectors_gguf_round_trip(client, model, offline, method):
    pos = ["The dog ran and barked", "A happy dog played", "The puppy wagged its tail"]
    neg = ["The cat sat and purred", "A sleepy cat napped", "The kitten licked its paw"]
    made = await post(client, "/v1/steering", {"method": method, "positive": pos,
                                              "negative": neg, "layers": [2, 3, -1]})
    n = model.engine.config.n_layers
    assert made["kind"] == "control" and made["layers"] == [2, 3, n]
    engine, tok = offline
    want = build_control(engine, tok, pos, neg, [2, 3, n], method)
    got = await npy(client, made["id"])
    np.testing.assert_allclose(got, np.stack([want[k] for k in (2, 3, n)]), atol=1e-4)
    gguf_bytes = await (await client.get(f"/v1/steering/{made['id']}",
                                         params={"format": "gguf"})).read()
    assert gguf_bytes[:4] == b"GGUF"
    response = await client.post("/v1/steering/import", data=gguf_bytes)
    imported = await response.json()
    assert response.status == 200, imported
    assert imported["layers"] == [2, 3, n] and imported["id"] != made["id"]
    np.testing.assert_allclose(await npy(client, imported["id"]), got, atol=0)
    a = await complete(client, [{"vector": made["id"], "scale": 4.0}])
    b = await complete(client, [{"vector": imported["id"], "scale": 4.0}])
    assert a == b


async def test_delete_and_persistence(aiohttp_client, client, config, model):
    made = await post(client, "/v1/steering", {"method": "actadd", "add": "sun",
                                              "sub": "rain", "layer": 2})
    # a new server on the same directory knows the vector
    second = await aiohttp_client(create_app(config, model=model))
    assert (await second.get(f"/v1/steering/{made['id']}")).status == 200
    deleted = await (await client.delete(f"/v1/steering/{made['id']}")).json()
    assert deleted["deleted"] is True
    response = await client.get(f"/v1/steering/{made['id']}")
    assert response.status == 404 and (await response.json())["error"]["code"] == \
        "steering_vector_not_found"


async def test_store_size_bound(aiohttp_client, config, model, tmp_path):
    small = ServerConfig(**{**config.__dict__, "steering_dir": tmp_path, "steering_max_bytes":
                            3000})
    client = await aiohttp_client(create_app(small, model=model))
    await post(client, "/v1/steering", {"method": "actadd", "add": "a", "sub": "b", "layer": 1})
    error = (await post(client, "/v1/steering", {"method": "actadd", "add": "a long prompt",
                                                "sub": "b", "layer": 1}, status=507))["error"]
    assert error["code"] == "steering_store_full"


@pytest.mark.parametrize("steering,status,fragment", [
    ([{"vector": "sv-nope"}], 404, "no steering vector"),
    ([{"vector": "sv-x", "scale": "nan"}], 400, "finite"),
    ([{"add": "a", "sub": "b", "layer": 9}], 400, "layer 9"),
    ([{"add": "a", "sub": "b", "layer": 1, "source_layer": -9}], 400, "layer -9"),
    ([{"add": "a"}], 400, "add"),
    ([{"add": "word " * 700, "sub": "b", "layer": 1}], 400, "context"),
    ([{"vector": "v", "add": "a", "sub": "b", "layer": 1}], 400, "not both"),
    ([{"vector": "v"}] * 17, 400, "17"),
])
async def test_bad_steering_is_a_4xx_naming_the_field(client, steering, status, fragment):
    body = {"prompt": "x", "max_tokens": 2, "steering": steering}
    if steering and steering[0].get("scale") == "nan":
        body = '{"prompt": "x", "max_tokens": 2, "steering": [{"vector": "v", "scale": NaN}]}'
        response = await client.post("/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        error = (await response.json())["error"]
        assert response.status == status
    else:
        error = (await post(client, "/v1/completions", body, status=status))["error"]
    assert error["param"] == "steering"
    assert fragment in error["message"]


async def test_a_vector_of_another_model_is_refused(client, config):
    store = DirectoryStore(config.steering_dir, config.steering_max_bytes)
    foreign = SteeringVector("sv-foreign", "control", "0" * 64, 64, {"method": "import"},
                             directions={2: np.ones(64, np.float32)})
    store.put(foreign)
    server_store = client.app  # the app opened the directory before: reopen to see the file
    from tiller.server.app import STATE

    server_store[STATE].steering.put(foreign)
    error = (await post(client, "/v1/completions", {
        "prompt": "x", "max_tokens": 1, "steering": [{"vector": "sv-foreign"}]},
        status=400))["error"]
    assert error["code"] == "steering_model_mismatch"


async def test_bad_create_requests(client):
    for body, fragment in [
        ({"method": "actadd", "add": "a", "sub": "b"}, "layer"),
        ({"method": "pca", "positive": ["a"], "negative": ["b"]}, "two prompt pairs"),
        ({"method": "mean", "positive": ["a", "b"], "negative": ["c"]}, "same"),
        ({"method": "magic"}, "method"),
        ({"method": "mean", "positive": ["a"], "negative": ["b"], "layers": [99]}, "layer 99"),
    ]:
        error = (await post(client, "/v1/steering", body, status=400))["error"]
        assert fragment in error["message"], (body, error)
    made = await post(client, "/v1/steering", {"method": "actadd", "add": "a", "sub": "b",
                                              "layer": 1})
    response = await client.get(f"/v1/steering/{made['id']}", params={"format": "gguf"})
    assert response.status == 400 and "npy" in (await response.json())["error"]["message"]
    response = await client.post("/v1/steering/import", data=b"not a gguf file")
    assert response.status == 400


async def test_streamed_steered_chat(client):
    made = await post(client, "/v1/steering", {"method": "actadd", "add": "dog", "sub": "cat",
                                              "layer": 1})
    request = {"messages": [{"role": "user", "content": "Once"}], "max_tokens": 10,
               "temperature": 0, "stream": True,
               "steering": [{"vector": made["id"], "layer": 2, "scale": 5.0}]}
    events = await sse_events(await client.post("/v1/chat/completions", json=request))
    whole = await post(client, "/v1/chat/completions", {**request, "stream": False})
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == whole["choices"][0]["message"]["content"]


@pytest.mark.parametrize("kind", sorted(DAMAGE))
async def test_a_damaged_entry_is_reported_and_the_server_serves_the_rest(
        aiohttp_client, config, model, tmp_path, caplog, kind):
    dim = model.engine.config.dim
    good = control("good", dim=dim, key=model.key)
    victim = control("victim", dim=dim, key=model.key)
    DirectoryStore(tmp_path, config.steering_max_bytes).put(good)
    (tmp_path / f"{victim.id}.npz").write_bytes(damaged_bytes(kind, victim))
    client = await aiohttp_client(create_app(
        ServerConfig(**{**config.__dict__, "steering_dir": tmp_path}), model=model))
    assert f"{victim.id}.npz" in caplog.text and DAMAGE[kind] in caplog.text
    metrics = await (await client.get("/metrics")).text()
    assert "\ntiller_steering_store_damaged_entries 1.0\n" in metrics
    listed = await (await client.get("/v1/steering")).json()
    assert [v["id"] for v in listed["data"]] == [good.id]
    assert (await client.get(f"/v1/steering/{victim.id}")).status == 404
    plain = await complete(client)
    assert await complete(client, [{"vector": good.id, "scale": 8.0}]) != plain


async def test_an_import_whose_directions_overflow_is_a_400_naming_the_file(client, model,
                                                                             tmp_path):
    big = np.full(model.engine.config.dim, 3e38, np.float32)  # finite; twice it is not
    path = tmp_path / "overflow.gguf"
    hand_made(path, {"direction.2": big, "direction.02": big})
    response = await client.post("/v1/steering/import", data=path.read_bytes())
    error = (await response.json())["error"]
    assert response.status == 400 and error["param"] == "file"
    assert error["message"].startswith("upload: tensors direction.2, direction.02 (tiller "
                                       "layer 3) sum to NaN or infinite"), error
