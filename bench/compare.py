"""tiller against llama.cpp, side by side: the same Q8_0 GGUF files, the same thread count.

For each shape (random weights, public shapes: stories15M, stories110M, TinyLlama-1.1B) a Q8_0
GGUF is written once (with the Llama 2 vocabulary of ../shared/models, which llama.cpp needs to
load it) under --cache-dir. Then, alternating tiller and llama.cpp --reps times:
- prefill 128 and 512: one sequence's prompt in one step (tiller's Engine.step; llama.cpp's
  llama-bench -p N -n 0, one llama_decode of N tokens);
- decode B = 1, 4, 16: B sequences, each after a 64-token prompt, decode 16 tokens, one token
  per sequence per step (tiller's Engine.step with B sequences; llama-batched-bench -npp 64
  -ntg 16 -npl B: one llama_decode over B sequence ids per step); aggregate tok/s.
Printed: medians of each side, the ratio tiller / llama.cpp, the memory read bandwidth measured
in the same run and the weight bytes streamed per second at B=1, the load average, and the
issue's targets. The peer is llama.cpp at bench/peer.py's commit in $TILLER_PEER_DIR (default
bench/.peer); llama-batched-bench is built there when missing (under the builder's lock).

    python bench/compare.py [--models stories15M,stories110M,tinyllama] [--threads 2]
                            [--reps 3] [--cache-dir /tmp/tiller-bench]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import gguf
import numba
import numpy as np
from bench_engine import SHAPES, cpu_model, memory_bandwidth
from gguf import GGMLQuantizationType as T
from tiller.engine import simd
from tiller.engine.config import ModelConfig
from tiller.engine.dequant import random_blocks, row_bytes
from tiller.engine.engine import Engine, SeqRequest
from tiller.engine.weights import matrix_bytes

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT.parent / "shared/models/vocab/ggml-vocab-llama-spm.gguf"
PREFILLS = (128, 512)
BATCHES = (1, 4, 16)
PROMPT = 64  # tokens of each decoding sequence's prompt
DECODE = 16  # decode steps timed
BANDWIDTH_BYTES = 1 << 30
# the targets (tiller / llama.cpp)
TARGETS = {("prefill 512", "stories110M"): 2.0, ("prefill 512", "tinyllama"): 2.0,
           ("decode B=1", "stories15M"): 1.0, ("decode B=1", "stories110M"): 1.0,
           ("decode B=1", "tinyllama"): 1.0,
           ("decode B=16", "stories110M"): 1.5, ("decode B=16", "tinyllama"): 1.5}
TARGET_STREAM = 0.90  # TinyLlama B=1: weight bytes/s over the measured bandwidth


# -----------------------------------------------------------------------------------------------
# the peer


def peer_bin() -> Path:
    """llama.cpp's build/bin, with llama-bench (built by bench/peer.py) and llama-batched-bench
    (built here, under the same lock, when missing)."""
    home = Path(os.environ.get("TILLER_PEER_DIR") or ROOT / "bench" / ".peer") / "llama.cpp"
    bin_dir = home / "build" / "bin"
    if not (bin_dir / "llama-bench").is_file():
        try:
            from peer import llama_cpp  # bench/peer.py: builds llama.cpp at its pinned commit
        except ImportError:
            sys.exit(f"no llama.cpp in {home}: build it with bench/peer.py (TILLER_PEER_DIR)")
        llama_cpp()
    if not (bin_dir / "llama-batched-bench").is_file():
        with open(home.parent / "llama.cpp.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            subprocess.run(["cmake", "--build", "build", "-j2", "--target",
                            "llama-batched-bench"], cwd=home, check=True)
    return bin_dir


def peer_prefill(bin_dir: Path, model: Path, n: int, threads: int) -> float:
    """tok/s of one n-token llama_decode (llama-bench, one repetition after its warm-up)."""
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(n), "-n", "0",
                          "-r", "1", "-t", str(threads), "-b", "512", "-ub", "512", "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def peer_decode(bin_dir: Path, model: Path, batch: int, threads: int) -> float:
    """Aggregate tok/s of `batch` sequences decoding together (llama-batched-bench S_TG)."""
    ctx = batch * (PROMPT + DECODE) + 16
    out = subprocess.run([str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c", str(ctx),
                          "-b", "2048", "-ub", "512", "-npp", str(PROMPT), "-ntg", str(DECODE),
                          "-npl", str(batch), "-t", str(threads), "-tb", str(threads),
                          "--output-format", "jsonl"],
                         check=True, capture_output=True, text=True)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("{")]
    return float(json.loads(lines[-1])["speed_tg"])


def peer_buffers(bin_dir: Path, model: Path, threads: int) -> list[str]:
    """llama.cpp's model buffer lines (which say whether it uses AMX buffers)."""
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", "8", "-n", "0",
                          "-r", "1", "-t", str(threads), "-v"], capture_output=True, text=True)
    return sorted({line.split(":", 1)[-1].strip() for line in out.stderr.splitlines()
                   if "model buffer size" in line})


