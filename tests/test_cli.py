"""`tiller generate` and `tiller serve` as a user runs them: a real process, real files, exit
codes and messages."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.live_server import free_port
from tests.test_real_model import GOLDEN


def tiller(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tiller", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd or Path(__file__).resolve().parents[1])


def test_generate_streams_prompt_then_completion(shared_models):
    from tiller.engine.tokenizer import SpmTokenizer

    tok = SpmTokenizer.from_llama2c(shared_models / "tok512.bin", vocab_size=512)
    result = tiller("generate", "--model", str(shared_models / "stories260K.bin"),
                    "--tokenizer", str(shared_models / "tok512.bin"), "--prompt",
                    "Once upon a time", "--temperature", "0", "--max-tokens", "40",
                    "--dtype", "f32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == tok.decode([1, 403, 407, 261, 378, *GOLDEN[:40]])
    assert "prompt 5 tokens" in result.stderr and "generated 40 tokens" in result.stderr
    assert "tok/s" in result.stderr


def test_tokenizer_defaults_to_tokenizer_bin_beside_the_model(tmp_path, shared_models):
    model = tmp_path / "model.bin"
    model.symlink_to(shared_models / "stories260K.bin")
    result = tiller("generate", "--model", str(model), "--max-tokens", "3")
    assert result.returncode == 2
    assert f"{tmp_path / 'tokenizer.bin'}" in result.stderr
    (tmp_path / "tokenizer.bin").symlink_to(shared_models / "tok512.bin")
    result = tiller("generate", "--model", str(model), "--max-tokens", "3", "--seed", "1")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("content,message", [
    (b"", "file"),
    (b"ak42" + b"\x00" * 20, "ak42"),
    (b"\x10\x00\x00\x00" * 7, "bytes"),
])
def test_bad_model_file_is_a_clear_error(tmp_path, content, message):
    bad = tmp_path / "broken.bin"
    bad.write_bytes(content)
    result = tiller("generate", "--model", str(bad), "--prompt", "hi")
    assert result.returncode == 2
    assert str(bad) in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("tiller: error:")


def test_missing_model_file(tmp_path):
    result = tiller("generate", "--model", str(tmp_path / "nope.bin"))
    assert result.returncode == 2 and "nope.bin" in result.stderr
    assert "Traceback" not in result.stderr


def test_steer_and_features(tmp_path, shared_models):
    import numpy as np
    from tiller.engine.engine import Engine
    from tiller.engine.steering import build_actadd
    from tiller.engine.tokenizer import SpmTokenizer

    from tests.reference import load_v0_legacy, reference_forward

    model, tok_path = shared_models / "stories260K.bin", shared_models / "tok512.bin"
    common = ["--model", str(model), "--tokenizer", str(tok_path), "--dtype", "f32"]
    result = tiller("steer", *common, "--add", "dog", "--sub", "cat", "--layer", "2",
                    "--out", str(tmp_path / "v.npy"))
    assert result.returncode == 0, result.stderr
    tok = SpmTokenizer.from_llama2c(tok_path, vocab_size=512)
    want = build_actadd(Engine.load(model, dtype="f32"), tok, "dog", "cat", 2)
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), want, atol=1e-6)
    (tmp_path / "pos.txt").write_text("a happy dog\nthe dog ran\n")
    (tmp_path / "neg.txt").write_text("a sad cat\nthe cat sat\n")
    result = tiller("steer", *common, "--method", "pca", "--positive", str(tmp_path / "pos.txt"),
                    "--negative", str(tmp_path / "neg.txt"), "--out", str(tmp_path / "c.gguf"))
    assert result.returncode == 0, result.stderr
    from tiller.engine.cvec import read_control_vector

    cv = read_control_vector(tmp_path / "c.gguf", 64, 5)
    assert sorted(cv.directions) == [2, 3, 4, 5]
    result = tiller("features", *common, "--input", "Once upon a time", "--layers", "0,-1",
                    "--out", str(tmp_path / "f.npz"))
    assert result.returncode == 0, result.stderr
    data = np.load(tmp_path / "f.npz")
    config, weights = load_v0_legacy(model)
    ref = reference_forward(weights, config, tok.encode("Once upon a time"))
    np.testing.assert_allclose(data["resid_post"], ref["resid_post"][[0, 4]], atol=2e-5)
    np.testing.assert_allclose(data["attn_out"], ref["attn_out"][[0, 4]], atol=2e-5)
    assert list(data["layers"]) == [0, 4]
    result = tiller("steer", *common, "--method", "mean", "--out", str(tmp_path / "x.gguf"))
    assert result.returncode == 2 and "--positive" in result.stderr


@pytest.mark.parametrize("content", [b"ak42" + b"\x00" * 20, b"\x10\x00\x00\x00" * 7])
def test_serve_exits_when_the_model_cannot_be_loaded(tmp_path, shared_models, content):
    bad = tmp_path / "broken.bin"
    bad.write_bytes(content)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tiller", "serve", "--model", str(bad), "--tokenizer",
         str(shared_models / "tok512.bin"), "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 120
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tiller: error: model failed to load:") and str(bad) in last
    assert "Traceback" not in result.stderr
