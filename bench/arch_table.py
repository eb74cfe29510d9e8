"""Architecture x quantization: tiller on the llama.cpp fixture models, as a markdown table.

    python bench/llamacpp_fixtures.py   # first (makes the models and llama.cpp's results)
    python bench/arch_table.py [--threads N] [--steps 64]

For each model file of bench/llamacpp_fixtures.py ($TILLER_PEER_DIR/llcpp-fixtures, hashes
checked against tests/fixtures/llamacpp): whether tiller loads it; the greedy tokens (f32 and
q8_0 engines) that agree with llama.cpp's from the start, out of 64; the largest |logit
difference| against llama.cpp's recorded top logits (f32 and q8_0 engines, fed llama.cpp's
tokens; llama.cpp quantizes activations for quantized weights, as tiller's q8_0 mode does); the
load time (read + engine weights in q8_0, the server's dtype; kernels already compiled); and
decode tok/s at batch 1 (q8_0 engine, mean over the 64 steps after the prompt) beside
llama.cpp's from the fixture run (2 threads, same machine, not the same moment).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import tests.arch_models as am
except ModuleNotFoundError:  # run as a script: bench/ is on sys.path, the checkout's root is not
    sys.path.insert(0, str(ROOT))
    import tests.arch_models as am
import numba  # noqa: E402
from llamacpp_fixtures import QUANTS, fixture, model_path  # noqa: E402
from tiller.engine.engine import Engine, SeqRequest  # noqa: E402
from tiller.engine.gguf import load_gguf  # noqa: E402
from tiller.engine.llama2c import CheckpointError  # noqa: E402
from tiller.engine.weights import build_weights  # noqa: E402


def decode_tok_s(engine: Engine, prompt: list[int], steps: int) -> float:
    seq = engine.new_sequence()
    logits = engine.step([SeqRequest(seq, prompt)])[0].logits
    start = time.perf_counter()
    for _ in range(steps):
        logits = engine.step([SeqRequest(seq, [int(logits.argmax())])])[0].logits
    seconds = time.perf_counter() - start
    engine.release(seq)
    return steps / seconds


def row(arch: str, quant: str, steps: int) -> str:
    fx = fixture(arch)
    run, request = fx["files"][quant], fx["request"]
    path = model_path(arch, quant)
    if not path.exists() or am.sha256(path) != run["sha256"]:
        return f"| {arch} | {quant} | missing or changed: rerun bench/llamacpp_fixtures.py |"
    try:
        start = time.perf_counter()
        ckpt = load_gguf(path)
        q8 = Engine(ckpt.config, build_weights(ckpt.config, ckpt.tensors, "q8_0"),
                    max_tokens=128)
        load = time.perf_counter() - start
    except CheckpointError as e:
        return f"| {arch} | {quant} | no: {e} |"
    f32 = Engine(ckpt.config, build_weights(ckpt.config, ckpt.tensors, "f32"), max_tokens=128)
    n = len(run["tokens"])
    same_f32 = am.agreeing(am.greedy(f32, request["prompt"], n), run["tokens"])
    same_q8 = am.agreeing(am.greedy(q8, request["prompt"], n), run["tokens"])
    diff, scale = am.logit_difference(f32, request, run)
    diff_q8, _ = am.logit_difference(q8, request, run)
    tok_s = decode_tok_s(q8, request["prompt"], steps)
    types = sorted({t for t, _ in run["tensors"].values()} - {"F32"}) or ["F32"]
    return (f"| {arch} | {quant} ({'/'.join(types)}) | yes | {same_f32}/{n} | {same_q8}/{n} | "
            f"{diff:.1e} | {diff_q8:.1e} | {scale:.1f} | {load:.2f} s | {tok_s:.0f} | "
            f"{run['decode_tok_s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
    # compile (or load from numba's cache) the decoders and the step before anything is timed
    for arch in am.SPECS:
        ckpt = load_gguf(model_path(arch, "F32"))
        Engine(ckpt.config, build_weights(ckpt.config, ckpt.tensors, "q8_0")).forward_all([1, 2])
    print("| arch | quant (tensor types) | loads | tokens = llama.cpp (f32) | (q8_0) | "
          "max logit diff (f32) | (q8_0) | largest logit | load | tiller tok/s (q8_0) | "
          "llama.cpp tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch in am.SPECS:
        for quant in QUANTS:
            print(row(arch, quant, args.steps), flush=True)


if __name__ == "__main__":
    main()
