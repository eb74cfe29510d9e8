"""One request can never hurt another: a poisoned request in a shared batch fails alone, and
requests that could poison a step are refused up front (400 naming the field)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
from tiller.engine.cvec import ControlVector, write_control_vector
from tiller.engine.engine import (
    MAX_STEERING_NORM,
    Engine,
    EngineError,
    FoldedSteering,
    SeqRequest,
    SteeringTerm,
)
from tiller.engine.generate import generate
from tiller.engine.kvcache import KV_BLOCK
from tiller.engine.loader import load_checkpoint
from tiller.engine.sampling import SamplingParams, apply_penalties, sample_token
from tiller.engine.tokenizer import SpmTokenizer, Tokenizer
from tiller.server.app import STATE, ServerConfig, create_app
from tiller.server.runner import Finished, GenerationRequest, Runner, TokenEvent

from tests.test_server import post, sse_events

N_TOKENS = 24


class PoisonedEngine:
    """The runner's engine, but a sequence whose prompt starts with `marker` is poisoned from
    the step that takes it past `after` tokens on: with kind "step" every step holding it raises
    (a whole-batch failure, as a bug in one request's part of a step would be); with kind "nan"
    its logits are NaN."""

    def __init__(self, engine: Engine, marker: list[int], kind: str, after: int = 0) -> None:
        self.engine = engine
        self.marker = marker
        self.kind = kind
        self.after = after
        self.poisoned: set[int] = set()
        self.poisoned_batches: list[int] = []  # sizes of the steps the poison was in

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def step(self, requests: list[SeqRequest]):
        for r in requests:
            # NOTE: with what the sequence already holds: the prefix cache may have given it
            # the marker's first tokens (BOS is every prompt's)
            held = [*r.seq.tokens, *r.tokens]
            if r.seq.length < len(self.marker) and held[:len(self.marker)] == self.marker:
                self.poisoned.add(r.seq.id)
        hit = [r for r in requests
               if r.seq.id in self.poisoned and r.seq.length + len(r.tokens) > self.after]
        if hit:
            self.poisoned_batches.append(len(requests))
            if self.kind == "step":
                raise RuntimeError("poisoned step")
        results = self.engine.step(requests)
        for r, result in zip(requests, results, strict=True):
            if r in hit and result.logits is not None:
                result.logits = np.full_like(result.logits, np.nan)
        return results


@pytest.fixture(scope="module")
def engine(shared_models: Path) -> Engine:
    return Engine.from_checkpoint(load_checkpoint(shared_models / "stories260K.bin"),
                                  max_tokens=64, kv_sequences=17)


@pytest.fixture(scope="module")
def tok(shared_models: Path) -> Tokenizer:
    return SpmTokenizer.from_llama2c(shared_models / "tok512.bin", vocab_size=512)


def batch_requests(tok: Tokenizer) -> list[GenerationRequest]:
    """Fifteen different requests: prompts, seeds and sampling settings."""
    words = ["dog", "cat", "sun", "tree", "ball", "boat", "cake", "bird", "fish", "car", "hat",
             "frog", "rain", "moon", "girl"]
    requests = []
    for i, word in enumerate(words):
        params = SamplingParams(temperature=0.0 if i % 5 == 0 else 0.9, top_k=40 * (i % 2),
                                top_p=0.95 if i % 3 else 1.0, seed=1000 + i,
                                repetition_penalty=1.3 if i % 4 == 1 else 1.0,
                                frequency_penalty=0.5 if i % 4 == 2 else 0.0)
        prompt = tok.encode(f"Once upon a time there was a {word}", bos=True)
        requests.append(GenerationRequest(prompt, params, N_TOKENS,
                                          logprobs=2 if i % 6 == 3 else None))
    return requests


async def drain(handle) -> tuple[list[int], Finished]:
    tokens = []
    while True:
        event = await handle.queue.get()
        if isinstance(event, TokenEvent):
            tokens.append(event.token)
        elif isinstance(event, Finished):
            return tokens, event


@pytest.mark.parametrize("kind,after", [("step", 0), ("step", 3), ("nan", 0), ("nan", 3)],
                         ids=["step-at-prefill", "step-at-decode", "nan-at-prefill",
                              "nan-at-decode"])
async def test_a_poisoned_request_fails_alone_in_a_batch_of_16(engine, tok, kind, after):
    requests = batch_requests(tok)
    # the independent reference: each request alone, through the single-sequence loop
    solo = [list(generate(engine, r.prompt, r.params, r.max_tokens)) for r in requests]
    marker = tok.encode("The poisoned request", bos=True)
    poisoned = PoisonedEngine(engine, marker, kind, after=len(marker) + after - 1)
    runner = Runner(poisoned, max_running=16, token_budget=64)  # type: ignore[arg-type]
    runner.start(asyncio.get_running_loop())
    try:
        handles = [runner.submit(r) for r in requests]
        drains = [asyncio.create_task(drain(h)) for h in handles]
        while runner.stats.generated_tokens < 2 * len(requests):  # the batch is decoding
            await asyncio.sleep(0.005)
        bad = runner.submit(GenerationRequest(marker, SamplingParams(seed=7), N_TOKENS))
        bad_tokens, bad_end = await asyncio.wait_for(drain(bad), 60)
        results = await asyncio.wait_for(asyncio.gather(*drains), 60)
    finally:
        runner.stop()
    assert bad_end.error is not None and bad_end.reason.name == "ERROR"
    assert ("engine step failed" if kind == "step" else "NaN") in bad_end.error
    assert len(bad_tokens) == after  # it generated until it was poisoned, and nothing after
    # it failed inside a shared step, with most of the batch still running
    assert poisoned.poisoned_batches and max(poisoned.poisoned_batches) >= 12
    for i, (tokens, end) in enumerate(results):
        assert end.error is None and end.reason.name == "LENGTH", (i, end)
        assert tokens == solo[i], i
    assert engine.cache.used_blocks == 0  # the failed request's blocks came back too


async def test_a_failed_step_is_rerun_in_halves_down_to_the_culprit(engine, tok):
    """The bisection runs the same chunks again in halves: the culprit is found in log2(batch)
    rounds, and the others' tokens are those of their solo runs."""
    requests = batch_requests(tok)[:8]
    solo = [list(generate(engine, r.prompt, r.params, 12)) for r in requests]
    marker = requests[5].prompt
    # it fails after 3 tokens: by then all 8 are decoding (submitted within a step or two)
    poisoned = PoisonedEngine(engine, marker, "step", after=len(marker) + 2)
    runner = Runner(poisoned, max_running=8, token_budget=64)  # type: ignore[arg-type]
    runner.start(asyncio.get_running_loop())
    try:
        handles = [runner.submit(GenerationRequest(r.prompt, r.params, 12)) for r in requests]
        results = await asyncio.wait_for(asyncio.gather(*(drain(h) for h in handles)), 60)
    finally:
        runner.stop()
    # decode chunks run in arrival order: the 8, then 4..7, 4..5 and 5 alone
    assert poisoned.poisoned_batches == [8, 4, 2, 1]
    for i, (tokens, end) in enumerate(results):
        if i == 5:
            assert end.error is not None and tokens == solo[5][:3]
        else:
            assert end.error is None and tokens == solo[i], i
    assert engine.cache.used_blocks == 0


def test_a_step_that_raised_can_be_run_again(engine, tok, monkeypatch):
    """What the runner's bisection relies on: a step that fails after its forward pass has
    written K/V rows and taken blocks leaves the sequences as they were, and running it again
    gives the bits a clean step gives."""
    import tiller.engine.engine as engine_module

    prompts = [tok.encode(f"Once upon a time there was a little {w} who liked to play in the "
                          "park", bos=True) for w in ("dog", "cat")]
    assert all(len(p) > KV_BLOCK > 14 for p in prompts)  # the failed step takes a new block

    def run(fail: bool) -> tuple[list[np.ndarray], list[int], int]:
        seqs = [engine.new_sequence() for _ in prompts]
        try:
            first = engine.step([SeqRequest(s, p[:14]) for s, p in zip(seqs, prompts,
                                                                        strict=True)])
            rest = [SeqRequest(s, p[14:], logits="all")
                    for s, p in zip(seqs, prompts, strict=True)]
            if fail:
                real = engine_module.forward_step

                def forward_then_fail(*args) -> None:
                    real(*args)
                    raise RuntimeError("failed after the forward pass")

                monkeypatch.setattr(engine_module, "forward_step", forward_then_fail)
                with pytest.raises(RuntimeError, match="after the forward pass"):
                    engine.step(rest)
                monkeypatch.undo()
                assert [s.length for s in seqs] == [14, 14]
            again = engine.step(rest)
            return ([r.logits for r in first + again], [s.length for s in seqs],
                    engine.cache.used_blocks)
        finally:
            for s in seqs:
                engine.release(s)

    clean_logits, clean_lengths, clean_blocks = run(fail=False)
    used_before = engine.cache.used_blocks
    rerun_logits, rerun_lengths, rerun_blocks = run(fail=True)
    assert rerun_lengths == clean_lengths == [len(p) for p in prompts]
    assert rerun_blocks == clean_blocks  # the failed step's blocks were not taken twice
    for a, b in zip(clean_logits, rerun_logits, strict=True):
        np.testing.assert_array_equal(a, b)
    assert engine.cache.used_blocks == used_before == 0


@pytest.mark.parametrize("value", [np.inf, np.nan, 1e30])
def test_a_poisoned_residual_stream_stays_in_its_own_rows(engine, tok, value):
    """Steering that slipped past validation (built here by hand) poisons only its own
    sequence's rows of the forward pass: the others' logits are bitwise those of a clean step,
    which is what lets the runner fail the poisoned request alone."""
    dim = engine.config.dim
    prompts = [tok.encode(f"Once upon a time there was a {w}", bos=True)
               for w in ("dog", "cat", "sun")]

    def logits(poison: bool) -> list[np.ndarray]:
        seqs = [engine.new_sequence() for _ in prompts]
        if poison:
            seqs[1].steering = FoldedSteering(np.array([2]), np.full((1, dim), value, np.float32),
                                              np.zeros((1, 0, dim), np.float32))
        try:
            out = engine.step([SeqRequest(s, p, logits="all")
                               for s, p in zip(seqs, prompts, strict=True)])
            out += engine.step([SeqRequest(s, [5]) for s in seqs])  # and a decode step
            return [r.logits for r in out]
        finally:
            for s in seqs:
                engine.release(s)

    clean, poisoned = logits(False), logits(True)
    for i in (0, 2, 3, 5):
        np.testing.assert_array_equal(poisoned[i], clean[i])
    # (its own logits are garbage: NaN, or zeros where Q8_0 quantization swallowed the NaN)
    assert not np.array_equal(poisoned[1], clean[1], equal_nan=True)
    assert not np.array_equal(poisoned[4], clean[4], equal_nan=True)


# refused up front ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"repetition_penalty": 0.09}, "repetition_penalty"),
    ({"repetition_penalty": 10.5}, "repetition_penalty"),
    ({"frequency_penalty": 1e38}, "frequency_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
])
def test_penalties_that_could_overflow_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_penalties_and_temperatures_within_bounds_keep_logits_finite():
    big = np.float32(3e37)
    logits = np.array([big, -big, 0.0, 1.0, -1.0, big / 2], np.float32)
    context = np.arange(6)
    for params in (SamplingParams(repetition_penalty=0.1, frequency_penalty=-2.0,
                                  presence_penalty=-2.0),
                   SamplingParams(repetition_penalty=10.0, frequency_penalty=2.0,
                                  presence_penalty=2.0)):
        out = apply_penalties(logits, params, np.concatenate([context] * 50), n_prompt=0)
        assert np.isfinite(out).all()
    # temperature divides differences <= 0 in float64: tiny or huge, it only sharpens or flattens
    model_like = np.random.default_rng(0).normal(0, 5, 512).astype(np.float32)
    for temperature in (5e-324, 1e-300, 1e-30, 1e30, 1e300):
        for top_p in (1.0, 0.9):
            token = sample_token(model_like, SamplingParams(temperature=temperature,
                                                            top_p=top_p), 0.5)
            assert 0 <= token < 512
    tiny = SamplingParams(temperature=1e-300)
    assert sample_token(model_like, tiny, 0.99) == int(np.argmax(model_like))