# -----------------------------------------------------------------------------------------------
# the shared files


def write_gguf(path: Path, c: ModelConfig, chat_template: str | None = None,
               added_tokens: tuple[str, ...] = ()) -> None:
    """A Q8_0 GGUF of random weights in shape c, with the Llama 2 vocabulary (32000 pieces) and
    `added_tokens` after it as CONTROL tokens (a chat fine-tune's markers, as Llama 2 ChatML
    models such as OpenHermes add them: one token each), and, if given, a
    `tokenizer.chat_template`."""
    vocab = gguf.GGUFReader(VOCAB)
    c = replace(c, vocab_size=32000 + len(added_tokens))

    def strings(name: str) -> list[str]:
        f = vocab.fields[name]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def values(name: str) -> list:
        f = vocab.fields[name]
        return [f.parts[i][0].item() for i in f.data]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"random {path.stem}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_block_count(c.n_layers)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_tokenizer_model("llama")
    w.add_token_list(strings("tokenizer.ggml.tokens") + list(added_tokens))
    w.add_token_scores(values("tokenizer.ggml.scores") + [0.0] * len(added_tokens))
    w.add_token_types(values("tokenizer.ggml.token_type")
                      + [gguf.TokenType.CONTROL] * len(added_tokens))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    plan = [("token_embd.weight", (c.vocab_size, c.dim), T.Q8_0),
            ("output_norm.weight", (c.dim,), T.F32)]
    if not c.shared_classifier:
        plan.append(("output.weight", (c.vocab_size, c.dim), T.Q8_0))
    for i in range(c.n_layers):
        plan += [(f"blk.{i}.attn_norm.weight", (c.dim,), T.F32),
                 (f"blk.{i}.attn_q.weight", (c.dim, c.dim), T.Q8_0),
                 (f"blk.{i}.attn_k.weight", (c.kv_dim, c.dim), T.Q8_0),
                 (f"blk.{i}.attn_v.weight", (c.kv_dim, c.dim), T.Q8_0),
                 (f"blk.{i}.attn_output.weight", (c.dim, c.dim), T.Q8_0),
                 (f"blk.{i}.ffn_norm.weight", (c.dim,), T.F32),
                 (f"blk.{i}.ffn_gate.weight", (c.hidden_dim, c.dim), T.Q8_0),
                 (f"blk.{i}.ffn_up.weight", (c.hidden_dim, c.dim), T.Q8_0),
                 (f"blk.{i}.ffn_down.weight", (c.dim, c.hidden_dim), T.Q8_0)]
    for name, shape, ttype in plan:
        if ttype == T.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            rb = row_bytes(ttype, shape[-1])
            w.add_tensor_info(name, (shape[0], rb), np.dtype(np.uint8), shape[0] * rb,
                              raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, shape, ttype in plan:
        if ttype == T.F32:
            w.write_tensor_data(np.ones(shape, np.float32))
        else:
            w.write_tensor_data(random_blocks(ttype, shape[0], shape[1], rng))
    w.close()
    os.replace(tmp, path)


# -----------------------------------------------------------------------------------------------
# tiller


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(3, 32000, size=n).tolist()


def tiller_prefill(engine: Engine, n: int, rng: np.random.Generator) -> float:
    seq = engine.new_sequence()
    t0 = time.perf_counter()
    engine.step([SeqRequest(seq, _tokens(rng, n))])
    dt = time.perf_counter() - t0
    engine.release(seq)
    return n / dt


def tiller_decode(engine: Engine, batch: int, rng: np.random.Generator) -> float:
    """As llama-batched-bench: prompts first (untimed), then DECODE steps of B tokens."""
    seqs = [engine.new_sequence() for _ in range(batch)]
    engine.step([SeqRequest(s, _tokens(rng, PROMPT)) for s in seqs])
    t0 = time.perf_counter()
    for _ in range(DECODE):
        engine.step([SeqRequest(s, _tokens(rng, 1)) for s in seqs])
    dt = time.perf_counter() - t0
    for s in seqs:
        engine.release(s)
    return batch * DECODE / dt


# -----------------------------------------------------------------------------------------------


CASES = [f"prefill {n}" for n in PREFILLS] + [f"decode B={b}" for b in BATCHES]


def compare_model(name: str, path: Path, bin_dir: Path, threads: int, reps: int,
                  buf: np.ndarray) -> dict:
    c = SHAPES[name]
    kv_tokens = max(max(PREFILLS), max(BATCHES) * (PROMPT + DECODE)) + 16 * max(BATCHES)
    engine = Engine.load(path, max_tokens=max(*PREFILLS, max(BATCHES) * PROMPT),
                         kv_tokens=kv_tokens, threads=threads)
    rng = np.random.default_rng(0)
    numba.set_num_threads(threads)
    tiller_prefill(engine, 16, rng)  # compile or load the step, then warm up each shape
    tiller_decode(engine, 1, rng)
    ours: dict[str, list[float]] = {k: [] for k in CASES}
    peer: dict[str, list[float]] = {k: [] for k in CASES}
    bandwidth = []
    prefills = [n for n in PREFILLS if n <= c.max_seq_len]  # stories15M: context 256
    for _ in range(reps):
        bandwidth.append(memory_bandwidth(buf, threads, repeats=2))
        numba.set_num_threads(threads)
        for n in prefills:
            peer[f"prefill {n}"].append(peer_prefill(bin_dir, path, n, threads))
            ours[f"prefill {n}"].append(tiller_prefill(engine, n, rng))
        for b in BATCHES:
            peer[f"decode B={b}"].append(peer_decode(bin_dir, path, b, threads))
            ours[f"decode B={b}"].append(tiller_decode(engine, b, rng))
    return {"tiller": {k: statistics.median(v) for k, v in ours.items() if v},
            "llama.cpp": {k: statistics.median(v) for k, v in peer.items() if v},
            "bandwidth": max(bandwidth), "weight_bytes": matrix_bytes(engine.weights),
            "buffers": peer_buffers(bin_dir, path, threads)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="stories15M,stories110M,tinyllama")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="alternating runs per case (median)")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/tiller-bench"))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(SHAPES)}")
    if not VOCAB.is_file():
        p.error(f"{VOCAB} is missing (the shared test files): llama.cpp needs a vocabulary")
    bin_dir = peer_bin()
    print(f"CPU {cpu_model()}, {args.threads} threads, tiller matmul path: "
          f"{'VNNI' if simd.HAS_VNNI else 'portable IR'}; peer {bin_dir.parent.parent}")
    buf = np.ones(BANDWIDTH_BYTES // 8, np.int64)
    header = (f"| {'shape':12s} | {'case':12s} | {'tiller tok/s':>12s} | "
              f"{'llama.cpp tok/s':>15s} | {'ratio':>6s} | {'target':>7s} |")
    results = {}
    failed = 0
    for name in names:  # each shape's rows as soon as they are measured
        path = args.cache_dir / f"{name}-random-q8_0.gguf"
        if not path.is_file():
            write_gguf(path, SHAPES[name])
        load = os.getloadavg()[0]
        r = results[name] = compare_model(name, path, bin_dir, args.threads, args.reps, buf)
        r["load"] = (load, os.getloadavg()[0])
        print(f"\n{header}\n|{'-' * 14}|{'-' * 14}|{'-' * 14}|{'-' * 17}|{'-' * 8}|{'-' * 9}|")
        for case in r["tiller"]:
            ours, peer = r["tiller"][case], r["llama.cpp"][case]
            target = TARGETS.get((case, name))
            mark = ""
            if target is not None:
                ok = ours / peer >= target
                failed += not ok
                mark = f"{target:.1f} {'ok' if ok else 'MISS'}"
            print(f"| {name:12s} | {case:12s} | {ours:12.1f} | {peer:15.1f} | "
                  f"{ours / peer:6.2f} | {mark:>7s} |")
        stream = r["weight_bytes"] * r["tiller"]["decode B=1"] / r["bandwidth"]
        print(f"{name}: memory read bandwidth {r['bandwidth'] / 1e9:.1f} GB/s; tiller B=1 streams "
              f"{stream * 100:.0f}% of it; load average {r['load'][0]:.1f} -> {r['load'][1]:.1f}; "
              f"llama.cpp buffers: {'; '.join(r['buffers'])}", flush=True)
        if name == "tinyllama":
            failed += stream < TARGET_STREAM
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
