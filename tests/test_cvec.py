"""llama.cpp control-vector GGUF files: layer mapping, round trip, other writers, broken files."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
from tiller.engine.config import ModelConfig
from tiller.engine.cvec import (
    ControlVector,
    ControlVectorError,
    from_llama_cpp,
    read_control_vector,
    to_llama_cpp,
    write_control_vector,
)
from tiller.engine.engine import Engine
from tiller.engine.llama2c import random_tensors
from tiller.engine.steering import control_terms
from tiller.engine.weights import build_weights

from tests.reference import reference_forward

CONFIG = ModelConfig(dim=64, hidden_dim=96, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64,
                     max_seq_len=32)
DIM, N = CONFIG.dim, CONFIG.n_layers
TENSORS = random_tensors(CONFIG, seed=3)
RNG = np.random.default_rng(0)
TOKENS = [1, 5, 9, 22, 40, 3, 17]


def directions(layers=(2, 3, N)) -> dict[int, np.ndarray]:
    return {layer: RNG.standard_normal(DIM).astype(np.float32) for layer in layers}


def hand_made(path, tensors: dict[str, np.ndarray], *, arch="controlvector", hint="llama",
              count: int | None = -1, count_type="uint32") -> None:
    """A file written with GGUFWriter the way repeng's ControlVector.export_gguf does."""
    w = gguf.GGUFWriter(path, arch)
    if hint is not None:
        w.add_string(f"{arch}.model_hint", hint)
    if count is not None:
        getattr(w, f"add_{count_type}")(f"{arch}.layer_count",
                                        len(tensors) if count == -1 else count)
    for name, t in tensors.items():
        if t.dtype == np.float16:
            w.add_tensor(name, t, raw_dtype=gguf.GGMLQuantizationType.F16)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -----------------------------------------------------------------------------------------------
# the mapping and the round trip


def test_mapping_is_the_output_of_block_n():
    assert [from_llama_cpp(n) for n in (1, N - 1)] == [2, N]
    assert all(to_llama_cpp(from_llama_cpp(n)) == n for n in range(1, N))


def test_round_trip(tmp_path):
    cv = ControlVector(directions(), "llama", {"general.name": "happy", "steps": 7,
                                               "lr": 0.1, "pca": True})
    path = tmp_path / "happy.gguf"
    write_control_vector(path, cv, N)
    back = read_control_vector(path, DIM, N)
    assert back.model_hint == "llama" and back.metadata == cv.metadata
    assert list(back.directions) == [2, 3, N]
    for layer, vec in cv.directions.items():
        assert back.directions[layer].dtype == np.float32
        np.testing.assert_array_equal(back.directions[layer], vec)
    assert not (tmp_path / "happy.gguf.tmp").exists()


def test_the_gguf_package_reads_our_file_with_llama_cpp_names(tmp_path):
    cv = ControlVector(directions(), "llama")
    path = tmp_path / "cv.gguf"
    write_control_vector(path, cv, N)
    r = gguf.GGUFReader(path)
    fields = {k: r.get_field(k) for k in r.fields}
    assert fields["general.architecture"].contents() == "controlvector"
    assert fields["controlvector.model_hint"].contents() == "llama"
    count = fields["controlvector.layer_count"]
    assert count.types == [gguf.GGUFValueType.UINT32] and count.contents() == 3
    assert {t.name for t in r.tensors} == {"direction.1", "direction.2", f"direction.{N - 1}"}
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [DIM]
        layer = from_llama_cpp(int(t.name.split(".")[1]))
        np.testing.assert_array_equal(t.data, cv.directions[layer])


def test_a_repeng_style_file_loads_at_the_right_layers(tmp_path):
    # repeng's layer L is block L's output and it exports direction.L: tiller layer L + 1
    vecs = {f"direction.{n}": RNG.standard_normal(DIM).astype(np.float32) for n in (1, 2, 3)}
    path = tmp_path / "repeng.gguf"
    hand_made(path, vecs, hint="mistral")
    cv = read_control_vector(path, DIM, N)
    assert cv.model_hint == "mistral" and sorted(cv.directions) == [2, 3, 4]
    for n in (1, 2, 3):
        np.testing.assert_array_equal(cv.directions[n + 1], vecs[f"direction.{n}"])


def test_a_cvector_generator_style_int32_count_and_2d_row_load(tmp_path):
    # llama.cpp's generator writes layer_count as int32; ggml takes (1, n_embd) as 1-D
    v = RNG.standard_normal((1, DIM)).astype(np.float32)
    path = tmp_path / "gen.gguf"
    hand_made(path, {"direction.1": v}, count_type="int32")
    np.testing.assert_array_equal(read_control_vector(path, DIM, N).directions[2], v[0])


def test_directions_naming_one_layer_are_summed_as_llama_cpp_does(tmp_path):
    a, b = (RNG.standard_normal(DIM).astype(np.float32) for _ in range(2))
    path = tmp_path / "twice.gguf"
    hand_made(path, {"direction.2": a, "direction.02": b})
    np.testing.assert_array_equal(read_control_vector(path, DIM, N).directions[3], a + b)


