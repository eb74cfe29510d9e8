"""Continuous batching as a pure state machine: no HTTP, no numba, no model.

As in vLLM there is no prefill or decode phase: each request has tokens it needs computed
(its prompt, then one sampled token at a time), and each step serves a token budget across all
running requests -- one decode token each first, so streams never stall, then chunks of
prompts that are still prefilling (chunked prefill). Waiting requests are admitted in arrival
order when a slot is free and the KV cache can hold their whole length (prompt + max_tokens):
reserving up front means a running request never runs out of cache, so nothing is ever
preempted.

The caller drives it: `add` / `cancel` / `finish`, then `schedule()` to get a Plan, run it on
the model, and `update(plan, sampled)` with the tokens sampled for the plan's entries.

Prefix cache: the caller's `prefix(request)` is asked, when a request's first chunk is planned,
how many prompt tokens it already holds (cached KV blocks), and the request starts past them.
A request may follow a leader (`after`, the n choices of one prompt): it gets no chunk while
the leader is still prefilling, so its lookup finds the leader's blocks and the prompt is
computed once. Reservations stay at total_len per request: shared blocks are counted once per
request that uses them, which only over-reserves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Status(IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class FinishReason(IntEnum):
    STOP = 0  # an end-of-sequence token or a stop string
    LENGTH = 1  # max_tokens, or the end of the context
    CANCELLED = 2  # the client went away or asked to stop
    ERROR = 3


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its bound."""


@dataclass(eq=False)
class Request:
    """One sequence to generate. `payload` is the caller's (sampler, engine sequence, ...)."""

    id: str
    prompt: list[int]
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    payload: Any = None
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    computed: int = 0  # tokens (prompt, then output) already in the KV cache
    finish_reason: FinishReason | None = None
    after: Request | None = None  # a leader whose prefill this request waits for
    cached: int | None = None  # prompt tokens reused from the prefix cache, once looked up

    @property
    def total_len(self) -> int:
        return len(self.prompt) + self.max_tokens

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


@dataclass
class Chunk:
    """Tokens of one request to run this step; `sample` when its last token's logits are used."""

    request: Request
    tokens: list[int]
    sample: bool


@dataclass
class Plan:
    chunks: list[Chunk]
    finished: list[Request]  # requests that ended since the last plan: free their resources

    @property
    def n_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


