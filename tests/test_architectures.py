"""Llama 3, Qwen 2 and Qwen 3 GGUF files (tests/arch_models.py, written with the gguf package)
against tests/reference.py's numpy forward: f32 tight, Q8_0 by argmax; the step's contract
(batch invariance, steering, capture) on the new architectures; files that lie, refused."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from tiller.engine.config import ModelConfig, llama3_rope_factors, rope_tables
from tiller.engine.engine import Engine, SeqRequest, SteeringTerm
from tiller.engine.forward import CAPTURE_POINTS
from tiller.engine.gguf import load_gguf
from tiller.engine.llama2c import CheckpointError
from tiller.engine.weights import build_weights, dequantized

import tests.arch_models as am
from tests.reference import add_q8_weights, reference_forward, reference_generate

ARCHS = list(am.SPECS)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch")
    return {name: am.write(root / f"{name}.gguf", spec) for name, spec in am.SPECS.items()}


@pytest.fixture(scope="module")
def engines(files) -> dict[tuple[str, str], Engine]:
    out = {}
    for name, path in files.items():
        ckpt = load_gguf(path)
        for dtype in ("f32", "q8_0"):
            out[name, dtype] = Engine(ckpt.config, build_weights(ckpt.config, ckpt.tensors,
                                                                 dtype), max_tokens=64)
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_the_config_comes_from_the_metadata(name, files):
    spec = am.SPECS[name]
    config = load_gguf(files[name]).config
    assert config == spec.config()
    # independent of ModelConfig's arithmetic: the numbers the spec wrote
    assert (config.head_dim, config.q_dim) == (spec.head_dim, spec.head_dim * spec.n_heads)
    assert config.rope_neox == (spec.arch in ("qwen2", "qwen3"))


@pytest.mark.parametrize("name", ARCHS)
def test_f32_matches_the_numpy_reference(name, engines):
    spec = am.SPECS[name]
    engine = engines[name, "f32"]
    toks = am.prompt(spec, 24)
    got = engine.forward_all(toks, capture_layers=list(range(spec.n_layers)))
    ref = reference_forward(am.weights(spec), spec.config(), toks)
    scale = np.abs(ref["logits"]).max()
    np.testing.assert_allclose(got.logits, ref["logits"], atol=2e-5 * scale, rtol=0)
    for i, point in enumerate(CAPTURE_POINTS):
        np.testing.assert_allclose(got.captures[i], ref[point], atol=1e-4, rtol=1e-4,
                                   err_msg=point)
    # the engine's weights, back in the file's row order, are the file's tensors
    back = dequantized(engine.weights, engine.config)
    for key, value in am.weights(spec).items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("name", ARCHS)
def test_f32_greedy_tokens_match_the_reference(name, engines):
    spec = am.SPECS[name]
    engine = engines[name, "f32"]
    prompt = am.prompt(spec)
    want = reference_generate(am.weights(spec), spec.config(), prompt, 24)
    seq = engine.new_sequence()
    logits = engine.step([SeqRequest(seq, prompt)])[0].logits
    got = []
    for _ in range(24):
        got.append(int(np.argmax(logits)))
        logits = engine.step([SeqRequest(seq, [got[-1]])])[0].logits
    engine.release(seq)
    assert got == want


@pytest.mark.parametrize("name", ARCHS)
def test_q8_0_matches_the_reference_on_the_same_quantized_weights(name, engines):
    # with a float32 KV cache: the weights' path alone (the default cache is the next test's)
    spec = am.SPECS[name]
    engine = Engine(engines[name, "q8_0"].config, engines[name, "q8_0"].weights,
                    max_tokens=64, cache_type_k="f32", cache_type_v="f32")
    toks = am.prompt(spec, 24)
    got = engine.forward_all(toks).logits
    weights = add_q8_weights(dequantized(engine.weights, engine.config))
    ref = reference_forward(weights, spec.config(), toks, quantized=True, capture=False,
                            kv_type="f32")
    scale = np.abs(ref["logits"]).max()
    np.testing.assert_allclose(got, ref["logits"], atol=1e-3 * scale, rtol=0)
    f32 = reference_forward(am.weights(spec), spec.config(), toks, capture=False)["logits"]
    assert (got.argmax(-1) == f32.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("name", ARCHS)
def test_a_bf16_kv_cache_matches_the_reference_with_the_same_roundings(name, engines):
    # the default Q8_0 engine keeps K and V as bfloat16 and rounds queries and softmax weights
    # to bfloat16 to multiply them; the reference rounds the same values the same way. Float
    # sums in another order can still land a value on the other side of a rounding boundary
    # (bfloat16's, or an activation's 8 bits), which moves that token's logits by a few
    # quanta: most tokens agree to float32 precision, all within 3%, the argmax nearly always
    spec = am.SPECS[name]
    engine = engines[name, "q8_0"]
    assert (engine.cache.type_k, engine.cache.type_v) == ("bf16", "bf16")
    toks = am.prompt(spec, 24)
    got = engine.forward_all(toks).logits
    weights = add_q8_weights(dequantized(engine.weights, engine.config))
    ref = reference_forward(weights, spec.config(), toks, quantized=True, capture=False,
                            kv_type="bf16")["logits"]
    scale = np.abs(ref).max()
    row_err = np.abs(got - ref).max(-1) / scale
    assert (row_err <= 1e-5).mean() >= 0.75 and row_err.max() <= 3e-2, row_err
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    exact = reference_forward(am.weights(spec), spec.config(), toks, capture=False)["logits"]
    assert (got.argmax(-1) == exact.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_batch_invariance_bitwise(name, dtype, engines):
    engine = engines[name, dtype]
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 500, n).tolist() for n in (9, 3, 17)]
    follow = [rng.integers(0, 500, 4).tolist() for _ in prompts]

    def alone(i: int) -> list[np.ndarray]:
        seq = engine.new_sequence()
        out = [engine.step([SeqRequest(seq, prompts[i])])[0].logits]
        out += [engine.step([SeqRequest(seq, [t])])[0].logits for t in follow[i]]
        engine.release(seq)
        return out

    want = [alone(i) for i in range(3)]
    seqs = [engine.new_sequence() for _ in prompts]
    got: list[list[np.ndarray]] = [[], [], []]
    # staggered: sequence i's prompt at step i, while the earlier ones decode
    for step in range(3 + 4):
        batch, who = [], []
        for i in range(3):
            k = step - i
            if k == 0:
                batch.append(SeqRequest(seqs[i], prompts[i]))
            elif 0 < k <= 4:
                batch.append(SeqRequest(seqs[i], [follow[i][k - 1]]))
            else:
                continue
            who.append(i)
        for i, res in zip(who, engine.step(batch), strict=True):
            got[i].append(res.logits)
    for s in seqs:
        engine.release(s)
    for i in range(3):
        assert len(got[i]) == len(want[i])
        for a, b in zip(want[i], got[i], strict=True):
            assert np.array_equal(a, b)


def test_steering_and_capture_on_qwen3(engines):
    spec = am.SPECS["qwen3"]
    engine = engines["qwen3", "f32"]
    toks = am.prompt(spec, 16)
    vec = np.random.default_rng(8).standard_normal((4, spec.dim)).astype(np.float32)
    terms = [SteeringTerm(layer=1, vectors=vec, scale=3.0),
             SteeringTerm(layer=spec.n_layers, vectors=vec[0], scale=0.5, every_position=True)]
    got = engine.forward_all(toks, steering=terms, capture_layers=[0, 1])
    ref = reference_forward(am.weights(spec), spec.config(), toks,
                            steering={1: 3.0 * vec, spec.n_layers: 0.5 * vec[0]})
    np.testing.assert_allclose(got.logits, ref["logits"], atol=1e-4, rtol=1e-4)
    for i, point in enumerate(CAPTURE_POINTS):
        np.testing.assert_allclose(got.captures[i], ref[point], atol=1e-4, rtol=1e-4,
                                   err_msg=point)
    assert not np.allclose(engine.forward_all(toks).logits, got.logits)


# RoPE scaling --------------------------------------------------------------------------------


def test_llama3_factors_from_metadata_equal_the_rope_freqs_tensor(files, tmp_path):
    """A llama3 rope.scaling.type without rope_freqs.weight: the factors computed from the
    metadata are the tensor convert_hf_to_gguf.py writes (HF's formula, written out here)."""
    spec = am.SPECS["llama3"]
    s = am.LLAMA3_SCALING
    freqs = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2) / spec.head_dim)
    wavelen = 2 * np.pi / freqs
    low, high = s["original_context_length"] / s["low_freq_factor"], \
        s["original_context_length"] / s["high_freq_factor"]
    smooth = (s["original_context_length"] / wavelen - s["low_freq_factor"]) \
        / (s["high_freq_factor"] - s["low_freq_factor"])
    want = np.where(wavelen < high, 1.0, np.where(
        wavelen > low, s["factor"], 1 / ((1 - smooth) / s["factor"] + smooth)))
    assert len(set(want.tolist())) > 2  # all three regimes appear
    np.testing.assert_allclose(spec.config().rope_factors, want, rtol=1e-6)

    ckpt = load_gguf(files["llama3"])
    reader = gguf.GGUFReader(files["llama3"])
    tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert ckpt.config.rope_factors == tuple(np.asarray(tensor.data, np.float32).tolist())
    # the same model with metadata instead of the tensor
    plain = _rewrite(files["llama3"], tmp_path / "meta.gguf", drop={"rope_freqs.weight"}, kv={
        "llama.rope.scaling.type": ("llama3", gguf.GGUFValueType.STRING),
        "llama.rope.scaling.factor": (s["factor"], gguf.GGUFValueType.FLOAT32),
        "llama.rope.scaling.low_freq_factor": (s["low_freq_factor"], gguf.GGUFValueType.FLOAT32),
        "llama.rope.scaling.high_freq_factor": (s["high_freq_factor"],
                                                gguf.GGUFValueType.FLOAT32),
        "llama.rope.scaling.original_context_length": (s["original_context_length"],
                                                       gguf.GGUFValueType.UINT32)})
    assert load_gguf(plain).config.rope_factors == pytest.approx(ckpt.config.rope_factors,
                                                                  rel=1e-6)