def test_steering_whose_sum_overflows_or_is_too_large_is_refused(engine):
    dim = engine.config.dim
    huge = np.full(dim, 3e38, np.float32)  # finite: each term alone passes
    with pytest.raises(EngineError, match="overflows float32"):
        engine.new_sequence([SteeringTerm(2, huge, every_position=True),
                             SteeringTerm(2, huge, every_position=True)])
    with pytest.raises(EngineError, match="overflows float32"):
        engine.new_sequence([SteeringTerm(2, huge[None], scale=10.0)])
    unit = np.ones(dim, np.float32) / math.sqrt(dim)
    limit = np.float32(MAX_STEERING_NORM)
    # the bound is on the norm per position summed over layers: two layers at 0.6 pass alone
    engine.new_sequence([SteeringTerm(2, unit, 0.6 * limit, every_position=True)])
    with pytest.raises(EngineError, match="every position") as e:
        engine.new_sequence([SteeringTerm(2, unit, 0.6 * limit, every_position=True),
                             SteeringTerm(4, unit, 0.6 * limit, every_position=True)])
    assert "1.2e+09" in str(e.value)
    # ActAdd rows count at their own positions only
    rows = np.zeros((3, dim), np.float32)
    rows[1] = unit * 1.5 * limit
    with pytest.raises(EngineError, match="position 1 "):
        engine.new_sequence([SteeringTerm(1, rows)])
    engine.new_sequence([SteeringTerm(1, rows / 2), SteeringTerm(3, unit[None] / 2 * limit)])


