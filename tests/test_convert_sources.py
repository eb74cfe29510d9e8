"""`tiller convert` from every kind of source GGUF: byte-level BPE and SentencePiece vocabularies
(llama.cpp's vocab files plus random weights), float and K-quant tensors, to Q8_0 / F16 / F32.
The output is read back with the `gguf` package and compared with the source: every metadata
key with its type (tokenizer.ggml.* with merges, pre, token types and special ids, the chat
template, the uuid), and every tensor against the source dequantized by gguf.quants (for Q8_0
output: gguf.quants.quantize of that, llama.cpp's reference quantizer)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from tiller.engine.convert import OUT_TYPES, _gguf_kv, convert
from tiller.engine.dequant import random_blocks
from tiller.engine.engine import Engine
from tiller.engine.gguf import load_gguf_tokenizer

from tests.test_bpe import vectors

DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, CTX = 256, 512, 2, 4, 2, 64
UUID = "4f1e8a52-5d0c-4c43-9a4b-0d1f4a7c9e21"
# a source of every K-quant type tiller decodes, as llama.cpp's mixes use them
K_TYPES = {"token_embd": T.Q4_K, "output": T.Q6_K, "attn_q": T.Q4_K, "attn_k": T.Q3_K,
           "attn_v": T.Q5_K, "attn_output": T.Q2_K, "ffn_gate": T.Q4_K, "ffn_up": T.Q5_K,
           "ffn_down": T.Q6_K}
SOURCES = {  # (vocabulary file, tensor types by part or one type)
    "gpt-2 bpe, f16": ("gpt-2", T.F16),
    "deepseek-coder bpe, k-quants": ("deepseek-coder", K_TYPES),
    "llama-spm, k-quants": ("llama-spm", K_TYPES),
    "starcoder bpe, q8_0": ("starcoder", T.Q8_0),
}


def _shape(name: str, vocab: int) -> tuple[int, ...]:
    part = name.split(".")[-2]
    kv = DIM // HEADS * KV_HEADS
    return {"token_embd": (vocab, DIM), "output": (vocab, DIM), "output_norm": (DIM,),
            "attn_norm": (DIM,), "ffn_norm": (DIM,), "attn_q": (DIM, DIM), "attn_k": (kv, DIM),
            "attn_v": (kv, DIM), "attn_output": (DIM, DIM), "ffn_gate": (HIDDEN, DIM),
            "ffn_up": (HIDDEN, DIM), "ffn_down": (DIM, HIDDEN)}[part]


def write_source(path: Path, vocab_file: Path, types, template: str) -> Path:
    """A llama GGUF with the vocabulary file's tokenizer.* keys (their own types), a chat
    template, a uuid and random tensors of `types`."""
    kv = _gguf_kv(vocab_file, lambda key: key.startswith("tokenizer."))
    vocab = len(kv["tokenizer.ggml.tokens"][0])
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("random source")
    w.add_uuid(UUID)
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(DIM // HEADS)
    for key, (value, vtype, sub) in kv.items():
        w.add_key_value(key, value, vtype, sub)
    w.add_chat_template(template)
    w.add_string("general.license", "mit")  # an unrelated key is copied too
    names = ["token_embd.weight", "output_norm.weight", "output.weight"] + [
        f"blk.{i}.{part}.weight" for i in range(LAYERS)
        for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                     "ffn_gate", "ffn_up", "ffn_down")]
    rng = np.random.default_rng(7)
    for name in names:
        shape = _shape(name, vocab)
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        ttype = types if isinstance(types, T) else types[name.split(".")[-2]]
        w.add_tensor(name, random_blocks(ttype, shape[0], shape[1], rng), raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def fields(reader: gguf.GGUFReader) -> dict[str, tuple[list, object]]:
    """key -> (its types, its value) as the gguf package reads them."""
    return {k: (f.types, f.contents()) for k, f in reader.fields.items()
            if not k.startswith("GGUF.")}


def dequantized(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        tuple(int(d) for d in reversed(t.shape)))


@pytest.fixture(scope="module", params=list(SOURCES))
def source(request, shared_models, tmp_path_factory):
    """(source path, vocabulary file, {output type: converted path}, the source's tensors
    dequantized by gguf.quants)."""
    vocab_name, types = SOURCES[request.param]
    vocab_file = shared_models / "vocab" / f"ggml-vocab-{vocab_name}.gguf"
    template = (shared_models / "chat-templates" / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
    folder = tmp_path_factory.mktemp("sources")
    src = write_source(folder / "src.gguf", vocab_file, types, template)
    outputs = {t: convert(src, folder / f"out-{t}.gguf", t, cache=folder).path
               for t in OUT_TYPES}
    reference = {t.name: dequantized(t) for t in gguf.GGUFReader(src).tensors}
    return src, vocab_file, outputs, reference


@pytest.mark.parametrize("out_type", list(OUT_TYPES))
def test_keys_and_tensors_survive_conversion(source, out_type):
    src, vocab_file, outputs, reference = source
    dst = outputs[out_type]
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    fa, fb = fields(a), fields(b)
    replaced = {"general.file_type", "general.quantization_version"}
    for key, (types, value) in fa.items():
        if key in replaced:
            continue
        assert key in fb, key
        assert fb[key][0] == types, key  # same GGUF type (and element type)
        assert fb[key][1] == value, key
    tok_keys = [k for k in fa if k.startswith("tokenizer.")]
    assert {"tokenizer.ggml.pre", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
            "tokenizer.chat_template"} <= set(tok_keys)
    if "spm" not in vocab_file.name:
        assert "tokenizer.ggml.merges" in tok_keys
    assert fb["general.uuid"][1] == UUID and fb["general.source.uuid"][1] == UUID
    assert fb["general.file_type"][1] == int(OUT_TYPES[out_type][0])
    assert fb["tokenizer.ggml.token_type"][0] == [V.ARRAY, V.INT32]  # llama.cpp checks it
    # tensors: the same names and shapes; values as gguf's reference makes them
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    assert list(ta) == list(tb)
    want_type = OUT_TYPES[out_type][1]
    for name, t in ta.items():
        ref, got = reference[name], tb[name]
        assert tuple(got.shape) == tuple(t.shape), name
        if ref.ndim == 1:
            assert got.tensor_type == T.F32 and np.array_equal(dequantized(got), ref), name
            continue
        assert got.tensor_type == want_type, name
        if want_type == T.Q8_0 and t.tensor_type == T.Q8_0:
            assert np.array_equal(np.asarray(got.data), np.asarray(t.data)), name  # kept
        elif want_type == T.Q8_0:
            want = gguf.quants.quantize(ref, T.Q8_0)
            assert np.array_equal(np.asarray(got.data).reshape(want.shape), want), name
        else:
            want = ref.astype(np.float16 if want_type == T.F16 else np.float32)
            assert np.array_equal(np.asarray(got.data).reshape(want.shape), want), name
    # the copied vocabulary still tokenizes as llama.cpp does
    tok = load_gguf_tokenizer(dst)
    cases = vectors(vocab_file)[:12]
    assert [tok.encode(text, bos=False) for text, _ in cases] == [ids for _, ids in cases]


def test_f32_output_runs_as_the_source(source):
    """An F32 conversion holds the source's values exactly, so the engine (f32) computes the
    same logits from both."""
    src, _, outputs, _ = source
    tokens = [1, 50, 7, 300, 2]
    a = Engine.load(src, "f32", weight_cache=False).forward_all(tokens).logits
    b = Engine.load(outputs["f32"], "f32", weight_cache=False).forward_all(tokens).logits
    assert np.array_equal(a, b)