def test_layer_count_mismatch_is_only_a_warning(tmp_path, caplog):
    path = tmp_path / "count.gguf"
    hand_made(path, {"direction.1": np.ones(DIM, np.float32)}, count=N)
    with caplog.at_level(logging.WARNING, logger="tiller.engine.cvec"):
        assert list(read_control_vector(path, DIM, N).directions) == [2]
    assert "layer_count is 4 but the file has 1" in caplog.text


# -----------------------------------------------------------------------------------------------
# steering


def test_steering_with_a_read_vector_equals_the_original_and_the_reference(tmp_path):
    engine = Engine(CONFIG, build_weights(CONFIG, TENSORS, "f32"), max_tokens=16)
    dirs = directions()
    path = tmp_path / "cv.gguf"
    write_control_vector(path, ControlVector(dirs), N)
    read = read_control_vector(path, DIM, N).directions
    plain = engine.forward_all(TOKENS).logits
    want = engine.forward_all(TOKENS, steering=control_terms(dirs, 2.5)).logits
    got = engine.forward_all(TOKENS, steering=control_terms(read, 2.5)).logits
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - plain).max() > 1e-3
    # a hand-made llama.cpp file: direction.N goes on the output of block N (= tiller N + 1)
    d1 = RNG.standard_normal(DIM).astype(np.float32)
    hand_made(tmp_path / "d1.gguf", {"direction.1": d1})
    cv = read_control_vector(tmp_path / "d1.gguf", DIM, N)
    got = engine.forward_all(TOKENS, steering=control_terms(cv.directions, 3.0)).logits
    ref = reference_forward(TENSORS, CONFIG, TOKENS, steering={2: 3.0 * d1}, capture=False)
    np.testing.assert_allclose(got, ref["logits"], atol=1e-4, rtol=1e-4)


# -----------------------------------------------------------------------------------------------
# broken files and vectors


def one(n=1, dtype=np.float32, width=DIM):
    return {f"direction.{n}": np.ones(width, dtype)}


@pytest.mark.parametrize("kwargs, tensors, message", [
    ({"arch": "llama"}, one(), "architecture 'llama' is not a control vector"),
    ({}, one(width=DIM + 32), f"tensor direction.1: shape ({DIM + 32},), expected ({DIM},)"),
    ({}, one(dtype=np.float16), "tensor direction.1: type F16, expected F32"),
    ({}, one(0), "direction.0 is invalid"),
    ({}, one(N), f"direction.{N} is the output of block {N}, but the model has {N} blocks"),
    ({}, {"steering.1": np.ones(DIM, np.float32)}, "tensor steering.1: not a direction tensor"),
    ({}, {"direction.-1": np.ones(DIM, np.float32)}, "not a direction tensor"),
    ({"count": None}, one(), "metadata key controlvector.layer_count is missing"),
    ({"hint": None}, one(), "metadata key controlvector.model_hint is missing"),
    ({}, {"direction.1": np.full(DIM, np.nan, np.float32)}, "NaN or infinite"),
    ({}, {}, "no direction tensors"),
    # each tensor finite, their sum not: refused naming both tensors and the layer
    ({}, {"direction.2": np.full(DIM, 3e38, np.float32),
          "direction.02": np.full(DIM, 3e38, np.float32)},
     "tensors direction.2, direction.02 (tiller layer 3) sum to NaN or infinite values"),
])
def test_broken_files_give_clear_errors(tmp_path, kwargs, tensors, message):
    path = tmp_path / "bad.gguf"
    hand_made(path, tensors, **kwargs)
    with pytest.raises(ControlVectorError, match="bad.gguf") as e:
        read_control_vector(path, DIM, N)
    assert message in str(e.value)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"junk" * 10)
    with pytest.raises(ControlVectorError, match="not a GGUF file"):
        read_control_vector(path, DIM, N)


@pytest.mark.parametrize("dirs, message", [
    ({0: np.ones(DIM)}, "tiller layer 0 (the stream entering block 0) has no llama.cpp"),
    ({1: np.ones(DIM)}, "would be direction.0, which llama.cpp rejects"),
    ({N + 1: np.ones(DIM)}, f"layer {N + 1} outside 2..{N}"),
    ({2: np.ones(DIM), 3: np.ones(DIM + 1)}, f"layer 3: direction has {DIM + 1} values"),
    ({2: np.ones((1, DIM))}, "non-empty 1-D numeric array"),
    ({2: np.array([1.0, np.inf])}, "NaN or infinite"),
    ({}, "at least one direction"),
])
def test_vectors_llama_cpp_cannot_hold_are_refused(tmp_path, dirs, message):
    path = tmp_path / "out.gguf"
    with pytest.raises(ControlVectorError) as e:
        write_control_vector(path, ControlVector(dirs), N)
    assert message in str(e.value)
    assert not path.exists()


def test_reserved_or_unwritable_metadata_is_refused(tmp_path):
    for meta, message in (({"controlvector.layer_count": 3}, "written by the exporter"),
                          ({"tags": ["a"]}, "only strings, integers")):
        with pytest.raises(ControlVectorError, match=message):
            write_control_vector(tmp_path / "m.gguf", ControlVector(directions(), "llama", meta),
                                 N)
