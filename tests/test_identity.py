"""Model identity: the BLAKE3 key and its on-disk cache, the uuid (declared or derived from the
tensors), and both exposed by the server."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import blake3
import numpy as np
import pytest
from gguf import GGUFValueType as V
from tiller.engine import identity
from tiller.engine.config import ModelConfig
from tiller.engine.convert import convert
from tiller.engine.identity import (
    CACHE_FILE,
    TENSOR_NAMESPACE,
    TENSOR_NAMESPACE_NAME,
    derived_uuid,
    model_key,
    model_uuid,
)
from tiller.engine.llama2c import load_llama2c, random_tensors, write_llama2c
from tiller.engine.loader import load_checkpoint
from tiller.server.app import ServerConfig, create_app, load_model

from tests.test_gguf import write_gguf

CONFIG = ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80,
                     max_seq_len=32)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty identity cache, also the default for code that does not pass one."""
    path = tmp_path / "cache"
    monkeypatch.setenv("TILLER_CACHE_DIR", str(path))
    return path


@pytest.fixture
def count_hashing(monkeypatch) -> list[str]:
    """Paths hashed by identity.hash_file from now on."""
    calls: list[str] = []
    real = identity.hash_file

    def counting(path):
        calls.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(identity, "hash_file", counting)
    return calls


def test_the_namespace_is_the_documented_derivation():
    assert uuid.uuid5(uuid.NAMESPACE_URL, TENSOR_NAMESPACE_NAME) == TENSOR_NAMESPACE


# -----------------------------------------------------------------------------------------------
# the key


def test_the_key_is_blake3_of_the_bytes(tmp_path, cache):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    data = np.random.default_rng(0).bytes(3 << 20)
    a.write_bytes(data)
    b.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    c.write_bytes(data)
    assert model_key(a) == blake3.blake3(data).hexdigest()
    assert model_key(b) != model_key(a) == model_key(c)  # other bytes, other key; same, same


def test_a_second_start_does_not_rehash_and_changes_do(tmp_path, cache, count_hashing):
    path = tmp_path / "model.bin"
    path.write_bytes(np.random.default_rng(1).bytes(64 << 20))
    start = time.perf_counter()
    key = model_key(path)
    hashed = time.perf_counter() - start
    start = time.perf_counter()
    assert model_key(path) == key
    cached = time.perf_counter() - start
    assert count_hashing == [str(path)]
    print(f"\n64 MiB: hashed in {hashed * 1e3:.1f} ms, from the cache in {cached * 1e3:.2f} ms")
    entry = json.loads((cache / CACHE_FILE).read_text())["files"][str(path)]
    st = path.stat()
    assert entry == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
                     "blake3": key}
    # touched: hashed again, same key
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert model_key(path) == key and len(count_hashing) == 2
    # one byte changed in place (same size and inode), mtime moved on
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2000))
    changed = model_key(path)
    assert changed != key and len(count_hashing) == 3
    # replaced by a copy (new inode), same size and mtime: hashed again
    copy = tmp_path / "copy"
    copy.write_bytes(path.read_bytes())
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 2000))
    os.replace(copy, path)
    assert model_key(path) == changed and len(count_hashing) == 4
    assert model_key(path) == changed and len(count_hashing) == 4


def test_a_symlink_and_a_relative_path_share_the_entry(tmp_path, cache, count_hashing,
                                                       monkeypatch):
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights")
    (tmp_path / "link").symlink_to(path)
    key = model_key(path)
    monkeypatch.chdir(tmp_path)
    assert model_key("link") == model_key("model.bin") == key and len(count_hashing) == 1


def test_a_broken_cache_is_ignored_and_replaced(tmp_path, cache, caplog):
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights")
    want = blake3.blake3(b"weights").hexdigest()
    cache.mkdir()
    for junk in ("{not json", '{"version": 99, "files": {}}', "[1, 2]",
                 json.dumps({"version": 1, "files": {str(path): "nonsense"}})):
        (cache / CACHE_FILE).write_text(junk)
        with caplog.at_level(logging.WARNING):
            assert model_key(path) == want
        assert json.loads((cache / CACHE_FILE).read_text())["files"][str(path)]["blake3"] == want
    assert "ignoring" in caplog.text
    # an unwritable cache location: the key all the same, and a warning
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING):
        assert model_key(path, cache=blocked / "sub") == want
    assert "could not write the identity cache" in caplog.text