def test_steering_at_the_bound_keeps_the_logits_finite(engine, tok):
    dim = engine.config.dim
    rng = np.random.default_rng(3)
    terms = []
    for layer in range(engine.config.n_layers + 1):
        v = rng.normal(size=dim).astype(np.float32)
        v *= np.float32(0.999 * MAX_STEERING_NORM / (engine.config.n_layers + 1)
                        / np.linalg.norm(v))
        terms.append(SteeringTerm(layer, v, every_position=True))
    seq = engine.new_sequence(terms)
    try:
        out = engine.step([SeqRequest(seq, tok.encode("Once upon a time", bos=True),
                                      logits="all")])[0]
        assert out.logits is not None and np.isfinite(out.logits).all()
    finally:
        engine.release(seq)


# through HTTP -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def config(shared_models: Path, tmp_path_factory) -> ServerConfig:
    return ServerConfig(model_path=shared_models / "stories260K.bin",
                        tokenizer_path=shared_models / "tok512.bin", parallel=8,
                        token_budget=64, steering_dir=tmp_path_factory.mktemp("steering"))


async def test_a_repetition_penalty_that_would_poison_the_batch_is_a_400(client):
    for path, field in [("/v1/completions", "repetition_penalty"),
                        ("/v1/chat/completions", "repetition_penalty"),
                        ("/completion", "repeat_penalty")]:
        body = {"prompt": "Hi", "max_tokens": 5, field: 1e-300}
        if path == "/v1/chat/completions":
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                    field: 1e-300}
        error = (await post(client, path, body, status=400))["error"]
        assert error["param"] == field and field in error["message"], (path, error)
        assert error["type"] == "invalid_request_error"


