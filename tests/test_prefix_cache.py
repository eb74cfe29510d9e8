"""The prefix cache: KV blocks shared by content key (engine/kvcache.py, engine/prefix.py).

The reference for every output is an engine without the cache computing the whole prompt:
because the engine is batch-invariant, reusing blocks must give the same bits, steered or not.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tiller.engine import engine as engine_module
from tiller.engine.engine import Condition, Engine, SeqRequest, Sequence, SteeringTerm
from tiller.engine.kvcache import KV_BLOCK, CacheFull, KVCache
from tiller.engine.loader import load_checkpoint

DIM = 64  # stories260K's width
N_NEW = 12


def unit(seed: int, *shape: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(shape or (DIM,)).astype(np.float32)
    return v


def prompt_of(seed: int, n: int) -> list[int]:
    return [1, *np.random.default_rng(seed).integers(3, 512, n - 1).tolist()]


@pytest.fixture(scope="module", params=["f32", "bf16"])
def checkpoint(request, shared_models: Path):
    """stories260K (heads of 8: a float32 KV cache), and its weights read as 2 heads of 32
    with one KV head, a width the default bfloat16 cache takes (row copies then go by pairs of
    positions: engine/kvcache.py)."""
    checkpoint = load_checkpoint(shared_models / "stories260K.bin")
    if request.param == "bf16":
        checkpoint = replace(checkpoint, config=replace(checkpoint.config, n_heads=2,
                                                        n_kv_heads=1))
    return checkpoint


@pytest.fixture
def cached(checkpoint) -> Engine:
    """A fresh cache per test, so that what a lookup can find is what the test ran."""
    engine = Engine.from_checkpoint(checkpoint, max_tokens=64, kv_sequences=4)
    assert engine.cache.type_v == ("bf16" if checkpoint.config.head_dim == 32 else "f32")
    return engine


@pytest.fixture(scope="module")
def plain(checkpoint) -> Engine:
    """The reference: no block is ever reused."""
    return Engine.from_checkpoint(checkpoint, max_tokens=64, kv_sequences=4, prefix_cache=False)


class Run:
    """One sequence through prefill (chunks of `chunk`) and N_NEW greedy tokens."""

    def __init__(self, engine: Engine, prompt: list[int], steering=(), attach: bool = True,
                 chunk: int = 64) -> None:
        self.engine, self.prompt, self.chunk = engine, prompt, chunk
        self.seq: Sequence = engine.new_sequence(steering, prompt_len=len(prompt))
        self.reused = engine.attach_prefix(self.seq, prompt) if attach else 0
        self.done = self.reused
        self.tokens: list[int] = []
        self.logits: list[np.ndarray] = []

    def request(self) -> SeqRequest | None:
        if self.done < len(self.prompt):
            part = self.prompt[self.done:self.done + self.chunk]
            last = self.done + len(part) == len(self.prompt)
            return SeqRequest(self.seq, part, logits="last" if last else "none")
        if len(self.tokens) < N_NEW:
            return SeqRequest(self.seq, [self.tokens[-1]])
        return None

    def take(self, request: SeqRequest, result) -> None:
        self.done += len(request.tokens)
        if result.logits is not None:
            self.logits.append(result.logits.copy())
            self.tokens.append(int(np.argmax(result.logits)))


def run_batch(engine: Engine, runs: list[Run], release: bool = True) -> list[Run]:
    while True:
        pending = [(r, r.request()) for r in runs]
        pending = [(r, q) for r, q in pending if q is not None]
        if not pending:
            break
        results = engine.step([q for _, q in pending])
        for (r, q), result in zip(pending, results, strict=True):
            r.take(q, result)
    if release:
        for r in runs:
            engine.release(r.seq)
    return runs


def run(engine: Engine, prompt: list[int], steering=(), attach: bool = True,
        chunk: int = 64) -> Run:
    return run_batch(engine, [Run(engine, prompt, steering, attach, chunk)])[0]


def same(a: Run, b: Run) -> None:
    assert a.tokens == b.tokens
    assert len(a.logits) == len(b.logits) == N_NEW
    for x, y in zip(a.logits, b.logits, strict=True):
        np.testing.assert_array_equal(x, y)


def check_empty(engine: Engine) -> None:
    """Every sequence has ended: no block referenced, the pool whole."""
    cache = engine.cache
    assert cache.used_blocks == 0
    assert all(cache.refs(b) == 0 for b in range(cache.n_blocks))
    assert len(cache._free) + cache.evictable_blocks == cache.n_blocks
    assert cache.evictable_blocks == cache.cached_blocks  # every cached block is unreferenced


# the cache itself, no model --------------------------------------------------------------------

def small_cache(n: int) -> KVCache:
    return KVCache(SimpleNamespace(n_layers=1, kv_dim=4), n)  # type: ignore[arg-type]


def test_refcounts_lru_eviction_and_accounting():
    cache = small_cache(6)
    a = cache.allocate(3)
    b = cache.allocate(2)
    assert cache.free_blocks == 1 and cache.used_blocks == 5
    for i, block in enumerate(a):
        assert cache.register(block, b"a%d" % i)
    assert cache.register(b[0], b"b0")
    assert not cache.register(b[1], b"a0")  # the key is taken: b[1] stays private
    cache.acquire(a[0])  # a second sequence shares a's first block
    assert cache.shared_blocks == 1
    cache.release(a)
    assert cache.refs(a[0]) == 1 and cache.evictable_blocks == 2  # a[1], a[2]
    cache.release(b)  # b[0] cached, b[1] free
    cache.release([a[0]])
    assert cache.used_blocks == 0 and cache.cached_blocks == 4 and cache.free_blocks == 6
    # LRU order: a's blocks went back first (a[2] before a[1]: a sequence's tail first),
    # then b[0], then a[0]; plain free blocks are taken before any is evicted
    got = cache.allocate(4)
    assert got[:2] == [b[1], 5]  # the free list, most recently freed first
    assert got[2:] == [a[2], a[1]] and cache.stats.evictions == 2
    assert cache.lookup(b"a2") is None and cache.lookup(b"a1") is None
    assert cache.lookup(b"a0") == a[0] and cache.lookup(b"b0") == b[0]
    got += cache.allocate(2)
    assert got[4:] == [b[0], a[0]] and cache.cached_blocks == 0
    with pytest.raises(CacheFull):
        cache.allocate(1)
    cache.release(got)
    assert cache.free_blocks == 6 and cache.cached_blocks == 0
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release([got[0]])


def test_rows_offered_found_by_longest_agreement_and_dropped_with_their_block():
    cache = small_cache(3)
    x, y = cache.allocate(2)
    cache.offer(x, b"anchor", (5, 6, 7))
    cache.offer(y, b"anchor", (5, 6))  # x already offers these rows: y stays uncached
    assert cache.cached_blocks == 1
    cache.offer(y, b"anchor", (5, 9, 9, 9))
    assert cache.best_rows(b"anchor", (5, 6, 7, 8)) == (x, 3)
    assert cache.best_rows(b"anchor", (5, 9, 1)) == (y, 2)
    assert cache.best_rows(b"anchor", (4,)) is None
    assert cache.best_rows(b"other", (5, 6)) is None
    with pytest.raises(RuntimeError, match="two anchors"):
        cache.offer(x, b"other", (5,))
    cache.k[:, x], cache.v[:, x] = 1.0, 2.0
    z = cache.allocate(1)[0]
    cache.copy_rows(x, z, 2)
    assert (cache.k[:, z, :, :2] == 1).all() and (cache.k[:, z, :, 2:] == 0).all()
    assert (cache.v[:, z, :2] == 2).all() and (cache.v[:, z, 2:] == 0).all()
    cache.release([x, y, z])
    assert cache.evictable_blocks == 2 and cache.free_blocks == 3  # z offered nothing: free
    cache.allocate(3)  # evicts x then y: their rows go with them
    assert cache.best_rows(b"anchor", (5, 6)) is None and cache.cached_blocks == 0


def test_bf16_row_copies_go_by_pairs_of_positions_and_bad_types_are_refused():
    cache = KVCache(SimpleNamespace(n_layers=1, kv_dim=32, head_dim=32), 2,  # type: ignore
                    "bf16", "bf16")
    cache.k[:, 0], cache.v[:, 0] = 1, 2
    cache.copy_rows(0, 1, 3)
    assert (cache.k[:, 1, :, :3] == 1).all() and not cache.k[:, 1, :, 3:].any()
    # positions 0..2 are the values' pairs 0 and 1: the second pair goes whole
    assert (cache.v[:, 1, :2] == 2).all() and not cache.v[:, 1, 2:].any()
    narrow = SimpleNamespace(n_layers=1, kv_dim=16, head_dim=8)
    with pytest.raises(ValueError, match="multiple of 16; this model's is 8"):
        KVCache(narrow, 2, "f32", "bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="type_k must be one of"):
        KVCache(narrow, 2, "f16", "f32")  # type: ignore[arg-type]


# bitwise equality with and without the cache ----------------------------------------------------

STEERING = {
    "plain": [],
    "every_position": [SteeringTerm(2, unit(1), 2.0, every_position=True)],
    "actadd": [SteeringTerm(1, unit(2, 20, DIM), 1.5)],
    "scoped_ops": [SteeringTerm(3, unit(3), op="clamp", value=1.0, every_position=True,
                                positions=(10, 50)),
                   SteeringTerm(2, unit(4), op="ablate", every_position=True, positions="prompt"),
                   SteeringTerm(1, unit(5), 3.0, every_position=True, positions="generated")],
    "token_condition": [SteeringTerm(2, unit(6), 4.0, every_position=True,
                                     when=Condition(unit(7), 1, 0.0, scope="token"))],
}


@pytest.mark.parametrize("name", STEERING)
def test_reused_blocks_give_the_same_bits(cached, plain, name):
    steering = STEERING[name]
    first = prompt_of(10, 70)
    longer = first + prompt_of(11, 25)[1:]
    run(cached, first, steering)  # fills the cache: 4 full blocks, and 6 rows of a fifth
    again = run(cached, first, steering)
    # all but the last token (its logits are the first draw's): the 4 blocks shared, then 5
    # rows copied from the fifth, which holds first[64:70] and then the generated tokens
    assert again.reused == 69
    same(again, run(plain, first, steering, attach=False))
    turn = run(cached, longer, steering)
    # the whole first prompt: longer continues it, not its generated tokens; but a "prompt"
    # scope ends inside the fifth block at each prompt's own end, so there the two differ in
    # steering and its rows are not copied
    assert turn.reused == (64 if name == "scoped_ops" else 70)
    same(turn, run(plain, longer, steering, attach=False))
    check_empty(cached)


def test_a_conversation_reuses_its_generated_tokens(cached, plain):
    first = run(cached, prompt_of(12, 40))
    # the next turn: the prompt, the reply, then more: blocks of generated tokens are reused too
    second = first.prompt + first.tokens + prompt_of(13, 20)[1:]
    turn = run(cached, second)
    # everything the first run computed: its prompt and its generated tokens but the last,
    # never fed back (3 blocks shared, 3 rows of the fourth copied)
    assert turn.reused == 40 + N_NEW - 1
    same(turn, run(plain, second, attach=False))


def test_chunking_does_not_change_the_bits(cached, plain):
    """What makes reuse exact: K/V of a position do not depend on how it was batched."""
    prompt = prompt_of(14, 60)
    same(run(plain, prompt, attach=False, chunk=7), run(plain, prompt, attach=False, chunk=64))


def test_a_mixed_batch_matches_each_sequence_alone(cached, plain):
    steer = STEERING["every_position"]
    a, b, c = prompt_of(20, 50), prompt_of(21, 45), prompt_of(22, 33)
    run(cached, a)
    run(cached, b, steer)
    runs = run_batch(cached, [Run(cached, a + [5, 6], chunk=9), Run(cached, b, steer, chunk=9),
                              Run(cached, c, chunk=9), Run(cached, a, steer, chunk=9)])
    # a + [5, 6]: a's 50 tokens (3 blocks, 2 rows); b steered: all but its last token; c and
    # a steered: the first row only (token 1 at position 0, computed unsteered by a's run and
    # steered by b's)
    assert [r.reused for r in runs] == [50, 44, 1, 1]
    for r, steering in zip(runs, [(), steer, (), steer], strict=True):
        same(r, run(plain, r.prompt, steering, attach=False))
    check_empty(cached)


# isolation: the steering at a block's positions is part of its key -----------------------------

def test_a_steered_prefix_is_never_served_unsteered_and_vice_versa(cached, plain):
    steer = STEERING["every_position"]
    # q does not start with p's token 1, whose row alone p's runs would otherwise share
    p, q = prompt_of(30, 50), prompt_of(31, 50)[1:]
    hits = cached.cache.stats.hit_tokens
    run(cached, p, steer)
    unsteered = run(cached, p)
    assert unsteered.reused == 0
    same(unsteered, run(plain, p, attach=False))
    run(cached, q)
    steered = run(cached, q, steer)
    assert steered.reused == 0
    same(steered, run(plain, q, steer, attach=False))
    other_scale = [SteeringTerm(2, unit(1), 2.5, every_position=True)]
    assert run(cached, q, other_scale).reused == 0
    assert cached.cache.stats.hit_tokens == hits
    assert run(cached, q, steer).reused == 48  # each finds its own


def test_steering_of_generated_positions_shares_the_prompt(cached, plain):
    late = [SteeringTerm(1, unit(8), 3.0, every_position=True, positions="generated"),
            SteeringTerm(2, unit(9), op="cap", value=0.0, every_position=True,
                         positions=(48, 512))]
    p = prompt_of(32, 50)
    run(cached, p)
    r = run(cached, p, late)
    assert r.reused == 48
    same(r, run(plain, p, late, attach=False))
    # ActAdd rows reach positions [0, 20): the prompt's first block is not shared
    assert run(cached, p, STEERING["actadd"]).reused == 0


def test_prompt_conditions_reuse_nothing(cached):
    cast = [SteeringTerm(2, unit(6), 4.0, every_position=True,
                         when=Condition(unit(7), 1, 0.0, scope="prompt"))]
    p = prompt_of(33, 50)
    run(cached, p, cast)
    assert run(cached, p, cast).reused == 0  # the decision needs the prompt's hidden states
    assert run(cached, p).reused == 48  # its prompt blocks are not steered: shared


# eviction and failures -------------------------------------------------------------------------

def test_eviction_under_a_small_pool_is_lru_and_leaks_nothing(checkpoint, plain):
    small = Engine.from_checkpoint(checkpoint, max_tokens=64, kv_tokens=10 * KV_BLOCK)
    # 49 tokens each, with different first tokens (a shared first token's row is copied)
    a, b, c = (prompt_of(seed, 50)[1:] for seed in (40, 41, 42))
    assert len({a[0], b[0], c[0]}) == 3
    run(small, a)  # 49 + 11 positions: 4 blocks, 3 full and keyed, the last offering its rows
    check_empty(small)
    run(small, b)
    assert small.cache.cached_blocks == 8 and small.cache.stats.evictions == 0
    check_empty(small)
    run(small, c)  # 2 free blocks, then the 2 least recently used: a's, its tail first
    assert small.cache.stats.evictions == 2
    check_empty(small)
    r = run(small, a)
    assert r.reused == 32  # a's first two blocks are left
    assert small.cache.stats.evictions == 4  # b's last two went for a's
    same(r, run(plain, a, attach=False))
    check_empty(small)
    r = run(small, c)
    assert r.reused == 48  # c's 3 full blocks; its fourth takes b's second (the oldest left)
    same(r, run(plain, c, attach=False))
    check_empty(small)
    assert run(small, b).reused == 16
    check_empty(small)


def test_copying_rows_never_evicts_their_source(checkpoint, plain):
    """The block rows are copied from stays put while the copy's block is allocated: with no
    other block to take, nothing is copied and the prompt is computed."""
    p = prompt_of(43, 4)  # 4 + 11 positions: one partial block
    for blocks, reused in ((1, 0), (2, 3)):
        eng = Engine.from_checkpoint(checkpoint, max_tokens=64, kv_tokens=blocks * KV_BLOCK)
        run(eng, p)
        r = run(eng, p)
        assert r.reused == reused
        same(r, run(plain, p, attach=False))
        check_empty(eng)


def test_a_failed_step_registers_nothing_and_a_cancelled_prefill_keeps_its_blocks(
        checkpoint, plain, monkeypatch):
    eng = Engine.from_checkpoint(checkpoint, max_tokens=64, kv_sequences=2)
    p = prompt_of(50, 60)
    seq = eng.new_sequence(prompt_len=len(p))
    real = engine_module.forward_step

    def fail(*args) -> None:
        real(*args)
        raise RuntimeError("poisoned step")

    monkeypatch.setattr(engine_module, "forward_step", fail)
    with pytest.raises(RuntimeError, match="poisoned"):
        eng.step([SeqRequest(seq, p[:40], logits="none")])
    assert eng.cache.cached_blocks == 0 and seq.length == 0
    monkeypatch.setattr(engine_module, "forward_step", real)
    eng.step([SeqRequest(seq, p[:40], logits="none")])  # run again: now it holds 2 full blocks
    assert eng.cache.cached_blocks == 2
    eng.release(seq)  # cancelled mid-prefill
    check_empty(eng)
    r = run(eng, p)
    assert r.reused == 40  # its 2 full blocks, and the 8 rows its release left to copy
    same(r, run(plain, p, attach=False))
    check_empty(eng)


# the server: usage, timings, metrics, n choices, conversations --------------------------------

STORY = ("Once upon a time there was a little girl named Lily. She loved to play outside in the "
         "park with her big red ball and her small brown dog, and every day ")


@pytest.fixture(scope="module")
def config(shared_models: Path, tmp_path_factory):
    from tiller.server.app import ServerConfig

    return ServerConfig(model_path=shared_models / "stories260K.bin",
                        tokenizer_path=shared_models / "tok512.bin", parallel=8,
                        token_budget=64, steering_dir=tmp_path_factory.mktemp("steering"))


async def post(client, path: str, body: dict) -> dict:
    response = await client.post(path, json=body)
    payload = await response.json()
    assert response.status == 200, payload
    return payload


def runner_of(client):
    from tiller.server.app import STATE

    return client.app[STATE].ready()[1]


def cached_tokens(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


async def test_n_choices_compute_their_prompt_once(client, model):
    prompt = "One day. " + STORY + "she ran to the tree."
    n_prompt = len(model.tokenizer.encode(prompt, bos=True))
    assert n_prompt > 2 * KV_BLOCK
    stats = runner_of(client).stats
    request = {"prompt": prompt, "n": 4, "max_tokens": 8, "temperature": 0.9, "seed": 7}
    before = stats.prompt_tokens
    without = await post(client, "/v1/completions", {**request, "cache_prompt": False})
    assert stats.prompt_tokens - before == 4 * n_prompt
    assert cached_tokens(without) == 0
    before = stats.prompt_tokens
    hits = model.engine.cache.stats.hit_tokens
    with_cache = await post(client, "/v1/completions", {**request, "prompt": prompt + " Then"})
    n2 = with_cache["usage"]["prompt_tokens"]
    # the first choice shares the earlier request's blocks; the other three wait for it,
    # share its blocks and copy the rows of the block its prompt ends in: each computes only
    # the last prompt token, whose logits are its first draw's
    assert n2 > n_prompt
    assert cached_tokens(with_cache) == n_prompt  # the earlier prompt, whole
    assert stats.prompt_tokens - before == (n2 - n_prompt) + 3
    reused = model.engine.cache.stats.hit_tokens - hits
    assert reused == n_prompt + 3 * (n2 - 1)
    again = await post(client, "/v1/completions", request)
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in without["choices"]]
    assert cached_tokens(again) == n_prompt - 1


async def test_a_conversation_reuses_its_earlier_turns(client, model):
    first = [{"role": "user", "content": "Hello. " + STORY + "what did she find?"}]
    turn1 = await post(client, "/v1/chat/completions",
                       {"messages": first, "max_tokens": 24, "temperature": 0})
    reply = turn1["choices"][0]["message"]["content"]
    n1 = turn1["usage"]["prompt_tokens"]
    second = {"messages": [*first, {"role": "assistant", "content": reply},
                           {"role": "user", "content": "And then what happened?"}],
              "max_tokens": 24, "temperature": 0}
    off = await post(client, "/v1/chat/completions", {**second, "cache_prompt": False})
    assert cached_tokens(off) == 0
    on = await post(client, "/v1/chat/completions", second)
    assert cached_tokens(on) >= (n1 - 1) // KV_BLOCK * KV_BLOCK > 0
    assert on["choices"][0]["message"] == off["choices"][0]["message"]
    response = await client.post("/v1/chat/completions", json={
        **second, "stream": True, "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in (await response.text()).splitlines()
              if line.startswith("data: {")]
    assert events[-1]["usage"] == on["usage"]
    assert events[-1]["timings"]["cache_n"] == cached_tokens(on)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == on["choices"][0]["message"]["content"]


async def test_llama_completion_reports_cache_n(client, model):
    prompt = "A bird sang. " + STORY
    n_prompt = len(model.tokenizer.encode(prompt, bos=True))
    body = {"prompt": prompt, "n_predict": 6, "temperature": 0}
    first = await post(client, "/completion", body)
    second = await post(client, "/completion", body)
    reused = n_prompt - 1
    # the first may copy a row or two that other tests' prompts computed (the same BOS, "A")
    assert first["timings"]["prompt_n"] + first["timings"]["cache_n"] == n_prompt
    assert first["timings"]["prompt_n"] >= n_prompt - 2
    assert second["timings"]["cache_n"] == reused
    assert second["timings"]["prompt_n"] == n_prompt - reused
    assert second["content"] == first["content"]
    # llama.cpp's tokens_cached: the tokens in the slot's cache at the end, prompt + generated
    assert second["tokens_cached"] == n_prompt + second["tokens_predicted"]
    off = await post(client, "/completion", {**body, "cache_prompt": False})
    assert off["timings"]["cache_n"] == 0 and off["content"] == first["content"]
    # streamed with timings per token: every chunk's timings count the reused tokens already
    response = await client.post("/completion", json={**body, "stream": True,
                                                      "timings_per_token": True})
    events = [json.loads(line[6:]) for line in (await response.text()).splitlines()
              if line.startswith("data: {")]
    assert len(events) > 1
    for event in events:
        assert event["timings"]["cache_n"] == reused
        assert event["timings"]["prompt_n"] == n_prompt - reused


async def test_requests_reading_their_prompt_compute_it(client, model):
    prompt = "The sun came out. " + STORY
    request = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": True,
               "logprobs": 1}
    first = await post(client, "/v1/completions", request)
    second = await post(client, "/v1/completions", request)
    assert cached_tokens(second) == 0
    assert second["choices"][0]["logprobs"] == first["choices"][0]["logprobs"]
    plain_request = {k: v for k, v in request.items() if k not in ("echo", "logprobs")}
    assert cached_tokens(await post(client, "/v1/completions", plain_request)) > 0


async def test_metrics_count_hits_and_blocks(client, model):
    body = {"prompt": STORY + "they went home.", "max_tokens": 4, "temperature": 0}
    await post(client, "/v1/completions", body)
    await post(client, "/v1/completions", body)
    text = await (await client.get("/metrics")).text()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("tiller_prefix") or line.startswith("tiller_kv_blocks")}
    stats = model.engine.cache.stats
    assert values["tiller_prefix_cache_hits_total"] == stats.hit_tokens > 0
    assert values["tiller_prefix_cache_queries_total"] == stats.lookups >= stats.hit_tokens
    assert values["tiller_prefix_cache_hit_blocks_total"] == stats.hit_blocks
    assert values["tiller_prefix_cache_evictions_total"] == stats.evictions
    assert values["tiller_kv_blocks_cached"] == model.engine.cache.cached_blocks > 0
    assert values["tiller_kv_blocks_shared"] == 0  # nothing runs now
    assert values["tiller_kv_blocks_used"] == 0


async def test_no_prefix_cache_flag(aiohttp_client, config):
    from tiller.server.app import create_app, load_model

    from tiller.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "m.gguf", "--no-prefix-cache"])
    assert args.no_prefix_cache
    off = replace(config, prefix_cache=False)
    model = load_model(off)
    assert not model.engine.prefix_cache
    client = await aiohttp_client(create_app(off, model=model))
    body = {"prompt": STORY, "max_tokens": 4, "temperature": 0}
    for _ in range(2):
        assert cached_tokens(await post(client, "/v1/completions", body)) == 0
    assert model.engine.cache.cached_blocks == 0
