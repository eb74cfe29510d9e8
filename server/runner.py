"""The engine loop: one thread that batches every running request into each engine step.

The event loop never runs the model. Handlers `submit` a GenerationRequest and read events
from its asyncio queue; this thread plans a step with the Scheduler, runs Engine.step (numba,
GIL released), samples every sequence of the step in one compiled call (`sample_batch`: each
row with its own Sampler's parameters and seed), and posts the step's events back with one
`loop.call_soon_threadsafe`, after offering each to its handle's `direct` hook, if it has one
(a plain stream whose tokens are written to the client's socket on this thread). Text
(detokenizing, stop strings) is the handler's business, or its hook's: when it sees a stop
string it calls `finish`, and a handler whose client went away calls `cancel`; either way the
sequence's KV blocks are released before the next step.

A request can fail only itself: a step that raises is run again in halves to find the request
at fault, and a sequence whose sampling fails ends alone (`_run_chunks`); its handler gets the
error in its Finished event and its KV blocks are released like any other's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..engine.engine import Engine, Readout, SeqRequest, SeqResult, Sequence, SteeringTerm
from ..engine.kvcache import KV_BLOCK, blocks_for
from ..engine.sampling import Sampler, SamplingParams, logprobs, sample_batch, top_logprobs
from .constraints import Constraint, MaskBatch
from .scheduler import Chunk, FinishReason, Plan, QueueFull, Request, Scheduler

log = logging.getLogger(__name__)

__all__ = ["Captured", "FinishReason", "Finished", "GenerationRequest", "Handle",
           "PromptReadings", "QueueFull", "Runner", "TokenEvent"]


@dataclass
class GenerationRequest:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: none; n >= 0: the sampled token's and the top n
    post_sampling_probs: bool = False  # with logprobs: probabilities after the sampler chain
    prompt_logprobs: bool = False  # logprobs of the prompt tokens too (echo with logprobs)
    steering: tuple[SteeringTerm, ...] = ()  # given to the sequence once, when it is created
    capture_layers: tuple[int, ...] = ()  # blocks whose residual points the prompt reports
    capture_final: bool = False  # the prompt's stream after the final norm
    constraint: Constraint | None = None  # structured output: the tokens allowed at each step
    readouts: tuple[Readout, ...] = ()  # per token, inside the step (engine/interventions.py)
    readout_prompt: bool = False  # the prompt tokens' readouts too (PromptReadings)
    # hidden states: blocks captured at every step, reported for "prompt", "generated", "all"
    hidden_blocks: tuple[int, ...] = ()
    hidden_positions: Literal["prompt", "generated", "all"] = "generated"
    cache_prompt: bool = True  # llama.cpp's: reuse cached KV blocks of the prompt's prefix
    follow: bool = False  # one of n choices of the prompt the previous leader computes

    @property
    def reuses_prompt(self) -> bool:
        """Whether cached KV blocks may stand in for the prompt: not when the request reads
        the prompt's own per-position outputs, which only computing it gives."""
        return self.cache_prompt and not (
            self.prompt_logprobs or self.capture_layers or self.capture_final
            or self.readout_prompt or (self.hidden_blocks and self.hidden_positions != "generated"))


@dataclass
class Captured:
    """Hidden states of one prompt chunk: `states` (len(CAPTURE_POINTS), len(capture_layers),
    n, dim) and, with capture_final, `final` (n, dim)."""

    states: np.ndarray | None
    final: np.ndarray | None = None


@dataclass
class TokenEvent:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    prob: float | None = None  # post_sampling_probs: probabilities of the draw's distribution
    top_probs: list[tuple[int, float]] | None = None
    # read from the state the token was drawn from (the position before it):
    readouts: np.ndarray | None = None  # (n_readouts, 2): projection, cosine
    hidden: np.ndarray | None = None  # (len(CAPTURE_POINTS), len(hidden_blocks), dim)
    gates: np.ndarray | None = None  # (n_conditions, 2): token conditions' cosine, fired


