"""Load time and peak memory of a 1.1B-parameter Q4_K_M GGUF (TinyLlama's shape, random weights).

The file is written once (random valid blocks: engine/dequant.py's random_blocks; the types of
llama.cpp's Q4_K_M recipe: Q6_K for output.weight and for attn_v / ffn_down of the layers
`use_more_bits` picks, Q4_K elsewhere, norms F32), then each load is measured in a fresh
process: after imports and compiling (or loading from cache) the decoding kernels on a tiny
tensor, the kernel's peak-RSS mark is reset (/proc/self/clear_refs), then the checkpoint is
opened and the engine's weights built. Printed: the engine's steady-state weight bytes, the
peak RSS during the load above the resident set before it, their ratio (the target is
<= 1.3), and the load's wall time. The page cache is warm (the file was just written or read).

`--cache` measures the load as `tiller generate` does it (engine/weight_cache.py's
load_or_build, with a fresh cache root in a temporary folder): "cold" hashes the file (BLAKE3),
builds the weights and writes the cache file; "warm", in the next process, maps that file. The
warm row also reads every page of the weights after the load (as the first steps do) and
reports the RSS then, the steady state: mapped weights count in RSS once their pages are read.

    python bench/bench_load.py [--dtype q8_0|f32|both] [--file PATH] [--threads N] [--cache]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import gguf
import numba
import numpy as np
from gguf import GGMLQuantizationType as T
from tiller.engine.config import ModelConfig
from tiller.engine.dequant import Packed, random_blocks, row_bytes
from tiller.engine.gguf import read_gguf
from tiller.engine.llama2c import CheckpointError
from tiller.engine.loader import load_checkpoint
from tiller.engine.weight_cache import load_or_build
from tiller.engine.weights import build_weights

TINYLLAMA = ModelConfig(2048, 5632, 22, 32, 4, 32000, 2048, shared_classifier=False)
DEFAULT_FILE = Path("/tmp/tiller-bench/tinyllama-random-q4_k_m.gguf")
TARGET = 1.3  # peak load memory over steady-state weight memory


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits (src/llama-quant.cpp): layers whose attn_v / ffn_down get Q6_K."""
    return (layer < n_layers // 8 or layer >= 7 * n_layers // 8
            or (layer - n_layers // 8) % 3 == 2)


def q4_k_m_plan(c: ModelConfig) -> list[tuple[str, tuple[int, ...], T]]:
    """(GGUF name, numpy shape, type) of every tensor, in llama.cpp's order."""
    plan = [("token_embd.weight", (c.vocab_size, c.dim), T.Q4_K),
            ("output_norm.weight", (c.dim,), T.F32),
            ("output.weight", (c.vocab_size, c.dim), T.Q6_K)]
    for i in range(c.n_layers):
        more = T.Q6_K if _more_bits(i, c.n_layers) else T.Q4_K
        plan += [(f"blk.{i}.attn_norm.weight", (c.dim,), T.F32),
                 (f"blk.{i}.attn_q.weight", (c.dim, c.dim), T.Q4_K),
                 (f"blk.{i}.attn_k.weight", (c.kv_dim, c.dim), T.Q4_K),
                 (f"blk.{i}.attn_v.weight", (c.kv_dim, c.dim), more),
                 (f"blk.{i}.attn_output.weight", (c.dim, c.dim), T.Q4_K),
                 (f"blk.{i}.ffn_norm.weight", (c.dim,), T.F32),
                 (f"blk.{i}.ffn_gate.weight", (c.hidden_dim, c.dim), T.Q4_K),
                 (f"blk.{i}.ffn_up.weight", (c.hidden_dim, c.dim), T.Q4_K),
                 (f"blk.{i}.ffn_down.weight", (c.dim, c.hidden_dim), more)]
    return plan


def write_model(path: Path, c: ModelConfig) -> None:
    """Header, then each tensor generated as it is written (one tensor in memory at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("random TinyLlama-shaped Q4_K_M")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_block_count(c.n_layers)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    plan = q4_k_m_plan(c)
    for name, shape, ttype in plan:
        rows = int(np.prod(shape[:-1]))
        nbytes = rows * row_bytes(ttype, shape[-1])
        if ttype == T.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        else:
            w.add_tensor_info(name, (*shape[:-1], row_bytes(ttype, shape[-1])),
                              np.dtype(np.uint8), nbytes, raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, shape, ttype in plan:
        if ttype == T.F32:
            w.write_tensor_data(np.ones(shape, np.float32))
        else:
            w.write_tensor_data(random_blocks(ttype, int(np.prod(shape[:-1])), shape[-1], rng))
    w.close()
    os.replace(tmp, path)


# -----------------------------------------------------------------------------------------------
# one measured load (in its own process)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _warm_up() -> None:
    """Compile (or load from numba's cache) the decoders on a tiny tensor, outside the timing."""
    rng = np.random.default_rng(0)
    for ttype in (T.Q4_K, T.Q6_K):
        blocks = random_blocks(ttype, 2, 256, rng)
        blocks.setflags(write=False)  # as the file's views are: numba types them apart
        p = Packed(("warm-up",), (ttype,), (blocks,), 256, False, CheckpointError)
        p.dequantize()
        p.into_q8_0(np.empty((2, 256), np.uint8), np.empty((2, 8), np.float32))
        p.into_f32(np.empty((2, 256), np.float32))


def measure(path: Path, dtype: str, how: str = "build") -> dict[str, float]:
    """One load: "build" (build_weights, no cache), "cold" or "warm" (load_or_build with the
    cache root of $TILLER_CACHE_DIR: empty before cold, holding cold's file before warm)."""
    _warm_up()
    before = _rss_kib("VmRSS")
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        reset = False
    start = time.perf_counter()
    checkpoint = load_checkpoint(path)
    if how == "build":
        weights = build_weights(checkpoint.config, checkpoint.tensors, dtype)
    else:
        weights = load_or_build(checkpoint, dtype, min_bytes=0)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    unique = {id(a): a for a in weights}
    weight_bytes = sum(a.nbytes for a in unique.values())
    out = {"how": how, "dtype": dtype, "seconds": seconds, "weight_bytes": weight_bytes,
           "rss_before": before * 1024, "peak_rss": peak * 1024,
           "peak_over_weights": (peak - before) * 1024 / weight_bytes,
           "peak_reset": reset, "threads": numba.get_num_threads()}
    if how == "warm":
        for a in unique.values():  # one byte of every page: the mapped weights become resident
            if a.nbytes:
                flat = a.reshape(-1).view(np.uint8)
                int(flat[::4096].sum())
        steady = _rss_kib("VmRSS")
        out["steady_over_weights"] = (steady - before) * 1024 / weight_bytes
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("q8_0", "f32", "both"), default="q8_0")
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--threads", type=int, help="numba threads for the measured loads")
    parser.add_argument("--cache", action="store_true",
                        help="cold and warm loads through the weight cache (as tiller generate)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: one dtype
    parser.add_argument("--how", default="build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.file, args.measure, args.how)))
        return 0
    if not args.file.exists():
        start = time.perf_counter()
        write_model(args.file, TINYLLAMA)
        print(f"wrote {args.file} ({args.file.stat().st_size / 1e9:.2f} GB) in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    header = read_gguf(args.file)
    params = sum(int(np.prod(t.shape)) for t in header.tensors.values())
    types = Counter(t.type.name for t in header.tensors.values())
    print(f"{args.file}: {args.file.stat().st_size / 1e9:.3f} GB, {params / 1e9:.3f} B "
          f"parameters, tensors " + ", ".join(f"{n} {t}" for t, n in types.most_common()))
    env = dict(os.environ)
    if args.threads:
        env["NUMBA_NUM_THREADS"] = str(args.threads)
    failed = False
    for dtype in (("q8_0", "f32") if args.dtype == "both" else (args.dtype,)):
        with tempfile.TemporaryDirectory(prefix="tiller-bench-cache-") as cache_root:
            env["TILLER_CACHE_DIR"] = cache_root
            for how in ("cold", "warm") if args.cache else ("build",):
                out = subprocess.run([sys.executable, __file__, "--file", str(args.file),
                                      "--measure", dtype, "--how", how], capture_output=True,
                                     text=True, env=env, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                ok = r["peak_over_weights"] <= TARGET
                failed |= not ok
                steady = (f" | after reading every page {r['steady_over_weights']:.3f} x "
                          "weights" if "steady_over_weights" in r else "")
                print(f"{dtype:5s} {how:5s} load {r['seconds']:6.2f} s ({r['threads']} threads) "
                      f"| weights {r['weight_bytes'] / 2**30:.3f} GiB | RSS before "
                      f"{r['rss_before'] / 2**30:.3f} GiB, peak {r['peak_rss'] / 2**30:.3f} GiB "
                      f"| peak - before = {r['peak_over_weights']:.3f} x weights (target <= "
                      f"{TARGET}: {'ok' if ok else 'MISSED'}){steady}"
                      + ("" if r["peak_reset"] else " [peak includes the warm-up]"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
