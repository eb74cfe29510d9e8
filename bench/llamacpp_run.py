"""llama.cpp's half of bench/llamacpp_fixtures.py: runs in the llama-cpp-python venv
(bench/llamacpp_setup.py), never in tiller's, and imports nothing of tiller.

    python llamacpp_run.py quantize SRC DST FTYPE      # llama.cpp's own quantizer
    python llamacpp_run.py run MODEL REQUEST_JSON      # greedy tokens and logits, JSON on stdout
    python llamacpp_run.py bench MODEL BENCH_JSON      # decode tok/s as llama-bench's tg test

REQUEST_JSON: {"prompt": [ids], "steps": 64, "record": [decode steps whose logits to keep],
"top": 32, "threads": 2}. The prompt goes in as one batch, then one token per decode, each the
argmax of the last logits (ties: lowest id, as numpy's argmax) -- no sampler involved. The KV
cache is F32 and flash attention off, so the only rounding besides the weights' is llama.cpp's
own (its quantized matmuls quantize activations to Q8_0/Q8_K, as it always does).

BENCH_JSON: {"n_gen": 64, "repetitions": 10, "threads": 2}. What llama-bench's `tg` test does
(tools/llama-bench: test_gen), for the architectures the pinned llama-bench build does not know
(qwen3): one warm-up run, then per repetition an empty KV cache and n_gen single-token
llama_decode calls, each followed by llama_synchronize; only those calls are timed. Prints the
tok/s of every repetition.

NOTE: llama.cpp 0.3.36 crashes in its AMX matmul when weights are repacked into extra buffer
types, so the model is loaded with use_extra_bufts = false (llama-cli's --repack 0).
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import llama_cpp as L
import numpy as np


def quantize(src: str, dst: str, ftype: int) -> None:
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    if L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {src} -> {dst}")


def run(model_path: str, request: dict) -> dict:
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.use_extra_bufts = False  # see the module docstring
    start = time.perf_counter()
    model = L.llama_model_load_from_file(model_path.encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {model_path}")
    cparams = L.llama_context_default_params()
    prompt, steps = request["prompt"], request["steps"]
    cparams.n_ctx = len(prompt) + steps + 8
    cparams.n_batch = cparams.n_ubatch = max(len(prompt), 1)
    cparams.n_threads = cparams.n_threads_batch = request.get("threads", 2)
    cparams.type_k = cparams.type_v = L.GGML_TYPE_F32
    cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cparams)
    load_seconds = time.perf_counter() - start
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(max(len(prompt), 1), 0, 1)

    def decode(tokens: list[int], pos0: int) -> np.ndarray:
        batch.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        ptr = L.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

    logits = decode(prompt, 0)
    record, top = set(request.get("record", [])), request.get("top", 32)
    tokens: list[int] = []
    kept = {}
    decode_seconds = 0.0
    for step in range(steps):
        if step in record:
            ids = np.argsort(-logits, kind="stable")[:top]
            kept[str(step)] = {"ids": ids.tolist(), "logits": logits[ids].tolist()}
        tokens.append(int(np.argmax(logits)))
        if step + 1 < steps or step + 1 in record:
            t0 = time.perf_counter()
            logits = decode([tokens[-1]], len(prompt) + step)
            decode_seconds += time.perf_counter() - t0
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return {"tokens": tokens, "logits": kept, "load_seconds": load_seconds,
            "decode_tok_s": (steps - 1) / decode_seconds if decode_seconds else None,
            "llama_cpp_python": L.__version__}


def bench(model_path: str, request: dict) -> dict:
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.use_extra_bufts = False  # see the module docstring
    model = L.llama_model_load_from_file(model_path.encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {model_path}")
    n_gen, threads = request.get("n_gen", 64), request.get("threads", 2)
    cparams = L.llama_context_default_params()
    cparams.n_ctx = n_gen + 8
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cparams)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    token = ctypes.c_int32(L.llama_vocab_bos(vocab) % n_vocab)  # llama-bench's first token

    def run() -> float:
        L.llama_memory_clear(L.llama_get_memory(ctx), False)
        seconds = 0.0
        rng = np.random.default_rng(0)
        for _ in range(n_gen):
            batch = L.llama_batch_get_one(ctypes.pointer(token), 1)
            t0 = time.perf_counter()
            if L.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed")
            L.llama_synchronize(ctx)
            seconds += time.perf_counter() - t0
            token.value = int(rng.integers(n_vocab))  # llama-bench feeds random tokens
        return n_gen / seconds

    run()  # warm-up, as llama-bench's
    samples = [run() for _ in range(request.get("repetitions", 10))]
    L.llama_free(ctx)
    L.llama_model_free(model)
    return {"samples_ts": samples, "llama_cpp_python": L.__version__}


if __name__ == "__main__":
    if sys.argv[1] == "quantize":
        quantize(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "run":
        print(json.dumps(run(sys.argv[2], json.loads(sys.argv[3]))))
    elif sys.argv[1] == "bench":
        print(json.dumps(bench(sys.argv[2], json.loads(sys.argv[3]))))
    else:
        raise SystemExit(__doc__)
