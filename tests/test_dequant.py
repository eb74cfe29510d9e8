"""GGUF quantizations: our numba decoders against gguf-py's numpy reference (bitwise in float32),
whole models in every type against tests/reference.py's forward on the gguf-decoded weights,
`tiller convert` from them, and broken files."""

from __future__ import annotations

import dataclasses
import re
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from tiller.engine import dequant
from tiller.engine.config import ModelConfig
from tiller.engine.convert import convert
from tiller.engine.dequant import BLOCKS, TYPES, Packed, random_blocks, row_bytes
from tiller.engine.engine import Engine
from tiller.engine.gguf import load_gguf
from tiller.engine.llama2c import NORMS, CheckpointError, random_tensors
from tiller.engine.quant import QTensor, quantize_q8_0
from tiller.engine.weights import build_weights, dequantized

from tests.reference import reference_forward
from tests.test_gguf import LAYER_NAMES, _patched, _tensor_field, gguf_tensors, write_gguf

QUANTS = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
# gguf-py has quantizers for these; the K-quants are built from random blocks
HAS_QUANTIZER = (T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
# rows of 256 values for the K-quants
CONFIG = ModelConfig(dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=2,
                     vocab_size=96, max_seq_len=32, shared_classifier=False)
TIED = ModelConfig(dim=256, hidden_dim=256, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64,
                   max_seq_len=16)
TOKENS = [1, 5, 17, 42, 3, 9, 60, 11, 2, 33, 7, 8]


def packed(blocks: np.ndarray, qtype: T, n: int) -> Packed:
    return Packed(("t",), (qtype,), (np.ascontiguousarray(blocks),), n, False, CheckpointError)


def reference(blocks: np.ndarray, qtype: T) -> np.ndarray:
    """gguf-py's numpy dequantization, float32."""
    return np.asarray(gguf.quants.dequantize(blocks, qtype), np.float32)


def encoded(qtype: T, rows: int, n: int, rng: np.random.Generator, scale: float = 0.02,
            floats: np.ndarray | None = None) -> np.ndarray:
    """(rows, row_bytes) of `qtype`: gguf's quantizer on `floats` (or random ones) where it has
    one, else valid random blocks."""
    if qtype in (T.F32, T.F16):
        x = floats if floats is not None else rng.standard_normal((rows, n), np.float32) * scale
        return x.astype(np.float32 if qtype == T.F32 else np.float16).view(np.uint8)
    if qtype in HAS_QUANTIZER:
        x = floats if floats is not None else rng.standard_normal((rows, n), np.float32) * scale
        return gguf.quants.quantize(np.asarray(x, np.float32), qtype)
    return random_blocks(qtype, rows, n, rng, scale)


# -----------------------------------------------------------------------------------------------
# decoders against gguf-py


def test_block_table_is_ggmls():
    for qtype in TYPES:
        assert BLOCKS[qtype] == GGML_QUANT_SIZES[qtype], qtype.name
    assert set(QUANTS) < set(TYPES)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decoding_equals_gguf_reference_bitwise(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, n = 9, 768  # three K-quant super-blocks, 24 legacy blocks
    sources = [random_blocks(qtype, rows, n, rng)]
    if qtype in HAS_QUANTIZER:  # real quantizer output, with outliers
        x = rng.standard_normal((rows, n)).astype(np.float32)
        x[:, ::97] *= 40
        sources.append(encoded(qtype, rows, n, rng, floats=x))
    for blocks in sources:
        assert blocks.shape == (rows, row_bytes(qtype, n))
        want = reference(blocks, qtype).reshape(rows, n)
        got = packed(blocks, qtype, n).dequantize()
        assert got.dtype == np.float32 and got.shape == (rows, n)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_q8_0_output_is_the_engine_quantizer_on_the_reference_values(qtype):
    """Requantized to the engine's Q8_0 (rows padded to n_pad): exactly engine.quant's
    quantize_q8_0 of gguf's values; a Q8_0 source keeps its own int8 values and scales."""
    rng = np.random.default_rng(100 + int(qtype))
    rows, n, n_pad = 5, 512, 576
    blocks = encoded(qtype, rows, n, rng)
    values = np.full((rows, n_pad), 7, np.uint8)  # garbage the decoder must overwrite
    scales = np.full((rows, n_pad // 32), 7.0, np.float32)
    packed(blocks, qtype, n).into_q8_0(values, scales)
    if qtype == T.Q8_0:
        b = blocks.reshape(rows, -1, 34)
        want = QTensor(b[..., 2:].reshape(rows, n).view(np.int8),
                       b[..., :2].copy().view(np.float16).astype(np.float32).reshape(rows, -1))
    else:
        want = quantize_q8_0(reference(blocks, qtype).reshape(rows, n))
    assert np.array_equal(values[:, :n], (want.values.astype(np.int16) + 128).astype(np.uint8))
    assert np.array_equal(scales[:, :n // 32].view(np.uint32), want.scales.view(np.uint32))
    assert (values[:, n:] == 128).all() and (scales[:, n // 32:] == 0).all()  # pad groups


@pytest.mark.parametrize("qtype", [T.F16, T.Q4_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q6_K],
                         ids=lambda t: t.name)
def test_any_bytes_decode_as_gguf_does_including_odd_scales(qtype):
    """Random bytes everywhere, scales too (subnormal, huge, inf, NaN): the values agree
    with gguf's (bitwise where finite), and exactly the rows with a non-finite value are
    flagged."""
    rng = np.random.default_rng(7)
    block, nbytes = BLOCKS[qtype]
    rows, n = 64, 2 * max(block, 32)
    blocks = rng.integers(0, 256, (rows, n // block * nbytes), np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 and the like, on purpose
        want = reference(blocks, qtype).reshape(rows, n)
    got = np.empty((rows, n), np.float32)
    bad = np.zeros(rows, np.bool_)
    dequant._rows_to_f32(dequant._KIND[qtype], blocks, n, got, bad, dequant._HALF)
    finite = np.isfinite(want)
    assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[np.isinf(want)], want[np.isinf(want)])
    assert np.array_equal(bad, ~finite.all(axis=1))


def test_every_float16_and_bfloat16_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(4, -1)
    for qtype, want in ((T.F16, bits.view(np.float16).astype(np.float32)),
                        (T.BF16, (bits.astype(np.uint32) << 16).view(np.float32))):
        got = np.empty(bits.shape, np.float32)
        bad = np.zeros(4, np.bool_)
        dequant._rows_to_f32(dequant._KIND[qtype], bits.view(np.uint8), bits.shape[1], got,
                             bad, dequant._HALF)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), qtype.name


def test_packed_refuses_views_that_do_not_fit_and_reports_non_finite_rows():
    rng = np.random.default_rng(0)
    blocks = random_blocks(T.Q4_K, 3, 256, rng)
    with pytest.raises(ValueError, match=r"uint8 \(3, 144\)"):
        packed(blocks[:, :-1], T.Q4_K, 256)
    with pytest.raises(ValueError, match="rows of 128 values, not a multiple of the Q4_K"):
        packed(blocks, T.Q4_K, 128)
    with pytest.raises(ValueError, match="IQ4_NL: unsupported"):
        packed(blocks, T.IQ4_NL, 256)
    with pytest.raises(ValueError, match="cannot hold"):
        packed(blocks, T.Q4_K, 256).into_f32(np.empty((3, 255), np.float32))
    blocks[1, :2] = np.float16(np.inf).reshape(1).view(np.uint8)  # d of row 1
    with pytest.raises(CheckpointError, match=r"tensor t \(Q4_K\) decodes to non-finite "
                                              "values in 1 of its 3 rows"):
        packed(blocks, T.Q4_K, 256).dequantize()


def test_decoded_pages_are_released_and_still_readable(tmp_path):
    rng = np.random.default_rng(1)
    blocks = random_blocks(T.Q6_K, 64, 1024, rng)
    path = tmp_path / "blocks.bin"
    path.write_bytes(b"\0" * 100 + blocks.tobytes())
    data = np.memmap(path, dtype=np.uint8, mode="r")
    view = data[100:100 + blocks.nbytes].reshape(blocks.shape)
    first = packed(view, T.Q6_K, 1024).dequantize()  # releases the pages after decoding
    assert np.array_equal(first, reference(blocks, T.Q6_K).reshape(64, 1024))
    assert np.array_equal(packed(view, T.Q6_K, 1024).dequantize(), first)  # faulted back in


# -----------------------------------------------------------------------------------------------
# whole models


def quantized_model(path: Path, config: ModelConfig, types: dict[str, T] | T,
                    seed: int = 0) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A random Llama GGUF whose matrices are in `types` (one type, or by GGUF name with
    Q4_K as the default); norms F32. Returns the path, the gguf-decoded float32 tensors in
    engine names and the raw blocks by GGUF name."""
    rng = np.random.default_rng(seed)
    src = random_tensors(config, seed=seed)
    raw: dict[str, tuple[np.ndarray, T]] = {}
    decoded: dict[str, np.ndarray] = {}
    for name, a in gguf_tensors(config, src).items():
        if a.ndim == 1:
            continue
        qtype = types if isinstance(types, T) else types.get(name, T.Q4_K)
        blocks = encoded(qtype, *a.shape, rng, floats=a)
        raw[name] = (blocks, qtype)
        decoded[name] = reference(blocks, qtype).reshape(a.shape)
    ours = {"token_embd.weight": "token_embedding", "output.weight": "classifier"}
    ref = {k: v for k, v in src.items() if k in NORMS}
    for name, a in decoded.items():
        if name in ours:
            ref[ours[name]] = a
    for part, mine in LAYER_NAMES.items():
        if mine not in NORMS:
            ref[mine] = np.stack([decoded[f"blk.{i}.{part}.weight"]
                                  for i in range(config.n_layers)])
    write_gguf(path, config, src, raw=raw)
    return path, ref, {k: v for k, (v, _) in raw.items()}


def q8_reference(ref: dict[str, np.ndarray], blocks: dict[str, np.ndarray], qtype: T | None
                 ) -> dict[str, object]:
    """tests/reference.py's quantized weights: a Q8_0 file's own blocks, else quantize_q8_0 of
    the decoded values (what the engine should hold)."""
    out: dict[str, object] = dict(ref)
    for name, a in ref.items():
        if name in NORMS:
            continue
        if qtype == T.Q8_0:
            stacked = a.ndim == 3
            names = ([f"blk.{i}.{p}.weight" for i in range(a.shape[0]) for p, m in
                      LAYER_NAMES.items() if m == name] if stacked else
                     ["token_embd.weight" if name == "token_embedding" else "output.weight"])
            b = np.stack([blocks[k] for k in names]).reshape(*a.shape[:-1], -1, 34)
            q = QTensor(b[..., 2:].reshape(a.shape).view(np.int8),
                        b[..., :2].copy().view(np.float16).astype(np.float32)[..., 0])
        else:
            q = quantize_q8_0(a)
        out[name + "_q8"] = (q.values, q.scales)
    return out


@pytest.mark.parametrize("qtype", QUANTS + (T.F16, T.BF16), ids=lambda t: t.name)
def test_a_model_in_each_type_matches_the_reference(qtype, tmp_path):
    path, ref, blocks = quantized_model(tmp_path / "m.gguf", CONFIG, qtype, seed=int(qtype))
    ckpt = load_gguf(path)
    assert all(isinstance(ckpt.tensors[k], Packed) for k in ref if k not in NORMS)
    # f32: the engine computes with gguf's values exactly
    f32 = Engine(CONFIG, build_weights(CONFIG, ckpt.tensors, "f32"))
    weights = dequantized(f32.weights, CONFIG)
    for name, a in ref.items():
        assert np.array_equal(weights[name], a), name
    want = reference_forward(ref, CONFIG, TOKENS, capture=False)["logits"]
    scale = np.abs(want).max()
    np.testing.assert_allclose(f32.forward_all(TOKENS).logits, want, atol=2e-5 * scale, rtol=0)
    # q8_0: the engine's Q8_0 of those values (or the file's own Q8_0 blocks); a float32 KV
    # cache, so that what is compared is the weights' path (the bfloat16 cache has its own
    # tests: tests/test_kernels.py, tests/test_architectures.py)
    q8 = Engine(CONFIG, build_weights(CONFIG, ckpt.tensors, "q8_0"), cache_type_k="f32",
                cache_type_v="f32")
    qref = q8_reference(ref, blocks, qtype)
    weights = dequantized(q8.weights, CONFIG)
    for name in ref:
        if name not in NORMS:
            values, scales = qref[name + "_q8"]
            assert np.array_equal(weights[name], QTensor(values, scales).dequantize()), name
    got = q8.forward_all(TOKENS).logits
    want_q8 = reference_forward(qref, CONFIG, TOKENS, quantized=True, capture=False,
                                kv_type="f32")["logits"]
    # NOTE: float32 sums differ from the reference's float64 ones in the last bit, which can
    # move an activation across a rounding boundary of its quantization (one quantum): allow
    # that in one token of six, bounded, and require the others to match closely.
    row_err = np.abs(got[:6] - want_q8[:6]).max(-1) / scale
    assert (row_err <= 1e-5).sum() >= 5 and row_err.max() <= 5e-3, row_err
    assert (got.argmax(-1) == want_q8.argmax(-1)).mean() >= 0.9
    np.testing.assert_allclose(got, want, atol=0.05 * scale)


def test_a_q4_k_m_style_mix_of_types_and_a_tied_embedding(tmp_path):
    """Like llama-quantize's Q4_K_M: Q6_K for some layers' attn_v and ffn_down, Q4_K
    elsewhere; here with a tied embedding and a Q8_0 layer beside a Q5_0 one in a stack."""
    types = {"token_embd.weight": T.Q6_K, "blk.0.attn_v.weight": T.Q6_K,
             "blk.0.ffn_down.weight": T.Q6_K, "blk.0.attn_q.weight": T.Q8_0,
             "blk.1.attn_q.weight": T.Q5_0}
    config = dataclasses.replace(TIED, n_layers=2)
    path, ref, _ = quantized_model(tmp_path / "m.gguf", config, types, seed=3)
    ckpt = load_gguf(path)
    f32 = Engine(config, build_weights(config, ckpt.tensors, "f32"))
    for name, a in ref.items():
        assert np.array_equal(dequantized(f32.weights, config)[name], a), name
    want = reference_forward(ref, config, TOKENS, capture=False)["logits"]
    scale = np.abs(want).max()
    np.testing.assert_allclose(f32.forward_all(TOKENS).logits, want, atol=2e-5 * scale, rtol=0)
    q8 = Engine(config, build_weights(config, ckpt.tensors, "q8_0"), cache_type_k="f32",
                cache_type_v="f32").forward_all(TOKENS).logits
    # NOTE: the Q8_0 layer keeps its own blocks, which gguf's quantizer made: requantizing
    # their values with the engine's rule gives the same int8 and scales
    want_q8 = reference_forward(q8_reference(ref, {}, None), config, TOKENS, quantized=True,
                                capture=False, kv_type="f32")["logits"]
    np.testing.assert_allclose(q8[:6], want_q8[:6], atol=1e-5 * scale, rtol=0)
    assert (q8.argmax(-1) == want_q8.argmax(-1)).mean() >= 0.9
    # a stack mixing Q8_0 and other types materializes as float32
    wq = ckpt.tensors["wq"]
    assert isinstance(wq, Packed) and not wq.is_q8_0
    assert np.array_equal(wq.materialize(), ref["wq"])


@pytest.mark.parametrize("dtype", ["q8_0", "f32"])
def test_loading_allocates_little_beyond_the_engines_weights(dtype, tmp_path):
    """No float32 copy of the model, nor of a stacked matrix: what load and build allocate
    (numpy's allocations, traced) peaks within 1.3x the weights they build. (The memory-mapped
    file is not traced: bench/bench_load.py measures the RSS of a 1B model.)"""
    config = dataclasses.replace(CONFIG, n_layers=6, vocab_size=512)
    path, _, _ = quantized_model(tmp_path / "m.gguf", config, T.Q4_K)
    build_weights(config, load_gguf(path).tensors, dtype)  # compiled outside the trace
    tracemalloc.start()
    try:
        weights = build_weights(config, load_gguf(path).tensors, dtype)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = sum({id(a): a.nbytes for a in weights}.values())
    assert peak <= 1.3 * total, (peak, total)


def test_loading_reports_progress_per_tensor(tmp_path):
    path, _, _ = quantized_model(tmp_path / "m.gguf", CONFIG, T.Q4_K)
    calls: list[tuple[int, int, str]] = []
    Engine.load(path, dtype="q8_0", progress=lambda *a: calls.append(a))
    n = 2 + 7 * CONFIG.n_layers  # output, token_embd, seven matrices a layer
    assert [c[:2] for c in calls] == [(i, n) for i in range(1, n + 1)]
    assert calls[0][2] == "output.weight" and calls[-1][2] == "blk.1.ffn_down.weight"


def _generate_with_stderr(args: list[str], stderr: int) -> None:
    """`tiller generate ARGS` in a fresh process whose fd 2 is `stderr`, with the delay that
    hides quick loads' bars set to 0."""
    import subprocess
    import sys

    code = ("import sys; from tiller import cli; cli.LOAD_BAR_DELAY = 0.0; "
            "sys.exit(cli.main(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, "generate", *args], stderr=stderr,
                   stdout=subprocess.DEVNULL, check=True, timeout=300)


def test_the_load_bar_shows_on_a_terminal_only(tmp_path):
    """`tiller generate` with stderr on a pseudo-terminal draws tqdm's bar over the tensors it
    decodes, also when nobody set the terminal's size (0 columns, where tqdm's dynamic width
    draws nothing); with stderr a file, no bar."""
    import os
    import pty
    import select

    path, _, _ = quantized_model(tmp_path / "m.gguf", CONFIG, T.Q4_K)
    args = ["-m", str(path), "--max-tokens", "1", "--no-weight-cache"]
    master, slave = pty.openpty()
    assert os.get_terminal_size(slave).columns == 0
    drawn = b""
    try:
        _generate_with_stderr(args, slave)
        while select.select([master], [], [], 0.5)[0]:  # the pty holds all of it by now
            drawn += os.read(master, 1 << 16)
    finally:
        os.close(slave)
        os.close(master)
    n = 2 + 7 * CONFIG.n_layers
    text = drawn.decode(errors="replace")
    # tqdm redraws at most every 0.1 s, so which counts show depends on the load's speed
    assert re.search(rf"\| *\d+/{n} \[[^]]*tensor/s, (output|token_embd|blk\.\d\.\w+)\.weight\]",
                     text), text[-500:]
    assert "load " in text
    with open(tmp_path / "stderr.txt", "w+b") as f:
        _generate_with_stderr(args, f.fileno())
        f.seek(0)
        text = f.read().decode()
    assert "load " in text and f"/{n}" not in text and "tensor/s" not in text


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0], ids=lambda t: t.name)
def test_convert_from_a_quantized_file(qtype, tmp_path):
    path, ref, _ = quantized_model(tmp_path / "m.gguf", CONFIG, qtype)
    for out_type in ("f32", "f16", "q8_0"):
        out = convert(path, tmp_path / f"{out_type}.gguf", out_type, cache=tmp_path)
        written = {t.name: t for t in gguf.GGUFReader(out.path).tensors}
        for name, a in gguf_tensors(CONFIG, ref).items():
            t = written[name]
            if a.ndim == 1 or out_type == "f32":
                want = np.asarray(a, np.float32).view(np.uint8).reshape(a.shape[0] if a.ndim
                                                                         > 1 else 1, -1)
            elif out_type == "f16":
                want = a.astype(np.float16).view(np.uint8)
            else:
                want = gguf.quants.quantize(a, T.Q8_0)
            assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(want.shape),
                                  want), (out_type, name)
        logits = Engine.load(out.path, dtype="f32").forward_all(TOKENS).logits
        want = reference_forward(ref, CONFIG, TOKENS, capture=False)["logits"]
        tol = 1e-4 if out_type == "f32" else 0.05
        np.testing.assert_allclose(logits, want, atol=tol * np.abs(want).max())


# -----------------------------------------------------------------------------------------------
# broken files


@pytest.mark.parametrize("qtype", QUANTS, ids=lambda t: t.name)
def test_a_size_that_does_not_match_type_and_shape_is_refused(qtype, tmp_path):
    """One more row than the data holds: the tensor's bytes reach into the next tensor, or past
    the end of the file for the last one."""
    path, _, _ = quantized_model(tmp_path / "m.gguf", CONFIG, qtype)
    good = path.read_bytes()
    at, n_dims = _tensor_field(path, "blk.0.attn_q.weight")
    _patched(path, at - 8, "<Q", CONFIG.dim + 1)  # ne[1], the rows
    with pytest.raises(CheckpointError, match=rf"{path}: tensor blk.0.attn_q.weight "
                                              rf"\({qtype.name}, shape \(257, 256\), .* overlaps"):
        load_gguf(path)
    path.write_bytes(good)
    last = gguf.GGUFReader(path).tensors[-1]
    path.write_bytes(good[:-row_bytes(qtype, int(last.shape[0]))])
    with pytest.raises(CheckpointError, match=rf"tensor {last.name} \({qtype.name}, .* runs "
                                              "past the end"):
        load_gguf(path)


def test_rows_that_are_not_whole_blocks_are_refused(tmp_path):
    path, _, _ = quantized_model(tmp_path / "m.gguf", TIED, T.F32)
    good = path.read_bytes()
    at, _ = _tensor_field(path, "blk.0.ffn_up.weight")
    # K-quants need rows of a multiple of 256 (QK_K)
    _patched(path, at - 16, "<Q", 128)  # ne[0]
    _patched(path, at - 8, "<Q", 512)  # ne[1]: the same bytes
    _patched(path, at, "<I", int(T.Q4_K))
    with pytest.raises(CheckpointError, match=r"tensor blk.0.ffn_up.weight has rows of 128 "
                                              r"values, not a multiple of the Q4_K super-block "
                                              r"\(QK_K\) of 256"):
        load_gguf(path)
    # the legacy types, of 32
    path.write_bytes(good)
    _patched(path, at - 16, "<Q", 48)
    _patched(path, at, "<I", int(T.Q4_0))
    with pytest.raises(CheckpointError, match="tensor blk.0.ffn_up.weight has rows of 48 "
                                              "values, not a multiple of the Q4_0 block of 32"):
        load_gguf(path)


def test_unknown_type_ids_and_non_finite_scales_are_refused(tmp_path):
    path, _, blocks = quantized_model(tmp_path / "m.gguf", CONFIG, T.Q4_K)
    good = path.read_bytes()
    at, _ = _tensor_field(path, "blk.1.ffn_gate.weight")
    _patched(path, at, "<I", 1234)
    with pytest.raises(CheckpointError, match=f"{path}: tensor blk.1.ffn_gate.weight has "
                                              "unknown type 1234"):
        load_gguf(path)
    # a NaN super-block scale: found while decoding, before the engine ever runs
    path.write_bytes(good)
    offset = next(t.data_offset for t in gguf.GGUFReader(path).tensors
                  if t.name == "blk.1.ffn_gate.weight")
    data = bytearray(good)
    struct.pack_into("<H", data, offset + 144 * 5, 0x7E00)  # d of the sixth block: NaN
    path.write_bytes(data)
    ckpt = load_gguf(path)
    for dtype in ("f32", "q8_0"):
        with pytest.raises(CheckpointError, match=f"{path}: tensor blk.1.ffn_gate.weight "
                                                  r"\(Q4_K\) decodes to non-finite values"):
            build_weights(CONFIG, ckpt.tensors, dtype)
