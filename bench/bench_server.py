"""Server throughput and latency: N concurrent streaming clients against `tiller serve` and,
through the same load generator, llama.cpp's `llama-server` on the same file.

    python bench/bench_server.py [--concurrency 1,4,16] [--duration S | --requests N]
        [--rounds 2] [--max-tokens 64] [--temperature 0.8] [--top-p 0.95] [--threads 2]
        [--parallel 16] [--model PATH [--tokenizer PATH]] [--no-peer] [--no-engine]
        [--chat-histories 200,400,800] [--chat-rounds 6] [--url URL] [--json [PATH]]

Both servers get the same model file (default: a stories110M-shaped Q8_0 GGUF of random weights
with the Llama 2 vocabulary and a ChatML template, written once under --cache-dir), the same
threads and slots (llama-server: -np P -c P x context --cont-batching). For each round and
each N, each server in turn serves N clients sending streaming /v1/completions requests back to
back (the same token-id prompt, max_tokens, temperature, top_p, and seed i for request i):
aggregate tok/s, TTFT and ITL (between text chunks). The clients all run on one thread of this
process (bench/http_stream.py: a lean client, as it shares the cores with the server it
measures). Right before and right after tiller's run, with both servers idle, this process
times tiller's own engine at batch N on the same file (decode step + sampling with the same
parameters), so tiller's server / engine ratio is taken within one run. The table
shows medians over the rounds. Then the multi-turn chat scenario (bench/chat_turns.py) runs on
each server. llama-server is bench/peer.py's build (llama.cpp at its pinned commit, under
$TILLER_PEER_DIR, built there if missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from chat_turns import ChatRow, chat_scenario, format_chat
from http_stream import Request, run_clients
from server_procs import Server, llama_server, tiller_server, wait_ready
from tiller.engine.engine import Engine, SeqRequest, SeqResult
from tiller.engine.loader import load_tokenizer
from tiller.engine.sampling import Sampler, SamplingParams, sample_batch
from tiller.engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
               "in the park with her friends.")
DEFAULT_SHAPE = "stories110M"
STARTUP_TIMEOUT = 300.0  # the first start of a checkout compiles the kernels (numba)
REQUEST_TIMEOUT = 120.0  # no byte of a stream for this long: the request fails
ENGINE_MIN_SECONDS = 4.0  # repeat the engine's decode until it has run this long
IDLE_PAUSE = 1.0  # seconds between phases, so neither process measures the other's tail
NOISY = 0.25  # cores used by other processes during a measurement that mark its row


# -----------------------------------------------------------------------------------------------
# model, peer, metering


def default_model(cache_dir: Path) -> Path:
    """The stories110M-shaped Q8_0 GGUF with a ChatML template, written once under cache_dir
    (bench/compare.py's writer: random weights, the Llama 2 vocabulary plus the template's
    markers as two control tokens, as a ChatML fine-tune of Llama 2 has them)."""
    from bench_engine import SHAPES
    from compare import write_gguf
    from tiller.server.chat import DEFAULT_CHAT_TEMPLATE

    path = cache_dir / f"{DEFAULT_SHAPE}-chatml-tokens-random-q8_0.gguf"
    if not path.is_file():
        print(f"writing {path}", flush=True)
        write_gguf(path, SHAPES[DEFAULT_SHAPE], chat_template=DEFAULT_CHAT_TEMPLATE,
                   added_tokens=("<|im_start|>", "<|im_end|>"))
    return path


def peer_server_binary() -> tuple[Path, str]:
    """llama-server of bench/peer.py (built if missing) and the commit it was built from."""
    from peer import llama_cpp, peer_dir

    binary = llama_cpp()["llama-server"]
    commit_file = peer_dir() / "llama.cpp" / "COMMIT"
    commit = commit_file.read_text().strip() if commit_file.is_file() else "unknown"
    return binary, commit


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
    server_main_seconds: float | None = None  # CPU seconds of the server's main thread


class CpuMeter:
    def __init__(self, server: Server | None) -> None:
        self.server = server
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float, float]:
        server = self.server.cpu_seconds() if self.server is not None else 0.0
        main = self.server.main_thread_cpu_seconds() if self.server is not None else 0.0
        return time.perf_counter(), machine_cpu_seconds(), time.process_time(), server, main

    def stop(self) -> CpuUse:
        end = self._read()
        wall, machine, here, server, main = (b - a for a, b in
                                             zip(self._start, end, strict=True))
        others = machine - here - server
        started = self.server is not None
        return CpuUse(here / wall, server / wall if started else None,
                      max(others, 0.0) / wall, main if started else None)


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


def completion(body: dict, results: list[RequestResult]) -> Request:
    """A streaming /v1/completions request whose RequestResult goes to `results` when it
    ends; chunk times are taken as each SSE line's bytes arrive (http_stream.py: a lean
    client, so that the load generator takes little CPU from the servers it measures)."""
    t0 = time.perf_counter()
    last = None
    result = RequestResult(ok=False)

    def on_data(now: float, data: bytes) -> bool:
        nonlocal last
        if data == b"[DONE]":
            result.ok = result.completion_tokens > 0 or body["max_tokens"] == 0
            return True
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
        return False

    def on_end(status: int, error_body: bytes, error: Exception | None) -> None:
        if error is not None:
            result.ok = False
            result.error = f"{type(error).__name__}: {error}"
        elif status != 200:
            result.error = f"HTTP {status}: {error_body[:200].decode(errors='replace')}"
        elif not result.ok and not result.error:
            result.error = "stream ended without usage and [DONE]"
        results.append(result)

    return Request(json.dumps(body).encode(), on_data, on_end)


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: list[RequestResult]
    cpu: CpuUse
    metrics_delta: dict[str, float]


async def run_load(session: aiohttp.ClientSession, url: str, concurrency: int,
                   prompt: list[int], args: argparse.Namespace, seed_base: int,
                   server: Server | None, tiller_metrics: bool) -> LoadResult:
    """`concurrency` clients, each sending requests back to back until the duration is up
    (a request under way is finished) or the shared request count is used up. Request i gets
    seed seed_base + i, whichever server answers it."""
    results: list[RequestResult] = []
    issued = 0

    def body(index: int) -> dict:
        b = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
             "seed": seed_base + index, "stream": True,
             "stream_options": {"include_usage": True}}
        if args.top_p is not None:
            b["top_p"] = args.top_p
        # NOTE: left out, each server uses its own default: llama-server's are top_k 40 and
        # min_p 0.05, tiller's 0 and 0 (bench/README.md, bench_server)
        if args.top_k is not None:
            b["top_k"] = args.top_k
        if args.min_p is not None:
            b["min_p"] = args.min_p
        return b

    def clients(deadline: float) -> None:
        def next_request() -> Request | None:
            nonlocal issued
            if (issued >= args.requests if args.requests is not None
                    else time.perf_counter() >= deadline):
                return None
            issued += 1
            return completion(body(issued - 1), results)

        run_clients(f"{url}/v1/completions", concurrency, next_request,
                    read_timeout=REQUEST_TIMEOUT)

    before = await server_metrics(session, url) if tiller_metrics else {}
    meter = CpuMeter(server)
    t0 = time.perf_counter()
    await asyncio.to_thread(clients, t0 + args.duration)
    seconds = time.perf_counter() - t0
    cpu = meter.stop()
    after = await server_metrics(session, url) if tiller_metrics else {}
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    return LoadResult(concurrency, seconds, results, cpu, delta)


# -----------------------------------------------------------------------------------------------
# the engine alone


@dataclass
class EngineResult:
    batch: int
    steps: int
    step_seconds: float  # mean decode step
    sample_seconds: float  # mean sampling time per token (sample_step, same parameters)
    prefill_seconds: float = 0.0  # mean step prefilling the batch's prompts (one per wave)
    max_tokens: int = 0  # tokens per request
    cpu: CpuUse | None = None

    @property
    def tok_s(self) -> float:
        return self.batch / self.step_seconds

    @property
    def tok_s_with_sampling(self) -> float:
        """What a server could deliver: a step plus sampling its batch's tokens."""
        return self.batch / (self.step_seconds + self.batch * self.sample_seconds)

    @property
    def tok_s_served(self) -> float:
        """What the engine delivers for whole requests, as the server serves them: each
        wave's prompts prefilled (in one step, at once: the server's staggered arrivals
        prefill in smaller pieces), then max_tokens tokens each, every one sampled."""
        n = self.max_tokens
        wave = (self.prefill_seconds + (n - 1) * self.step_seconds
                + n * self.batch * self.sample_seconds)
        return self.batch * n / wave


