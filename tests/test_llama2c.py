"""llama2.c checkpoints: the writer against a transcription of export.py, round trips of every
layout, the real stories260K file, v1/q80v1 disambiguation, and malformed files."""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from tiller.engine.config import GROUP_SIZE, ModelConfig, rope_tables
from tiller.engine.llama2c import (
    FORMATS,
    MAGIC,
    Checkpoint,
    CheckpointError,
    load_llama2c,
    random_tensors,
    tensor_shapes,
    write_llama2c,
)
from tiller.engine.quant import QTensor, quantize_q8_0

# w2's rows of 172 don't fit export.py's groups of 64: that tensor takes the requantizing path
SMALL = ModelConfig(dim=64, hidden_dim=172, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=96,
                    max_seq_len=32)
# dim 96 makes export.py back off to groups of 32; unshared classifier; everything exact
UNSHARED = ModelConfig(dim=96, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                       vocab_size=80, max_seq_len=16, shared_classifier=False)
CONFIGS = {"small": SMALL, "unshared": UNSHARED}
MATRICES = ("token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "classifier")


# -----------------------------------------------------------------------------------------------
# an independent transcription of llama2.c's export.py (legacy_export, version1_export,
# version2_export, and the first grouped-int8 export that wrote version 1)


def ref_quantize_q80(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    w = w.astype(np.float32).reshape(-1, group_size)
    scale = np.abs(w).max(axis=1) / np.float32(127.0)
    return np.round(w / scale[:, None]).astype(np.int8), scale


def ref_export(cfg: ModelConfig, t: dict[str, np.ndarray], fmt: str, group_size: int) -> bytes:
    L = cfg.n_layers
    p = [cfg.dim, cfg.hidden_dim, L, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.max_seq_len]
    shared = cfg.shared_classifier

    def f32(a: np.ndarray) -> bytes:
        return a.astype("<f4").tobytes()

    def layers(name: str) -> list[np.ndarray]:
        return [t[name][i] for i in range(L)]

    if fmt == "v0":
        if not shared:
            p[5] = -p[5]
        out = [struct.pack("iiiiiii", *p), f32(t["token_embedding"])]
        for name in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"):
            out += [f32(w) for w in layers(name)]
        out.append(f32(t["final_norm"]))
        out += [f32(table) for table in rope_tables(cfg, torch_float32=True)]
        if not shared:
            out.append(f32(t["classifier"]))
        return b"".join(out)
    version = {"v1": 1, "v2": 2, "q80v1": 1}[fmt]
    header = struct.pack("I", MAGIC) + struct.pack("i", version) + struct.pack("iiiiiii", *p)
    header += struct.pack("B", int(shared))
    weights = [t["token_embedding"]]
    for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
        weights += layers(name)
    if not shared:
        weights.append(t["classifier"])
    norms = [*layers("attn_norm"), *layers("ffn_norm"), t["final_norm"]]
    if fmt == "v1":
        return header.ljust(256, b"\0") + b"".join(f32(w) for w in norms + weights)
    while cfg.dim % group_size:
        group_size //= 2
    header += struct.pack("i", group_size)
    out = [header.ljust(256, b"\0"), *[f32(w) for w in norms]]
    quantized = [ref_quantize_q80(w, group_size) for w in weights]
    if fmt == "v2":
        for q, s in quantized:
            out += [q.tobytes(), f32(s)]
    else:
        out += [q.tobytes() for q, _ in quantized] + [f32(s) for _, s in quantized]
    return b"".join(out)


def ref_file_q80(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """export.py's quantization of one (layers?, rows, cols) tensor, layer by layer ->
    (int8 values shaped like w, the fp32 values they stand for)."""
    stack = w.reshape(-1, *w.shape[-2:])
    qs, deqs = [], []
    for layer in stack:
        q, s = ref_quantize_q80(layer, group_size)
        qs.append(q.reshape(layer.shape))
        deqs.append((q.astype(np.float32) * s[:, None]).reshape(layer.shape))
    return np.stack(qs).reshape(w.shape), np.stack(deqs).reshape(w.shape)


# -----------------------------------------------------------------------------------------------
# writer and round trips


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", CONFIGS)
def test_writer_matches_export_py(tmp_path: Path, fmt: str, name: str) -> None:
    cfg = CONFIGS[name]
    t = random_tensors(cfg, seed=1)
    path = write_llama2c(tmp_path / "m.bin", cfg, t, fmt)
    assert path.read_bytes() == ref_export(cfg, t, fmt, 64)


def check_round_trip(ckpt: Checkpoint, t: dict[str, np.ndarray], group_size: int) -> list[str]:
    """Asserts loaded tensors match what export.py wrote -> names that were requantized."""
    assert set(ckpt.tensors) == set(tensor_shapes(ckpt.config))
    requantized = []
    for name, got in ckpt.tensors.items():
        want = t[name]
        if not isinstance(got, QTensor):  # fp32: exact, and a read-only view of the file
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            assert not got.flags.writeable and not got.flags.owndata and got.flags.aligned
            continue
        assert ckpt.format in ("v2", "q80v1") and name in MATRICES
        assert got.shape == want.shape and got.values.dtype == np.int8
        assert got.scales.dtype == np.float32
        assert got.scales.shape == (*want.shape[:-1], -(-want.shape[-1] // GROUP_SIZE))
        file_q, file_deq = ref_file_q80(want, group_size)
        if want.shape[-1] % group_size == 0 and group_size % GROUP_SIZE == 0:
            np.testing.assert_array_equal(got.values, file_q)  # the file's int8, untouched
            np.testing.assert_array_equal(got.dequantize(), file_deq)
        else:
            requantized.append(name)
            again = quantize_q8_0(file_deq)
            np.testing.assert_array_equal(got.values, again.values)
            np.testing.assert_array_equal(got.scales, again.scales)
    return requantized


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str,
                    name: str) -> None:
    cfg = CONFIGS[name]
    t = random_tensors(cfg, seed=2)
    path = write_llama2c(tmp_path / "m.bin", cfg, t, fmt)
    with caplog.at_level(logging.WARNING, logger="tiller.engine.llama2c"):
        ckpt = load_llama2c(path)
    assert ckpt.format == fmt and ckpt.config == cfg and ckpt.path == path
    group_size = 64 if cfg.dim % 64 == 0 else 32
    assert ckpt.file_group_size == (group_size if fmt in ("v2", "q80v1") else None)
    requantized = check_round_trip(ckpt, t, group_size)
    assert requantized == (["w2"] if fmt in ("v2", "q80v1") and name == "small" else [])
    assert len(caplog.records) == (1 if requantized else 0)
    if requantized:
        assert str(path) in caplog.text and "w2" in caplog.text


def test_exact_conversion_repeats_each_file_scale(tmp_path: Path) -> None:
    cfg = ModelConfig(dim=128, hidden_dim=256, n_layers=1, n_heads=4, n_kv_heads=4,
                      vocab_size=64, max_seq_len=8)
    t = random_tensors(cfg, seed=3)
    ckpt = load_llama2c(write_llama2c(tmp_path / "m.bin", cfg, t, "v2", group_size=128))
    assert ckpt.file_group_size == 128
    assert check_round_trip(ckpt, t, 128) == []
    wq = ckpt.tensors["wq"]
    _, s = ref_quantize_q80(t["wq"][0], 128)
    np.testing.assert_array_equal(wq.scales[0], np.repeat(s[:, None], 4, axis=1))


def test_small_groups_are_requantized_with_one_warning(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    t = random_tensors(SMALL, seed=4)
    path = write_llama2c(tmp_path / "m.bin", SMALL, t, "q80v1", group_size=16)
    with caplog.at_level(logging.WARNING, logger="tiller.engine.llama2c"):
        ckpt = load_llama2c(path)
    assert ckpt.file_group_size == 16
    assert sorted(check_round_trip(ckpt, t, 16)) == sorted(m for m in MATRICES[:-1])
    assert len(caplog.records) == 1


def test_random_tensors() -> None:
    a, b = random_tensors(UNSHARED, seed=5), random_tensors(UNSHARED, seed=5)
    assert set(a) == set(tensor_shapes(UNSHARED)) and "classifier" in a
    for name, shape in tensor_shapes(UNSHARED).items():
        assert a[name].shape == shape and a[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name])
    assert abs(float(a["wq"].std()) - 0.02) < 0.005
    assert abs(float(a["attn_norm"].mean()) - 1.0) < 0.05
    assert not np.array_equal(random_tensors(UNSHARED, seed=6)["wq"], a["wq"])


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    t = random_tensors(SMALL)
    with pytest.raises(ValueError, match="unknown llama2.c format"):
        write_llama2c(tmp_path / "m.bin", SMALL, t, "v3")
    with pytest.raises(ValueError, match=r"missing \['wq'\]"):
        write_llama2c(tmp_path / "m.bin", SMALL, {k: v for k, v in t.items() if k != "wq"}, "v0")
    with pytest.raises(ValueError, match="shared_classifier is True"):
        write_llama2c(tmp_path / "m.bin", SMALL, t | {"classifier": t["token_embedding"]}, "v1")
    with pytest.raises(ValueError, match="tensor w2 has shape"):
        write_llama2c(tmp_path / "m.bin", SMALL, t | {"w2": t["w1"]}, "v1")
    with pytest.raises(ValueError, match="group_size must be positive"):
        write_llama2c(tmp_path / "m.bin", SMALL, t, "v2", group_size=0)
    assert not list(tmp_path.iterdir())


# -----------------------------------------------------------------------------------------------
# the real model


def test_stories260k(shared_models: Path, tmp_path: Path) -> None:
    path = shared_models / "stories260K.bin"
    if not path.exists():
        pytest.skip(f"{path} not found")
    ckpt = load_llama2c(path)
    assert ckpt.format == "v0"
    assert ckpt.config == ModelConfig(dim=64, hidden_dim=172, n_layers=5, n_heads=8,
                                      n_kv_heads=4, vocab_size=512, max_seq_len=512,
                                      shared_classifier=True)
    assert "classifier" not in ckpt.tensors
    assert ckpt.tensors["w2"].shape == (5, 64, 172)
    assert np.isfinite(ckpt.tensors["token_embedding"]).all()
    # writing it back reproduces the file, up to the ~1 ulp RoPE tables it carries
    out = write_llama2c(tmp_path / "s.bin", ckpt.config, ckpt.tensors, "v0").read_bytes()
    orig = path.read_bytes()
    tables = 2 * 512 * 4 * 4
    assert len(out) == len(orig) and out[:-tables] == orig[:-tables]
    np.testing.assert_allclose(np.frombuffer(out[-tables:], "<f4"),
                               np.frombuffer(orig[-tables:], "<f4"), atol=1e-6)


# -----------------------------------------------------------------------------------------------
# version 1: fp32 or the original Q8_0 layout, by size


def test_v1_and_q80v1_are_told_apart_by_size(tmp_path: Path) -> None:
    t = random_tensors(SMALL, seed=7)
    v1 = write_llama2c(tmp_path / "v1.bin", SMALL, t, "v1")
    q = write_llama2c(tmp_path / "q.bin", SMALL, t, "q80v1")
    assert v1.read_bytes()[:8] == q.read_bytes()[:8]  # same magic and version
    assert load_llama2c(v1).format == "v1" and load_llama2c(q).format == "q80v1"
    # stray bytes where q80v1 keeps its group size don't confuse an fp32 v1 file
    blob = bytearray(v1.read_bytes())
    blob[37:41] = struct.pack("<i", 64)
    v1.write_bytes(bytes(blob))
    assert load_llama2c(v1).format == "v1"


def test_version1_file_matching_neither_layout(tmp_path: Path) -> None:
    t = random_tensors(SMALL, seed=8)
    q = write_llama2c(tmp_path / "q.bin", SMALL, t, "q80v1")
    v1_size = len(ref_export(SMALL, t, "v1", 64))
    q_size = q.stat().st_size
    q.write_bytes(q.read_bytes() + b"\0" * 4)
    with pytest.raises(CheckpointError) as e:
        load_llama2c(q)
    msg = str(e.value)
    assert str(q) in msg and f"file is {q_size + 4} bytes" in msg
    assert f"{v1_size} bytes (fp32 layout)" in msg and f"{q_size} bytes (original Q8_0" in msg
    v1 = write_llama2c(tmp_path / "v1.bin", SMALL, t, "v1")
    v1.write_bytes(v1.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="group_size=0: must be positive"):
        load_llama2c(v1)


# -----------------------------------------------------------------------------------------------
# malformed files: each a CheckpointError naming the file


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("good")
    t = random_tensors(SMALL, seed=9)
    return {fmt: write_llama2c(d / f"{fmt}.bin", SMALL, t, fmt).read_bytes() for fmt in FORMATS}


PARAMS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
INT32_MAX = 2**31 - 1


def patch(blob: bytes, **fields: int) -> bytes:
    """Overwrite header fields (params, version, flag, group_size) of a checkpoint's bytes."""
    out = bytearray(blob)
    base = 0 if blob[:4] != struct.pack("<I", MAGIC) else 8
    for name, value in fields.items():
        if name in PARAMS:
            struct.pack_into("<i", out, base + 4 * PARAMS.index(name), value)
        elif name == "version":
            struct.pack_into("<i", out, 4, value)
        elif name == "flag":
            struct.pack_into("<B", out, 36, value)
        else:
            struct.pack_into("<i", out, 37, value)
    return bytes(out)


BROKEN = {
    "empty": (lambda g: b"", "file is empty"),
    "v0 header truncated": (lambda g: g["v0"][:10], "shorter than the 28-byte header"),
    "v2 header truncated": (lambda g: g["v2"][:100], "shorter than the 256-byte header"),
    "gguf": (lambda g: b"GGUF" + g["v2"][4:], "GGUF file"),
    "byte-swapped magic": (lambda g: struct.pack(">I", MAGIC) + g["v1"][4:],
                           "dim=842296161: .* no 'ak42' magic"),
    "version 3": (lambda g: patch(g["v2"], version=3), "unsupported .* version 3"),
    "version 0 with magic": (lambda g: patch(g["v1"], version=0), "unsupported .* version 0"),
    "v0 truncated in tensors": (lambda g: g["v0"][:-4], "needs 389404 bytes"),
    "v1 truncated in tensors": (lambda g: g["v1"][:1000], "file is 1000 bytes"),
    "v2 truncated in tensors": (lambda g: g["v2"][:-1], "a v2 checkpoint .* needs"),
    "q80v1 truncated in tensors": (lambda g: g["q80v1"][:-1], "version-1 checkpoint"),
    "v0 trailing bytes": (lambda g: g["v0"] + b"\0" * 8, "needs 389404 bytes"),
    "v2 trailing bytes": (lambda g: g["v2"] + b"junk", "a v2 checkpoint .* needs"),
    **{f"v0 {p}=0": (lambda g, p=p: patch(g["v0"], **{p: 0}),
                     f"{p}=0: must be {'nonzero' if p == 'vocab_size' else 'positive'}")
       for p in PARAMS},
    **{f"v2 {p}=-1": (lambda g, p=p: patch(g["v2"], **{p: -1}), f"{p}=-1: must be positive")
       for p in PARAMS},
    "v0 negative dim": (lambda g: patch(g["v0"], dim=-64), "dim=-64: must be positive"),
    "n_heads not dividing dim": (lambda g: patch(g["v0"], n_heads=7),
                                 "dim=64 n_heads=7: n_heads must divide dim"),
    "n_kv_heads not dividing n_heads": (lambda g: patch(g["v1"], n_kv_heads=3),
                                        "n_kv_heads must divide n_heads"),
    "odd head_dim": (lambda g: patch(g["v2"], dim=72), "head_dim 9 must be even"),
    "all fields INT32_MAX": (lambda g: patch(g["v0"], **{p: INT32_MAX for p in PARAMS}),
                             "sane limit"),
    "int64-overflowing vocab*dim": (lambda g: patch(g["v1"], dim=2**30, vocab_size=INT32_MAX),
                                    "dim=1073741824: larger than the sane limit"),
    "v0 vocab_size=INT32_MIN": (lambda g: patch(g["v0"], vocab_size=-(2**31)),
                                "vocab_size=-2147483648: larger than the sane limit"),
    "terabytes within limits": (lambda g: patch(g["v2"], dim=1 << 16, hidden_dim=1 << 18,
                                                n_layers=1 << 10, n_heads=1 << 10,
                                                n_kv_heads=1 << 10, vocab_size=1 << 22,
                                                max_seq_len=1 << 22),
                                r"needs \d{14,} bytes"),
    "shared flag 2": (lambda g: patch(g["v1"], flag=2), "shared_classifier flag is 2"),
    "shared flag 255": (lambda g: patch(g["v2"], flag=255), "shared_classifier flag is 255"),
    "group_size 0": (lambda g: patch(g["v2"], group_size=0), "group_size=0: must be positive"),
    "group_size negative": (lambda g: patch(g["v2"], group_size=-64),
                            "group_size=-64: must be positive"),
    "group_size not dividing": (lambda g: patch(g["v2"], group_size=48),
                                "group_size=48 does not divide"),
    "q80v1 group_size changed": (lambda g: patch(g["q80v1"], group_size=32),
                                 "version-1 checkpoint"),
    "q80v1 body under a version-2 header": (lambda g: patch(g["q80v1"], version=2),
                                            "negative or non-finite Q8_0 scales.* short-lived"),
    "v2 NaN scale": (lambda g: g["v2"][:-4] + struct.pack("<f", float("nan")),
                     "classifier|w3 has negative or non-finite Q8_0 scales"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_file(tmp_path: Path, good: dict[str, bytes], case: str) -> None:
    make, match = BROKEN[case]
    path = tmp_path / "broken.bin"
    path.write_bytes(make(good))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=match) as e:
        load_llama2c(path)
    assert str(e.value).startswith(f"{path}: ")
    assert isinstance(e.value, ValueError)
    assert time.perf_counter() - start < 1.0  # refused from the header, nothing sized from it


def test_model_config_errors_become_checkpoint_errors(
        tmp_path: Path, good: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**kwargs: object) -> ModelConfig:
        raise ValueError("no thanks")

    monkeypatch.setattr("tiller.engine.llama2c.ModelConfig", refuse)
    path = tmp_path / "m.bin"
    path.write_bytes(good["v0"])
    with pytest.raises(CheckpointError, match="no thanks") as e:
        load_llama2c(path)
    assert str(path) in str(e.value)
