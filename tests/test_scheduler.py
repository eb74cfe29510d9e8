"""The scheduler as a pure state machine, fed fake model outputs: no model, no numba, no HTTP.

A small fake model loop (`Loop`) plays the runner: schedule(), "sample" a deterministic token
for every chunk with sample=True (a function of the request id and the position sampled), then
update(). Every plan is checked against the invariants in `check_plan` on the way.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from tiller.server.scheduler import (
    Chunk,
    FinishReason,
    Plan,
    QueueFull,
    Request,
    Scheduler,
    Status,
)

VOCAB = 1000


def fake_token(request_id: str, pos: int) -> int:
    """The token the fake model samples for `request_id` at sequence position `pos`."""
    return (sum(map(ord, request_id)) * 31 + pos * 17 + 3) % VOCAB


def fake_output(request_id: str, n_prompt: int, n: int) -> list[int]:
    """The first n tokens the fake model generates after a prompt of n_prompt tokens."""
    return [fake_token(request_id, n_prompt + k) for k in range(n)]


def blocks(n_tokens: int) -> int:
    """A block-granular KV cost: 4 positions per block."""
    return -(-n_tokens // 4)


def make_scheduler(**overrides: Any) -> Scheduler:
    kw: dict[str, Any] = dict(max_running=4, token_budget=16, max_waiting=8, kv_capacity=10_000,
                              kv_cost=lambda n: n)
    kw.update(overrides)
    return Scheduler(**kw)


def req(request_id: str, n_prompt: int = 4, max_tokens: int = 8,
        stop_ids: frozenset[int] = frozenset()) -> Request:
    """A request whose prompt tokens are distinct and recognisable: id-specific offsets."""
    base = 10_000 + 1000 * (sum(map(ord, request_id)) % 50)
    return Request(request_id, [base + i for i in range(n_prompt)], max_tokens, stop_ids)


def is_decode(chunk: Chunk) -> bool:
    # NOTE: judged before update(): a decode chunk starts at or after the end of the prompt.
    return chunk.request.computed >= len(chunk.request.prompt)


def check_plan(s: Scheduler, plan: Plan) -> None:
    """Invariants of a freshly scheduled plan and of the scheduler state behind it."""
    assert plan.n_tokens <= s.token_budget
    ids = [c.request.id for c in plan.chunks]
    assert len(ids) == len(set(ids)), "a request twice in one plan"
    assert len(s.running) <= s.max_running
    assert s.kv_reserved == sum(s.kv_cost(r.total_len) for r in s.running)
    assert s.kv_reserved <= s.kv_capacity
    # admission is FIFO and stops only for a reason: no free slot or no room for the head
    if s.waiting:
        head = s.waiting[0]
        assert (len(s.running) == s.max_running
                or s.kv_reserved + s.kv_cost(head.total_len) > s.kv_capacity)
    assert len(s.waiting) <= s.max_waiting
    for r in s.waiting:
        assert r.status == Status.WAITING and r.computed == 0 and not r.output
    for r in s.running:
        assert r.status == Status.RUNNING
        if r.prefilling:
            assert not r.output
        else:  # the last sampled token is not in the cache yet: it is the next decode input
            assert r.output and r.computed == len(r.prompt) + len(r.output) - 1
            assert len(r.output) < r.max_tokens
    for r in plan.finished:
        assert r.status == Status.FINISHED and r.finish_reason is not None
        assert r not in s.running and r not in s.waiting and s.get(r.id) is not r

    # decode chunks first, one token each, fed the previously sampled token
    seen_prompt_chunk = False
    for c in plan.chunks:
        r = c.request
        assert r.status == Status.RUNNING and r in s.running
        assert c.tokens, "an empty chunk"
        if is_decode(c):
            assert not seen_prompt_chunk, "a decode chunk after a prompt chunk"
            assert c.tokens == [r.output[-1]] and c.sample
        else:
            seen_prompt_chunk = True
            end = r.computed + len(c.tokens)
            assert c.tokens == r.prompt[r.computed:end]
            assert c.sample == (end == len(r.prompt) and r.max_tokens > 0)
    # NOTE: this holds for any budget, even below max_running: a request starts decoding only
    # through its last prompt chunk, which needs budget left over after the decodes.
    decoding = [r for r in s.running if not r.prefilling]
    assert {id(r) for r in decoding} == {id(c.request) for c in plan.chunks if is_decode(c)}
    # the budget is not wasted while a prompt still has tokens to run
    if plan.n_tokens < s.token_budget:
        for c in plan.chunks:
            if not is_decode(c):
                assert c.request.computed + len(c.tokens) == len(c.request.prompt)
        planned = {id(c.request) for c in plan.chunks}
        # followers wait for their leader's prefill whatever the budget
        assert all(id(r) in planned or s._follows(r) for r in s.running)


class Loop:
    """The fake model loop: schedule, sample fake tokens, update; records what it saw."""

    def __init__(self, s: Scheduler) -> None:
        self.s = s
        self.plans: list[Plan] = []
        self.finished: list[Request] = []  # every Plan.finished, in order
        self.done: list[Request] = []  # every update() result, in order
        self.admitted: list[Request] = []  # in the order they started running

    def step(self, during: Callable[[Plan], None] | None = None) -> Plan:
        """One step; `during(plan)` runs between schedule() and update(), as a client would."""
        plan = self.s.schedule()
        check_plan(self.s, plan)
        self.admitted.extend(r for r in self.s.running if r not in self.admitted)
        self.plans.append(plan)
        self.finished.extend(plan.finished)
        sampled = {c.request.id: fake_token(c.request.id,
                                            len(c.request.prompt) + len(c.request.output))
                   for c in plan.chunks if c.sample}
        if during is not None:
            during(plan)
        self.done.extend(self.s.update(plan, sampled))
        return plan

    def run(self, max_steps: int = 1000) -> int:
        """Step until the scheduler is idle; returns the number of steps."""
        for n in range(max_steps):
            if self.s.idle:
                return n
            self.step()
        raise AssertionError("the scheduler did not drain")


def layout(plan: Plan) -> list[tuple[str, int, bool]]:
    """(id, n_tokens, sample) per chunk."""
    return [(c.request.id, len(c.tokens), c.sample) for c in plan.chunks]


# ---------------------------------------------------------------------------------------------
# the step: decodes first, chunked prefill within the budget

def test_decodes_are_never_starved_by_a_long_prompt():
    s = make_scheduler(max_running=4, token_budget=8)
    loop = Loop(s)
    for name in "abc":
        s.add(req(name, n_prompt=2, max_tokens=100))
    assert layout(loop.step()) == [("a", 2, True), ("b", 2, True), ("c", 2, True)]
    long = req("long", n_prompt=100, max_tokens=3)
    s.add(long)
    for k in range(20):
        plan = loop.step()
        last = k == 19
        assert layout(plan) == [("a", 1, True), ("b", 1, True), ("c", 1, True),
                                ("long", 5, last)]
        assert plan.chunks[3].tokens == long.prompt[5 * k:5 * k + 5]
    assert long.computed == 100 and len(long.output) == 1
    assert [len(r.output) for r in s.running] == [21, 21, 21, 1]
    assert layout(loop.step()) == [("a", 1, True), ("b", 1, True), ("c", 1, True),
                                   ("long", 1, True)]


def test_prompts_are_split_by_the_remaining_budget_in_arrival_order():
    s = make_scheduler(token_budget=8)
    loop = Loop(s)
    s.add(req("a", n_prompt=5, max_tokens=4))
    s.add(req("b", n_prompt=10, max_tokens=4))
    s.add(req("c", n_prompt=20, max_tokens=1))
    assert layout(loop.step()) == [("a", 5, True), ("b", 3, False)]
    assert layout(loop.step()) == [("a", 1, True), ("b", 7, True)]
    assert layout(loop.step()) == [("a", 1, True), ("b", 1, True), ("c", 6, False)]
    assert layout(loop.step()) == [("a", 1, True), ("b", 1, True), ("c", 6, False)]
    # a finished with its 4th token; c's prompt takes everything the decodes leave
    assert layout(loop.step()) == [("b", 1, True), ("c", 7, False)]
    assert layout(loop.step()) == [("c", 1, True)]
    assert [(r.id, r.finish_reason) for r in loop.done] == [
        ("a", FinishReason.LENGTH), ("b", FinishReason.LENGTH), ("c", FinishReason.LENGTH)]


def test_a_budget_of_one_still_makes_progress():
    s = make_scheduler(max_running=1, token_budget=1)
    loop = Loop(s)
    r = req("a", n_prompt=3, max_tokens=2)
    s.add(r)
    assert loop.run() == 3 + 1 + 1  # three prompt tokens, one decode, one step to hand it back
    assert r.output == fake_output("a", 3, 2)
    assert [layout(p) for p in loop.plans[:4]] == [
        [("a", 1, False)], [("a", 1, False)], [("a", 1, True)], [("a", 1, True)]]


def test_a_budget_below_max_running_holds_prompts_behind_decodes():
    s = make_scheduler(max_running=2, token_budget=1)
    loop = Loop(s)
    s.add(req("a", n_prompt=2, max_tokens=3))
    s.add(req("b", n_prompt=2, max_tokens=1))
    loop.run()
    assert [layout(p) for p in loop.plans[:7]] == [
        [("a", 1, False)], [("a", 1, True)], [("a", 1, True)], [("a", 1, True)],
        [("b", 1, False)], [("b", 1, True)], []]


def test_chunks_replay_the_prompt_then_each_sampled_token():
    s = make_scheduler(token_budget=3)
    loop = Loop(s)
    r = req("a", n_prompt=7, max_tokens=5)
    s.add(r)
    loop.run()
    fed = [t for p in loop.plans for c in p.chunks for t in c.tokens]
    assert r.output == fake_output("a", 7, 5)
    assert fed == r.prompt + r.output[:-1]  # the last sampled token is never run
    assert [c.sample for p in loop.plans for c in p.chunks] == [False, False, True] + [True] * 4
    assert r.computed == len(r.prompt) + len(r.output) - 1
    assert r.status == Status.FINISHED and r.finish_reason == FinishReason.LENGTH


def test_every_decoding_request_gets_one_token_per_step():
    s = make_scheduler(max_running=3, token_budget=3)
    loop = Loop(s)
    rs = [req(n, n_prompt=1, max_tokens=m) for n, m in (("a", 3), ("b", 6), ("c", 9))]
    for r in rs:
        s.add(r)
    loop.run()
    counts = [Counter(c.request.id for c in p.chunks) for p in loop.plans]
    assert all(set(c.values()) <= {1} for c in counts)
    assert [sorted(c) for c in counts[:9]] == (
        [["a", "b", "c"]] * 3 + [["b", "c"]] * 3 + [["c"]] * 3)
    assert [len(r.output) for r in rs] == [3, 6, 9]


# ---------------------------------------------------------------------------------------------
# finishing

def test_stop_id_finishes_with_the_stop_token_in_the_output():
    stop = fake_token("a", 4 + 2)  # the third generated token
    s = make_scheduler()
    loop = Loop(s)
    r = req("a", n_prompt=4, max_tokens=10, stop_ids=frozenset({stop}))
    s.add(r)
    loop.step()
    loop.step()
    assert loop.done == []
    loop.step()
    assert loop.done == [r]
    assert r.status == Status.FINISHED and r.finish_reason == FinishReason.STOP
    assert r.output == fake_output("a", 4, 3) and r.output[-1] == stop
    assert s.kv_reserved == 0 and s.get("a") is None and not s.running
    assert loop.step().finished == [r]
    assert s.idle


def test_stop_on_the_first_token_and_stop_beats_length():
    s = make_scheduler()
    loop = Loop(s)
    first = req("a", n_prompt=3, max_tokens=10, stop_ids=frozenset({fake_token("a", 3)}))
    both = req("b", n_prompt=3, max_tokens=2, stop_ids=frozenset({fake_token("b", 4)}))
    s.add(first)
    s.add(both)
    loop.run()
    assert first.finish_reason == FinishReason.STOP and first.output == fake_output("a", 3, 1)
    assert both.finish_reason == FinishReason.STOP and both.output == fake_output("b", 3, 2)


def test_max_tokens_finishes_with_length():
    s = make_scheduler()
    loop = Loop(s)
    r = req("a", n_prompt=4, max_tokens=5, stop_ids=frozenset({-1}))
    s.add(r)
    assert loop.run() == 6
    assert r.finish_reason == FinishReason.LENGTH and r.output == fake_output("a", 4, 5)
    assert loop.done == [r] and loop.finished == [r]


def test_max_tokens_zero_finishes_after_prefill_without_sampling():
    s = make_scheduler(token_budget=8)
    loop = Loop(s)
    r = req("a", n_prompt=20, max_tokens=0)
    s.add(r)
    assert s.kv_reserved == 0  # not admitted until schedule()
    assert layout(loop.step()) == [("a", 8, False)]
    assert s.kv_reserved == 20
    assert layout(loop.step()) == [("a", 8, False)]
    assert loop.done == []
    assert layout(loop.step()) == [("a", 4, False)]
    assert loop.done == [r] and r.finish_reason == FinishReason.LENGTH
    assert r.output == [] and r.computed == 20 and s.kv_reserved == 0
    plan = loop.step()
    assert plan.chunks == [] and plan.finished == [r]
    assert s.idle


def test_cancel_while_waiting():
    s = make_scheduler(max_running=1)
    loop = Loop(s)
    a, b, c = req("a", max_tokens=3), req("b"), req("c", max_tokens=2)
    for r in (a, b, c):
        s.add(r)
    loop.step()
    assert list(s.waiting) == [b, c]
    s.cancel("b")
    assert b.status == Status.FINISHED and b.finish_reason == FinishReason.CANCELLED
    assert list(s.waiting) == [c] and s.get("b") is None
    assert loop.step().finished == [b]
    loop.run()
    assert all(ch.request is not b for p in loop.plans for ch in p.chunks)
    assert b.output == [] and b.computed == 0
    assert loop.finished == [b, a, c]
    assert loop.done == [a, c]  # update() reports only what it finished itself


def test_cancel_while_running_between_steps_releases_kv_at_once():
    s = make_scheduler(kv_cost=blocks)
    loop = Loop(s)
    a, b = req("a", n_prompt=6, max_tokens=10), req("b", n_prompt=6, max_tokens=10)
    s.add(a)
    s.add(b)
    loop.step()
    loop.step()
    assert s.kv_reserved == 2 * blocks(16)
    s.cancel("a")
    assert s.kv_reserved == blocks(16) and s.running == [b]
    plan = loop.step()
    assert plan.finished == [a] and layout(plan) == [("b", 1, True)]
    assert a.finish_reason == FinishReason.CANCELLED and len(a.output) == 2


def test_cancel_during_a_step_ignores_the_requests_chunks():
    s = make_scheduler(token_budget=8)
    loop = Loop(s)
    a, b, c = req("a", n_prompt=3), req("b", n_prompt=3), req("c", n_prompt=30)
    for r in (a, b, c):
        s.add(r)
    loop.step()
    before = {r.id: (r.computed, list(r.output)) for r in (a, b, c)}

    def cancel_a_and_c(plan: Plan) -> None:
        assert {ch.request.id for ch in plan.chunks} == {"a", "b", "c"}
        s.cancel("a")  # decoding: its sampled token must be dropped
        s.cancel("c")  # prefilling: its chunk must not count as computed

    loop.step(cancel_a_and_c)
    assert (a.computed, a.output) == before["a"] and (c.computed, c.output) == before["c"]
    assert b.computed == before["b"][0] + 1 and len(b.output) == 2
    assert loop.done == [] and s.running == [b]
    assert a.finish_reason == c.finish_reason == FinishReason.CANCELLED
    plan = loop.step()
    assert plan.finished == [a, c] and layout(plan) == [("b", 1, True)]


def test_cancel_during_the_step_that_would_have_finished_it():
    s = make_scheduler()
    loop = Loop(s)
    r = req("a", n_prompt=2, max_tokens=1)
    s.add(r)
    loop.step(lambda plan: s.cancel("a"))
    assert r.finish_reason == FinishReason.CANCELLED and r.output == [] and loop.done == []
    assert loop.step().finished == [r]


def test_finish_for_a_stop_string_while_running_and_during_a_step():
    s = make_scheduler()
    loop = Loop(s)
    a, b = req("a", max_tokens=20), req("b", max_tokens=20)
    s.add(a)
    s.add(b)
    loop.step()
    loop.step()
    s.finish("a", FinishReason.STOP)
    loop.step(lambda plan: s.finish("b", FinishReason.STOP))
    assert a.finish_reason == b.finish_reason == FinishReason.STOP
    assert len(a.output) == 2 and len(b.output) == 2  # b's token of the last step is dropped
    assert loop.step().finished == [b]
    assert loop.finished == [a, b] and s.idle


def test_unknown_and_already_finished_ids_are_ignored():
    s = make_scheduler()
    loop = Loop(s)
    r = req("a", max_tokens=1)
    s.add(r)
    s.cancel("nope")
    s.finish("nope", FinishReason.STOP)
    loop.step()
    assert r.finish_reason == FinishReason.LENGTH
    s.cancel("a")  # ended by update(), not yet handed back
    s.finish("a", FinishReason.ERROR)
    assert loop.step().finished == [r]
    s.cancel("a")
    assert r.finish_reason == FinishReason.LENGTH
    assert loop.step().finished == [] and s.idle
    assert loop.finished == [r]


def test_finished_requests_are_handed_back_exactly_once():
    s = make_scheduler(max_running=2, token_budget=4)
    loop = Loop(s)
    rs = [req(f"r{i}", n_prompt=1 + i, max_tokens=i % 4) for i in range(8)]
    for r in rs:
        s.add(r)
    s.cancel("r5")
    loop.run()
    for _ in range(3):
        assert loop.step().finished == []
    assert sorted(r.id for r in loop.finished) == sorted(r.id for r in rs)
    assert len(loop.finished) == len(rs)
    assert {r.id for r in loop.done} == {r.id for r in rs} - {"r5"}


# ---------------------------------------------------------------------------------------------
# admission

def test_admission_is_fifo_within_max_running():
    s = make_scheduler(max_running=2)
    loop = Loop(s)
    rs = [req(n, n_prompt=2, max_tokens=m) for n, m in (("a", 2), ("b", 5), ("c", 2), ("d", 1))]
    for r in rs:
        s.add(r)
    assert s.running == [] and list(s.waiting) == rs  # admission happens in schedule()
    plan = loop.step()
    assert [ch.request.id for ch in plan.chunks] == ["a", "b"] and list(s.waiting) == rs[2:]
    loop.step()  # a finishes (2 tokens)
    plan = loop.step()
    assert s.running == [rs[1], rs[2]] and layout(plan) == [("b", 1, True), ("c", 2, True)]
    loop.run()
    assert loop.admitted == rs


def test_kv_reservation_blocks_the_queue_without_overtaking():
    s = make_scheduler(max_running=8, kv_capacity=100, kv_cost=lambda n: n)
    loop = Loop(s)
    big = req("big", n_prompt=40, max_tokens=20)  # 60
    mid = req("mid", n_prompt=30, max_tokens=20)  # 50: does not fit beside big
    small = req("small", n_prompt=5, max_tokens=5)  # 10: would fit, but must not overtake
    for r in (big, mid, small):
        s.add(r)
    loop.step()
    assert s.running == [big] and list(s.waiting) == [mid, small] and s.kv_reserved == 60
    for _ in range(5):
        loop.step()
        assert list(s.waiting) == [mid, small]
    s.cancel("big")
    assert s.kv_reserved == 0
    loop.step()
    assert s.running == [mid, small] and s.kv_reserved == 60
    loop.run()
    assert s.kv_reserved == 0


def test_kv_reservation_released_on_every_kind_of_finish():
    s = make_scheduler(kv_capacity=4 * blocks(12), kv_cost=blocks)
    loop = Loop(s)
    stop = fake_token("stop", 8)
    rs = [req("len", 8, 4), req("stop", 8, 4, frozenset({stop})), req("cancel", 8, 4),
          req("fin", 8, 4), req("zero", 12, 0), req("next", 8, 4)]
    for r in rs:
        s.add(r)
    loop.step()  # "stop" ended on its first token: its blocks are free at once
    assert s.kv_reserved == 3 * blocks(12) and list(s.waiting) == rs[4:]
    s.cancel("cancel")
    s.finish("fin", FinishReason.STOP)
    loop.run()
    assert [r.finish_reason for r in rs] == [
        FinishReason.LENGTH, FinishReason.STOP, FinishReason.CANCELLED, FinishReason.STOP,
        FinishReason.LENGTH, FinishReason.LENGTH]
    assert s.kv_reserved == 0


def test_a_request_larger_than_the_whole_cache_is_rejected():
    s = make_scheduler(kv_capacity=10, kv_cost=blocks)
    s.add(req("fits", n_prompt=30, max_tokens=10))  # 40 tokens: exactly 10 blocks
    with pytest.raises(ValueError, match="more KV cache than exists"):
        s.add(req("huge", n_prompt=30, max_tokens=11))
    assert s.get("huge") is None and [r.id for r in s.waiting] == ["fits"]
    assert not s.fits(req("x", n_prompt=41, max_tokens=0))


def test_queue_full_when_the_waiting_queue_is_at_its_bound():
    s = make_scheduler(max_running=1, max_waiting=2)
    loop = Loop(s)
    s.add(req("a", max_tokens=50))
    loop.step()
    s.add(req("b"))
    s.add(req("c"))
    with pytest.raises(QueueFull):
        s.add(req("d"))
    assert s.get("d") is None and [r.id for r in s.waiting] == ["b", "c"]
    s.cancel("c")
    s.add(req("d"))  # room again
    assert [r.id for r in s.waiting] == ["b", "d"]


def test_no_queue_full_when_the_request_can_start_at_once():
    s = make_scheduler(max_running=1, max_waiting=0)
    loop = Loop(s)
    s.add(req("a", max_tokens=2))  # a free slot: no queue needed
    loop.step()
    with pytest.raises(QueueFull):
        s.add(req("b"))  # the only slot is busy and nothing may wait
    loop.run()
    s.add(req("b"))


def test_no_queue_full_for_requests_added_together_into_free_slots():
    # Several requests arriving during one engine step are all added before the next schedule():
    # those that the next admission will start are not waiting for the purpose of max_waiting.
    s = make_scheduler(max_running=3, max_waiting=0)
    loop = Loop(s)
    for name in "abc":
        s.add(req(name))
    with pytest.raises(QueueFull):
        s.add(req("d"))
    loop.step()
    assert [r.id for r in s.running] == ["a", "b", "c"]

    s = make_scheduler(max_running=2, max_waiting=1)
    for name in "abc":
        s.add(req(name))
    with pytest.raises(QueueFull):
        s.add(req("d"))
    s.schedule()
    assert len(s.running) == 2 and len(s.waiting) == 1


def test_queue_full_when_the_cache_is_taken_and_nothing_may_wait():
    s = make_scheduler(max_running=4, max_waiting=0, kv_capacity=20)
    loop = Loop(s)
    s.add(req("a", n_prompt=8, max_tokens=8))
    loop.step()
    with pytest.raises(QueueFull):
        s.add(req("b", n_prompt=4, max_tokens=2))  # a free slot, but not enough cache
    s.add(req("c", n_prompt=2, max_tokens=2))  # fits beside a


def test_duplicate_ids_and_bad_requests_are_value_errors():
    s = make_scheduler(max_running=1)
    loop = Loop(s)
    s.add(req("a", max_tokens=1))
    s.add(req("b", max_tokens=3))
    with pytest.raises(ValueError, match="already scheduled"):
        s.add(req("b"))  # waiting
    loop.step()
    loop.step()
    assert s.get("b") is not None and s.get("b").status == Status.RUNNING
    with pytest.raises(ValueError, match="already scheduled"):
        s.add(req("b"))  # running
    with pytest.raises(ValueError, match="prompt"):
        s.add(Request("e", [], 4))
    with pytest.raises(ValueError, match="max_tokens"):
        s.add(Request("n", [1], -1))
    loop.run()
    s.add(req("a"))  # an id may be reused once its request has ended


@pytest.mark.parametrize("kw", [dict(max_running=0), dict(token_budget=0), dict(max_waiting=-1)])
def test_bad_scheduler_settings(kw: dict[str, int]):
    with pytest.raises(ValueError):
        make_scheduler(**kw)


# ---------------------------------------------------------------------------------------------
# randomized traffic: a reference model of who should finish how, checked every step

@pytest.mark.parametrize("seed", range(8))
def test_random_traffic(seed: int):
    rng = random.Random(seed)
    # a budget below max_running is allowed: prompts then wait for decodes to finish
    starved = seed % 4 == 0
    max_running = rng.randint(2 if starved else 1, 4)
    budget = rng.randint(1, max_running - 1) if starved else rng.randint(max_running, 12)
    s = Scheduler(max_running=max_running, token_budget=budget,
                  max_waiting=rng.randint(0, 5), kv_capacity=rng.randint(6, 30), kv_cost=blocks)
    loop = Loop(s)
    added: dict[str, Request] = {}
    arrival: list[str] = []
    ended: set[str] = set()  # the reference model's view: cancelled/finished/expected to end
    expected: dict[str, FinishReason] = {}
    natural: dict[str, tuple[FinishReason, list[int]]] = {}  # end if nobody intervenes
    next_id = 0

    def intervene(_plan: Plan | None = None) -> None:
        for _ in range(rng.choice([0, 0, 0, 1])):
            live = [i for i in added if i not in ended]
            target = rng.choice([*live, "ghost", *arrival[-3:]]) if live else "ghost"
            reason = rng.choice([FinishReason.CANCELLED, FinishReason.STOP])
            if reason == FinishReason.CANCELLED:
                s.cancel(target)
            else:
                s.finish(target, reason)
            if target in added and target not in ended:
                ended.add(target)
                expected[target] = reason

    for step in range(400):
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2]) if step < 300 else 0):
            rid = f"r{next_id}"
            next_id += 1
            n_prompt, max_tokens = rng.randint(1, 25), rng.choice([0, 1, 2, 5, rng.randint(0, 15)])
            stop_ids: frozenset[int] = frozenset()
            if rng.random() < 0.5:
                stop_ids = frozenset({fake_token(rid, n_prompt + rng.randrange(12))})
            r = req(rid, n_prompt, max_tokens, stop_ids)
            n_waiting = len(s.waiting)
            everyone_fits = (len(s.running) + n_waiting < s.max_running
                             and s.kv_reserved + sum(blocks(w.total_len) for w in s.waiting)
                             + blocks(r.total_len) <= s.kv_capacity)
            try:
                s.add(r)
            except QueueFull:
                assert n_waiting >= s.max_waiting and not everyone_fits
                continue
            except ValueError:
                assert blocks(r.total_len) > s.kv_capacity
                continue
            assert blocks(r.total_len) <= s.kv_capacity
            added[rid] = r
            arrival.append(rid)
            out = fake_output(rid, n_prompt, max_tokens)
            hit = [k for k, t in enumerate(out) if t in stop_ids]
            natural[rid] = ((FinishReason.STOP, out[:hit[0] + 1]) if hit
                            else (FinishReason.LENGTH, out))
        intervene()
        loop.done.clear()
        loop.step(intervene)
        for r in loop.done:
            assert r.id not in ended, f"{r.id} ended twice"
            ended.add(r.id)
            expected[r.id] = natural[r.id][0]
            assert (r.finish_reason, r.output) == natural[r.id]
        for r in s.running:  # whoever runs is still on the path to its natural end
            assert r.output == natural[r.id][1][:len(r.output)]

    loop.run()
    assert s.idle and s.kv_reserved == 0 and ended == set(added)
    counts = Counter(r.id for r in loop.finished)
    assert counts == Counter(list(added)), "every request is handed back exactly once"
    for rid, r in added.items():
        assert r.status == Status.FINISHED and r.finish_reason == expected[rid]
    admitted = [r.id for r in loop.admitted]
    assert admitted == sorted(admitted, key=arrival.index), "admission overtook the queue"
    assert len(added) > 50 and len({r.finish_reason for r in loop.finished}) >= 3


# ---------------------------------------------------------------------------------------------
# the prefix cache: a lookup at the first chunk, followers after their leader's prefill

class FakePrefixCache:
    """Prompt tokens 'cached' in blocks of 4 once a request has prefilled them (the runner's
    callback attaches engine blocks the same way: whole blocks, never the last prompt token)."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []
        self.asked: list[str] = []

    def __call__(self, request: Request) -> int:
        self.asked.append(request.id)
        best = 0
        for p in self.prompts:
            n = 0
            while n < min(len(p), len(request.prompt)) and p[n] == request.prompt[n]:
                n += 1
            best = max(best, n)
        return min(best, len(request.prompt) - 1) // 4 * 4

    def update(self, s: Scheduler, plan: Plan) -> None:
        for c in plan.chunks:
            r = c.request
            if r.status == Status.RUNNING and not r.prefilling and r.prompt not in self.prompts:
                self.prompts.append(r.prompt)


