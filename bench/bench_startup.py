"""Start-up of a 1.1B model, tiller cold and warm beside llama.cpp: load seconds and peak RSS.

    TILLER_PEER_DIR=/work/peer python bench/bench_startup.py [--runs 3] [--types q8_0,q4_k_m]
        [--threads 2] [--breakdown]

The models: TinyLlama-1.1B's shape (dim 2048, hidden 5632, 22 layers, 32 heads, 4 kv heads,
vocab 32000, context 2048) with random weights and the Llama SentencePiece vocabulary of
../shared/models/vocab/ggml-vocab-llama-spm.gguf, written once as F16 and quantized to Q8_0 and
Q4_K_M by the peer's llama-quantize, all in $TILLER_PEER_DIR/models (ignored by git).

Each run is a fresh process, timed from its start to its exit after generating one token from
the prompt "hi" (the page cache holds the model file: every run but the first reads it from
memory), with its peak RSS from wait4(2):
- tiller cold   `tiller generate --max-tokens 1` with an empty cache root (numba's compiled
                kernels stay cached, as on any second run of tiller): hashes the file, builds
                the weights and writes the weight cache;
- tiller warm   the same command again: the key and the weights come from the cache;
- llama.cpp     `llama-cli -m F -n 1 -p hi --no-warmup -no-cnv` (c392e50, bench/peer.py).
Also `tiller serve` from start to its first 200 on /health, warm (its derived uuid, for files
without general.uuid, computed and cached beforehand, untimed). The kinds alternate within
each round; the medians are printed. `--breakdown` times the stages of one warm load in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import llama_cpp, model_buffer_lines, peer_dir  # noqa: E402

SHAPE = {"dim": 2048, "hidden": 5632, "layers": 22, "heads": 32, "kv_heads": 4,
         "vocab": 32000, "ctx": 2048}
VOCAB = Path(__file__).resolve().parents[2] / "shared" / "models" / "vocab" / \
    "ggml-vocab-llama-spm.gguf"
QUANT_TYPES = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}
UUID_SCRIPT = ("import sys; from tiller.engine.identity import model_uuid; "
               "from tiller.engine.loader import load_checkpoint; "
               "model_uuid(load_checkpoint(sys.argv[1]))")


# -----------------------------------------------------------------------------------------------
# the models


def write_f16(path: Path) -> None:
    """The F16 source: random N(0, 0.02) matrices, unit norms, the SPM vocabulary's keys."""
    from tiller.engine.convert import _gguf_kv  # NOTE: the typed copy convert itself uses

    s = SHAPE
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("random TinyLlama-1.1B shape")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["dim"])
    w.add_feed_forward_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(s["dim"] // s["heads"])
    for key, (value, vtype, sub) in _gguf_kv(VOCAB, lambda k: k.startswith("tokenizer.")).items():
        w.add_key_value(key, value, vtype, sub)
    kv = s["dim"] // s["heads"] * s["kv_heads"]
    plan = [("token_embd.weight", (s["vocab"], s["dim"])), ("output_norm.weight", (s["dim"],)),
            ("output.weight", (s["vocab"], s["dim"]))]
    for i in range(s["layers"]):
        plan += [(f"blk.{i}.attn_norm.weight", (s["dim"],)),
                 (f"blk.{i}.attn_q.weight", (s["dim"], s["dim"])),
                 (f"blk.{i}.attn_k.weight", (kv, s["dim"])),
                 (f"blk.{i}.attn_v.weight", (kv, s["dim"])),
                 (f"blk.{i}.attn_output.weight", (s["dim"], s["dim"])),
                 (f"blk.{i}.ffn_norm.weight", (s["dim"],)),
                 (f"blk.{i}.ffn_gate.weight", (s["hidden"], s["dim"])),
                 (f"blk.{i}.ffn_up.weight", (s["hidden"], s["dim"])),
                 (f"blk.{i}.ffn_down.weight", (s["dim"], s["hidden"]))]
    for name, shape in plan:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * dtype().itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, shape in plan:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, np.float32))
        else:
            x = rng.standard_normal(shape, dtype=np.float32)
            x *= np.float32(0.02)
            w.write_tensor_data(x.astype(np.float16))
    w.close()
    os.replace(tmp, path)


def models(types: list[str]) -> dict[str, Path]:
    """The model files by type, written and quantized when missing."""
    folder = peer_dir() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "tinyllama-random-f16.gguf"
    out = {t: folder / f"tinyllama-random-{t}.gguf" for t in types}
    if all(p.exists() for p in out.values()):
        return out
    if not src.exists():
        print(f"writing {src}", file=sys.stderr)
        write_f16(src)
    quantize = llama_cpp()["llama-quantize"]
    for t, path in out.items():
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            done = subprocess.run([str(quantize), str(src), str(tmp), QUANT_TYPES[t], "2"],
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"llama-quantize {t} failed:\n{done.stderr[-2000:]}")
            os.replace(tmp, path)
    return out