def sample_step(samplers: list[Sampler], results: list[SeqResult], threads: int
                ) -> list[int]:
    """The engine-side sampling of one decode step: a token for each sequence from its logits,
    with its request's parameters and seed.

    As the server's runner does: the rows stacked, one compiled call (engine/sample_kernel.py)
    with the engine's threads."""
    logits = np.stack([r.logits for r in results]).astype(np.float32, copy=False)
    tokens, errors = sample_batch(samplers, logits, threads)
    if any(errors):
        raise RuntimeError(f"sampling failed: {errors}")
    return tokens.tolist()


def engine_decode(engine: Engine, prompt: list[int], batch: int, max_tokens: int,
                  params: SamplingParams) -> EngineResult:
    """`batch` sequences prefilled with `prompt` in one step, then decoding one sampled token
    each per step, as many as a request's max_tokens; repeated for ENGINE_MIN_SECONDS.

    Step times and sampling times are taken apart: `tok_s` is the forward pass alone,
    `tok_s_with_sampling` adds sampling, as a server must, and `tok_s_served` the prompts'
    prefill too."""
    step_times: list[float] = []
    prefill_times: list[float] = []
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
        t0 = time.perf_counter()
        results = engine.step([SeqRequest(s, prompt) for s in seqs])
        prefill_times.append(time.perf_counter() - t0)
        for _ in range(max_tokens - 1):  # the last sampled token is never fed back
            t0 = time.perf_counter()
            tokens = sample_step(samplers, results, engine.threads)
            t1 = time.perf_counter()
            results = engine.step([SeqRequest(s, [t]) for s, t in zip(seqs, tokens, strict=True)])
            step_times.append(time.perf_counter() - t1)
            sample_total += t1 - t0
            samples += batch
        for s in seqs:
            engine.release(s)
    return EngineResult(batch, len(step_times), float(np.mean(step_times)),
                        sample_total / samples, float(np.mean(prefill_times)), max_tokens)