def run_with_cache(s: Scheduler, cache: FakePrefixCache) -> list[list[tuple[str, int, bool]]]:
    """Run to the end; per plan, (request id, tokens, prompt chunk) of each chunk."""
    loop = Loop(s)
    seen = []
    while not s.idle:
        plan = s.schedule()
        check_plan(s, plan)
        seen.append([(c.request.id, len(c.tokens), not is_decode(c)) for c in plan.chunks])
        sampled = {c.request.id: fake_token(c.request.id,
                                            len(c.request.prompt) + len(c.request.output))
                   for c in plan.chunks if c.sample}
        loop.done.extend(s.update(plan, sampled))
        cache.update(s, plan)
    return seen


def computed_prompt(seen: list[list[tuple[str, int, bool]]]) -> Counter:
    out: Counter = Counter()
    for plan in seen:
        for rid, n, prompt in plan:
            if prompt:
                out[rid] += n
    return out


def test_the_lookup_advances_a_request_at_its_first_chunk_only():
    cache = FakePrefixCache()
    s = make_scheduler(max_running=1, token_budget=8, prefix=cache)
    first, again = req("a", n_prompt=22, max_tokens=2), req("a2", n_prompt=22, max_tokens=2)
    again.prompt = list(first.prompt)
    s.add(first)
    s.add(again)
    seen = run_with_cache(s, cache)
    assert cache.asked == ["a", "a2"]  # once each, when it got its first chunk
    assert first.cached == 0 and again.cached == 20
    assert computed_prompt(seen) == {"a": 22, "a2": 2}
    assert first.output == fake_output("a", 22, 2) and again.output == fake_output("a2", 22, 2)


