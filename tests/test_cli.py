"""`tiller generate` as a user runs it: a real process, real files, exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_real_model import GOLDEN


def tiller(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd or Path(__file__).resolve().parents[1])


def test_generate_streams_prompt_then_completion(shared_models):
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_llama2c(shared_models / "tok512.bin", vocab_size=512)
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
