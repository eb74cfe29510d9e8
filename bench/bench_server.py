"""Server throughput and latency: N concurrent streaming clients against `tiller serve`.

Starts a server on a free port (or uses `--url`), and for each concurrency N runs N asyncio
clients that send streaming /v1/completions requests back to back: aggregate generated tok/s,
time to first token and inter-token latency (between SSE chunks) at p50 and p99. Beside each N,
with the server idle, this process times the engine's own decode steps at batch N on the same
model file, so the server's overhead is a ratio taken within one run.

The default model is a random-weight model shaped like stories15M with the llama2 tokenizer
(32000 pieces), written to a temporary directory; `--model/--tokenizer` take real files.

    python bench/bench_server.py [--concurrency 1,4,16] [--duration S | --requests N]
                                 [--max-tokens N] [--model PATH --tokenizer PATH] [--url URL]
                                 [--threads N] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import numba
import numpy as np
from tiller.engine.config import ModelConfig
from tiller.engine.engine import Engine, SeqRequest
from tiller.engine.llama2c import random_tensors, write_llama2c
from tiller.engine.sampling import Sampler, SamplingParams
from tiller.engine.tokenizer import SpmTokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared/models"
DEFAULT_TOKENIZER = SHARED / "llama2-tokenizer.bin"
STORIES15M = ModelConfig(288, 768, 6, 6, 6, 32000, 256)
PROMPT_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
               "in the park with her friends.")
STARTUP_TIMEOUT = 180.0  # the first start of a checkout compiles the kernels (numba)
ENGINE_MIN_SECONDS = 2.0  # repeat the engine's decode until it has run this long
IDLE_PAUSE = 1.0  # seconds between phases, so neither process measures the other's tail
NOISY = 0.25  # cores used by other processes during a measurement that mark its row


# -----------------------------------------------------------------------------------------------
# model and server process


def random_model(directory: Path, seed: int) -> Path:
    """A stories15M-shaped llama2.c file (legacy v0 layout) with random weights."""
    return write_llama2c(directory / "random-stories15M.bin", STORIES15M,
                         random_tensors(STORIES15M, seed), "v0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `tiller serve` child process: started here, stopped with SIGTERM."""

    def __init__(self, model: Path, tokenizer: Path, *, parallel: int, dtype: str,
                 threads: int | None, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "tiller", "serve", "--model", str(model),
               "--tokenizer", str(tokenizer), "--host", "127.0.0.1", "--port", str(self.port),
               "--parallel", str(parallel), "--dtype", dtype]
        if threads:
            cmd += ["--threads", str(threads)]
        self._log = log_path.open("wb")
        # NOTE: its own session, so a ^C here reaches only this process, which then stops the
        # server with SIGTERM like any supervisor would
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=os.environ | {"PYTHONUNBUFFERED": "1"},
                                     start_new_session=True)

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (all its threads) so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; the exit code (None if it had to be killed)."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    return self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    return None
            return self.proc.returncode
        finally:
            self._log.close()


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout: float,
                     server: Server | None) -> float:
    """Poll /health until it answers 200; seconds waited."""
    start = time.perf_counter()
    while True:
        if server is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server exited with code {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            async with session.get(f"{url}/health") as resp:
                if resp.status == 200:
                    return time.perf_counter() - start
        except aiohttp.ClientError:
            pass
        if time.perf_counter() - start > timeout:
            tail = f":\n{server.log_tail()}" if server is not None else ""
            raise RuntimeError(f"{url}/health not ready after {timeout:.0f} s{tail}")
        await asyncio.sleep(0.5)


async def server_metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The unlabelled samples of /metrics (step time, batch sizes, token counters)."""
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def machine_cpu_seconds() -> float:
    """CPU time spent by everything on the machine so far (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuUse:
    """CPU used during a phase, in cores (CPU seconds / wall seconds)."""

    here: float  # this process: load generator, or the engine when it is timed
    server: float | None  # None: a server we did not start
    others: float  # every other process on the machine (the machine is shared)


class CpuMeter:
    def __init__(self, server: Server | None) -> None:
        self.server = server
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        server = self.server.cpu_seconds() if self.server is not None else 0.0
        return time.perf_counter(), machine_cpu_seconds(), time.process_time(), server

    def stop(self) -> CpuUse:
        end = self._read()
        wall, machine, here, server = (b - a for a, b in zip(self._start, end, strict=True))
        others = machine - here - server
        return CpuUse(here / wall, server / wall if self.server is not None else None,
                      max(others, 0.0) / wall)


# -----------------------------------------------------------------------------------------------
# clients


@dataclass
class RequestResult:
    ok: bool
    completion_tokens: int = 0
    prompt_tokens: int = 0
    chunks: int = 0  # SSE chunks carrying text (a token can carry no text: a partial UTF-8 byte)
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def stream_completion(session: aiohttp.ClientSession, url: str, body: dict
                            ) -> RequestResult:
    """One streaming request; chunk times are taken as each SSE line arrives."""
    t0 = time.perf_counter()
    last = None
    result = RequestResult(ok=False)
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            return result
        async for line in resp.content:
            now = time.perf_counter()
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                result.ok = result.completion_tokens > 0 or body["max_tokens"] == 0
                break
            msg = json.loads(data)
            if msg.get("usage"):
                result.completion_tokens = msg["usage"]["completion_tokens"]
                result.prompt_tokens = msg["usage"]["prompt_tokens"]
            if "error" in msg:
                result.error = str(msg["error"])[:200]
            for choice in msg.get("choices", ()):
                if choice.get("text") and choice.get("finish_reason") is None:
                    result.chunks += 1
                    if last is None:
                        result.ttft = now - t0
                    else:
                        result.itl.append(now - last)
                    last = now
    if not result.ok and not result.error:
        result.error = "stream ended without usage and [DONE]"
    return result


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: list[RequestResult]
    cpu: CpuUse
    metrics_delta: dict[str, float]


async def run_load(session: aiohttp.ClientSession, url: str, concurrency: int,
                   prompt: list[int], args: argparse.Namespace, seed_base: int,
                   server: Server | None) -> LoadResult:
    """`concurrency` clients, each sending requests back to back until the duration is up
    (a request under way is finished) or the shared request count is used up."""
    results: list[RequestResult] = []
    issued = 0

    def body(index: int) -> dict:
        b = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
             "seed": seed_base + index, "stream": True,
             "stream_options": {"include_usage": True}}
        if args.top_p is not None:
            b["top_p"] = args.top_p
        return b

    async def client(deadline: float) -> None:
        nonlocal issued
        while True:
            if args.requests is not None:
                if issued >= args.requests:
                    return
            elif time.perf_counter() >= deadline:
                return
            index = issued
            issued += 1
            results.append(await stream_completion(session, url, body(index)))

    before = await server_metrics(session, url)
    meter = CpuMeter(server)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(t0 + args.duration) for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    cpu = meter.stop()
    after = await server_metrics(session, url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    return LoadResult(concurrency, seconds, results, cpu, delta)


# -----------------------------------------------------------------------------------------------
# the engine alone


@dataclass
class EngineResult:
    batch: int
    steps: int
    step_seconds: float  # mean decode step
    step_median: float
    sample_seconds: float  # mean sampling time per token (Sampler.sample, same parameters)
    cpu: CpuUse | None = None

    @property
    def tok_s(self) -> float:
        return self.batch / self.step_seconds

    @property
    def tok_s_with_sampling(self) -> float:
        return self.batch / (self.step_seconds + self.batch * self.sample_seconds)


def engine_decode(engine: Engine, prompt: list[int], batch: int, max_tokens: int,
                  params: SamplingParams) -> EngineResult:
    """`batch` sequences prefilled with `prompt` in one step, then decoding one sampled token
    each per step, as many as a request's max_tokens; repeated for ENGINE_MIN_SECONDS.

    Step times exclude sampling, which is timed apart: the engine figure is the forward pass."""
    step_times: list[float] = []
    sample_total = 0.0
    samples = 0
    start = time.perf_counter()
    seed = 0
    while not step_times or time.perf_counter() - start < ENGINE_MIN_SECONDS:
        seqs = [engine.new_sequence() for _ in range(batch)]
        samplers = []
        for _ in seqs:
            samplers.append(Sampler(SamplingParams(**{**asdict(params), "seed": seed}), prompt))
            seed += 1
        results = engine.step([SeqRequest(s, prompt) for s in seqs])
        for _ in range(max_tokens - 1):  # the last sampled token is never fed back
            t0 = time.perf_counter()
            tokens = [smp.sample(r.logits) for smp, r in zip(samplers, results, strict=True)]
            t1 = time.perf_counter()
            results = engine.step([SeqRequest(s, [t]) for s, t in zip(seqs, tokens, strict=True)])
            step_times.append(time.perf_counter() - t1)
            sample_total += t1 - t0
            samples += batch
        for s in seqs:
            engine.release(s)
    return EngineResult(batch, len(step_times), float(np.mean(step_times)),
                        float(np.median(step_times)), sample_total / samples)


# -----------------------------------------------------------------------------------------------
# report


@dataclass
class Row:
    concurrency: int
    requests: int
    failed: int
    seconds: float
    completion_tokens: int
    agg_tok_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    chunks: int
    engine: EngineResult | None
    cpu: CpuUse
    server_steps: float
    server_step_seconds: float  # engine.step time inside the server, summed
    server_mean_batch: float
    errors: list[str]
    engine_runs: list[float] = field(default_factory=list)  # engine tok/s before and after

    @property
    def ratio(self) -> float | None:
        return self.agg_tok_s / self.engine.tok_s if self.engine else None

    @property
    def noisy(self) -> bool:
        """Other processes took a noticeable share of the cores during a measurement."""
        engine_others = self.engine.cpu.others if self.engine and self.engine.cpu else 0.0
        return max(self.cpu.others, engine_others) > NOISY


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def make_row(load: LoadResult, engine: EngineResult | None) -> Row:
    ok = [r for r in load.requests if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    tokens = sum(r.completion_tokens for r in ok)
    d = load.metrics_delta
    steps = d.get("tiller_step_seconds_count", 0.0)
    return Row(
        concurrency=load.concurrency, requests=len(ok), failed=len(load.requests) - len(ok),
        seconds=load.seconds, completion_tokens=tokens, agg_tok_s=tokens / load.seconds,
        ttft_p50=_pct(ttft, 50), ttft_p99=_pct(ttft, 99),
        itl_p50=_pct(itl, 50), itl_p99=_pct(itl, 99), chunks=sum(r.chunks for r in ok),
        engine=engine, cpu=load.cpu, server_steps=steps,
        server_step_seconds=d.get("tiller_step_seconds_sum", 0.0),
        server_mean_batch=d.get("tiller_batch_size_sum", 0.0) / max(steps, 1),
        errors=sorted({r.error for r in load.requests if not r.ok})[:3])


HEADER = ("N", "requests", "agg tok/s", "engine tok/s", "ratio", "TTFT p50", "TTFT p99",
          "ITL p50", "ITL p99")
WIDTHS = (3, 8, 10, 12, 7, 9, 9, 8, 8)


def _table_line(cells: list[str] | tuple[str, ...]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cells, WIDTHS, strict=True))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}ms"


def format_row(row: Row) -> str:
    return _table_line([
        str(row.concurrency), str(row.requests) + (f"+{row.failed}!" if row.failed else ""),
        f"{row.agg_tok_s:.1f}", f"{row.engine.tok_s:.1f}" if row.engine else "-",
        (f"{row.ratio:.2f}" + ("*" if row.noisy else "")) if row.engine else "-",
        _ms(row.ttft_p50), _ms(row.ttft_p99), _ms(row.itl_p50), _ms(row.itl_p99)])


def _cores(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def row_notes(row: Row) -> list[str]:
    n = row.concurrency
    per_step = row.seconds / row.server_steps if row.server_steps else float("nan")
    step = row.server_step_seconds / row.server_steps if row.server_steps else float("nan")
    out = [f"N={n}: {row.completion_tokens} tokens in {row.seconds:.1f}s ({row.chunks} text "
           f"chunks); server: {row.server_steps:.0f} steps, mean batch "
           f"{row.server_mean_batch:.1f}, {_ms(step)} in engine.step of {_ms(per_step)} wall "
           f"per step ({row.server_step_seconds / row.seconds:.0%} of the run)"]
    cpu = row.cpu
    busy = (f"cores busy under load: server {_cores(cpu.server)}, load generator "
            f"{_cores(cpu.here)}, other processes {_cores(cpu.others)}")
    if row.engine is not None:
        e = row.engine
        runs = " / ".join(f"{x:.1f}" for x in row.engine_runs)
        out.append(f"  engine alone, batch {n}: {runs} tok/s before / after the run; kept the "
                   f"faster: step {_ms(e.step_seconds)} (mean of {e.steps}, median "
                   f"{_ms(e.step_median)})")
        out.append(f"  sampling (Sampler.sample, same parameters, this model's logits): "
                   f"{_ms(e.sample_seconds)} per token -> engine + sampling "
                   f"{e.tok_s_with_sampling:.1f} tok/s; server / that = "
                   f"{row.agg_tok_s / e.tok_s_with_sampling:.2f}")
        busy += f"; other processes while the engine ran {_cores(e.cpu.others)}"
    out.append(f"  {busy}")
    if row.failed:
        out.append(f"  {row.failed} failed requests: {'; '.join(row.errors)}")
    return out


# -----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--duration", type=float, default=20.0,
                   help="seconds of load per concurrency (requests under way are finished)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per concurrency instead of a duration")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--prompt-tokens", type=int, default=16,
                   help="prompt length: the first tokens of a fixed text (BOS included)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=None, help="default: the server's (1.0)")
    p.add_argument("--seed", type=int, default=0, help="request i gets seed + i")
    p.add_argument("--model", type=Path,
                   help="llama2.c model file (default: random weights, stories15M shape)")
    p.add_argument("--tokenizer", type=Path,
                   help="tokenizer.bin (default: beside --model; without --model "
                        f"{DEFAULT_TOKENIZER})")
    p.add_argument("--url", help="use this running server instead of starting one (the engine "
                   "column needs --model: the same file the server runs)")
    p.add_argument("--parallel", type=int, default=None,
                   help="server --parallel (default: max(16, largest N))")
    p.add_argument("--dtype", choices=("q8_0", "f32"), default="q8_0")
    p.add_argument("--threads", type=int, default=None,
                   help=f"numba threads, server and engine (default: all "
                        f"{numba.config.NUMBA_NUM_THREADS})")
    p.add_argument("--json", nargs="?", const="bench_server.json", default=None, metavar="PATH",
                   help="also write the results as JSON (default path: bench_server.json)")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        p.error("--concurrency must be comma-separated integers")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs positive client counts")
    if args.duration <= 0 or (args.requests is not None and args.requests < 1):
        p.error("--duration and --requests must be positive")
    if args.max_tokens < 1 or args.prompt_tokens < 1:
        p.error("--max-tokens and --prompt-tokens must be at least 1")
    if args.parallel is None:
        args.parallel = max(16, *args.concurrency)
    if args.tokenizer is None:
        args.tokenizer = (args.model.with_name("tokenizer.bin") if args.model
                          else DEFAULT_TOKENIZER)
    for name in ("model", "tokenizer"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            p.error(f"--{name} {path}: no such file")
    return args


def load_engine(model: Path, args: argparse.Namespace, prompt_len: int, token: int) -> Engine:
    """The engine as the server builds it, with one step run (compiles or loads the kernels)."""
    engine = Engine.load(model, dtype=args.dtype, threads=args.threads,
                         max_tokens=max(256, max(args.concurrency) * prompt_len),
                         kv_sequences=max(args.concurrency))
    seq = engine.new_sequence()
    engine.step([SeqRequest(seq, [token])])
    engine.release(seq)
    return engine


async def engine_while_idle(engine: Engine, thread: ThreadPoolExecutor, prompt: list[int],
                            batch: int, args: argparse.Namespace, params: SamplingParams,
                            server: Server | None) -> EngineResult:
    await asyncio.sleep(IDLE_PAUSE)  # let the server's last step and our clients settle
    meter = CpuMeter(server)
    result = await asyncio.get_running_loop().run_in_executor(
        thread, engine_decode, engine, prompt, batch, args.max_tokens, params)
    result.cpu = meter.stop()
    await asyncio.sleep(IDLE_PAUSE)
    return result


async def run(args: argparse.Namespace, model: Path | None, tmp: Path) -> dict:
    tokenizer = SpmTokenizer.from_llama2c(args.tokenizer)
    prompt = tokenizer.encode(PROMPT_TEXT, bos=True)[: args.prompt_tokens]
    engine = None
    # NOTE: threads as in the server: the model is loaded and its first step run on one worker
    # thread, decode steps run on another. With numba's OpenMP layer this matters a lot: each
    # thread that starts parallel regions owns a libgomp team, and libgomp spin-waits at its
    # barriers unless it manages more threads than there are cores. With one team on 2 cores
    # (a step on the main thread) every barrier spins, and steps get 10x slower or worse as
    # soon as another process is busy; with two teams, as in the server, it throttles. (A
    # team lives as long as its thread: the loader is kept, like the server's executor.)
    loader = ThreadPoolExecutor(1, thread_name_prefix="load")
    thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
    if model is not None:
        engine = loader.submit(load_engine, model, args, len(prompt), prompt[0]).result()
        if engine.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"{args.tokenizer} has {tokenizer.vocab_size} pieces, the model "
                             f"{engine.config.vocab_size}")
    params = SamplingParams(temperature=args.temperature,
                            top_p=1.0 if args.top_p is None else args.top_p)
    server = None
    if args.url is None:
        server = Server(model, args.tokenizer, parallel=args.parallel, dtype=args.dtype,
                        threads=args.threads, log_path=tmp / "server.log")
    url = args.url or server.url
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    connector = aiohttp.TCPConnector(limit=0)
    rows: list[Row] = []
    exit_code = None
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            ready = await wait_ready(session, url, STARTUP_TIMEOUT, server)
            print(f"server {url} ready after {ready:.1f}s"
                  + (f" (parallel {args.parallel}, log {server.log_path})" if server else ""))
            async with session.get(f"{url}/v1/models") as resp:
                meta = (await resp.json())["data"][0]
            print(f"model {meta['id']}: {meta['meta']}")
            warm = await stream_completion(session, url, {
                "prompt": prompt, "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}})
            if not warm.ok:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
            print(f"prompt: {len(prompt)} tokens; max_tokens {args.max_tokens}, temperature "
                  f"{args.temperature}, top_p {params.top_p}; "
                  + (f"{args.requests} requests" if args.requests else f"{args.duration:g}s")
                  + " per N")
            print()
            print(_table_line(HEADER), flush=True)
            notes: list[str] = []
            seed_base = args.seed
            for n in args.concurrency:
                # NOTE: other processes' load drifts (the machine is shared): time the engine
                # on both sides of the server's run and keep the faster, so the ratio errs low
                runs: list[EngineResult] = []
                if engine is not None:
                    runs.append(await engine_while_idle(engine, thread, prompt, n, args, params,
                                                        server))
                load = await run_load(session, url, n, prompt, args, seed_base, server)
                seed_base += len(load.requests)
                if engine is not None:
                    runs.append(await engine_while_idle(engine, thread, prompt, n, args, params,
                                                        server))
                row = make_row(load, max(runs, key=lambda r: r.tok_s) if runs else None)
                row.engine_runs = [r.tok_s for r in runs]
                rows.append(row)
                notes.extend(row_notes(row))
                print(format_row(row), flush=True)
    finally:
        thread.shutdown()
        loader.shutdown()
        if server is not None:
            exit_code = server.stop()
    return {"rows": rows, "notes": notes, "prompt_tokens": len(prompt),
            "server_exit_code": exit_code, "startup_seconds": ready}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="bench_server-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model
        if model is None and args.url is None:
            model = random_model(tmp, args.seed)
            print(f"model: random weights, stories15M shape, written to {model}")
        print(f"CPU: {cores} cores, shared by the server and this load generator (which also "
              f"times the engine, while the server is idle); numba threads "
              f"{args.threads or numba.config.NUMBA_NUM_THREADS}")
        result = asyncio.run(run(args, model, tmp))
    rows: list[Row] = result["rows"]
    print()
    print("agg tok/s: completion tokens (from usage) / wall time of the run, N clients sending "
          "back to back; engine tok/s: this process's Engine.step at batch N, decode only (mean "
          "step, sampling excluded), server idle; ratio = agg / engine. TTFT: request sent to "
          "first text chunk; ITL: gaps between text chunks of a request.")
    if any(r.noisy for r in rows):
        print(f"  * other processes used more than {NOISY} of a core while this row's server "
              "run or kept engine run was measured: compare with care")
    for note in result["notes"]:
        print(f"  {note}")
    code = result["server_exit_code"]
    if args.url is None:
        print(f"server stopped with SIGTERM: exit code {code if code is not None else 'killed'}")
    if args.json:
        out = {
            "cores": cores, "threads": args.threads or numba.config.NUMBA_NUM_THREADS,
            "model": str(args.model) if args.model else "random stories15M shape",
            "tokenizer": str(args.tokenizer), "url": args.url, "dtype": args.dtype,
            "parallel": args.parallel, "prompt_tokens": result["prompt_tokens"],
            "max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "duration": args.duration, "requests": args.requests,
            "startup_seconds": result["startup_seconds"], "server_exit_code": code,
            "rows": [asdict(r) | {"ratio": r.ratio, "engine_tok_s": r.engine.tok_s
                                  if r.engine else None} for r in rows],
            "notes": result["notes"],
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if all(r.failed == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