def test_followers_wait_for_their_leader_then_compute_only_the_tail():
    cache = FakePrefixCache()
    s = make_scheduler(max_running=4, token_budget=16, prefix=cache)
    leader = req("L", n_prompt=41, max_tokens=3)
    followers = [req(f"F{i}", n_prompt=41, max_tokens=3) for i in range(3)]
    s.add(leader)
    for f in followers:
        f.prompt = list(leader.prompt)
        f.after = leader
        s.add(f)
    seen = run_with_cache(s, cache)
    assert computed_prompt(seen) == {"L": 41, "F0": 1, "F1": 1, "F2": 1}
    assert [f.cached for f in followers] == [40, 40, 40]
    # no follower chunk while the leader was prefilling (its 41 tokens take 3 steps)
    assert [[rid for rid, _, _ in plan] for plan in seen[:3]] == [["L"]] * 3
    assert all(f.output == fake_output(f.id, 41, 3) for f in followers)


def test_a_follower_whose_leader_ended_goes_on_alone():
    cache = FakePrefixCache()
    s = make_scheduler(max_running=2, token_budget=8, prefix=cache)
    leader, follower = req("L", n_prompt=30), req("F", n_prompt=30)
    follower.prompt, follower.after = list(leader.prompt), leader
    s.add(leader)
    s.add(follower)
    assert [c.request.id for c in s.schedule().chunks] == ["L"]
    s.cancel("L")
    plan = s.schedule()
    assert [c.request.id for c in plan.chunks] == ["F"] and follower.cached == 0


def test_a_lookup_must_leave_a_prompt_token_to_compute():
    s = make_scheduler(prefix=lambda r: len(r.prompt))
    s.add(req("a", n_prompt=8))
    with pytest.raises(ValueError, match="at least one"):
        s.schedule()
