"""The Redis steering store (server/steering_redis.py) against a real redis-server: the stored
bytes, sharing between replicas, the size bound under concurrent writers, damaged values, and a
Redis that goes down and comes back."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from tiller.server.app import ServerConfig, create_app, load_model
from tiller.server.steering_redis import INDEX, USED, VEC, RedisStore
from tiller.server.steering_store import SteeringVector, StoreFull, StoreUnavailable, encode

from tests.redis_server import RedisServer, start_redis
from tests.test_server import post
from tests.test_steering_store import actadd, control, damaged_bytes

MAX = 1 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = start_redis(tmp_path / "redis")
    yield srv
    srv.stop()


@pytest.fixture
def raw(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def test_vectors_are_stored_as_the_directory_stores_bytes(server, raw):
    store = RedisStore.from_url(server.url, MAX)
    for vec in (control("a"), actadd("b")):
        assert store.put(vec) is vec
        assert raw.get(VEC + vec.id) == encode(vec)
        assert int(raw.hget(INDEX, vec.id)) == vec.nbytes
    assert store.used_bytes == int(raw.get(USED)) == control("a").nbytes + actadd("b").nbytes
    fresh = RedisStore.from_url(server.url, MAX)  # nothing cached: read from Redis
    got = fresh.get(actadd("b").id)
    np.testing.assert_array_equal(got.rows, actadd("b").rows)
    assert [v.id for v in fresh.list()] == [v.id for v in store.list()]
    assert fresh.list("another model") == []


def test_replicas_share_vectors_and_see_deletes_at_once(server):
    a, b = RedisStore.from_url(server.url, MAX), RedisStore.from_url(server.url, MAX)
    vec = control("shared")
    a.put(vec)
    assert b.get(vec.id).describe() == vec.describe()  # b now has it cached
    assert a.delete(vec.id)
    assert b.get(vec.id) is None and b.list() == []  # the cached copy is not served
    assert not b.delete(vec.id)
    assert a.used_bytes == b.used_bytes == 0


def test_put_is_idempotent_across_replicas(server):
    a, b = RedisStore.from_url(server.url, MAX), RedisStore.from_url(server.url, MAX)
    vec = control("once")
    a.put(vec)
    later = SteeringVector(vec.id, vec.kind, vec.model_key, vec.dim, vec.request,
                           created=vec.created + 100, directions=vec.directions)
    assert b.put(later).created == vec.created  # the stored one, as the directory store does
    assert b.used_bytes == vec.nbytes


def test_size_bound_holds_under_concurrent_writers(server, raw):
    one = control("v0").nbytes
    stores = [RedisStore.from_url(server.url, 10 * one) for _ in range(2)]
    results: list[str] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        store = stores[w % 2]
        for i in range(12):
            try:
                store.put(control(f"w{w}-{i}"))
                outcome = "stored"
            except StoreFull:
                outcome = "full"
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("stored") == 10 and results.count("full") == 62
    assert int(raw.get(USED)) == 10 * one and raw.hlen(INDEX) == 10
    assert sum(int(x) for x in raw.hvals(INDEX)) == 10 * one
    with pytest.raises(StoreFull, match=f"holds {10 * one} of {10 * one} bytes"):
        stores[0].put(control("one more"))


def test_a_damaged_value_is_skipped_and_reported(server, raw, caplog):
    store = RedisStore.from_url(server.url, MAX)
    good, victim = control("good"), control("victim")
    store.put(good)
    store.put(victim)
    raw.set(VEC + victim.id, damaged_bytes("truncated", victim))
    fresh = RedisStore.from_url(server.url, MAX)
    with caplog.at_level(logging.ERROR, "tiller.server.steering_redis"):
        assert [v.id for v in fresh.list()] == [good.id]
        assert fresh.get(victim.id) is None
    assert fresh.damaged_entries == 1
    assert f"{VEC}{victim.id}" in caplog.text and "not a readable .npz" in caplog.text


def test_a_redis_that_is_down_is_unavailable_then_comes_back(tmp_path):
    srv = start_redis(tmp_path / "redis", appendonly=True)
    store = RedisStore.from_url(srv.url, MAX)
    vec = control("survivor")
    store.put(vec)
    srv.kill()
    for call in (lambda: store.get(vec.id), store.list, lambda: store.put(control("x")),
                 lambda: store.delete(vec.id), lambda: store.used_bytes):
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{srv.port} db 0"):
            call()
        assert time.monotonic() - start < 3  # refused at once: no request hangs on it
    srv = start_redis(tmp_path / "redis", port=srv.port, appendonly=True)
    try:
        # the pooled connections died with the old server: the first call reconnects
        assert store.get(vec.id) is not None and store.used_bytes == vec.nbytes
    finally:
        srv.stop()


def test_the_url_is_checked():
    with pytest.raises(ValueError, match="scheme"):
        RedisStore.from_url("http://localhost:6379/0", MAX)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore.from_url("redis://localhost:6379/0?decode_responses=true", MAX)
    assert str(RedisStore.from_url("redis://:secret@db.example:6380/3", MAX)) == \
        "redis db.example:6380 db 3"  # no password in messages


# -----------------------------------------------------------------------------------------------
# through the server: two apps ("replicas") on one Redis


@pytest.fixture(scope="module")
def model_config(shared_models: Path, tmp_path_factory) -> ServerConfig:
    return ServerConfig(model_path=shared_models / "stories260K.bin",
                        tokenizer_path=shared_models / "tok512.bin", parallel=4,
                        token_budget=64, dtype="f32",
                        steering_dir=tmp_path_factory.mktemp("unused-steering"))


@pytest.fixture(scope="module")
def model(model_config):
    return load_model(model_config)


async def test_replicas_share_vectors_through_redis(aiohttp_client, model_config, model,
                                                    server):
    config = ServerConfig(**{**model_config.__dict__, "steering_store": server.url})
    one = await aiohttp_client(create_app(config, model=model))
    two = await aiohttp_client(create_app(config, model=model))
    made = await post(one, "/v1/steering", {"method": "actadd", "add": "dog", "sub": "cat",
                                           "layer": 1})
    assert not any(config.steering_dir.iterdir())  # nothing went to the directory
    body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0.8, "seed": 5,
            "steering": [{"vector": made["id"], "layer": 3, "scale": 8.0}]}
    steered = (await post(two, "/v1/completions", body))["choices"][0]["text"]
    assert steered == (await post(one, "/v1/completions", body))["choices"][0]["text"]
    plain = await post(two, "/v1/completions", {**body, "steering": []})
    assert plain["choices"][0]["text"] != steered
    listed = await (await two.get("/v1/steering")).json()
    assert [v["id"] for v in listed["data"]] == [made["id"]]
    assert listed["used_bytes"] == made["bytes"]
    assert (await two.delete(f"/v1/steering/{made['id']}")).status == 200
    error = (await post(one, "/v1/completions", body, status=404))["error"]
    assert error["code"] == "steering_vector_not_found"  # deleted on two: gone on one too


async def test_a_redis_that_is_down_is_a_503_only_for_what_needs_it(aiohttp_client,
                                                                     model_config, model,
                                                                     tmp_path):
    srv = start_redis(tmp_path / "redis")
    config = ServerConfig(**{**model_config.__dict__, "steering_store": srv.url})
    client = await aiohttp_client(create_app(config, model=model))
    made = await post(client, "/v1/steering", {"method": "actadd", "add": "sun", "sub": "rain",
                                              "layer": 1})
    srv.kill()
    steered = {"prompt": "Once", "max_tokens": 4, "steering": [{"vector": made["id"]}]}
    for method, path, body in [("POST", "/v1/completions", steered),
                               ("GET", f"/v1/steering/{made['id']}", None),
                               ("GET", "/v1/steering", None),
                               ("POST", "/v1/steering", {"method": "actadd", "add": "a",
                                                         "sub": "b", "layer": 1})]:
        response = await client.request(method, path, json=body)
        error = (await response.json())["error"]
        assert response.status == 503, (path, error)
        assert error["code"] == "steering_store_unavailable"
        assert f"127.0.0.1:{srv.port}" in error["message"]
        assert error["param"] == ("steering" if path == "/v1/completions" else None)
    assert (await client.get("/health")).status == 200
    plain = await post(client, "/v1/completions", {"prompt": "Once", "max_tokens": 4})
    assert plain["choices"][0]["text"]  # everything else is served


def test_ci_installs_redis_server_so_these_tests_never_skip():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    install = ci[ci.index("apt-get install"):]
    assert "redis-server" in install.split("fi", 1)[0] and "nginx" in install.split("fi", 1)[0]
