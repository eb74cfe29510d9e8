"""GGUF: round trips through the gguf package's writer (F32, F16, BF16, Q8_0, tied and untied),
our header reading against gguf.GGUFReader, RoPE against a Hugging Face-style model converted
the way llama.cpp does, the SentencePiece vocabulary test vectors, and broken files."""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from tiller.engine.bpe import BpeTokenizer
from tiller.engine.config import ModelConfig
from tiller.engine.dequant import Packed
from tiller.engine.engine import Engine
from tiller.engine.gguf import load_gguf, load_gguf_tokenizer, read_gguf
from tiller.engine.llama2c import CheckpointError, load_llama2c, random_tensors, write_llama2c
from tiller.engine.loader import load_checkpoint
from tiller.engine.quant import QTensor
from tiller.engine.tokenizer import SpmTokenizer, TokenizerError
from tiller.engine.weights import build_weights, dequantized

import tests.reference as reference

TIED = ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80,
                   max_seq_len=32)
UNTIED = ModelConfig(dim=96, hidden_dim=160, n_layers=3, n_heads=6, n_kv_heads=3,
                     vocab_size=70, max_seq_len=24, shared_classifier=False, norm_eps=1e-6,
                     rope_theta=500000.0)
TOKENS = [1, 5, 17, 42, 3, 9, 60, 11, 2, 33]
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside."
LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
               "attn_output": "wo", "ffn_norm": "ffn_norm", "ffn_gate": "w1", "ffn_up": "w3",
               "ffn_down": "w2"}
NORMS = ("attn_norm", "ffn_norm", "final_norm")


def vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    pieces = ["<unk>", "<s>", "</s>"] + [f"\u2581w{i}" for i in range(3, n)]
    return pieces, [0.0, 0.0, 0.0] + [-float(i) for i in range(3, n)], [2, 3, 3] + [1] * (n - 3)