def test_linear_rope_scaling_divides_positions(files, tmp_path):
    path = _rewrite(files["qwen2"], tmp_path / "linear.gguf", kv={
        "qwen2.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
        "qwen2.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32)})
    config = load_gguf(path).config
    assert config.rope_scale == 0.25
    cos, _ = rope_tables(config)
    freqs = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
    np.testing.assert_allclose(cos[8], np.cos(2.0 * freqs), atol=1e-7)  # position 8 / 4


def test_llama3_rope_factors_regimes():
    # wavelengths 2 pi / freq: short ones kept, long ones divided by the factor
    f = llama3_rope_factors(64, 500000.0, 8.0, 1.0, 4.0, 8192)
    assert f[0] == 1.0 and f[-1] == 8.0 and all(a <= b for a, b in zip(f, f[1:], strict=False))


# files that lie -------------------------------------------------------------------------------


def _rewrite(src: Path, dst: Path, *, drop: set[str] = frozenset(), kv=None,
             tensors: dict[str, np.ndarray] | None = None, arch: str | None = None) -> Path:
    """A copy of a GGUF file with keys set or replaced, tensors dropped or replaced."""
    reader = gguf.GGUFReader(src)
    arch = arch or str(reader.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst, arch)
    kv = dict(kv or {})
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture",) \
                or field.name in kv:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for key, (value, vtype) in kv.items():
        w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        if t.name in drop:
            continue
        if tensors and t.name in tensors:
            w.add_tensor(t.name, tensors[t.name])
        elif t.tensor_type == gguf.GGMLQuantizationType.F32:
            w.add_tensor(t.name, np.asarray(t.data))
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


U32 = gguf.GGUFValueType.UINT32


@pytest.mark.parametrize("name, change, match", [
    # Qwen3-0.6B's shape lie: a key_length that does not fit the q/k/v tensors
    ("qwen3", {"kv": {"qwen3.attention.key_length": (64, U32),
                      "qwen3.attention.value_length": (64, U32),
                      "qwen3.rope.dimension_count": (64, U32)}},
     r"tensor blk.0.attn_q.weight has shape \(512, 256\), the hyperparameters need \(256, 256\)"),
    ("qwen3", {"kv": {"qwen3.attention.key_length": (96, U32)}},
     r"qwen3.rope.dimension_count is 128, but only 96"),
    ("qwen3", {"drop": {"blk.1.attn_k_norm.weight"}}, r"missing tensor blk.1.attn_k_norm.weight"),
    ("qwen3", {"tensors": {"blk.0.attn_q_norm.weight": np.ones(64, np.float32)}},
     r"tensor blk.0.attn_q_norm.weight has shape \(64,\), the hyperparameters need \(128,\)"),
    ("qwen2", {"drop": {"blk.0.attn_v.bias"}}, r"missing tensor blk.0.attn_v.bias"),
    ("qwen2", {"kv": {"qwen2.embedding_length": (128, U32)}},
     r"tensor token_embd.weight has shape \(512, 256\), the hyperparameters need \(512, 128\)"),
    ("qwen2", {"kv": {"qwen2.attention.head_count": ([4, 8], gguf.GGUFValueType.ARRAY)}},
     r"qwen2.attention.head_count differs between layers"),
    ("qwen2", {"arch": "qwen2moe"}, r"general.architecture 'qwen2moe' is not supported"),
    ("llama3", {"arch": "qwen2"}, r"rope_freqs.weight: qwen2 models have no RoPE frequency"),
    ("qwen2", {"arch": "llama"}, r"unexpected tensors blk.0.attn_q.bias.*biases are not part"),
    ("llama3", {"tensors": {"rope_freqs.weight": -np.ones(32, np.float32)}},
     r"rope_freqs.weight has values that are not positive"),
])
def test_files_that_lie_are_refused_naming_file_and_key(name, change, match, files, tmp_path):
    path = tmp_path / "bad.gguf"
    arch = change.get("arch")
    kv = dict(change.get("kv", {}))
    if arch:  # the same keys under the claimed architecture's prefix
        reader = gguf.GGUFReader(files[name])
        old = am.SPECS[name].arch
        for field in reader.fields.values():
            if field.name.startswith(old + "."):
                vtype = field.types[0]
                kv[arch + field.name[len(old):]] = (field.contents(), vtype)
    _rewrite(files[name], path, drop=change.get("drop", set()), kv=kv,
             tensors=change.get("tensors"), arch=arch)
    with pytest.raises(CheckpointError, match=match) as e:
        load_gguf(path)
    assert str(e.value).startswith(f"{path}: ")


def test_per_layer_head_counts_that_agree_are_accepted(files, tmp_path):
    path = _rewrite(files["qwen3"], tmp_path / "arrays.gguf", kv={
        "qwen3.attention.head_count": ([4, 4], gguf.GGUFValueType.ARRAY),
        "qwen3.attention.head_count_kv": ([2, 2], gguf.GGUFValueType.ARRAY)})
    assert load_gguf(path).config == load_gguf(files["qwen3"]).config


def test_llama_configs_keep_their_defaults():
    c = ModelConfig(64, 96, 2, 4, 2, 80, 32)
    assert (c.arch, c.head_dim, c.q_dim, c.rope_neox, c.rope_factors) == ("llama", 16, 64,
                                                                         False, ())