async def test_a_vector_with_huge_values_is_a_400_and_others_run_on(client, model, tmp_path):
    n = model.engine.config.n_layers
    gguf = tmp_path / "huge.gguf"
    huge = np.full(model.engine.config.dim, 1e30, np.float32)  # finite, so importable
    write_control_vector(gguf, ControlVector({2: huge, 3: huge}, "llama"), n)
    imported = (await client.post("/v1/steering/import", data=gguf.read_bytes()))
    vid = (await imported.json())["id"]
    assert imported.status == 200
    normal = {"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0.8, "seed": 4}
    alone = (await post(client, "/v1/completions", normal))["choices"][0]["text"]
    running = asyncio.create_task(post(client, "/v1/completions", normal))
    error = (await post(client, "/v1/completions",
                        {**normal, "steering": [{"vector": vid, "scale": 2.0}]},
                        status=400))["error"]
    assert error["param"] == "steering" and "norm" in error["message"]
    assert (await running)["choices"][0]["text"] == alone


@pytest.mark.parametrize("kind", ["step", "nan"])
async def test_a_failing_request_is_a_500_or_an_sse_error_and_others_finish(
        client, model, kind):
    normal = {"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0.8, "seed": 9}
    alone = (await post(client, "/v1/completions", normal))["choices"][0]["text"]
    marker = "The poisoned request"
    runner = client.app[STATE].runner
    ids = model.tokenizer.encode(marker, bos=True)
    runner.engine = PoisonedEngine(model.engine, ids, kind, after=len(ids) + 1)  # 2 tokens
    others = [asyncio.create_task(post(client, "/v1/completions", normal)) for _ in range(3)]
    try:
        bad = {"prompt": marker, "max_tokens": 20, "temperature": 0.8, "seed": 1}
        error = (await post(client, "/v1/completions", bad, status=500))["error"]
        assert error["type"] == "server_error"
        assert ("engine step failed" if kind == "step" else "sampling this request failed"
                ) in error["message"]
        response = await client.post("/v1/completions", json={**bad, "stream": True})
        assert response.status == 200
        events = await sse_events(response)
        pieces = [e for e in events if isinstance(e, dict) and "choices" in e]
        assert 1 <= len(pieces) <= 2  # the stream had started: the error is its last event
        assert events[-1]["error"]["type"] == "server_error"
        for task in others:
            assert (await task)["choices"][0]["text"] == alone
    finally:
        await asyncio.gather(*others, return_exceptions=True)
        runner.engine = model.engine
    assert model.engine.cache.used_blocks == 0


async def test_a_model_that_fails_to_load_is_reported(aiohttp_client, config, tmp_path):
    """The server listens while the model loads; a load failure goes to on_load_error (the CLI
    then exits 2: tests/test_cli.py) and, while the app is up, to /health as a 503."""
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"ak42" + b"\x00" * 20)
    failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    app = create_app(ServerConfig(**{**config.__dict__, "model_path": bad}),
                     on_load_error=failed.set_result)
    client = await aiohttp_client(app)
    message = await asyncio.wait_for(failed, 30)
    assert message.startswith("model failed to load:") and str(bad) in message
    response = await client.get("/health")
    error = (await response.json())["error"]
    assert response.status == 503 and error["message"] == message


# the access log ------------------------------------------------------------------------------

async def raw_request(client, request_line: bytes) -> bytes:
    """Send one request as raw bytes (no client library to normalise its path)."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(request_line + b"\r\nHost: test\r\nConnection: close\r\n\r\n")
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    return response


async def test_control_characters_in_a_path_cannot_forge_access_log_lines(client, caplog):
    forged = "/v1/models\r\n2026-12-01 INFO tiller.server: GET /admin 200 - 1.0ms\x00\x1b[2K\u202e"
    encoded = "".join(c if c.isalnum() or c in "/.-" else "%" + "%".join(
        f"{b:02X}" for b in c.encode()) for c in forged)
    with caplog.at_level("INFO", logger="tiller.server"):
        response = await raw_request(client, f"GET {encoded} HTTP/1.1".encode())
        assert response.startswith(b"HTTP/1.1 404")
        await asyncio.sleep(0.05)  # the log line is written when the handler returns
    lines = [r.getMessage() for r in caplog.records if r.name == "tiller.server"
             and r.getMessage().startswith("GET /v1/models")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    line = lines[0]
    assert not any(c in line for c in "\r\n\x00\x1b\u202e")
    assert line.startswith("GET /v1/models\\r\\n2026-12-01 INFO tiller.server: GET /admin 200 - "
                           "1.0ms\\x00\\x1b[2K\\u202e 404 ")
    # a literal backslash is doubled, so the escapes above cannot be typed in to fake one
    with caplog.at_level("INFO", logger="tiller.server"):
        await raw_request(client, b"GET /x%5Cr%5Cn HTTP/1.1")
        await asyncio.sleep(0.05)
    assert any(r.getMessage().startswith("GET /x\\\\r\\\\n 404") for r in caplog.records)