def bracketed(runs: list[EngineResult]) -> EngineResult:
    """The engine's timings right before and right after a server run, as one: step, sampling
    and prefill times averaged (so throughputs combine harmonically), which takes the
    machine's drift between the two as even across the run."""
    first = runs[0]
    return EngineResult(
        first.batch, sum(r.steps for r in runs),
        statistics.fmean(r.step_seconds for r in runs),
        statistics.fmean(r.sample_seconds for r in runs),
        statistics.fmean(r.prefill_seconds for r in runs), first.max_tokens)


# -----------------------------------------------------------------------------------------------
# report


@dataclass
class Row:
    """One server's run at one N in one round."""

    server: str
    round: int
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
    cpu: CpuUse
    server_steps: float  # tiller's /metrics (0 for llama-server)
    server_step_seconds: float  # engine.step time inside tiller, summed
    server_sample_seconds: float  # sampling time inside tiller, summed
    errors: list[str]

    @property
    def noisy(self) -> bool:
        """Other processes took a noticeable share of the cores during the run."""
        return self.cpu.others > NOISY

    @property
    def loop_ms_per_token(self) -> float | None:
        """tiller's event loop (the server's main thread): CPU ms per generated token."""
        main = self.cpu.server_main_seconds
        if main is None or self.server != "tiller" or not self.completion_tokens:
            return None
        return main * 1e3 / self.completion_tokens

    @property
    def engine_busy(self) -> float | None:
        """The share of tiller's run its engine thread spent in steps and sampling: what the
        server delivers of what its engine computed in the same seconds, free of the drift
        between the run and the engine's separate timings (but not of anything that slowed
        the steps themselves)."""
        if not self.server_steps:
            return None
        return (self.server_step_seconds + self.server_sample_seconds) / self.seconds

    @property
    def client_ms_per_token(self) -> float | None:
        """The load generator (this process): CPU ms per generated token."""
        if not self.completion_tokens:
            return None
        return self.cpu.here * self.seconds * 1e3 / self.completion_tokens


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def make_row(server: str, rnd: int, load: LoadResult) -> Row:
    ok = [r for r in load.requests if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    tokens = sum(r.completion_tokens for r in ok)
    d = load.metrics_delta
    return Row(
        server=server, round=rnd, concurrency=load.concurrency, requests=len(ok),
        failed=len(load.requests) - len(ok), seconds=load.seconds, completion_tokens=tokens,
        agg_tok_s=tokens / load.seconds, ttft_p50=_pct(ttft, 50), ttft_p99=_pct(ttft, 99),
        itl_p50=_pct(itl, 50), itl_p99=_pct(itl, 99), chunks=sum(r.chunks for r in ok),
        cpu=load.cpu, server_steps=d.get("tiller_step_seconds_count", 0.0),
        server_step_seconds=d.get("tiller_step_seconds_sum", 0.0),
        server_sample_seconds=d.get("tiller_sampling_seconds_total", 0.0),
        errors=sorted({r.error for r in load.requests if not r.ok})[:3])


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1e3:.1f}"


