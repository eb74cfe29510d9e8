"""llama.cpp reference fixtures for each architecture: tests/fixtures/llamacpp/<arch>.json.

    python bench/llamacpp_setup.py        # once: llama-cpp-python 0.3.36 into $TILLER_PEER_DIR
    python bench/llamacpp_fixtures.py     # then: the fixtures (a few minutes)

For each model of tests/arch_models.py (llama with Llama 3.1 rope_freqs, qwen2, qwen3: small,
random weights, deterministic seeds, SPM or byte-level BPE vocabularies) this writes the F32
GGUF, quantizes it with llama.cpp's own quantizer (llama_model_quantize) to each of QUANTS,
and runs llama.cpp on every file (bench/llamacpp_run.py, in the llama-cpp-python venv): greedy
tokens for STEPS steps from a fixed prompt, and the top logits at the RECORD steps. A fixture
keeps, per file: its sha256, every tensor's type and data sha256, llama.cpp's tokens and
logits, and its load time and decode speed. The GGUF files themselves stay out of git, in
$TILLER_PEER_DIR/llcpp-fixtures (default bench/.peer): tests regenerate the F32, Q8_0 and Q5_0
files from the spec (gguf's quantizers are llama.cpp's reference ones) and check the hashes;
the K-quant files are compared when that folder has them (bench/arch_table.py uses them all).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
try:
    import tests.arch_models as am
except ModuleNotFoundError:  # run as a script: bench/ is on sys.path, the checkout's root is not
    sys.path.insert(0, str(ROOT))
    import tests.arch_models as am
from llamacpp_setup import build, peer_dir  # noqa: E402  (bench/ is on sys.path)

FIXTURES = ROOT / "tests" / "fixtures" / "llamacpp"
RUNNER = Path(__file__).resolve().parent / "llamacpp_run.py"
# llama.cpp's LLAMA_FTYPE_* of each file (None: the F32 original)
QUANTS: dict[str, int | None] = {"F32": None, "Q8_0": 7, "Q5_0": 8, "Q4_K_M": 15, "Q6_K": 18}
STEPS = 64
RECORD = [0, 1, 16, 32, 63]  # decode steps whose logits are kept
TOP = 32  # logits kept per recorded step: the largest


def model_dir() -> Path:
    return peer_dir() / "llcpp-fixtures"


def model_path(arch: str, quant: str) -> Path:
    return model_dir() / f"{arch}-{quant}.gguf"


def fixture(arch: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{arch}.json").read_text())


def make(python: Path, name: str) -> dict[str, Any]:
    spec = am.SPECS[name]
    model_dir().mkdir(parents=True, exist_ok=True)
    f32 = am.write(model_path(name, "F32"), spec)
    request = {"prompt": am.prompt(spec), "steps": STEPS, "record": RECORD, "top": TOP,
               "threads": 2}
    files = {}
    for quant, ftype in QUANTS.items():
        path = model_path(name, quant)
        if ftype is not None:
            subprocess.run([str(python), str(RUNNER), "quantize", str(f32), str(path),
                            str(ftype)], check=True, capture_output=True)
        out = subprocess.run([str(python), str(RUNNER), "run", str(path), json.dumps(request)],
                             check=True, capture_output=True, text=True)
        result = json.loads(out.stdout)
        files[quant] = {"sha256": am.sha256(path), "tensors": am.tensor_hashes(path), **result}
        print(f"{name} {quant}: {result['tokens'][:8]}... "
              f"{result['decode_tok_s']:.0f} tok/s", flush=True)
    return {"spec": spec.to_json(), "request": request, "files": files}


def main() -> None:
    python = build()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name in am.SPECS:
        data = make(python, name)
        (FIXTURES / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