def gguf_tensors(config: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our stacked tensors -> GGUF names, one tensor per layer, numpy [out, in] order."""
    out = {"token_embd.weight": tensors["token_embedding"],
           "output_norm.weight": tensors["final_norm"]}
    if "classifier" in tensors:
        out["output.weight"] = tensors["classifier"]
    for layer in range(config.n_layers):
        for part, ours in LAYER_NAMES.items():
            out[f"blk.{layer}.{part}.weight"] = tensors[ours][layer]
    return out


def write_gguf(path: Path, config: ModelConfig, tensors: dict[str, np.ndarray],
               ttype: T = T.F32, *, arch: str = "llama", skip: tuple[str, ...] = (),
               extra: dict[str, np.ndarray] | None = None, kv=None, tokenizer=True,
               raw: dict[str, tuple[np.ndarray, T]] | None = None) -> Path:
    """A GGUF file as llama.cpp's converters write it: norms in F32, matrices in `ttype`;
    `raw` gives some tensors (by GGUF name) as already encoded bytes of a type."""
    w = gguf.GGUFWriter(path, arch)
    w.add_name("test model")
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_feed_forward_length(config.hidden_dim)
    w.add_block_count(config.n_layers)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.head_dim)
    if tokenizer:
        pieces, scores, types = vocab(config.vocab_size)
        w.add_tokenizer_model("llama")
        w.add_token_list(pieces)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    for key, (vtype, value) in (kv or {}).items():
        w.add_key_value(key, value, vtype)
    for name, a in (gguf_tensors(config, tensors) | (extra or {})).items():
        if name in skip:
            continue
        if name in (raw or {}):
            blocks, btype = (raw or {})[name]
            w.add_tensor(name, blocks, raw_dtype=btype)
            continue
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 1 or ttype == T.F32:
            w.add_tensor(name, a)
        elif ttype == T.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, ttype), raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def materialized(tensors: dict) -> dict:
    """A checkpoint's tensors with GGUF's Packed matrices decoded (QTensors for Q8_0)."""
    return {k: v.materialize() if isinstance(v, Packed) else v for k, v in tensors.items()}


def f32_logits(config: ModelConfig, tensors: dict, tokens: list[int] = TOKENS) -> np.ndarray:
    return Engine(config, build_weights(config, tensors, "f32")).forward_all(tokens).logits


# -----------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied"])
def test_f32_round_trip_gives_the_same_logits(config, tmp_path):
    src = random_tensors(config, seed=1)
    ckpt = load_gguf(write_gguf(tmp_path / "m.gguf", config, src))
    assert ckpt.format == "gguf" and ckpt.config == config
    assert ("classifier" in ckpt.tensors) == (not config.shared_classifier)
    assert sorted(ckpt.tensors) == sorted(src)
    tensors = materialized(ckpt.tensors)
    for name, a in src.items():
        assert tensors[name].dtype == np.float32 and np.array_equal(tensors[name], a)
    assert np.array_equal(f32_logits(ckpt.config, ckpt.tensors), f32_logits(config, src))
    assert ckpt.metadata["general.name"] == "test model"
    assert ckpt.metadata["general.architecture"] == "llama"


@pytest.mark.parametrize("ttype", [T.F16, T.BF16])
def test_f16_and_bf16_become_their_exact_fp32_values(ttype, tmp_path):
    src = random_tensors(UNTIED, seed=2)
    ckpt = load_gguf(write_gguf(tmp_path / "m.gguf", UNTIED, src, ttype))
    tensors = materialized(ckpt.tensors)
    for name, a in src.items():
        got = tensors[name]
        if name in NORMS:
            want = a
        elif ttype == T.F16:
            want = a.astype(np.float16).astype(np.float32)
        else:
            want = gguf.quants.dequantize(gguf.quants.quantize(a, T.BF16), T.BF16)
        assert got.dtype == np.float32 and np.array_equal(got, want), name
    logits = f32_logits(UNTIED, ckpt.tensors)
    want = f32_logits(UNTIED, src)
    np.testing.assert_allclose(logits, want, atol=0.02 * np.abs(want).max())


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied"])
def test_q8_0_keeps_the_files_int8_and_scales(config, tmp_path):
    src = random_tensors(config, seed=3)
    ckpt = load_gguf(write_gguf(tmp_path / "m.gguf", config, src, T.Q8_0))
    tensors = materialized(ckpt.tensors)
    for name, a in src.items():
        got = tensors[name]
        if name in NORMS:
            assert isinstance(got, np.ndarray) and np.array_equal(got, a)
            continue
        blocks = gguf.quants.quantize(a, T.Q8_0).reshape(-1, 34)
        assert isinstance(got, QTensor) and got.shape == a.shape
        assert np.array_equal(got.values.reshape(-1, 32), blocks[:, 2:].view(np.int8))
        assert np.array_equal(got.scales.reshape(-1),
                              blocks[:, :2].copy().view(np.float16).astype(np.float32).ravel())
    # the engine's Q8_0 layout takes them as they are: nothing is requantized
    weights = dequantized(build_weights(config, ckpt.tensors, "q8_0"), config)
    for name, got in weights.items():
        want = tensors[name]
        want = want.dequantize() if isinstance(want, QTensor) else want
        assert np.array_equal(got, want), name
    q8 = Engine(config, build_weights(config, ckpt.tensors, "q8_0")).forward_all(TOKENS).logits
    ref = f32_logits(config, src)
    np.testing.assert_allclose(q8, ref, atol=0.05 * np.abs(ref).max())


def test_our_header_reading_agrees_with_gguf_reader(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", UNTIED, random_tensors(UNTIED), T.Q8_0,
                      kv={"general.uuid": (gguf.GGUFValueType.STRING, "1234"),
                          "x.i8": (gguf.GGUFValueType.INT8, -3),
                          "x.u64": (gguf.GGUFValueType.UINT64, 2**63),
                          "x.f64": (gguf.GGUFValueType.FLOAT64, 0.1),
                          "x.bool": (gguf.GGUFValueType.BOOL, True)})
    ours = read_gguf(path)
    theirs = gguf.GGUFReader(path)
    assert len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert (mine.type, mine.offset, mine.nbytes) == (t.tensor_type, t.data_offset, t.n_bytes)
        assert mine.shape == tuple(reversed(t.shape.tolist()))
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        if isinstance(value, list):
            value = [v.decode() for v in value]
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        want = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:  # ours is the shortest decimal
            value, want = np.float32(value), np.float32(want)
        assert value == want, key


def test_version_2_files_load(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", TIED, random_tensors(TIED))
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    path.write_bytes(data)
    assert load_gguf(path).config == TIED


def test_engine_load_and_load_checkpoint_route_by_magic(tmp_path):
    src = random_tensors(TIED, seed=4)
    g = write_gguf(tmp_path / "m.gguf", TIED, src)
    b = write_llama2c(tmp_path / "m.bin", TIED, src, "v1")
    assert load_checkpoint(g).format == "gguf" and load_checkpoint(b).format == "v1"
    got = Engine.load(g, dtype="f32").forward_all(TOKENS).logits
    assert np.array_equal(got, Engine.load(b, dtype="f32").forward_all(TOKENS).logits)


# -----------------------------------------------------------------------------------------------
# RoPE: a Hugging Face-style model (rotate-half RoPE), converted as llama.cpp converts it


def hf_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """A transcription of LlamaModel.permute in llama.cpp's convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def rotate_half_rope(x: np.ndarray, positions: np.ndarray, head_dim: int,
                     theta: float, *unscaled: object) -> np.ndarray:
    """Hugging Face's apply_rotary_pos_emb: pairs (i, i + head_dim/2) of each head (written
    apart from the reference's `neox`; `unscaled`: its NEOX flag and scaling, unused here)."""
    cos, sin = reference.rope_cos_sin(positions, head_dim, theta)
    h = x.reshape(x.shape[0], -1, head_dim)
    x0, x1 = h[..., :head_dim // 2], h[..., head_dim // 2:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1).reshape(x.shape)


def test_rope_matches_a_hugging_face_model_converted_like_llama_cpp(tmp_path, monkeypatch):
    config = UNTIED
    hf = random_tensors(config, seed=5)  # read as a Hugging Face checkpoint's weights
    monkeypatch.setattr(reference, "apply_rope", rotate_half_rope)
    want = reference.reference_forward(hf, config, TOKENS, capture=False)["logits"]
    monkeypatch.undo()
    converted = dict(hf)
    converted["wq"] = np.stack([hf_permute(w, config.n_heads, config.n_heads) for w in hf["wq"]])
    converted["wk"] = np.stack([hf_permute(w, config.n_heads, config.n_kv_heads)
                                for w in hf["wk"]])
    ckpt = load_gguf(write_gguf(tmp_path / "m.gguf", config, converted))
    got = f32_logits(ckpt.config, ckpt.tensors)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
    # and the permutation matters: without it the model is a different one
    unpermuted = f32_logits(config, hf)
    assert np.abs(unpermuted - want).max() > 0.01 * np.abs(want).max()


# -----------------------------------------------------------------------------------------------
# the vocabulary


def test_spm_vocabulary_reproduces_llama_cpp_test_vectors(shared_models):
    path = shared_models / "vocab" / "ggml-vocab-llama-spm.gguf"
    tok = load_gguf_tokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.unk_id) == (32000, 1, 2, 0)
    inputs = Path(f"{path}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    assert inputs[-1] == "" and outputs[-1] == "" and len(inputs) == len(outputs) > 40
    for text, want in zip(inputs[:-1], outputs[:-1], strict=True):
        assert tok.encode(text, bos=False) == [int(t) for t in want.split()], repr(text)
    with pytest.raises(CheckpointError, match="no tensors"):
        load_gguf(path)  # vocabulary only


def test_gpt2_vocabulary_is_byte_level_bpe(shared_models):
    # (its tokenization is checked in tests/test_bpe.py)
    tok = load_gguf_tokenizer(shared_models / "vocab" / "ggml-vocab-gpt-2.gguf")
    assert isinstance(tok, BpeTokenizer) and tok.pre == "gpt-2"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (50257, 50256, 50256, False)


def test_model_vocabulary_and_metadata(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = write_gguf(tmp_path / "m.gguf", TIED, random_tensors(TIED),
                      kv={"tokenizer.chat_template": (gguf.GGUFValueType.STRING, template),
                          "general.uuid": (gguf.GGUFValueType.STRING, "u-1"),
                          "tokenizer.ggml.add_bos_token": (gguf.GGUFValueType.BOOL, True)})
    tok = load_gguf_tokenizer(path)
    assert tok.vocab_size == TIED.vocab_size and tok.piece(5) == "\u2581w5"
    assert tok.token_type(1) == 3 and tok.decode([1, 7, 5]) == "w7 w5"
    meta = load_gguf(path).metadata
    assert meta["tokenizer.chat_template"] == template and meta["general.uuid"] == "u-1"
    assert meta["tokenizer.ggml.add_bos_token"] is True


def write_vocab(path: Path, kv: dict) -> Path:
    """A vocabulary-only GGUF: ten SentencePiece tokens, then `kv` (which may override)."""
    pieces, scores, types = vocab(10)
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for key, (vtype, value) in kv.items():
        w.add_key_value(key, value, vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kv, match", [
    ({"tokenizer.ggml.add_space_prefix": (gguf.GGUFValueType.BOOL, False)},
     "add_space_prefix=False is not supported"),
    ({"tokenizer.ggml.model": (gguf.GGUFValueType.STRING, "bert")}, "'bert' is not supported"),
    ({"tokenizer.ggml.bos_token_id": (gguf.GGUFValueType.UINT32, 999)}, "bos_id 999 outside"),
    ({"tokenizer.ggml.scores": (gguf.GGUFValueType.ARRAY, [0.5])}, "1 float32 values"),
    ({"tokenizer.ggml.token_type": (gguf.GGUFValueType.ARRAY, [1] * 9 + [77])},
     "token 9 has unknown token type 77"),
], ids=["no-space-prefix", "bert", "bos", "scores", "type"])
def test_unusable_vocabularies_raise_tokenizer_error(kv, match, tmp_path):
    path = write_vocab(tmp_path / "v.gguf", kv)
    with pytest.raises(TokenizerError, match=match) as e:
        load_gguf_tokenizer(path)
    assert str(e.value).startswith(f"{path}: ")


def read_tokenizer_bin(path: Path) -> list[float]:
    """The scores of a llama2.c tokenizer.bin."""
    data = path.read_bytes()
    scores, offset = [], 4
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        scores.append(score)
        offset += 8 + length
    return scores


def test_stories260k_as_gguf_gives_the_same_logits_and_tokens(shared_models, tmp_path):
    original = load_llama2c(shared_models / "stories260K.bin")
    config = original.config
    tok = SpmTokenizer.from_llama2c(shared_models / "tok512.bin", vocab_size=config.vocab_size)
    w = gguf.GGUFWriter(tmp_path / "s.gguf", "llama")
    for add, value in ((w.add_context_length, config.max_seq_len),
                       (w.add_embedding_length, config.dim),
                       (w.add_feed_forward_length, config.hidden_dim),
                       (w.add_block_count, config.n_layers), (w.add_head_count, config.n_heads),
                       (w.add_head_count_kv, config.n_kv_heads),
                       (w.add_layer_norm_rms_eps, config.norm_eps)):
        add(value)
    w.add_tokenizer_model("llama")
    w.add_token_list([tok.piece(i).encode() for i in range(tok.vocab_size)])
    w.add_token_scores(read_tokenizer_bin(shared_models / "tok512.bin"))
    w.add_token_types([int(tok.token_type(i)) for i in range(tok.vocab_size)])
    for name, a in gguf_tensors(config, original.tensors).items():
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    toks = tok.encode(STORY)
    want = Engine.load(shared_models / "stories260K.bin", dtype="f32").forward_all(toks).logits
    got = Engine.load(tmp_path / "s.gguf", dtype="f32").forward_all(toks).logits
    assert np.array_equal(got, want)
    from_gguf = load_gguf_tokenizer(tmp_path / "s.gguf")
    assert from_gguf.encode(STORY) == tok.encode(STORY)
    assert from_gguf.decode(tok.encode(STORY)) == STORY


# -----------------------------------------------------------------------------------------------
# broken files: a CheckpointError naming the file, quickly, without a big allocation


def _tensor_field(path: Path, name: str) -> tuple[int, int]:
    """(file offset of the tensor's type field, n_dims), found with the gguf package's reader."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape), len(t.shape)


def _kv_offset(path: Path, key: str) -> int:
    """File offset of a metadata value (just after its type field)."""
    return gguf.GGUFReader(path).fields[key].offset + 8 + len(key.encode()) + 4


def _patched(path: Path, at: int, fmt: str, value) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(data)


def _break(kind: str, path: Path) -> None:
    good = path.read_bytes()
    q_type, _ = _tensor_field(path, "blk.0.attn_q.weight")
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "bad magic":
        path.write_bytes(b"GGUG" + good[4:])
    elif kind == "version 1":
        _patched(path, 4, "<I", 1)
    elif kind == "truncated header":
        path.write_bytes(good[:200])
    elif kind == "truncated tensor data":
        path.write_bytes(good[:-1000])
    elif kind == "offset beyond EOF":
        _patched(path, q_type + 4, "<Q", len(good) * 4 // 32 * 32)
    elif kind == "misaligned offset":
        _patched(path, q_type + 4, "<Q", struct.unpack_from("<Q", good, q_type + 4)[0] + 4)
    elif kind == "overlapping tensors":
        k_type, _ = _tensor_field(path, "blk.0.attn_k.weight")
        _patched(path, k_type + 4, "<Q", struct.unpack_from("<Q", good, q_type + 4)[0])
    elif kind == "unknown tensor type":
        _patched(path, q_type, "<I", 99)
    elif kind == "unsupported tensor type":
        _patched(path, q_type, "<I", int(T.IQ4_NL))
    elif kind == "wrong shape":
        _patched(path, q_type - 8, "<Q", TIED.dim // 2)  # ne[1], the number of rows
    elif kind == "too many dimensions":
        _patched(path, q_type - 8 * 2 - 4, "<I", 7)
    elif kind == "huge tensor count":
        _patched(path, 8, "<Q", 2**62)
    elif kind == "huge metadata count":
        _patched(path, 16, "<Q", 2**62)
    elif kind == "huge string length":
        _patched(path, 24, "<Q", 2**62)  # the first key
    elif kind == "huge string array":
        _patched(path, _kv_offset(path, "tokenizer.ggml.tokens") + 4, "<Q", 2**60)
    elif kind == "huge number array":
        _patched(path, _kv_offset(path, "tokenizer.ggml.scores") + 4, "<Q", 2**40)
    elif kind == "array of arrays":
        _patched(path, _kv_offset(path, "tokenizer.ggml.scores"), "<I", 9)
    elif kind == "unknown value type":
        _patched(path, _kv_offset(path, "general.name") - 4, "<I", 77)
    elif kind == "invalid UTF-8 key":
        _patched(path, 32, "<B", 0xFF)
    else:
        raise AssertionError(kind)


BROKEN = {
    "empty": "too short",
    "bad magic": "not a GGUF file",
    "version 1": "GGUF version 1 is not supported",
    "truncated header": "truncated",  # mid-string or mid-number, depending on the cut
    "truncated tensor data": "runs past the end",
    "offset beyond EOF": "blk.0.attn_q.weight .* runs past the end",
    "misaligned offset": "blk.0.attn_q.weight has offset .* not a multiple of the alignment",
    "overlapping tensors": "overlaps",
    "unknown tensor type": "blk.0.attn_q.weight has unknown type 99",
    "unsupported tensor type": "blk.0.attn_q.weight has type IQ4_NL; supported: F32, .*Q6_K",
    "wrong shape": r"blk.0.attn_q.weight has shape \(32, 64\)",
    "too many dimensions": "7 dimensions",
    "huge tensor count": "tensor count is 4611686018427387904, more than",
    "huge metadata count": "metadata count is 4611686018427387904, more than",
    "huge string length": "claims 4611686018427387904 bytes",
    "huge string array": "string array metadata tokenizer.ggml.tokens is 1152921504606846976",
    "huge number array": "length of array metadata tokenizer.ggml.scores is 1099511627776",
    "array of arrays": "array of arrays",
    "unknown value type": "unknown value type 77",
    "invalid UTF-8 key": "not valid UTF-8",
}


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "m.gguf"
    return write_gguf(path, TIED, random_tensors(TIED)).read_bytes()


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_files_raise_checkpoint_error(kind, good_file, tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(good_file)
    _break(kind, path)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match=BROKEN[kind]) as e:
            load_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(f"{path}: ")
    assert peak < 4 << 20, f"{peak} bytes allocated"
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("what, match", [
    ("arch", "general.architecture 'gemma' is not supported"),
    ("missing", "missing tensor blk.1.ffn_up.weight"),
    ("rope dim", "llama.rope.dimension_count is 8, but only 16 .*partial RoPE"),
    ("value length", "llama.attention.value_length is 8, but only 16"),
    ("rope_freqs", "rope_freqs.weight has shape \\(3,\\) and type F32, RoPE needs \\(8,\\)"),
    ("experts", "mixture-of-experts"),
    ("rope scaling", "llama.rope.scaling.type='yarn': only none, linear and llama3"),
    ("heads per layer", "llama.attention.head_count_kv differs between layers \\(\\[2, 4\\]\\)"),
    ("sliding window", "llama.attention.sliding_window is 16: sliding-window attention"),
    ("vocab", "vocabulary sizes disagree"),
    ("eps type", "layer_norm_rms_epsilon is a string"),
    ("no eps", "layer_norm_rms_epsilon is missing"),
])
def test_models_we_cannot_run_are_refused_by_name(what, match, tmp_path):
    src = random_tensors(TIED)
    kwargs = {}
    path = tmp_path / "m.gguf"
    S, U32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
    if what == "arch":
        kwargs["arch"] = "gemma"
    elif what == "missing":
        kwargs["skip"] = ("blk.1.ffn_up.weight",)
    elif what == "rope dim":
        kwargs["kv"] = {"llama.rope.dimension_count": (U32, 8)}
    elif what == "value length":
        kwargs["kv"] = {"llama.attention.value_length": (U32, 8)}
    elif what == "rope_freqs":
        kwargs["extra"] = {"rope_freqs.weight": np.ones(3, np.float32)}
    elif what == "experts":
        kwargs["kv"] = {"llama.expert_count": (U32, 8)}
    elif what == "rope scaling":
        kwargs["kv"] = {"llama.rope.scaling.type": (S, "yarn"),
                        "llama.rope.scaling.factor": (gguf.GGUFValueType.FLOAT32, 4.0)}
    elif what == "heads per layer":
        kwargs["kv"] = {"llama.attention.head_count_kv": (gguf.GGUFValueType.ARRAY, [2, 4])}
    elif what == "sliding window":
        kwargs["kv"] = {"llama.attention.sliding_window": (U32, 16)}
    elif what == "vocab":
        kwargs["kv"] = {"llama.vocab_size": (U32, 1000)}
    elif what == "eps type":
        kwargs["kv"] = {"llama.attention.layer_norm_rms_epsilon": (S, "1e-5")}
    if what == "no eps":
        write_gguf(path, TIED, src)
        at = _kv_offset(path, "llama.attention.layer_norm_rms_epsilon")
        _patched(path, at - 5, "<B", ord("X"))  # the key's last letter
    else:
        write_gguf(path, TIED, src, **kwargs)
    with pytest.raises(CheckpointError, match=match) as e:
        load_gguf(path)
    assert str(e.value).startswith(f"{path}: ")


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.gguf")
