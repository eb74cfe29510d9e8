"""`tiller convert` of every architecture the engine loads: the random llama (Llama 3.1-style,
rope_freqs), qwen2 (q/k/v biases, NEOX rope) and qwen3 (q/k norms, heads wider than
dim / n_heads) files of tests/arch_models.py, from F32 and from mixed (Q8_0, Q4_0, Q5_1, BF16,
...) sources, to F32 / F16 / Q8_0. Checked against the gguf package (metadata with its types,
tensors as gguf.quants encodes them) and by running both files: the same config, the same
logits within the output type's tolerance, the same greedy tokens. Sources the engine cannot
run are refused naming the key."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from tiller.engine.config import ModelConfig
from tiller.engine.convert import OUT_TYPES, convert
from tiller.engine.engine import Engine
from tiller.engine.gguf import load_gguf
from tiller.engine.llama2c import CheckpointError, random_tensors

import tests.arch_models as am
from tests.test_gguf import write_gguf
from tiller.cli import main

UUID = "0b6f1f5e-3c1a-4d7e-8f21-6a9c2e4d5b70"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n" \
           "{% endfor %}"
# a quantized source: Q8_0 attention (kept as it is by a Q8_0 output), other types decoded and
# quantized again by gguf.quants (which cannot write K-quants: K-quant sources are converted in
# tests/test_convert_sources.py; decoding does not depend on the architecture)
MIXED = {"token_embd": T.BF16, "output": T.Q8_0, "attn_q": T.Q8_0, "attn_k": T.Q8_0,
         "attn_v": T.Q5_0, "attn_output": T.Q8_0, "ffn_gate": T.Q4_0, "ffn_up": T.Q5_1,
         "ffn_down": T.Q4_1}
# max |logit difference| / largest |logit| allowed between the source and its conversion
TOLERANCE = {"f32": 0.0, "f16": 2e-3, "q8_0": 3e-2}
STEPS = 64


def _vocab(spec: am.Spec):
    """The spec's vocabulary plus a chat template and a declared uuid."""
    def add(w: gguf.GGUFWriter) -> None:
        (am._spm_vocab if spec.vocab == "spm" else am._bpe_vocab)(w)
        w.add_chat_template(TEMPLATE)
        w.add_uuid(UUID)
    return add


def _source(folder: Path, spec: am.Spec, kind: str) -> Path:
    types = None
    if kind == "mixed":
        names = am.gguf_tensors(spec, am.weights(spec))
        types = {n: MIXED[n.split(".")[-2]] for n, a in names.items() if a.ndim == 2}
    return am.write(folder / f"{spec.name}-{kind}.gguf", spec, types, _vocab(spec))


