"""Architecture x quantization: tiller beside llama.cpp on the fixture models, as a markdown table.

    TILLER_PEER_DIR=/work/peer python bench/arch_table.py [--threads 2] [--repetitions 10]

Needs bench/llamacpp_fixtures.py's models ($TILLER_PEER_DIR/llcpp-fixtures, hashes checked
against tests/fixtures/llamacpp), the llama-cpp-python venv (bench/llamacpp_setup.py) and the
pinned llama.cpp build (bench/peer.py; built when missing). For each file:

- loads: whether tiller loads it;
- tokens = llama.cpp: the greedy tokens (tiller's f32 and q8_0 engines) that agree with
  llama.cpp's from the start, out of 64;
- max logit diff: the largest |logit difference| against llama.cpp's recorded top logits (f32
  and q8_0 engines, fed llama.cpp's tokens; llama.cpp quantizes activations for quantized
  weights, as tiller's q8_0 mode does), beside the largest logit for scale;
- load: tiller's read + engine weights in q8_0, the server's dtype (kernels already compiled);
- decode tok/s, batch 1, `--threads` threads, the median of `--repetitions` runs of 64
  single-token steps from an empty context (what llama-bench's `tg 64` does), logits included:
  tiller's q8_0 engine (Engine.step); llama.cpp's `llama-bench -p 0 -n 64 -t T -r R -o json`
  of the pinned build (the median of its samples_ts; that build predates qwen3, so none for
  qwen3); and llama.cpp 0.3.36 through llama-cpp-python timing llama_decode alone
  (bench/llamacpp_run.py bench: llama-bench's tg loop, a warm-up run first).

The medians matter on a shared machine: a run whose threads are descheduled mid-step is 10-100x
slower (spinning thread pools), and the script prints the load average it ran under.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
import numpy as np  # noqa: E402
from llamacpp_fixtures import QUANTS, RUNNER, fixture, model_path  # noqa: E402
from llamacpp_setup import build  # noqa: E402
from peer import COMMIT, llama_cpp  # noqa: E402
from tiller.engine.engine import Engine, SeqRequest  # noqa: E402
from tiller.engine.gguf import load_gguf  # noqa: E402
from tiller.engine.llama2c import CheckpointError  # noqa: E402
from tiller.engine.weights import build_weights  # noqa: E402

N_GEN = 64


def tiller_tok_s(engine: Engine, repetitions: int) -> float:
    """Median tok/s of `repetitions` runs of N_GEN single-token steps from an empty sequence."""
    def run() -> float:
        seq = engine.new_sequence()
        token, seconds = 1, 0.0
        for _ in range(N_GEN):
            t0 = time.perf_counter()
            logits = engine.step([SeqRequest(seq, [token])])[0].logits
            seconds += time.perf_counter() - t0
            token = int(np.argmax(logits))
        engine.release(seq)
        return N_GEN / seconds

    run()  # warm-up, as llama-bench's
    return statistics.median(run() for _ in range(repetitions))


def llama_bench_tok_s(path: Path, threads: int, repetitions: int) -> float | None:
    """The pinned llama-bench's tg N_GEN: the median of its samples; None if it cannot load the
    file (an architecture newer than the build)."""
    bench = llama_cpp()["llama-bench"]
    run = subprocess.run([str(bench), "-m", str(path), "-p", "0", "-n", str(N_GEN), "-t",
                          str(threads), "-r", str(repetitions), "-o", "json"],
                         capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        return None
    return statistics.median(json.loads(run.stdout)[0]["samples_ts"])


def llama_decode_tok_s(python: Path, path: Path, threads: int, repetitions: int) -> float:
    request = {"n_gen": N_GEN, "repetitions": repetitions, "threads": threads}
    out = subprocess.run([str(python), str(RUNNER), "bench", str(path), json.dumps(request)],
                         check=True, capture_output=True, text=True, timeout=600)
    return statistics.median(json.loads(out.stdout)["samples_ts"])


def row(arch: str, quant: str, args: argparse.Namespace, python: Path) -> str:
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
    ours = tiller_tok_s(q8, args.repetitions)
    bench = llama_bench_tok_s(path, args.threads, args.repetitions)
    decode = llama_decode_tok_s(python, path, args.threads, args.repetitions)
    types = sorted({t for t, _ in run["tensors"].values()} - {"F32"}) or ["F32"]
    return (f"| {arch} | {quant} ({'/'.join(types)}) | yes | {same_f32}/{n} | {same_q8}/{n} | "
            f"{diff:.1e} | {diff_q8:.1e} | {scale:.1f} | {load:.2f} s | {ours:,.0f} | "
            f"{'-' if bench is None else f'{bench:,.0f}'} | {decode:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=10)
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    python = build()
    llama_cpp()
    # compile (or load from numba's cache) the decoders and the step before anything is timed
    for arch in am.SPECS:
        ckpt = load_gguf(model_path(arch, "F32"))
        Engine(ckpt.config, build_weights(ckpt.config, ckpt.tensors, "q8_0")).forward_all([1, 2])
    t = args.threads
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{t} threads; decode = median of {args.repetitions} runs of {N_GEN} tokens\n")
    print("| arch | quant (tensor types) | loads | tokens = llama.cpp (f32) | (q8_0) | "
          "max logit diff (f32) | (q8_0) | largest logit | tiller load | tiller tok/s (q8_0) | "
          f"llama.cpp tok/s (llama-bench {COMMIT}, tg {N_GEN}, -t {t}) | "
          "llama.cpp tok/s (0.3.36, llama_decode alone) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch in am.SPECS:
        for quant in QUANTS:
            print(row(arch, quant, args, python), flush=True)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