# -----------------------------------------------------------------------------------------------
# one run


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds, peak RSS bytes, stderr) of a process run to its end."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read()
    if proc.returncode:
        raise RuntimeError(f"{argv[:4]} exited with {proc.returncode}:\n{text[-2000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_ready(model: Path, env: dict[str, str], threads: int) -> tuple[float, float, int]:
    """(seconds from start to the first 200 on /health, CPU seconds and peak RSS by then) of
    `tiller serve`."""
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tiller", "serve", "--model", str(model),
                             "--port", str(port), "-t", str(threads)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tiller serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024  # type: ignore[union-attr]
        stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    finally:
        proc.terminate()
        proc.wait(30)
    return seconds, cpu, peak


def tiller_generate(model: Path, env: dict[str, str], threads: int
                    ) -> tuple[float, float, int, float]:
    """(wall seconds, CPU seconds, peak RSS, tiller's own load seconds) of `tiller generate`."""
    seconds, cpu, peak, err = timed([sys.executable, "-m", "tiller", "generate", "--model",
                                str(model), "--prompt", "hi", "--max-tokens", "1",
                                "--temperature", "0", "-t", str(threads)], env)
    load = float(re.search(r"load ([\d.]+) s", err).group(1))  # type: ignore[union-attr]
    return seconds, cpu, peak, load


def llama_cli(model: Path, threads: int) -> tuple[float, float, int, float, list[str]]:
    """(wall seconds, CPU seconds, peak RSS, llama.cpp's own load ms / 1000, its model-buffer
    lines) of one llama-cli run."""
    cli = llama_cpp()["llama-cli"]
    seconds, cpu, peak, err = timed([str(cli), "-m", str(model), "-n", "1", "-p", "hi",
                                "--no-warmup", "-no-cnv", "-t", str(threads), "-c", "2048"],
                               dict(os.environ))
    found = re.search(r"load time =\s+([\d.]+) ms", err)
    return seconds, cpu, peak, float(found.group(1)) / 1000 if found else float("nan"), \
        model_buffer_lines(err)


# -----------------------------------------------------------------------------------------------
# the breakdown of a warm load


def breakdown(model: Path, threads: int) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of each stage of a warm load, as tiller generate runs them."""
    marks: dict[str, tuple[float, float]] = {}
    t, cpu = time.perf_counter(), time.process_time()

    def mark(name: str) -> None:
        nonlocal t, cpu
        now, now_cpu = time.perf_counter(), time.process_time()
        marks[name] = (now - t, now_cpu - cpu)
        t, cpu = now, now_cpu

    import numba
    from tiller.engine.engine import Engine, SeqRequest
    from tiller.engine.identity import model_key
    from tiller.engine.loader import load_checkpoint, load_tokenizer
    from tiller.engine.weight_cache import cache_path, load
    mark("import tiller.engine")
    numba.set_num_threads(threads)
    ckpt = load_checkpoint(model)
    mark("read the GGUF header (load_checkpoint)")
    key = model_key(model)
    mark("model key (cached)")
    weights = load(cache_path(key, "q8_0"), ckpt.config, "q8_0")
    mark("map the weight cache")
    engine = Engine(ckpt.config, weights, threads=threads)
    mark("Engine(): workspace, KV cache")
    tok = load_tokenizer(model, None, ckpt.config.vocab_size)
    mark("tokenizer")
    ids = tok.encode("hi", bos=True)
    mark("encode the prompt")
    seq = engine.new_sequence()
    engine.step([SeqRequest(seq, ids)])
    mark("first step (numba dispatch from cache, page faults)")
    engine.step([SeqRequest(seq, [ids[-1]])])
    mark("second step")
    return marks


# -----------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds (medians are printed)")
    parser.add_argument("--types", default="q8_0,q4_k_m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--breakdown", action="store_true",
                        help="time the stages of one warm load of the first type, in-process")
    parser.add_argument("--no-peer", action="store_true", help="tiller only")
    args = parser.parse_args()
    types = args.types.split(",")
    files = models(types)
    if args.breakdown:
        print("   wall      CPU  stage")
        for stage, (wall, cpu) in breakdown(files[types[0]], args.threads).items():
            print(f"{wall:7.3f} s {cpu:7.3f} s  {stage}")
        return 0
    import numba
    import tiller.engine  # noqa: F401  (sets numba's cache folder)

    numba_cache = numba.config.CACHE_DIR  # type: ignore[attr-defined]
    print(f"{'model':8s} {'run':12s} {'wall':>8s} {'CPU':>8s} {'own load':>9s} {'peak RSS':>9s}")
    results: dict[str, dict] = {}
    for t in types:
        model = files[t]
        rows: dict[str, list[tuple[float, ...]]] = {}
        with tempfile.TemporaryDirectory(prefix="tiller-startup-") as root:
            env = dict(os.environ, TILLER_CACHE_DIR=root, NUMBA_CACHE_DIR=numba_cache)
            for _ in range(args.runs):
                shutil.rmtree(Path(root) / "weights", ignore_errors=True)
                (Path(root) / "keys.json").unlink(missing_ok=True)
                rows.setdefault("tiller cold", []).append(tiller_generate(model, env,
                                                                          args.threads))
                rows.setdefault("tiller warm", []).append(tiller_generate(model, env,
                                                                          args.threads))
                # NOTE: a file without general.uuid gets one derived from its tensors, computed
                # by the server's first load and then cached beside the key: done here, untimed
                subprocess.run([sys.executable, "-c", UUID_SCRIPT, str(model)], env=env,
                               check=True)
                rows.setdefault("serve warm", []).append(
                    (*serve_ready(model, env, args.threads), float("nan")))
                if not args.no_peer:
                    *numbers, buffers = llama_cli(model, args.threads)
                    rows.setdefault("llama.cpp", []).append(tuple(numbers))
        results[t] = {}
        for kind, runs in rows.items():
            med = [statistics.median(col) for col in zip(*runs, strict=True)]
            results[t][kind] = {"seconds": med[0], "cpu_seconds": med[1], "peak_rss": med[2],
                                "own_load": med[3]}
            print(f"{t:8s} {kind:12s} {med[0]:6.2f} s {med[1]:6.2f} s {med[3]:7.2f} s "
                  f"{med[2] / 2**30:6.2f} GiB")
        if not args.no_peer:
            print(f"{t:8s} llama.cpp model buffers: {'; '.join(buffers)} -> AMX: "
                  f"{'yes' if any('AMX' in b for b in buffers) else 'no'}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
