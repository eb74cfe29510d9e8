"""`tiller convert`: stories260K through GGUF f32 / f16 / q8_0 and back into the engine, the
output as llama.cpp expects it, Q8_0 sources kept exactly, GGUF metadata copied with its types,
and the errors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from tiller.engine.config import ModelConfig
from tiller.engine.convert import OUT_TYPES, convert
from tiller.engine.engine import Engine
from tiller.engine.generate import generate
from tiller.engine.gguf import load_gguf, load_gguf_tokenizer, read_gguf
from tiller.engine.identity import model_key, model_uuid
from tiller.engine.llama2c import CheckpointError, load_llama2c, random_tensors, write_llama2c
from tiller.engine.quant import QTensor, quantize_q8_0
from tiller.engine.sampling import SamplingParams
from tiller.engine.tokenizer import SpmTokenizer, TokenizerError
from tiller.engine.weights import build_weights

from tests.test_gguf import write_gguf
from tiller.cli import main

TEXTS = ["Once upon a time, there was a little girl named Lily.",
         "  two  spaces, a tab\tand a newline\n", "Ünïcödé, 日本語 and emoji 🙂", "", " ", "x"]
PROMPT = "Once upon a time"
MATRICES = ("token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3")
NORMS = ("attn_norm", "ffn_norm", "final_norm")
LAYER_PARTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
               "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def stories(shared_models, tmp_path_factory):
    """stories260K converted to each output type: {type: path}, plus "src" and "tok"."""
    out = tmp_path_factory.mktemp("convert")
    src, tok = shared_models / "stories260K.bin", shared_models / "tok512.bin"
    paths = {t: convert(src, out / f"s-{t}.gguf", t, tok, cache=out).path for t in OUT_TYPES}
    return paths | {"src": src, "tok": tok, "dir": out}


def greedy(engine: Engine, prompt: list[int], n: int = 40) -> list[int]:
    return list(generate(engine, prompt, SamplingParams(temperature=0), n))


# -----------------------------------------------------------------------------------------------
# stories260K


def test_f32_gives_the_originals_logits_and_greedy_tokens(stories):
    tok = SpmTokenizer.from_llama2c(stories["tok"], vocab_size=512)
    prompt = tok.encode(PROMPT)
    original = Engine.load(stories["src"], dtype="f32")
    converted = Engine.load(stories["f32"], dtype="f32")
    tokens = greedy(original, prompt)
    assert len(tokens) == 40 and greedy(converted, prompt) == tokens
    text = prompt + tokens
    assert np.array_equal(converted.forward_all(text).logits, original.forward_all(text).logits)


def test_q8_0_keeps_our_int8_and_differs_from_our_path_only_by_fp16_scales(stories):
    """The Q8_0 GGUF holds exactly the int8 values of the engine's own quantizer (no value of
    stories260K sits at a rounding tie, where gguf's round-half-away and our rint could part);
    its scales are ours rounded to fp16, the only scale type GGUF's Q8_0 has; ffn_down (rows of
    172) is F16 and quantized by the engine at load. Rebuilding exactly that from the original
    gives bitwise the same logits; against the engine's own Q8_0 path (fp32 scales) the top-1
    token agrees everywhere and the logits differ about as much as Q8_0 differs from fp32."""
    original = load_llama2c(stories["src"])
    q8 = load_gguf(stories["q8_0"])
    rebuilt = {}
    for name, a in original.tensors.items():
        if name in NORMS:
            rebuilt[name] = a
        elif name == "w2":
            assert not isinstance(q8.tensors[name], QTensor)
            assert np.array_equal(q8.tensors[name], a.astype(np.float16).astype(np.float32))
            rebuilt[name] = q8.tensors[name]
        else:
            ours, got = quantize_q8_0(a), q8.tensors[name]
            assert np.array_equal(got.values, ours.values), name
            assert np.array_equal(got.scales, ours.scales.astype(np.float16).astype(np.float32))
            rebuilt[name] = got
    tok = SpmTokenizer.from_llama2c(stories["tok"], vocab_size=512)
    text = tok.encode(PROMPT) + greedy(Engine.load(stories["src"], dtype="q8_0"),
                                       tok.encode(PROMPT))
    config = original.config
    mine = Engine(config, build_weights(config, rebuilt, "q8_0")).forward_all(text).logits
    got = Engine.load(stories["q8_0"], dtype="q8_0").forward_all(text).logits
    assert np.array_equal(got, mine)
    own = Engine.load(stories["src"], dtype="q8_0").forward_all(text).logits
    f32 = Engine.load(stories["src"], dtype="f32").forward_all(text).logits
    assert np.array_equal(got.argmax(-1), own.argmax(-1))
    err = np.linalg.norm(got - own) / np.linalg.norm(own)
    q8_err = np.linalg.norm(own - f32) / np.linalg.norm(f32)
    assert err < 0.02 and err < 2 * q8_err, (err, q8_err)


def test_the_embedded_tokenizer_is_tok512(stories):
    want = SpmTokenizer.from_llama2c(stories["tok"], vocab_size=512)
    for t in OUT_TYPES:
        got = load_gguf_tokenizer(stories[t])
        assert [got.piece(i) for i in range(512)] == [want.piece(i) for i in range(512)]
        assert [got.token_type(i) for i in range(512)] == [want.token_type(i) for i in range(512)]
        for text in TEXTS:
            ids = want.encode(text)
            assert got.encode(text) == ids and got.decode(ids) == want.decode(ids), text
    meta = read_gguf(stories["f32"]).metadata
    assert meta["tokenizer.ggml.tokens"][:3] == [b"<unk>", b"<s>", b"</s>"]
    assert all(b" " not in p for p in meta["tokenizer.ggml.tokens"])  # spaces are "▁"
    assert "\u2581the".encode() in meta["tokenizer.ggml.tokens"]


def test_every_type_keeps_the_sources_uuid_and_converting_again_is_identical(stories):
    src = load_llama2c(stories["src"])
    uuid = model_uuid(src, stories["dir"])
    for t in OUT_TYPES:
        meta = read_gguf(stories[t]).metadata
        assert meta["general.uuid"] == meta["general.source.uuid"] == uuid
        assert model_uuid(load_gguf(stories[t])) == uuid
        assert meta["general.source.blake3"] == model_key(stories["src"], stories["dir"])
        assert meta["general.source.name"] == meta["general.name"] == "stories260K"
        assert meta["general.source.format"] == "llama2c-v0"
    keys = {model_key(stories[t], stories["dir"]) for t in OUT_TYPES}
    assert len(keys) == 3  # different bytes, different keys
    again = convert(stories["src"], stories["dir"] / "again.gguf", "q8_0", stories["tok"],
                    cache=stories["dir"])
    assert again.path.read_bytes() == stories["q8_0"].read_bytes()
    # the same model in another container of the same values: the same derived uuid
    v1 = write_llama2c(stories["dir"] / "s-v1.bin", src.config, src.tensors, "v1")
    assert model_uuid(load_llama2c(v1), stories["dir"]) == uuid


@pytest.mark.parametrize("out_type", list(OUT_TYPES))
def test_the_output_is_what_llama_cpp_expects(stories, out_type):
    reader = gguf.GGUFReader(stories[out_type])
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    u32 = ("context_length", "embedding_length", "feed_forward_length", "block_count",
           "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
           "vocab_size")
    want = {"general.architecture": V.STRING, "general.name": V.STRING,
            "general.uuid": V.STRING, "general.source.uuid": V.STRING,
            "general.file_type": V.UINT32, "general.quantization_version": V.UINT32,
            **{f"llama.{k}": V.UINT32 for k in u32},
            "llama.attention.layer_norm_rms_epsilon": V.FLOAT32,
            "llama.rope.freq_base": V.FLOAT32, "tokenizer.ggml.model": V.STRING,
            "tokenizer.ggml.tokens": V.ARRAY, "tokenizer.ggml.scores": V.ARRAY,
            "tokenizer.ggml.token_type": V.ARRAY, "tokenizer.ggml.bos_token_id": V.UINT32,
            "tokenizer.ggml.eos_token_id": V.UINT32, "tokenizer.ggml.unknown_token_id": V.UINT32,
            "tokenizer.ggml.add_bos_token": V.BOOL}
    for key, vtype in want.items():
        assert fields[key].types[0] == vtype, key
    assert fields["tokenizer.ggml.token_type"].types[-1] == V.INT32
    assert fields["tokenizer.ggml.scores"].types[-1] == V.FLOAT32
    assert fields["general.file_type"].contents() == OUT_TYPES[out_type][0] == \
        {"f32": 0, "f16": 1, "q8_0": 7}[out_type]
    c = {k: fields[f"llama.{k}"].contents() for k in u32}
    assert c == {"context_length": 512, "embedding_length": 64, "feed_forward_length": 172,
                 "block_count": 5, "attention.head_count": 8, "attention.head_count_kv": 4,
                 "rope.dimension_count": 8, "vocab_size": 512}
    ne = {"token_embd": (64, 512), "output_norm": (64,), "attn_norm": (64,), "attn_q": (64, 64),
          "attn_k": (64, 32), "attn_v": (64, 32), "attn_output": (64, 64), "ffn_norm": (64,),
          "ffn_gate": (64, 172), "ffn_up": (64, 172), "ffn_down": (172, 64)}
    names = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{p}.weight" for i in range(5) for p in LAYER_PARTS]
    assert [t.name for t in reader.tensors] == names  # tied: no output.weight
    matrix_type = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0}[out_type]
    for t in reader.tensors:
        part = t.name.removesuffix(".weight").split(".")[-1]
        assert tuple(int(n) for n in t.shape) == ne[part], t.name
        if part.endswith("norm"):
            assert t.tensor_type == T.F32
        elif part == "ffn_down" and out_type == "q8_0":
            assert t.tensor_type == T.F16  # rows of 172: not Q8_0, as convert_hf_to_gguf does
        else:
            assert t.tensor_type == matrix_type, t.name


# -----------------------------------------------------------------------------------------------
# sources


def test_q8_0_sources_keep_their_int8(stories):
    # a GGUF Q8_0 source: every tensor's bytes are copied unchanged
    again = convert(stories["q8_0"], stories["dir"] / "q8-again.gguf", "q8_0",
                    cache=stories["dir"])
    a, b = gguf.GGUFReader(stories["q8_0"]), gguf.GGUFReader(again.path)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data), x.name
    meta = read_gguf(again.path).metadata
    assert meta["general.uuid"] == read_gguf(stories["q8_0"]).metadata["general.uuid"]
    assert meta["general.source.blake3"] == model_key(stories["q8_0"], stories["dir"])
    assert meta["general.source.format"] == "gguf"
    # a llama2.c v2 (int8) source: its int8 values, its scales rounded to fp16
    src = load_llama2c(stories["src"])
    v2 = load_llama2c(write_llama2c(stories["dir"] / "s-v2.bin", src.config, src.tensors, "v2"))
    out = load_gguf(convert(v2.path, stories["dir"] / "v2.gguf", "q8_0", stories["tok"],
                            cache=stories["dir"]).path)
    for name in MATRICES:
        if name != "w2":  # rows of 172: F16
            assert np.array_equal(out.tensors[name].values, v2.tensors[name].values), name
            assert np.array_equal(out.tensors[name].scales,
                                  v2.tensors[name].scales.astype(np.float16).astype(np.float32))


UNTIED = ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80,
                     max_seq_len=32, shared_classifier=False, norm_eps=1e-6, rope_theta=5e5)


def test_a_gguf_sources_metadata_is_copied_with_its_types(tmp_path):
    kv = {"tokenizer.chat_template": (V.STRING, "{{ messages }}"),
          "general.source.url": (V.STRING, "https://example.com/model"),
          "general.author": (V.STRING, "someone"), "general.uuid": (V.STRING, "ABC"),
          "llama.attention.key_length": (V.UINT32, 16), "custom.big": (V.UINT64, 2 ** 40),
          "custom.ints": (V.ARRAY, [1, -2, 3])}
    tensors = random_tensors(UNTIED, seed=3)
    src = write_gguf(tmp_path / "src.gguf", UNTIED, tensors, T.F16, kv=kv)
    out = convert(src, tmp_path / "out.gguf", "f32", cache=tmp_path)
    before = gguf.GGUFReader(src).fields
    after = gguf.GGUFReader(out.path).fields
    for key in ("tokenizer.chat_template", "general.source.url", "general.author",
                "llama.attention.key_length", "custom.big", "custom.ints", "general.name",
                "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert after[key].types == before[key].types, key
        assert after[key].contents() == before[key].contents(), key
    # "ABC" is no uuid: the uuid is derived from the tensors (F16 values, exact in fp32)
    ckpt = load_gguf(src)
    assert out.uuid == model_uuid(ckpt, tmp_path) != "ABC"
    assert after["general.uuid"].contents() == out.uuid
    assert after["general.file_type"].contents() == 0
    got = load_gguf(out.path)
    assert got.config == UNTIED and "classifier" in got.tensors
    for name, a in ckpt.tensors.items():
        assert np.array_equal(got.tensors[name], a), name
    assert [t.name for t in gguf.GGUFReader(out.path).tensors][:3] == [
        "token_embd.weight", "output_norm.weight", "output.weight"]


def test_a_gguf_vocabulary_for_a_llama2c_model(shared_models, tmp_path):
    vocab = tmp_path / "vocab.gguf"
    convert(shared_models / "stories260K.bin", vocab, "f16", shared_models / "tok512.bin",
            cache=tmp_path)
    out = convert(shared_models / "stories260K.bin", tmp_path / "out.gguf", "f32", vocab,
                  cache=tmp_path)
    want = SpmTokenizer.from_llama2c(shared_models / "tok512.bin", vocab_size=512)
    assert load_gguf_tokenizer(out.path).encode(TEXTS[0]) == want.encode(TEXTS[0])


# -----------------------------------------------------------------------------------------------
# errors and the command


def test_errors(shared_models, stories, tmp_path):
    src, tok = shared_models / "stories260K.bin", shared_models / "tok512.bin"
    with pytest.raises(ValueError, match="unknown output type 'q4_0'"):
        convert(src, tmp_path / "o.gguf", "q4_0", tok)
    with pytest.raises(ValueError, match="brings its own vocabulary"):
        convert(stories["f32"], tmp_path / "o.gguf", "f16", tok)
    with pytest.raises(TokenizerError, match="no tokenizer file beside the model"):
        convert(src, tmp_path / "o.gguf", "f16")
    tiny = tmp_path / "tiny.bin"  # a tokenizer.bin of 3 tokens for a model of 512
    tiny.write_bytes(b"\x05\0\0\0" + b"\0\0\0\0\1\0\0\0a" * 3)
    with pytest.raises(TokenizerError, match="too short for 512 tokens"):
        convert(src, tmp_path / "o.gguf", "f16", tiny)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        convert(src, tmp_path / "missing" / "o.gguf", "f16", tok)
    with pytest.raises(CheckpointError, match=r"tok512\.bin: header says"):
        convert(tok, tmp_path / "o.gguf", "f16", tok)
    # a value beyond float16: refused by name, and no file (or temp file) left behind
    tensors = random_tensors(UNTIED, seed=4)
    tensors["wq"][1, 2, 3] = 1e6
    big = write_gguf(tmp_path / "big.gguf", UNTIED, tensors)
    with pytest.raises(ValueError, match=r"blk\.1\.attn_q\.weight: values beyond float16"):
        convert(big, tmp_path / "o.gguf", "f16", cache=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o.")) == []


def test_the_command_and_its_progress(shared_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TILLER_CACHE_DIR", str(tmp_path))
    args = ["convert", str(shared_models / "stories260K.bin"), str(tmp_path / "o.gguf"),
            "--type", "q8_0", "--tokenizer", str(shared_models / "tok512.bin")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "wrote" in err and "uuid" in err  # stderr is not a terminal
    assert main(args + ["--progress"]) == 0
    err = capsys.readouterr().err
    assert "47/47" in err and "blk.4.ffn_down.weight" in err  # tqdm's bar, with tensor names
    assert main(args[:3] + ["--type", "f16"]) == 2
    assert "no tokenizer file beside the model" in capsys.readouterr().err