def run_line(row: Row) -> str:
    """One run as it is measured."""
    cpu = row.cpu
    tail = (f"; tiller engine.step {row.server_step_seconds / row.seconds:.0%} + sampling "
            f"{row.server_sample_seconds / row.seconds:.0%} of the run, "
            f"{row.server_steps:.0f} steps" if row.server_steps else "")
    if row.loop_ms_per_token is not None:
        tail += f"; event loop {row.loop_ms_per_token:.3f} CPU ms/token"
    return (f"  round {row.round} N={row.concurrency:<3} {row.server:>12}: "
            f"{row.agg_tok_s:7.1f} tok/s  TTFT p50/p99 {_ms(row.ttft_p50)}/{_ms(row.ttft_p99)} ms"
            f"  ITL p50/p99 {_ms(row.itl_p50)}/{_ms(row.itl_p99)} ms  {row.requests} requests"
            + (f" +{row.failed} FAILED" if row.failed else "")
            + f"  cores: server {cpu.server if cpu.server is not None else float('nan'):.2f}, "
              f"others {cpu.others:.2f}" + ("*" if row.noisy else "") + tail
            + (f"; load generator {row.client_ms_per_token:.3f} CPU ms/token"
               if row.client_ms_per_token is not None else ""))


@dataclass
class Summary:
    """Medians over the rounds at one N."""

    concurrency: int
    tiller: dict[str, float | None]
    llama: dict[str, float | None] | None
    engine_tok_s: float | None  # decode + sampling, batch N (before and after together)
    engine_forward_tok_s: float | None  # decode alone
    engine_served_tok_s: float | None  # whole requests: prefill + decode + sampling
    sample_ms: float | None  # sampling per token
    noisy: bool
    failed: int = 0
    engine_fastest_tok_s: float | None = None  # decode + sampling, the faster timing

    @property
    def server_fastest(self) -> float | None:
        return (self.tiller["agg_tok_s"] / self.engine_fastest_tok_s
                if self.engine_fastest_tok_s else None)

    @property
    def ratio(self) -> float | None:
        return self.tiller["agg_tok_s"] / self.llama["agg_tok_s"] if self.llama else None

    @property
    def server_engine(self) -> float | None:
        return self.tiller["agg_tok_s"] / self.engine_tok_s if self.engine_tok_s else None

    @property
    def server_served(self) -> float | None:
        return (self.tiller["agg_tok_s"] / self.engine_served_tok_s
                if self.engine_served_tok_s else None)


METRICS = ("agg_tok_s", "ttft_p50", "itl_p50", "ttft_p99", "itl_p99", "loop_ms_per_token",
           "engine_busy")