class Scheduler:
    def __init__(self, *, max_running: int, token_budget: int, max_waiting: int,
                 kv_capacity: int, kv_cost: Callable[[int], int],
                 prefix: Callable[[Request], int] | None = None) -> None:
        """kv_capacity: cache units (blocks) in all; kv_cost(n_tokens): units n tokens need.
        prefix(request): prompt tokens already computed for it (fewer than its prompt)."""
        if max_running <= 0 or token_budget <= 0 or max_waiting < 0:
            raise ValueError("max_running and token_budget must be positive, max_waiting >= 0")
        self.max_running = max_running
        self.token_budget = token_budget
        self.max_waiting = max_waiting
        self.kv_capacity = kv_capacity
        self.kv_cost = kv_cost
        self.prefix = prefix
        self.kv_reserved = 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ended: list[Request] = []
        self._by_id: dict[str, Request] = {}

    # requests in and out ---------------------------------------------------------------------

    def fits(self, request: Request) -> bool:
        """Whether the request could ever run (alone, with the whole cache to itself)."""
        return self.kv_cost(request.total_len) <= self.kv_capacity

    def add(self, request: Request) -> None:
        if request.id in self._by_id:
            raise ValueError(f"request id {request.id!r} is already scheduled")
        if not request.prompt or request.max_tokens < 0:
            raise ValueError("a request needs a prompt and max_tokens >= 0")
        if not self.fits(request):
            raise ValueError(f"request {request.id!r} needs more KV cache than exists")
        if self._left_waiting([*self.waiting, request]) > self.max_waiting:
            raise QueueFull(f"{len(self.running)} running and {len(self.waiting)} waiting")
        self.waiting.append(request)
        self._by_id[request.id] = request

    def _left_waiting(self, queue: list[Request]) -> int:
        """How many of `queue` would still wait after admitting now, in order, as `_admit` does.

        NOTE: requests added since the last schedule() sit in `waiting` until it admits them;
        those that will start then are not queued for the purpose of max_waiting.
        """
        free_slots = self.max_running - len(self.running)
        reserved = self.kv_reserved
        for i, request in enumerate(queue):
            cost = self.kv_cost(request.total_len)
            if i >= free_slots or reserved + cost > self.kv_capacity:
                return len(queue) - i
            reserved += cost
        return 0

    def cancel(self, request_id: str) -> None:
        self.finish(request_id, FinishReason.CANCELLED)

    def finish(self, request_id: str, reason: FinishReason) -> None:
        """End a request now (stop string found, client gone); unknown or ended ids are ignored."""
        request = self._by_id.get(request_id)
        if request is not None:
            self._end(request, reason)

    def _end(self, request: Request, reason: FinishReason) -> None:
        if request.status == Status.RUNNING:
            self.running.remove(request)
            self.kv_reserved -= self.kv_cost(request.total_len)
        elif request.status == Status.WAITING:
            self.waiting.remove(request)
        else:
            return
        request.status = Status.FINISHED
        request.finish_reason = reason
        del self._by_id[request.id]
        self._ended.append(request)

    # the step --------------------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            request = self.waiting[0]
            cost = self.kv_cost(request.total_len)
            if self.kv_reserved + cost > self.kv_capacity:
                break  # first come, first served: no overtaking by smaller requests
            self.waiting.popleft()
            self.kv_reserved += cost
            request.status = Status.RUNNING
            self.running.append(request)

    def schedule(self) -> Plan:
        """What to run next: decode tokens first, then prompt chunks within the token budget."""
        for request in list(self.running):
            if request.max_tokens == 0 and not request.prefilling:
                self._end(request, FinishReason.LENGTH)
        self._admit()
        budget = self.token_budget
        chunks: list[Chunk] = []
        for request in self.running:
            if not request.prefilling and budget > 0:
                chunks.append(Chunk(request, [request.output[-1]], sample=True))
                budget -= 1
        for request in self.running:
            if request.prefilling and budget > 0 and not self._follows(request):
                if request.cached is None:
                    self._look_up(request)
                n = min(budget, len(request.prompt) - request.computed)
                end = request.computed + n
                chunks.append(Chunk(request, request.prompt[request.computed:end],
                                    sample=end == len(request.prompt) and request.max_tokens > 0))
                budget -= n
        finished, self._ended = self._ended, []
        return Plan(chunks, finished)

    @staticmethod
    def _follows(request: Request) -> bool:
        """Whether the request waits for its leader's prefill (a leader that ended, or has
        computed its prompt, holds nobody back)."""
        leader = request.after
        return leader is not None and leader.status == Status.RUNNING and leader.prefilling

    def _look_up(self, request: Request) -> None:
        request.cached = self.prefix(request) if self.prefix is not None else 0
        if not 0 <= request.cached < len(request.prompt):
            raise ValueError(f"prefix({request.id!r}) = {request.cached}: must leave at least "
                             f"one of the {len(request.prompt)} prompt tokens to compute")
        request.computed = request.cached

    def update(self, plan: Plan, sampled: dict[str, int]) -> list[Request]:
        """Record a step's results: sampled[request id] for chunks with sample=True.

        Returns the requests that finished in this update (by a stop id or their length).
        Chunks of requests ended meanwhile (cancelled during the step) are ignored.
        """
        done = []
        for chunk in plan.chunks:
            request = chunk.request
            if request.status != Status.RUNNING:
                continue
            request.computed += len(chunk.tokens)
            if not chunk.sample:
                if request.max_tokens == 0 and not request.prefilling:
                    self._end(request, FinishReason.LENGTH)
                    done.append(request)
                continue
            token = sampled[request.id]
            request.output.append(token)
            if token in request.stop_ids:
                self._end(request, FinishReason.STOP)
            elif len(request.output) >= request.max_tokens:
                self._end(request, FinishReason.LENGTH)
            else:
                continue
            done.append(request)
        return done

    # introspection -------------------------------------------------------------------------

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and not self._ended
