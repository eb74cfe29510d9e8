"""The weight cache (engine/weight_cache.py): a second load maps the file the first one wrote,
bitwise the weights build_weights makes and the same logits; broken files are removed and
rebuilt, never handed to a kernel; the flag and the environment turn it off."""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from tiller.engine import weight_cache as wc
from tiller.engine.config import ModelConfig
from tiller.engine.dequant import random_blocks
from tiller.engine.engine import Engine
from tiller.engine.identity import model_key
from tiller.engine.llama2c import random_tensors, write_llama2c
from tiller.engine.loader import load_checkpoint
from tiller.engine.weights import Weights, build_weights

from tests.test_gguf import gguf_tensors, write_gguf
from tiller.cli import main

SHARED = ModelConfig(64, 160, 2, 4, 2, 96, 32)  # dim and hidden not multiples of 64: padding
SEPARATE = ModelConfig(64, 160, 2, 4, 2, 96, 32, shared_classifier=False)
TOKENS = [1, 5, 9, 33, 2, 70]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache root, and every model file large enough to be cached."""
    monkeypatch.setenv("TILLER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(wc.ENV, raising=False)
    monkeypatch.setattr(wc, "MIN_FILE_BYTES", 0)
    return tmp_path / "cache" / "weights"


def model_file(tmp_path, config: ModelConfig, kind: str) -> str:
    tensors = random_tensors(config, seed=3)
    if kind == "llama2c":
        return str(write_llama2c(tmp_path / "m.bin", config, tensors, "v0"))
    path = tmp_path / f"m-{kind}.gguf"
    if kind == "gguf-k":  # K-quants need rows of 256 values: a wider model, Q4_K and Q6_K
        c = ModelConfig(256, 512, 2, 4, 2, 96, 32, shared_classifier=config.shared_classifier)
        tensors = random_tensors(c, seed=3)
        rng = np.random.default_rng(3)
        raw = {name: (random_blocks(T.Q6_K if "down" in name else T.Q4_K,
                                    int(np.prod(a.shape[:-1])), a.shape[-1], rng),
                      T.Q6_K if "down" in name else T.Q4_K)
               for name, a in gguf_tensors(c, tensors).items() if a.ndim == 2}
        return str(write_gguf(path, c, tensors, raw=raw))
    return str(write_gguf(path, config, tensors, T.Q8_0))


def mapped(a: np.ndarray) -> bool:
    """Whether `a` is a view of a memory map (not memory of its own)."""
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


@pytest.mark.parametrize("kind", ["gguf-k", "gguf-q8_0", "llama2c"])
@pytest.mark.parametrize("dtype", ["q8_0", "f32"])
@pytest.mark.parametrize("config", [SHARED, SEPARATE], ids=["shared", "separate"])
def test_a_second_load_maps_the_same_weights_and_gives_the_same_logits(
        cache, tmp_path, kind, dtype, config):
    path = model_file(tmp_path, config, kind)
    ckpt = load_checkpoint(path)
    reference = build_weights(ckpt.config, ckpt.tensors, dtype)  # never touches the cache
    cold = Engine.load(path, dtype)
    files = list(cache.glob(f"*{wc.SUFFIX}"))
    assert len(files) == 1 and f"-{dtype}-" in files[0].name
    warm = Engine.load(path, dtype)
    for name, want, got in zip(Weights._fields, reference, warm.weights, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(got, want), name
        assert not got.flags.writeable, name
        assert got.size == 0 or mapped(got), name
    assert not any(mapped(a) for a in cold.weights)  # the cold load kept what it built
    if ckpt.config.shared_classifier:
        assert warm.weights.embedding is warm.weights.classifier  # stored once
    tokens = TOKENS[:4]
    assert np.array_equal(warm.forward_all(tokens).logits, cold.forward_all(tokens).logits)


def test_the_header_is_what_the_module_docstring_says(cache, tmp_path):
    path = model_file(tmp_path, SEPARATE, "gguf-q8_0")
    Engine.load(path)
    (file,) = cache.glob("*.weights")
    data = file.read_bytes()
    assert data[:8] == wc.MAGIC
    (n,) = struct.unpack_from("<Q", data, 8)
    header = json.loads(data[16:16 + n])
    assert header["layout"] == wc.layout_tag() and header["dtype"] == "q8_0"
    assert header["config"]["dim"] == 64 and header["config"]["shared_classifier"] is False
    assert [f["name"] for f in header["fields"]] == list(Weights._fields)
    start = -(-(16 + n) // 64) * 64
    ckpt = load_checkpoint(path)
    built = build_weights(ckpt.config, ckpt.tensors, "q8_0")
    for spec, array in zip(header["fields"], built, strict=True):
        assert spec["offset"] % 64 == 0
        raw = np.frombuffer(data, array.dtype, array.size, start + spec["offset"])
        assert np.array_equal(raw.reshape(array.shape), array), spec["name"]
    assert len(data) == start + header["data_bytes"]


def _header_of(file) -> tuple[dict, int]:
    data = file.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 8)
    return json.loads(data[16:16 + n]), n


def _rewrite_header(file, edit) -> None:
    """Edit the JSON header and write the file again with the data after it, aligned as the
    writer aligns it, so that only what `edit` changes is wrong."""
    data = file.read_bytes()
    header, n = _header_of(file)
    payload = data[-(-(16 + n) // 64) * 64:]
    edit(header)
    blob = json.dumps(header, separators=(",", ":")).encode()
    head = wc.MAGIC + struct.pack("<Q", len(blob)) + blob
    file.write_bytes(head + b"\0" * (-len(head) % 64) + payload)


def _set_field(name, key, value):
    def edit(header):
        next(f for f in header["fields"] if f["name"] == name)[key] = value
    return edit


BREAKS = {
    "empty": lambda f: f.write_bytes(b""),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[:-1000]),
    "half": lambda f: f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2]),
    "bad magic": lambda f: f.write_bytes(b"GGUF" + f.read_bytes()[4:]),
    "header length past the end": lambda f: f.write_bytes(
        f.read_bytes()[:8] + struct.pack("<Q", 1 << 40) + f.read_bytes()[16:]),
    "garbage header": lambda f: f.write_bytes(
        f.read_bytes()[:16] + b"\xff" * 40 + f.read_bytes()[56:]),
    "wrong shape": lambda f: _rewrite_header(f, _set_field("wo", "shape", [2, 64, 32])),
    "wrong dtype": lambda f: _rewrite_header(f, _set_field("wo", "dtype", "int8")),
    "object dtype": lambda f: _rewrite_header(f, _set_field("wo", "dtype", "object")),
    "not a dtype": lambda f: _rewrite_header(f, _set_field("wo", "dtype", "<V12")),
    "offset past the end": lambda f: _rewrite_header(
        f, _set_field("classifier", "offset", 1 << 30)),
    "misaligned offset": lambda f: _rewrite_header(f, _set_field("wo", "offset", 8)),
    "overlapping": lambda f: _rewrite_header(f, _set_field("wo", "offset", 0)),
    "wrong nbytes": lambda f: _rewrite_header(f, _set_field("w2", "nbytes", 12)),
    "other config": lambda f: _rewrite_header(
        f, lambda h: h["config"].__setitem__("n_heads", 2)),
    "other layout": lambda f: _rewrite_header(
        f, lambda h: h.__setitem__("layout", "0" * 16)),
    "missing field": lambda f: _rewrite_header(f, lambda h: h["fields"].pop()),
    "bad same_as": lambda f: _rewrite_header(
        f, _set_field("classifier", "same_as", "rope_sin")),
}


@pytest.mark.parametrize("kind", BREAKS)
def test_a_broken_file_is_removed_and_rebuilt(kind, cache, tmp_path, caplog):
    path = model_file(tmp_path, SEPARATE, "gguf-q8_0")
    good = Engine.load(path).forward_all(TOKENS).logits
    (file,) = cache.glob("*.weights")
    intact = file.read_bytes()
    BREAKS[kind](file)
    assert file.read_bytes() != intact
    with caplog.at_level(logging.WARNING, logger=wc.__name__):
        engine = Engine.load(path)
    assert "ignoring a broken weight-cache file" in caplog.text and str(file) in caplog.text
    assert not any(mapped(a) for a in engine.weights)  # rebuilt, not read from the broken file
    assert np.array_equal(engine.forward_all(TOKENS).logits, good)
    assert file.read_bytes() == intact  # written again for the next start
    assert all(mapped(a) for a in Engine.load(path).weights if a.size)


def test_the_flag_and_the_environment_turn_it_off_and_small_files_are_not_cached(
        cache, tmp_path, monkeypatch):
    path = model_file(tmp_path, SHARED, "gguf-q8_0")
    Engine.load(path, weight_cache=False)
    assert not cache.exists()
    monkeypatch.setenv(wc.ENV, "0")
    Engine.load(path)
    assert not cache.exists()
    monkeypatch.delenv(wc.ENV)
    ckpt = load_checkpoint(path)
    wc.load_or_build(ckpt, "q8_0", min_bytes=10**9)
    assert not cache.exists()
    Engine.load(path)
    assert len(list(cache.glob("*.weights"))) == 1


def test_the_cli_flag(cache, tmp_path, capsys):
    path = model_file(tmp_path, SHARED, "gguf-q8_0")
    argv = ["generate", "--model", path, "--max-tokens", "8", "--seed", "1"]
    assert main([*argv, "--no-weight-cache"]) == 0
    assert not cache.exists()
    built = capsys.readouterr().out
    assert main(argv) == 0
    assert len(list(cache.glob("*.weights"))) == 1
    assert capsys.readouterr().out == built
    assert main(argv) == 0  # mapped: the same tokens
    assert capsys.readouterr().out == built


def test_least_recently_used_files_are_evicted(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(wc, "MAX_FILES", 2)
    paths = []
    for i in range(3):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        tensors = random_tensors(SHARED, seed=i)
        paths.append(str(write_gguf(folder / "m.gguf", SHARED, tensors, T.Q8_0)))
    files = [wc.cache_path(model_key(p), "q8_0") for p in paths]
    Engine.load(paths[0])
    Engine.load(paths[1])
    os.utime(files[1], (1, 1))  # the least recently used
    Engine.load(paths[0])  # touches files[0]
    assert files[0].stat().st_mtime > files[1].stat().st_mtime
    Engine.load(paths[2])
    assert sorted(cache.glob("*.weights")) == sorted([files[0], files[2]])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_the_architectures_extra_weights_round_trip(cache, tmp_path, arch, caplog):
    """Qwen 2's biases and Qwen 3's q/k norms and wider queries (q_dim 512 on a 256-wide model)
    come back from the cache as build_weights makes them, and the warm load reuses the file."""
    from tests import arch_models

    path = arch_models.write(tmp_path / f"{arch}.gguf", arch_models.SPECS[arch])
    ckpt = load_checkpoint(path)
    reference = build_weights(ckpt.config, ckpt.tensors, "q8_0")
    cold = Engine.load(path)
    (file,) = cache.glob(f"*{wc.SUFFIX}")
    inode = file.stat().st_ino
    with caplog.at_level(logging.INFO, logger=wc.__name__):
        warm = Engine.load(path)
    assert file.stat().st_ino == inode  # read, not rejected and rewritten
    assert "mapped from the cache" in caplog.text and "broken" not in caplog.text
    for name, want, got in zip(Weights._fields, reference, warm.weights, strict=True):
        assert np.array_equal(got, want), name
    extra = ("bqkv",) if arch == "qwen2" else ("q_norm", "k_norm")
    assert all(getattr(warm.weights, name).size for name in extra)
    assert mapped(warm.weights.wqkv)
    tokens = TOKENS[:4]
    assert np.array_equal(warm.forward_all(tokens).logits, cold.forward_all(tokens).logits)