@pytest.fixture(scope="module", params=[(a, k) for a in am.SPECS for k in ("f32", "mixed")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def converted(request, tmp_path_factory):
    """(spec, source path, {output type: converted path})."""
    name, kind = request.param
    folder = tmp_path_factory.mktemp("convert-arch")
    spec = am.SPECS[name]
    src = _source(folder, spec, kind)
    return spec, src, {t: convert(src, folder / f"out-{t}.gguf", t, cache=folder).path
                       for t in OUT_TYPES}


def _fields(path: Path) -> dict[str, tuple[list, object]]:
    return {k: (f.types, f.contents()) for k, f in gguf.GGUFReader(path).fields.items()
            if not k.startswith("GGUF.")}


def _decoded(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        tuple(int(d) for d in reversed(t.shape)))


@pytest.mark.parametrize("out_type", list(OUT_TYPES))
def test_the_metadata_survives(converted, out_type):
    spec, src, outputs = converted
    before, after = _fields(src), _fields(outputs[out_type])
    assert after["general.architecture"][1] == spec.arch
    for key, (types, value) in before.items():
        if key in ("general.file_type", "general.quantization_version"):
            continue
        assert key in after, key
        assert after[key] == (types, value), key  # the same value and GGUF type
    keys = set(before)
    arch = spec.arch
    assert {f"{arch}.attention.key_length", f"{arch}.rope.freq_base",
            f"{arch}.attention.layer_norm_rms_epsilon", "tokenizer.ggml.token_type",
            "tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "general.uuid"} <= keys
    if spec.vocab == "bpe":
        assert {"tokenizer.ggml.merges", "tokenizer.ggml.pre",
                "tokenizer.ggml.add_bos_token"} <= keys
    assert after["general.uuid"][1] == after["general.source.uuid"][1] == UUID
    assert after["general.file_type"][1] == int(OUT_TYPES[out_type][0])
    assert load_gguf(outputs[out_type]).config == load_gguf(src).config


@pytest.mark.parametrize("out_type", list(OUT_TYPES))
def test_the_tensors_are_what_gguf_quants_makes_of_the_source(converted, out_type):
    spec, src, outputs = converted
    a = {t.name: t for t in gguf.GGUFReader(src).tensors}
    b = {t.name: t for t in gguf.GGUFReader(outputs[out_type]).tensors}
    assert list(b) == list(a)  # the source's order, nothing dropped or added
    want_type = OUT_TYPES[out_type][1]
    vectors = [n for n, t in a.items() if len(t.shape) == 1]
    assert ("rope_freqs.weight" in vectors) == spec.llama3_rope
    assert any(n.endswith(".bias") for n in vectors) == (spec.arch == "qwen2")
    assert any(n.endswith("_norm.weight") and "attn_q" in n for n in vectors) == \
        (spec.arch == "qwen3")
    for name, t in a.items():
        got, ref = b[name], _decoded(t)
        assert tuple(got.shape) == tuple(t.shape), name
        if name in vectors:
            assert got.tensor_type == T.F32 and np.array_equal(_decoded(got), ref), name
            continue
        assert got.tensor_type == want_type, name
        data = np.asarray(got.data)
        if want_type == T.Q8_0 and t.tensor_type == T.Q8_0:
            assert np.array_equal(data, np.asarray(t.data)), name  # int8 and scales kept
        else:
            want = gguf.quants.quantize(ref, want_type)
            assert np.array_equal(data.reshape(want.shape), want), name


@pytest.mark.parametrize("out_type", list(OUT_TYPES))
def test_the_converted_file_runs_as_the_source(converted, out_type):
    """f32 engines on both files: F32 output gives the same logits bit for bit and the same 64
    greedy tokens; F16 / Q8_0 logits within the type's tolerance (teacher-forced on the
    source's tokens), and the same argmax wherever the source's top two are clearly apart."""
    spec, src, outputs = converted
    prompt = am.prompt(spec)
    a = Engine.load(src, "f32", weight_cache=False)
    b = Engine.load(outputs[out_type], "f32", weight_cache=False)
    tokens = am.greedy(a, prompt, STEPS)
    la = a.forward_all(prompt + tokens[:-1]).logits[len(prompt) - 1:]
    lb = b.forward_all(prompt + tokens[:-1]).logits[len(prompt) - 1:]
    assert [int(i) for i in la.argmax(-1)] == tokens  # forward_all agrees with the steps
    scale = float(np.abs(la).max())
    tol = TOLERANCE[out_type] * scale
    if out_type == "f32":
        assert np.array_equal(la, lb)
        assert am.greedy(b, prompt, STEPS) == tokens
        return
    assert 0 < float(np.abs(la - lb).max()) <= tol
    top2 = np.sort(la, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    assert clear.sum() >= STEPS // 4  # the check below is not vacuous
    assert np.array_equal(lb.argmax(-1)[clear], la.argmax(-1)[clear])
    if clear[0]:
        assert am.greedy(b, prompt, 1) == tokens[:1]


# -----------------------------------------------------------------------------------------------
# RoPE scaling given by metadata, and sources that are refused


SMALL = ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80,
                    max_seq_len=64, shared_classifier=False, norm_eps=1e-6, rope_theta=5e5)


@pytest.mark.parametrize("scaling", [
    {"llama.rope.scaling.type": (V.STRING, "llama3"), "llama.rope.scaling.factor": (V.FLOAT32, 8.0),
     "llama.rope.scaling.low_freq_factor": (V.FLOAT32, 1.0),
     "llama.rope.scaling.high_freq_factor": (V.FLOAT32, 4.0),
     "llama.rope.scaling.original_context_length": (V.UINT32, 16)},
    {"llama.rope.scaling.type": (V.STRING, "linear"),
     "llama.rope.scaling.factor": (V.FLOAT32, 4.0)},
], ids=["llama3", "linear"])
def test_rope_scaling_from_metadata_is_kept(tmp_path, scaling):
    src = write_gguf(tmp_path / "src.gguf", SMALL, random_tensors(SMALL, seed=5), kv=scaling)
    out = convert(src, tmp_path / "out.gguf", "f32", cache=tmp_path).path
    want = load_gguf(src).config
    assert want.rope_factors or want.rope_scale != 1.0  # the keys do change the model
    assert load_gguf(out).config == want
    fields = _fields(out)
    for key, (vtype, value) in scaling.items():
        assert fields[key][0] == [vtype] and fields[key][1] == pytest.approx(value), key
    assert "rope_freqs.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}
    prompt = [1, 5, 9, 30, 2, 44, 61, 7]
    assert np.array_equal(Engine.load(src, "f32", weight_cache=False).forward_all(prompt).logits,
                          Engine.load(out, "f32", weight_cache=False).forward_all(prompt).logits)


def _refused(tmp_path: Path, src: Path, match: str, capsys) -> None:
    dst = tmp_path / "out.gguf"
    with pytest.raises(CheckpointError, match=match) as e:
        convert(src, dst, "q8_0", cache=tmp_path)
    assert str(src) in str(e.value)
    assert main(["convert", str(src), str(dst), "--type", "f16"]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and e.value.args[0].split(": ", 1)[1] in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out.")]


def test_unsupported_sources_are_refused_naming_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TILLER_CACHE_DIR", str(tmp_path / "cache"))
    tensors = random_tensors(SMALL, seed=6)
    src = write_gguf(tmp_path / "phi3.gguf", SMALL, tensors, arch="phi3")
    _refused(tmp_path, src, r"general\.architecture 'phi3' is not supported", capsys)
    bias = {"blk.0.attn_q.bias": np.zeros(SMALL.dim, np.float32)}
    src = write_gguf(tmp_path / "bias.gguf", SMALL, tensors, extra=bias)
    _refused(tmp_path, src, r"unexpected tensor blk\.0\.attn_q\.bias .*biases are not part of "
             "the llama architecture", capsys)
    src = write_gguf(tmp_path / "moe.gguf", SMALL, tensors,
                     kv={"llama.expert_count": (V.UINT32, 8)})
    _refused(tmp_path, src, r"llama\.expert_count is 8", capsys)
    src = write_gguf(tmp_path / "yarn.gguf", SMALL, tensors,
                     kv={"llama.rope.scaling.type": (V.STRING, "yarn")})
    _refused(tmp_path, src, r"llama\.rope\.scaling\.type='yarn'", capsys)