def _medians(rows: list[Row]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in METRICS:
        values = [v for r in rows if (v := getattr(r, k)) is not None]
        out[k] = statistics.median(values) if values else None
    return out


def summarise(rows: list[Row], engines: dict[int, list[EngineResult]],
              fastest: dict[int, list[EngineResult]]) -> list[Summary]:
    out = []
    for n in sorted({r.concurrency for r in rows}, key=[r.concurrency for r in rows].index):
        mine = [r for r in rows if r.concurrency == n and r.server == "tiller"]
        peer = [r for r in rows if r.concurrency == n and r.server == "llama-server"]
        runs = engines.get(n, [])
        out.append(Summary(
            n, _medians(mine), _medians(peer) if peer else None,
            statistics.median(e.tok_s_with_sampling for e in runs) if runs else None,
            statistics.median(e.tok_s for e in runs) if runs else None,
            statistics.median(e.tok_s_served for e in runs) if runs else None,
            statistics.median(e.sample_seconds for e in runs) * 1e3 if runs else None,
            any(r.noisy for r in mine + peer), sum(r.failed for r in mine + peer),
            statistics.median(e.tok_s_with_sampling for e in fast) if (
                fast := fastest.get(n)) else None))
    return out


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_table(summaries: list[Summary]) -> list[str]:
    """The issue's table, plus tiller's engine (decode + sampling) and server / engine."""
    lines = ["| N | tiller tok/s | llama-server tok/s | ratio | TTFT p50 tiller / llama | "
             "ITL p50 tiller / llama | tiller engine tok/s (+sampling) | server / engine | "
             "engine tok/s, whole requests | server / that |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        t, ll = s.tiller, s.llama
        lines.append(
            f"| {s.concurrency}{'*' if s.noisy else ''} | {t['agg_tok_s']:.1f} | "
            f"{_f(ll['agg_tok_s']) if ll else '-'} | {_x(s.ratio)} | "
            f"{_ms(t['ttft_p50'])} / {_ms(ll['ttft_p50']) if ll else '-'} ms | "
            f"{_ms(t['itl_p50'])} / {_ms(ll['itl_p50']) if ll else '-'} ms | "
            f"{_f(s.engine_tok_s)} | {_x(s.server_engine)} | {_f(s.engine_served_tok_s)} | "
            f"{_x(s.server_served)} |")
    return lines


# -----------------------------------------------------------------------------------------------
# the run


def load_engine(model: Path, args: argparse.Namespace, prompt_len: int, token: int) -> Engine:
    """The engine as the server builds it, with one step run (compiles or loads the kernels)."""
    tokens = max(args.concurrency) * (prompt_len + args.max_tokens)
    engine = Engine.load(model, dtype=args.dtype, threads=args.threads,
                         max_tokens=max(256, tokens), kv_sequences=max(args.concurrency))
    seq = engine.new_sequence()
    engine.step([SeqRequest(seq, [token])])
    engine.release(seq)
    return engine


async def engine_while_idle(engine: Engine, thread: ThreadPoolExecutor, prompt: list[int],
                            batch: int, args: argparse.Namespace, params: SamplingParams
                            ) -> EngineResult:
    await asyncio.sleep(IDLE_PAUSE)  # let the servers' last steps and our clients settle
    meter = CpuMeter(None)
    result = await asyncio.get_running_loop().run_in_executor(
        thread, engine_decode, engine, prompt, batch, args.max_tokens, params)
    result.cpu = meter.stop()
    await asyncio.sleep(IDLE_PAUSE)
    return result


def new_session() -> aiohttp.ClientSession:
    """A client session that opens a connection per request. NOTE: llama-server (cpp-httplib)
    closes a keep-alive connection after 5 idle seconds or 5 requests, and a POST on a
    connection the server has just closed fails rather than being retried; a local connect
    costs well under a millisecond, the same for both servers."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=REQUEST_TIMEOUT)
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(
        limit=0, force_close=True))


async def warm_up(url: str, prompt: list[int]) -> None:
    results: list[RequestResult] = []
    requests = [completion({"prompt": prompt, "max_tokens": 4, "stream": True,
                            "stream_options": {"include_usage": True}}, results)]
    await asyncio.to_thread(run_clients, f"{url}/v1/completions", 1,
                            lambda: requests.pop() if requests else None,
                            read_timeout=REQUEST_TIMEOUT)
    warm = results[0]
    if not warm.ok:
        raise RuntimeError(f"{url}: warm-up request failed: {warm.error}")


async def run(args: argparse.Namespace, model: Path, tokenizer: Tokenizer, tmp: Path) -> dict:
    prompt = tokenizer.encode(PROMPT_TEXT, bos=True)[: args.prompt_tokens]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k or 0, min_p=args.min_p or 0.0)
    # NOTE: threads as in the server: the model is loaded and its first step run on one worker
    # thread, decode steps run on another. With numba's OpenMP layer this matters a lot: each
    # thread that starts parallel regions owns a libgomp team, and libgomp spin-waits at its
    # barriers unless it manages more threads than there are cores. With one team on 2 cores
    # (a step on the main thread) every barrier spins, and steps get 10x slower or worse as
    # soon as another process is busy; with two teams, as in the server, it throttles. (A
    # team lives as long as its thread: the loader is kept, like the server's executor.)
    loader = ThreadPoolExecutor(1, thread_name_prefix="load")
    thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
    servers: dict[str, Server] = {}
    urls: dict[str, str] = {}
    result: dict = {"prompt_tokens": len(prompt), "startup_seconds": {}, "exit_codes": {}}
    try:
        engine = None
        if args.engine:
            engine = loader.submit(load_engine, model, args, len(prompt), prompt[0]).result()
            if engine.config.vocab_size != tokenizer.vocab_size:
                raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces, the model "
                                 f"{engine.config.vocab_size}")
        if args.url is None:
            servers["tiller"] = tiller_server(model, args.tokenizer, parallel=args.parallel,
                                              threads=args.threads, dtype=args.dtype,
                                              log_path=tmp / "tiller.log")
            urls["tiller"] = servers["tiller"].url
        else:
            urls["tiller"] = args.url
        if args.peer:
            ctx = engine.config.max_seq_len if engine else args.peer_ctx
            servers["llama-server"] = llama_server(
                args.peer_binary, model, parallel=args.parallel, threads=args.threads,
                ctx_per_slot=ctx, log_path=tmp / "llama-server.log")
            urls["llama-server"] = servers["llama-server"].url
        async with new_session() as session:
            for name, server in servers.items():
                result["startup_seconds"][name] = await wait_ready(session, server,
                                                                   args.startup_timeout)
                print(f"{name} ready at {server.url} after "
                      f"{result['startup_seconds'][name]:.1f}s (log {server.log_path})",
                      flush=True)
            if "llama-server" in servers:
                result["peer_buffers"] = sorted(set(
                    servers["llama-server"].log_lines("model buffer size")))
                print("llama-server: " + "; ".join(result["peer_buffers"]), flush=True)
            for url in urls.values():
                await warm_up(url, prompt)
            print(f"prompt: {len(prompt)} tokens; max_tokens {args.max_tokens}, temperature "
                  f"{args.temperature}, top_p {args.top_p}, top_k {args.top_k}, "
                  f"min_p {args.min_p}; "
                  + (f"{args.requests} requests" if args.requests else f"{args.duration:g}s")
                  + f" per N and server; {args.rounds} rounds", flush=True)
            rows: list[Row] = []
            engines: dict[int, list[EngineResult]] = {}  # each round's two timings as one
            fastest: dict[int, list[EngineResult]] = {}  # each round's faster timing
            seed_base = args.seed
            for rnd in range(args.rounds):
                for n in args.concurrency:
                    # NOTE: the machine's speed drifts (it is shared): time the engine right
                    # before and right after tiller's run (the peer's comes after) and average
                    # the two (`bracketed`); the faster is kept too, for comparison
                    runs = []
                    if engine is not None:
                        runs.append(await engine_while_idle(engine, thread, prompt, n, args,
                                                            params))
                    for name, url in urls.items():
                        async with new_session() as phase:
                            load = await run_load(phase, url, n, prompt, args, seed_base,
                                                  servers.get(name), name == "tiller")
                        row = make_row(name, rnd, load)
                        rows.append(row)
                        print(run_line(row), flush=True)
                        if name == "tiller" and engine is not None:
                            runs.append(await engine_while_idle(engine, thread, prompt, n,
                                                                args, params))
                    seed_base += 100_000  # the next N and round: new seeds, same on both
                    if engine is not None:
                        both = bracketed(runs)
                        engines.setdefault(n, []).append(both)
                        fastest.setdefault(n, []).append(
                            max(runs, key=lambda r: r.tok_s_with_sampling))
                        print(f"  round {rnd} N={n:<3} tiller engine: "
                              + " / ".join(f"{r.tok_s_with_sampling:.1f}" for r in runs)
                              + f" tok/s before / after, {both.tok_s_with_sampling:.1f} together "
                              f"(decode {both.tok_s:.1f} tok/s, sampling "
                              f"{both.sample_seconds * 1e3:.2f} ms/token)", flush=True)
            result["rows"] = rows
            result["engines"] = engines
            result["fastest"] = fastest
            chat: list[ChatRow] = []
            if args.chat_histories:
                print(f"chat scenario: histories {args.chat_histories}, {args.chat_rounds} "
                      "rounds", flush=True)

                def count(text: str) -> int:  # as the chat route counts the rendered turns
                    return len(tokenizer.encode(text, bos=False, special=True))

                for name, url in urls.items():
                    chat += await chat_scenario(session, name, url, args.chat_histories,
                                                args.chat_rounds, count, args.temperature,
                                                args.top_p, args.seed)
            result["chat"] = chat
    finally:
        thread.shutdown()
        loader.shutdown()
        for name, server in servers.items():
            result["exit_codes"][name] = server.stop()
    return result


# -----------------------------------------------------------------------------------------------
# CLI


def _ints(text: str, what: str, p: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"--{what} must be comma-separated integers")
    if any(v < 1 for v in values):
        p.error(f"--{what} needs positive numbers")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--duration", type=float, default=20.0,
                   help="seconds of load per N and server (requests under way are finished)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per N and server instead of a duration")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the table shows medians")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--prompt-tokens", type=int, default=16,
                   help="prompt length: the first tokens of a fixed text (BOS included)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=None,
                   help="sent to both servers (default: not sent, so llama-server uses 40 and "
                   "tiller 0)")
    p.add_argument("--min-p", type=float, default=None,
                   help="sent to both servers (default: not sent, so llama-server uses 0.05 "
                   "and tiller 0)")
    p.add_argument("--seed", type=int, default=0, help="request i gets seed + i")
    p.add_argument("--model", type=Path, help="model file both servers load (default: a "
                   f"random-weight {DEFAULT_SHAPE}-shaped Q8_0 GGUF with a ChatML template, "
                   "written under --cache-dir)")
    p.add_argument("--tokenizer", type=Path,
                   help="tiller's tokenizer for a llama2.c --model (a GGUF carries its own)")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/tiller-bench"),
                   help="where the default model file is written once")
    p.add_argument("--url", help="a tiller server already running (instead of starting one)")
    p.add_argument("--parallel", type=int, default=16, help="slots of both servers")
    p.add_argument("--threads", type=int, default=2, help="threads of both servers and the "
                   "engine")
    p.add_argument("--dtype", choices=("q8_0", "f32"), default="q8_0")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also run llama-server (bench/peer.py's build; --no-peer: tiller only)")
    p.add_argument("--peer-ctx", type=int, default=1024,
                   help="llama-server's context per slot when --no-engine (else the model's)")
    p.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True,
                   help="time tiller's engine alone at each N (--no-engine: skip)")
    p.add_argument("--chat-histories", default="200,400,800",
                   help="history lengths (tokens) of the chat scenario; '' skips it")
    p.add_argument("--chat-rounds", type=int, default=6,
                   help="rounds of the chat scenario (medians): turn 2 recomputes 16 to 34 tokens"
                   " as the random model's answer re-tokenizes, so two rounds are noise")
    p.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT)
    p.add_argument("--json", nargs="?", const="bench_server.json", default=None, metavar="PATH",
                   help="also write the results as JSON (default path: bench_server.json)")
    args = p.parse_args(argv)
    args.concurrency = _ints(args.concurrency, "concurrency", p)
    args.chat_histories = _ints(args.chat_histories, "chat-histories", p)
    if not args.concurrency:
        p.error("--concurrency needs at least one client count")
    if args.duration <= 0 or (args.requests is not None and args.requests < 1):
        p.error("--duration and --requests must be positive")
    if args.max_tokens < 1 or args.prompt_tokens < 1 or args.rounds < 1 or args.chat_rounds < 1:
        p.error("--max-tokens, --prompt-tokens, --rounds and --chat-rounds must be at least 1")
    if args.parallel < max(args.concurrency):
        p.error(f"--parallel {args.parallel} is below the largest N {max(args.concurrency)}")
    for name in ("model", "tokenizer"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            p.error(f"--{name} {path}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model or default_model(args.cache_dir)
    tokenizer = load_tokenizer(model, args.tokenizer)
    peer_commit = None
    if args.peer:
        try:
            args.peer_binary, peer_commit = peer_server_binary()
        except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:
            sys.exit(f"llama-server is missing and could not be built ({e}); build it with "
                     "'python bench/peer.py' (TILLER_PEER_DIR), or run with --no-peer")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in flags.splitlines()
                if line.startswith("model name")), "unknown CPU")
    isa = ", ".join(f for f in ("avx512_vnni", "amx_int8") if f in flags) or "no VNNI/AMX"
    print(f"CPU: {cpu}, {os.cpu_count()} cores ({isa}; "
          f"{'AMX' if 'amx_int8' in flags else 'no AMX'}); threads {args.threads}, "
          f"slots {args.parallel}; model {model}")
    if peer_commit:
        print(f"peer: llama.cpp {peer_commit} ({args.peer_binary})")
    with tempfile.TemporaryDirectory(prefix="bench_server-") as tmp_name:
        result = asyncio.run(run(args, model, tokenizer, Path(tmp_name)))
    summaries = summarise(result["rows"], result["engines"], result["fastest"])
    print()
    print(f"medians of {args.rounds} rounds; llama-server = llama.cpp {peer_commit}"
          if peer_commit else f"medians of {args.rounds} rounds; tiller only")
    for line in format_table(summaries):
        print(line)
    print("tok/s: completion tokens (usage) / wall time, N clients back to back; TTFT: request "
          "sent to first text chunk; ITL: gaps between a request's text chunks; engine: "
          "tiller's Engine.step at batch N in this process, decode + sampling (same "
          "temperature and top_p), servers idle, timed right before and right after tiller's "
          "run and the two averaged per token; whole requests: each batch's prompts "
          "prefilled too, as the server must; * other processes used more than "
          f"{NOISY} of a core during a run: compare with care.")
    for s in summaries:
        parts = []
        if s.engine_forward_tok_s is not None:
            parts.append(f"engine decode alone {s.engine_forward_tok_s:.1f} tok/s, sampling "
                         f"{s.sample_ms:.2f} ms per token, whole requests "
                         f"{s.engine_served_tok_s:.1f} tok/s")
        if s.server_fastest is not None:
            parts.append(f"against the faster of the two timings {s.engine_fastest_tok_s:.1f} "
                         f"tok/s, server / engine {s.server_fastest:.2f}x")
        if s.tiller["engine_busy"] is not None:
            parts.append(f"in tiller's runs its engine thread spent {s.tiller['engine_busy']:.0%}"
                         " of the time in steps and sampling")
        if s.tiller["loop_ms_per_token"] is not None:
            parts.append(f"tiller's event loop {s.tiller['loop_ms_per_token']:.3f} CPU ms per "
                         "token (its main thread's CPU time / tokens)")
        if parts:
            print(f"  N={s.concurrency}: " + "; ".join(parts))
    if result["chat"]:
        print()
        print(f"chat scenario (one client; TTFT to the first content; {args.chat_rounds} "
              "rounds, medians; 't2 computed', 'one-line computed': the prompt tokens each "
              "computed, timings.prompt_n)")
        for line in format_chat(result["chat"]):
            print(line)
    print(f"servers stopped with SIGTERM: exit codes {result['exit_codes']}")
    if args.json:
        out = {
            "cpu": cpu, "isa": isa, "cores": os.cpu_count(), "threads": args.threads,
            "parallel": args.parallel, "model": str(model), "peer_commit": peer_commit,
            "peer_buffers": result.get("peer_buffers"), "dtype": args.dtype,
            "prompt_tokens": result["prompt_tokens"], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "min_p": args.min_p, "rounds": args.rounds,
            "duration": args.duration, "requests": args.requests,
            "startup_seconds": result["startup_seconds"], "exit_codes": result["exit_codes"],
            "table": [asdict(s) | {"ratio": s.ratio, "server_engine": s.server_engine,
                                   "server_served": s.server_served,
                                   "server_fastest": s.server_fastest}
                      for s in summaries],
            "runs": [asdict(r) for r in result["rows"]],
            "chat": [asdict(c) | {"ratio": c.ratio} for c in result["chat"]],
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(s.failed == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