@dataclass
class PromptReadings:
    """Readouts (n, n_readouts, 2) and hidden states (points, blocks, n, dim) of the prompt
    tokens of one chunk, as asked (readout_prompt, hidden_positions)."""

    readouts: np.ndarray | None
    hidden: np.ndarray | None


@dataclass
class PromptLogprobs:
    """Logprob of each prompt token given the ones before it (None for the first)."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float
    generate_seconds: float
    seed: int
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    # prompt conditions (CAST): (steering entry, cosine of the mean prompt stream, fired)
    decisions: list[tuple[int, float, bool]] = field(default_factory=list)


@dataclass(eq=False)
class Handle:
    id: str
    queue: asyncio.Queue
    seed: int
    # prompt tokens reused from the prefix cache: set on the engine thread before the request's
    # first event is posted, so a handler that has read an event sees it
    cached: int = 0
    # NOTE: called on the engine thread with each of the request's step events before they are
    # posted: it returns None for an event it has dealt with there (a token written straight
    # to its client: generation.Generation.stream_directly), else the event to queue
    direct: Callable[[object], object | None] | None = None
    posted: int = 0  # events posted to `queue` so far (counted on the engine thread)


@dataclass(eq=False)
class _Job:
    """What the engine thread keeps per request (the Scheduler's Request.payload)."""

    gen: GenerationRequest
    sampler: Sampler
    handle: Handle
    sequence: Sequence | None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    prompt_lp: list[float | None] = field(default_factory=list)
    prompt_top: list = field(default_factory=list)
    error: str | None = None


@dataclass(eq=False)
class _Row:
    """One chunk of a step between the engine and the sampler: its events so far and, if it
    samples, its logits (raw, for logprobs) and the ones it samples from (masked)."""

    chunk: Chunk
    result: SeqResult
    events: list[object]
    logits: np.ndarray | None = None  # (vocab,)
    masked: np.ndarray | None = None  # (vocab,); None: the chunk samples nothing
    hidden: np.ndarray | None = None  # hidden states captured at every step (hidden_blocks)


def _batch(arrays: list[np.ndarray]) -> np.ndarray:
    """Rows of logits as one (rows, vocab) float32 array: a view when they are consecutive rows
    of one array -- the engine's logits when nothing masked them, the usual case -- else a
    copy (16 rows of 32,000 cost 0.2 ms to stack)."""
    base = arrays[0].base
    if (isinstance(base, np.ndarray) and base.ndim == 2 and base.dtype == np.float32
            and base.flags.c_contiguous):
        origin = base.__array_interface__["data"][0]
        stride = base.strides[0]
        first, rem = divmod(arrays[0].__array_interface__["data"][0] - origin, stride)
        if rem == 0 and first >= 0 and first + len(arrays) <= base.shape[0] and all(
                a.base is base and a.shape == base.shape[1:]
                and a.__array_interface__["data"][0] == origin + (first + i) * stride
                for i, a in enumerate(arrays)):
            return base[first:first + len(arrays)]
    return np.stack(arrays).astype(np.float32, copy=False)


def _deliver(events: list[tuple[Handle, object]]) -> None:
    """On the event loop: each event to its handle's queue, in the order the step made them."""
    for handle, event in events:
        handle.queue.put_nowait(event)


@dataclass
class StepStats:
    """Token totals and the latest step's latency for /metrics, read at scrape time without a
    lock (ints and floats are atomic); step latency and batch size histograms are observed
    through `Runner.on_step`."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    last_step_seconds: float = 0.0
    sampling_seconds: float = 0.0  # in sample_batch, all steps


class Runner:
    def __init__(self, engine: Engine, *, max_running: int, token_budget: int | None = None,
                 max_waiting: int = 64) -> None:
        self.engine = engine
        budget = min(token_budget or engine.max_tokens, engine.max_tokens)
        self.scheduler = Scheduler(max_running=max_running, token_budget=budget,
                                   max_waiting=max_waiting, kv_capacity=engine.cache.n_blocks,
                                   kv_cost=blocks_for, prefix=self._prefix)
        self.stats = StepStats()
        self.masks = MaskBatch()
        self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="tiller-masks")
        self.on_step: Callable[[float, int], None] | None = None  # (seconds, batch size)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # lifecycle -------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="tiller-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything and join the engine thread."""
        with self._lock:
            self._stopping = True
            for request in [*self.scheduler.running, *self.scheduler.waiting]:
                self.scheduler.cancel(request.id)
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._mask_pool.shutdown(wait=False)

    # called from the event loop ------------------------------------------------------------

    def context_limit(self) -> int:
        """The longest sequence (prompt + generated tokens) one request may have."""
        return min(self.engine.config.max_seq_len, self.engine.cache.n_blocks * KV_BLOCK)

    def submit(self, gen: GenerationRequest, after: Handle | None = None) -> Handle:
        """Queue a request; raises QueueFull (503) or ValueError (400: EngineError for its
        steering) before anything runs. `after`: a request with the same prompt whose prefill
        this one waits for, to reuse its KV blocks (n choices)."""
        if self._loop is None or self._stopping:
            raise QueueFull("the server is not accepting requests")
        sampler = Sampler(gen.params, gen.prompt)
        # validates and folds the steering
        sequence = self.engine.new_sequence(gen.steering, gen.readouts, len(gen.prompt))
        request_id = f"req-{next(self._ids)}"
        handle = Handle(request_id, asyncio.Queue(), sampler.seed)
        job = _Job(gen, sampler, handle, sequence)
        request = Request(request_id, list(gen.prompt), gen.max_tokens, gen.stop_ids, job)
        with self._lock:
            if after is not None and gen.reuses_prompt and self.engine.prefix_cache:
                request.after = self.scheduler.get(after.id)  # None if it has ended
            self.scheduler.add(request)
            self._wake.notify()
        return handle

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self.scheduler.cancel(request_id)
            self._wake.notify()

    def finish(self, request_id: str) -> None:
        """The handler saw a stop string: end the request as stopped."""
        with self._lock:
            self.scheduler.finish(request_id, FinishReason.STOP)
            self._wake.notify()

    def snapshot(self) -> dict:
        """Queue and slot state for /slots, /health and /metrics."""
        cache = self.engine.cache
        shared = cache.shared_blocks  # NOTE: a scan of the pool: outside the engine's lock
        with self._lock:
            s = self.scheduler
            return {
                "running": [(r.id, len(r.prompt), len(r.output), r.computed) for r in s.running],
                "waiting": len(s.waiting),
                "max_running": s.max_running,
                "kv_blocks_used": cache.used_blocks,
                "kv_blocks_total": cache.n_blocks,
                "kv_blocks_reserved": s.kv_reserved,
                "kv_blocks_cached": cache.cached_blocks,
                "kv_blocks_shared": shared,
            }

    # the engine thread -----------------------------------------------------------------------

    def _post(self, handle: Handle, event: object) -> None:
        assert self._loop is not None
        handle.posted += 1
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(handle.queue.put_nowait, event)

    def _post_all(self, events: list[tuple[Handle, object]]) -> None:
        """Post a step's events in one callback: one wake-up of the event loop per step, not
        one per token. (`_direct` has counted them.)"""
        assert self._loop is not None
        if events:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                self._loop.call_soon_threadsafe(_deliver, events)

    @staticmethod
    def _direct(outbox: list[tuple[Handle, object]], failed: dict[str, str]
                ) -> list[tuple[Handle, object]]:
        """A step's events after the handles that take theirs on this thread (Handle.direct)
        have had them: what is left to post, counted as posted at once (a hook must see an
        event of its own it passed on as posted). A hook that raises fails its request alone."""
        left: list[tuple[Handle, object]] = []
        for handle, event in outbox:
            take = handle.direct
            if take is not None:
                try:
                    event = take(event)
                except Exception as e:
                    log.exception("streaming %s failed", handle.id)
                    handle.direct = None
                    failed[handle.id] = f"streaming this request failed: {e}"
                    continue
                if event is None:
                    continue
            handle.posted += 1
            left.append((handle, event))
        return left

    def _run(self) -> None:
        while True:
            with self._lock:
                plan = self.scheduler.schedule()
                while not plan.chunks and not plan.finished and not self._stopping:
                    self._wake.wait()
                    plan = self.scheduler.schedule()
                stopping = self._stopping and not plan.chunks
            self._release(plan)
            if stopping:
                return
            if plan.chunks:
                try:
                    self._step(plan)
                except Exception as e:  # a bug must not take the server down with it
                    log.exception("engine step failed")
                    self._fail(plan, e)

    def _release(self, plan: Plan) -> None:
        for request in plan.finished:
            job: _Job = request.payload
            decisions = []
            if job.sequence is not None:
                si = job.sequence.interventions
                if si is not None:
                    decisions = [(si.conditions[k].label, cos, fired)
                                 for k, (cos, fired) in sorted(si.decisions.items())]
                self.engine.release(job.sequence)
                job.sequence = None
            now = time.perf_counter()
            first = job.t_first or now
            assert request.finish_reason is not None  # set when the request ended
            self._post(job.handle, Finished(
                reason=request.finish_reason, prompt_tokens=len(request.prompt),
                completion_tokens=len(request.output), prompt_seconds=first - job.t_submit,
                generate_seconds=now - first, seed=job.sampler.seed, error=job.error,
                cached_tokens=request.cached or 0, decisions=decisions))

    def _prefix(self, request: Request) -> int:
        """The scheduler's lookup, on this thread: attach the cached blocks of the prompt."""
        job: _Job = request.payload
        if job.sequence is None or not job.gen.reuses_prompt:
            return 0
        job.handle.cached = self.engine.attach_prefix(job.sequence, request.prompt)
        return job.handle.cached

    def _step(self, plan: Plan) -> None:
        sampled: dict[str, int] = {}
        failed: dict[str, str] = {}  # request id -> what went wrong, for its handler
        outbox: list[tuple[Handle, object]] = []
        elapsed = self._run_chunks(plan.chunks, sampled, failed, outbox)
        self._post_all(self._direct(outbox, failed))
        s = self.stats
        s.last_step_seconds = elapsed
        s.prompt_tokens += sum(len(c.tokens) for c in plan.chunks
                               if c.request.prefilling and c.request.id not in failed)
        s.generated_tokens += len(sampled)
        if self.on_step is not None:
            self.on_step(elapsed, len(plan.chunks))
        with self._lock:
            for request_id, error in failed.items():  # ended before update, which skips them
                request = self.scheduler.get(request_id)
                if request is not None:  # not stopped or cancelled meanwhile
                    request.payload.error = error
                    self.scheduler.finish(request_id, FinishReason.ERROR)
            self.scheduler.update(plan, sampled)

    def _run_chunks(self, chunks: list[Chunk], sampled: dict[str, int],
                    failed: dict[str, str], outbox: list[tuple[Handle, object]]) -> float:
        """Run chunks as one engine step, sample every sequence that samples in one call, and
        put each chunk's events in `outbox`; returns the seconds spent in the engine.

        One request must never fail another. If the step raises, its two halves are run again
        as steps of their own, down to single chunks, and only a chunk that fails alone fails
        its request: a failed step changes no sequence (Engine.step's docstring says why), so
        running the same chunks again is safe and gives the same bits (batch invariance). If
        sampling one sequence fails (NaN or +inf logits, say), that request alone fails.
        """
        batch = [self._seq_request(chunk) for chunk in chunks]
        # NOTE: the masks depend only on the tokens sampled so far, so they are computed while
        # the forward step runs (both release the GIL)
        constrained = [c for c in chunks if c.sample and c.request.payload.gen.constraint]
        masks = self._mask_pool.submit(self._masks, constrained) if constrained else None
        start = time.perf_counter()
        try:
            results = self.engine.step(batch)
        except Exception as e:
            if masks is not None:
                masks.result()  # a matcher is never used from two threads at once
            elapsed = time.perf_counter() - start
            if len(chunks) == 1:
                log.exception("engine step failed for %s", chunks[0].request.id)
                failed[chunks[0].request.id] = f"the engine step failed for this request: {e}"
                return elapsed
            log.warning("engine step of %d sequences failed (%s): running it again in halves "
                        "to find the request at fault", len(chunks), e)
            results = None
        if results is None:  # outside the except: the halves' errors are their own
            half = len(chunks) // 2
            return (elapsed + self._run_chunks(chunks[:half], sampled, failed, outbox)
                    + self._run_chunks(chunks[half:], sampled, failed, outbox))
        elapsed = time.perf_counter() - start
        allowed = {} if masks is None else masks.result()
        rows: list[_Row] = []
        for chunk, result in zip(chunks, results, strict=True):
            try:
                row = self._take(chunk, result, allowed.get(chunk.request.id))
            except Exception as e:
                log.exception("sampling failed for %s", chunk.request.id)
                failed[chunk.request.id] = f"sampling this request failed: {e}"
                continue
            if row.masked is None:
                outbox.extend((chunk.request.payload.handle, event) for event in row.events)
            else:
                rows.append(row)
        if rows:
            self._sample(rows, sampled, failed, outbox)
        return elapsed

    def _sample(self, rows: list[_Row], sampled: dict[str, int], failed: dict[str, str],
                outbox: list[tuple[Handle, object]]) -> None:
        """Sample every row of the step in one compiled call, then finish each row's events.
        A row that fails (NaN or +inf logits, nothing allowed, a grammar refusing the token)
        fails its request alone, and none of its events are posted."""
        start = time.perf_counter()
        logits = _batch([row.masked for row in rows])  # type: ignore[misc]
        # NOTE: a parallel launch costs more than it saves for a single row
        tokens, errors = sample_batch([row.chunk.request.payload.sampler for row in rows],
                                      logits, threads=min(self.engine.threads, len(rows)))
        self.stats.sampling_seconds += time.perf_counter() - start
        for row, token, error in zip(rows, tokens.tolist(), errors, strict=True):
            request_id = row.chunk.request.id
            try:
                if error is not None:
                    raise ValueError(error)
                row.events.append(self._token_event(row, token))
            except Exception as e:
                log.error("sampling failed for %s: %s", request_id, e)
                failed[request_id] = f"sampling this request failed: {e}"
                continue
            sampled[request_id] = token
            handle = row.chunk.request.payload.handle
            outbox.extend((handle, event) for event in row.events)

    def _masks(self, constrained: list[Chunk]) -> dict[str, np.ndarray]:
        """Allowed tokens of each constrained sequence that samples in this step, by request
        id (its matcher is where its sampled tokens left it). A matcher in an error state
        allows nothing, and sampling that request fails alone."""
        allowed = self.masks.compute([c.request.payload.gen.constraint for c in constrained])
        return {c.request.id: row for c, row in zip(constrained, allowed, strict=True)}

    def _seq_request(self, chunk: Chunk) -> SeqRequest:
        job: _Job = chunk.request.payload
        assert job.sequence is not None  # released only when the request has finished
        prefilling = chunk.request.prefilling
        mode: Literal["last", "all", "none"] = (
            "all" if job.gen.prompt_logprobs and prefilling else
            ("last" if chunk.sample else "none"))
        layers = job.gen.capture_layers if prefilling else ()
        where = job.gen.hidden_positions
        if job.gen.hidden_blocks and ((prefilling and where != "generated")
                                      or (chunk.sample and where != "prompt")):
            layers = job.gen.hidden_blocks  # never with capture_layers (collect_states)
        return SeqRequest(job.sequence, chunk.tokens, logits=mode, capture_layers=layers,
                          capture_final=job.gen.capture_final and prefilling)

    def _take(self, chunk: Chunk, result: SeqResult, allowed: np.ndarray | None = None
              ) -> _Row:
        """A chunk's results before sampling: its captures and prompt logprobs as events, and,
        if it samples, the logits to sample from (masked to the tokens `allowed` if the request
        is constrained)."""
        request = chunk.request
        job: _Job = request.payload
        row = _Row(chunk, result, [])
        logits = result.logits
        gen = job.gen
        if gen.hidden_blocks:
            row.hidden = result.captures
        elif result.captures is not None or result.final is not None:
            row.events.append(Captured(result.captures, result.final))
        if request.prefilling:
            readings = self._prompt_readings(gen, result, row.hidden)
            if readings is not None:
                row.events.append(readings)
        if job.gen.prompt_logprobs and request.prefilling:
            assert logits is not None  # asked for "all"
            done = self._prompt_logprobs(job, request, chunk, logits)
            if done is not None:
                row.events.append(done)
            logits = logits[-1]
        if chunk.sample:
            assert logits is not None  # a sampled chunk asks for logits
            constraint = job.gen.constraint
            # NOTE: the mask only moves logits to -inf, and the sampler draws one uniform per
            # token as always: a seed gives the same tokens, constrained or not, run after run
            row.logits = logits
            row.masked = logits if constraint is None or allowed is None \
                else constraint.apply(logits, allowed)
        return row

    @staticmethod
    def _token_event(row: _Row, token: int) -> TokenEvent:
        """The sampled token's event (its readouts, hidden states and logprobs, as asked); the
        token goes to the request's grammar and penalty context."""
        job: _Job = row.chunk.request.payload
        gen = job.gen
        result = row.result
        if gen.constraint is not None:
            gen.constraint.consume(token)
        sampled = TokenEvent(token)
        if result.readouts is not None:
            sampled.readouts = result.readouts[-1]
        if result.gates is not None:
            sampled.gates = result.gates[-1]
        if row.hidden is not None and gen.hidden_positions != "prompt":
            sampled.hidden = row.hidden[:, :, -1]
        if gen.logprobs is not None and gen.post_sampling_probs:
            assert row.masked is not None
            # before accept(): the penalties must be the ones this draw saw
            sampled.prob, sampled.top_probs = job.sampler.probs(row.masked, token, gen.logprobs)
        job.sampler.accept(token)
        if gen.logprobs is not None and not gen.post_sampling_probs:
            assert row.logits is not None
            sampled.logprob = float(logprobs(row.logits)[token])
            sampled.top = top_logprobs(row.logits, gen.logprobs) if gen.logprobs else []
        if job.t_first is None:
            job.t_first = time.perf_counter()
        return sampled

    @staticmethod
    def _prompt_readings(gen: GenerationRequest, result: SeqResult, hidden: np.ndarray | None
                         ) -> PromptReadings | None:
        """A prompt chunk's readouts and hidden states, when the request asks for them."""
        readouts = result.readouts if gen.readout_prompt else None
        if gen.hidden_positions == "generated":
            hidden = None
        if readouts is None and hidden is None:
            return None
        return PromptReadings(readouts, hidden)

    def _prompt_logprobs(self, job: _Job, request: Request, chunk: Chunk, logits: np.ndarray
                         ) -> PromptLogprobs | None:
        """Logits at prompt position i score prompt token i + 1; the whole prompt's logprobs
        once its last chunk has run."""
        start = request.computed
        if start == 0:
            job.prompt_lp.append(None)
            job.prompt_top.append(None)
        for i in range(len(chunk.tokens)):
            nxt = start + i + 1
            if nxt >= len(request.prompt):
                break
            lp = logprobs(logits[i])
            job.prompt_lp.append(float(lp[request.prompt[nxt]]))
            n = job.gen.logprobs or 0
            job.prompt_top.append(top_logprobs(logits[i], n) if n else [])
        if start + len(chunk.tokens) >= len(request.prompt):
            return PromptLogprobs(job.prompt_lp, job.prompt_top)
        return None

    def _fail(self, plan: Plan, error: Exception) -> None:
        """End the step's requests with the error; _release tells their handlers. The last
        resort, for a failure outside any one request's part of the step (a bug)."""
        with self._lock:
            for chunk in plan.chunks:
                chunk.request.payload.error = f"engine step failed: {error}"
                self.scheduler.finish(chunk.request.id, FinishReason.ERROR)