def test_a_file_that_changes_while_hashed_is_not_cached(tmp_path, cache, monkeypatch):
    path = tmp_path / "model.bin"
    path.write_bytes(b"before")

    def racing(p):
        digest = blake3.blake3(Path(p).read_bytes()).hexdigest()
        Path(p).write_bytes(b"after!!")
        return digest

    monkeypatch.setattr(identity, "hash_file", racing)
    assert model_key(path) == blake3.blake3(b"before").hexdigest()
    assert not (cache / CACHE_FILE).exists()


def test_the_cache_is_bounded_and_forgets_deleted_files(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(identity, "MAX_CACHE_ENTRIES", 3)

    def add(name: str) -> list[str]:
        (tmp_path / name).write_bytes(name.encode())
        model_key(tmp_path / name)
        return [Path(p).name for p in json.loads((cache / CACHE_FILE).read_text())["files"]]

    assert [add(name) for name in "abc"][-1] == ["a", "b", "c"]
    (tmp_path / "b").unlink()
    assert add("d") == ["a", "c", "d"]
    assert add("e") == ["c", "d", "e"]


# -----------------------------------------------------------------------------------------------
# the uuid


def test_a_declared_uuid_is_used_in_canonical_form(tmp_path, cache, caplog):
    declared = "6BA7B810-9DAD-11D1-80B4-00C04FD430C8"
    path = write_gguf(tmp_path / "m.gguf", CONFIG, random_tensors(CONFIG),
                      kv={"general.uuid": (V.STRING, declared)})
    assert model_uuid(load_checkpoint(path)) == declared.lower()
    bad = write_gguf(tmp_path / "bad.gguf", CONFIG, random_tensors(CONFIG),
                     kv={"general.uuid": (V.STRING, "not-a-uuid")})
    with caplog.at_level(logging.WARNING):
        got = model_uuid(load_checkpoint(bad))
    assert "not a UUID" in caplog.text
    assert got == derived_uuid(load_checkpoint(bad)) and uuid.UUID(got).version == 5


def test_the_derived_uuid_follows_the_tensor_values(tmp_path, cache):
    tensors = random_tensors(CONFIG, seed=5)
    v0 = load_llama2c(write_llama2c(tmp_path / "m0.bin", CONFIG, tensors, "v0"))
    v1 = load_llama2c(write_llama2c(tmp_path / "m1.bin", CONFIG, tensors, "v1"))
    f32 = load_checkpoint(write_gguf(tmp_path / "m.gguf", CONFIG, tensors))
    assert model_uuid(v0) == model_uuid(v1) == model_uuid(f32)  # same values, any container
    tensors["wq"][0, 0, 0] += 1e-3
    other = load_llama2c(write_llama2c(tmp_path / "m2.bin", CONFIG, tensors, "v1"))
    assert model_uuid(other) != model_uuid(v1)
    q8 = load_llama2c(write_llama2c(tmp_path / "m3.bin", CONFIG, tensors, "v2"))
    assert model_uuid(q8) != model_uuid(other)  # int8 tensors as stored: not the same file


def test_the_derived_uuid_is_cached_with_the_key(tmp_path, cache, monkeypatch):
    ckpt = load_llama2c(write_llama2c(tmp_path / "m.bin", CONFIG, random_tensors(CONFIG), "v1"))
    first = model_uuid(ckpt)
    monkeypatch.setattr(identity, "derived_uuid", lambda c: pytest.fail("derived again"))
    assert model_uuid(ckpt) == first
    entry = json.loads((cache / CACHE_FILE).read_text())["files"][str(ckpt.path)]
    assert entry["tensor_uuid"] == first


# -----------------------------------------------------------------------------------------------
# the server


async def test_the_server_exposes_key_and_uuid_and_restarts_without_hashing(
        shared_models, tmp_path, cache, count_hashing, aiohttp_client):
    path = convert(shared_models / "stories260K.bin", tmp_path / "s.gguf", "q8_0",
                   shared_models / "tok512.bin").path
    count_hashing.clear()
    config = ServerConfig(model_path=path, parallel=2, token_budget=16,
                          steering_dir=tmp_path / "steering")
    model = load_model(config)
    assert count_hashing == [str(path)] and model.key == blake3.blake3(
        path.read_bytes()).hexdigest()
    src_uuid = model_uuid(load_llama2c(shared_models / "stories260K.bin"))
    assert model.uuid == src_uuid
    again = load_model(config)  # a restart: the key comes from the cache
    assert count_hashing == [str(path)] and (again.key, again.uuid) == (model.key, model.uuid)
    client = await aiohttp_client(create_app(config, model=model))
    meta = (await (await client.get("/v1/models")).json())["data"][0]["meta"]
    assert (meta["key"], meta["uuid"]) == (model.key, model.uuid)
    props = await (await client.get("/props")).json()
    assert (props["model_key"], props["model_uuid"]) == (model.key, model.uuid)
