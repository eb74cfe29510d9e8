"""tiller_client: SSE and metrics parsing, error mapping (no server), then the Client and
AsyncClient against a live `tiller serve` on stories260K (one server for the module)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tiller_client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    ChatChunk,
    Client,
    CompletionChunk,
    ConnectionError,
    ContextLengthError,
    Embeddings,
    Features,
    NotFoundError,
    ServerBusyError,
    ServerSentEvent,
    SSEDecoder,
    TillerError,
    TokenPiece,
    Usage,
    parse_metrics,
)
from tiller_client.errors import error_from_body

from tests.live_server import free_port, start_server

PROMPT = "Once upon a time"
GOLDEN = ", there was a little girl named Lily. She loved to play outside in the park."
KEY = "test-key"
CHAT = [{"role": "user", "content": "Tell me a story."}]


# SSE ------------------------------------------------------------------------------------------


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events = [e for chunk in chunks for e in decoder.feed(chunk)]
    return events + decoder.end()


def test_sse_events_survive_any_chunking():
    stream = ('\ufeff: keepalive\r\n\r\ndata: {"a": 1}\r\n\r\nevent: error\ndata: line one\n'
              'data:line two\nid: 7\nretry: 100\nunknown: x\n\n:comment\ndata\n\n'
              'data: "\u2028é"\r\rdata: [DONE]\n\n').encode()
    want = [ServerSentEvent('{"a": 1}'), ServerSentEvent("line one\nline two", "error", "7"),
            ServerSentEvent("", "message", "7"), ServerSentEvent('"\u2028é"', "message", "7"),
            ServerSentEvent("[DONE]", "message", "7")]
    assert decode(stream) == want
    for cut in range(len(stream) + 1):  # including inside CRLF, the BOM and a UTF-8 character
        assert decode(stream[:cut], stream[cut:]) == want, cut
    assert decode(*(stream[i:i + 1] for i in range(len(stream)))) == want


def test_sse_unfinished_event_is_dropped_but_a_final_cr_ends_a_line():
    assert decode(b"data: a\n\ndata: b\n") == [ServerSentEvent("a")]
    assert decode(b"data: a\r\r") == [ServerSentEvent("a")]
    assert decode(b"data: a\r") == []


# metrics --------------------------------------------------------------------------------------


def test_parse_metrics():
    text = ('# HELP tiller_x Things.\n# TYPE tiller_x counter\n'
            'tiller_x{route="/a b",status="200"} 3\n'
            'tiller_x{route="odd } \\" ,",status="500"} 1.5e3 1700000000000\n'
            'tiller_ready 1\n\ntiller_b_bucket{le="+Inf"} +Inf\ntiller_nan NaN\n')
    got = parse_metrics(text)
    assert got['tiller_x{route="/a b",status="200"}'] == 3
    assert got['tiller_x{route="odd } \\" ,",status="500"}'] == 1500
    assert got["tiller_ready"] == 1
    assert got['tiller_b_bucket{le="+Inf"}'] == float("inf")
    assert got["tiller_nan"] != got["tiller_nan"]
    with pytest.raises(ValueError, match="not a sample line"):
        parse_metrics("tiller_x{a=\"1\" 2\n")
    with pytest.raises(ValueError, match="bad value"):
        parse_metrics("tiller_x one\n")


# errors and streams, with a fake transport ----------------------------------------------------


def fake_client(handler) -> Client:
    return Client("http://tiller.test", http_client=httpx.Client(
        transport=httpx.MockTransport(handler)))


def error(status: int, message: str, type: str, param: str | None = None,
          code: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers, json={"error": {
        "message": message, "type": type, "param": param, "code": code}})


def sse(*events: object) -> httpx.Response:
    body = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
    return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                          content=body.encode())


CHUNK = {"id": "c", "model": "m", "choices": [{"index": 0, "text": "hi", "finish_reason": None}]}


@pytest.mark.parametrize(("response", "cls", "fields"), [
    (error(400, "bad", "invalid_request_error", "top_p"), BadRequestError, {"param": "top_p"}),
    (error(400, "long", "invalid_request_error", "max_tokens", "context_length_exceeded"),
     ContextLengthError, {"code": "context_length_exceeded"}),
    (error(401, "key", "authentication_error", code="invalid_api_key"), AuthenticationError,
     {"code": "invalid_api_key"}),
    (error(404, "Not Found", "not_found_error"), NotFoundError, {}),
    (error(503, "busy", "unavailable_error", code="server_busy", headers={"Retry-After": "2"}),
     ServerBusyError, {"retry_after": 2.0, "code": "server_busy"}),
    (error(500, "boom", "server_error"), TillerError, {"type": "server_error"}),
    (httpx.Response(502, text="<html>Bad Gateway</html>"), TillerError, {"status": 502}),
])
def test_error_responses_map_to_exceptions(response, cls, fields):
    with fake_client(lambda request: response) as client:
        with pytest.raises(cls) as info:
            client.complete(PROMPT)
        assert type(info.value) is cls
        assert info.value.status == response.status_code
        for name, value in fields.items():
            assert getattr(info.value, name) == value
        with pytest.raises(cls):  # a stream's request fails at the call, the same way
            client.stream_complete(PROMPT)


def test_stream_error_event_is_raised_mid_stream():
    bad = {"error": {"message": "engine failed", "type": "server_error", "code": 500}}
    with fake_client(lambda request: sse(CHUNK, bad, "[DONE]")) as client:
        stream = client.stream_complete(PROMPT)
        assert next(stream).text == "hi"
        with pytest.raises(TillerError, match="engine failed") as info:
            next(stream)
        assert info.value.status == 500 and info.value.type == "server_error"


def test_status_decides_the_class_and_type_only_without_one():
    body = {"error": {"message": "m", "type": "invalid_request_error"}}
    assert type(error_from_body(body)) is BadRequestError  # an error event inside a stream
    assert type(error_from_body(body, 500)) is TillerError
    assert type(error_from_body({"error": "plain text"}, 404)) is NotFoundError


def test_stream_cut_short_is_a_connection_error():
    with fake_client(lambda request: sse(CHUNK)) as client:
        stream = client.stream_complete(PROMPT)
        with pytest.raises(ConnectionError, match=r"ended before \[DONE\]"):
            list(stream)


def test_stream_sends_include_usage_and_keeps_it():
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert "temperature" not in body  # unset: the server's default
        usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
        return sse(CHUNK, {"id": "c", "model": "m", "choices": [], "usage": usage}, "[DONE]")

    with fake_client(handler) as client, client.stream_complete(PROMPT) as stream:
        assert [c.text for c in stream] == ["hi"]
        assert stream.usage is not None and stream.usage.total_tokens == 3


def test_unreachable_server_is_a_connection_error():
    with Client(f"http://127.0.0.1:{free_port()}", timeout=5) as client:
        with pytest.raises(ConnectionError) as info:
            client.complete(PROMPT)
        assert info.value.status is None
        with pytest.raises(ConnectionError):
            client.health()


# a live server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(shared_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url, process = start_server(tmp_path_factory.mktemp("server"), "--api-key", KEY)
    yield url
    process.stop()


@pytest.fixture
def client(server: str) -> Iterator[Client]:
    with Client(server, api_key=KEY, timeout=60) as c:
        yield c


def test_greedy_completion_is_golden(client: Client):
    out = client.complete(PROMPT, max_tokens=32, temperature=0)
    assert out.text.startswith(GOLDEN), out.text
    assert out.finish_reason == "length" and len(out.choices) == 1
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 32
    assert out.usage.total_tokens == 37
    assert out.model == "stories260K.bin" and out.id.startswith("cmpl-")
    assert out.system_fingerprint is not None and out.system_fingerprint.startswith("fp_")


def test_streamed_completion_concatenates_to_the_whole(client: Client):
    whole = client.complete(PROMPT, max_tokens=24, temperature=0, n=2)
    with client.stream_complete(PROMPT, max_tokens=24, temperature=0, n=2) as stream:
        chunks = list(stream)
    assert all(isinstance(c, CompletionChunk) for c in chunks)
    for choice in whole.choices:
        mine = [c for c in chunks if c.index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
    assert stream.usage == whole.usage


def test_stream_closed_early_frees_the_connection(client: Client):
    with client.stream_complete(PROMPT, max_tokens=200, temperature=0) as stream:
        assert next(stream).text
    assert client.complete(PROMPT, max_tokens=4, temperature=0).text == ", there was a"


def test_chat_and_streamed_chat_agree(client: Client):
    whole = client.chat(CHAT, max_tokens=12, temperature=0)
    assert whole.content and whole.message.role == "assistant"
    assert whole.finish_reason == "length" and whole.usage.completion_tokens == 12
    chunks = list(client.stream_chat(CHAT, max_tokens=12, temperature=0))
    assert all(isinstance(c, ChatChunk) for c in chunks)
    assert chunks[0].role == "assistant" and chunks[-1].finish_reason == "length"
    assert "".join(c.content for c in chunks) == whole.content


def test_tokenize_detokenize_round_trip(client: Client):
    ids = client.tokenize(PROMPT)
    assert ids and all(isinstance(i, int) for i in ids)
    assert client.detokenize(ids) == PROMPT
    assert client.tokenize(PROMPT, add_special=True) == [1, *ids]  # BOS is 1 in llama2.c
    pieces = client.tokenize("upon é", with_pieces=True)
    assert all(isinstance(p, TokenPiece) for p in pieces)
    assert [p.id for p in pieces] == client.tokenize("upon é")
    text = b"".join(p.piece.encode() if isinstance(p.piece, str) else p.piece for p in pieces)
    assert text.decode() == " upon é"  # with SentencePiece's leading space


def test_models_health_and_metrics(client: Client):
    (model,) = client.models()
    assert model.id == "stories260K.bin" and model.owned_by == "tiller"
    assert model.meta["n_vocab"] == 512
    assert client.health() is True
    metrics = client.metrics()
    requests = {k: v for k, v in metrics.items() if k.startswith("tiller_requests_total{")}
    assert requests and all(v >= 1 for v in requests.values())
    assert metrics["tiller_model_ready"] == 1


def test_errors_from_the_server(server: str, client: Client):
    with pytest.raises(BadRequestError) as bad:
        client.complete(PROMPT, temperature=-1)
    assert bad.value.status == 400 and bad.value.param == "temperature"
    assert bad.value.type == "invalid_request_error"
    with pytest.raises(ContextLengthError) as long:
        client.complete(PROMPT, max_tokens=100_000)
    assert long.value.code == "context_length_exceeded" and long.value.param == "max_tokens"
    with pytest.raises(ContextLengthError):
        client.stream_chat(CHAT, max_tokens=100_000)
    for key in ("wrong-key", None):
        with Client(server, api_key=key) as other, pytest.raises(AuthenticationError) as auth:
            other.complete(PROMPT)
        assert auth.value.status == 401 and auth.value.code == "invalid_api_key"
    with Client(server, api_key="wrong-key") as other:
        assert other.health() is True  # /health is public
    with Client(server + "/nope", api_key=KEY) as other, pytest.raises(NotFoundError):
        other.models()


async def test_async_client(server: str):
    async with AsyncClient(server, api_key=KEY, timeout=60) as client:
        out = await client.complete(PROMPT, max_tokens=32, temperature=0)
        assert out.text.startswith(GOLDEN)
        stream = await client.stream_complete(PROMPT, max_tokens=32, temperature=0)
        assert "".join([c.text async for c in stream]) == out.text
        assert stream.usage == out.usage
        chat = await client.chat(CHAT, max_tokens=8, temperature=0)
        async with await client.stream_chat(CHAT, max_tokens=8, temperature=0) as chunks:
            assert "".join([c.content async for c in chunks]) == chat.content
        async with await client.stream_complete(PROMPT, max_tokens=200) as early:
            async for chunk in early:
                assert chunk.text
                break
        ids = await client.tokenize(PROMPT)
        assert await client.detokenize(ids) == PROMPT
        assert (await client.models())[0].id == "stories260K.bin"
        assert await client.health() is True
        assert any(k.startswith("tiller_requests_total{") for k in await client.metrics())
        with pytest.raises(BadRequestError) as bad:
            await client.chat(CHAT, temperature=-1)
        assert bad.value.param == "temperature"
        with pytest.raises(ContextLengthError):
            await client.stream_complete(PROMPT, max_tokens=100_000)
    async with AsyncClient(server, api_key="wrong-key") as other:
        with pytest.raises(AuthenticationError):
            await other.tokenize(PROMPT)


# hidden states: features() and embed() ---------------------------------------------------------


def npz_response(**arrays: object) -> httpx.Response:
    np = pytest.importorskip("numpy")
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return httpx.Response(200, content=buffer.getvalue(),
                          headers={"Content-Type": "application/octet-stream"})


def test_features_and_embed_send_their_fields_and_decode_the_answers():
    np = pytest.importorskip("numpy")
    seen: list[tuple[str, dict]] = []
    packed = base64.b64encode(np.asarray([0.5, -1.25], "<f4").tobytes()).decode()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, json.loads(request.content)))
        if request.url.path == "/v1/features":
            return npz_response(mlp_out=np.ones((1, 2, 3), np.float32),
                                resid_pre=np.zeros((1, 2, 3), np.float32), tokens=[1, 5],
                                pieces=["<s>", " a"], layers=[4], positions=[0, 1])
        return httpx.Response(200, json={"object": "list", "model": "m", "data": [
            {"object": "embedding", "index": 1, "embedding": [1.0, 2.0]},
            {"object": "embedding", "index": 0, "embedding": packed}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    with fake_client(handler) as client:
        features = client.features("hi", layers=[-1], points=["mlp_out", "resid_pre"],
                                   positions=[0, -1], steering=[{"vector": "v", "scale": 2}])
        embeddings = client.embed(["a", "b"], pooling="last", normalize=False)
    assert isinstance(features, Features)
    assert features.points == ["mlp_out", "resid_pre"]  # in the server's order
    assert features["mlp_out"].dtype == np.float32 and features["mlp_out"].shape == (1, 2, 3)
    assert features.tokens == [1, 5] and features.pieces == ["<s>", " a"]
    assert features.layers == [4] and features.positions == [0, 1]
    assert isinstance(embeddings, Embeddings)
    assert embeddings.embeddings == [[0.5, -1.25], [1.0, 2.0]]  # by index, base64 decoded
    assert embeddings.embedding == [0.5, -1.25] and embeddings.usage.prompt_tokens == 3
    assert seen == [
        ("/v1/features", {"input": "hi", "format": "npz", "positions": [0, -1], "layers": [-1],
                          "points": ["mlp_out", "resid_pre"],
                          "steering": [{"vector": "v", "scale": 2}]}),
        ("/v1/embeddings", {"input": ["a", "b"], "encoding_format": "base64",
                            "pooling": "last", "normalize": False})]


def test_features_answer_that_is_not_npz_is_a_tiller_error():
    pytest.importorskip("numpy")
    with fake_client(lambda request: httpx.Response(200, content=b"<html>")) as client:
        with pytest.raises(TillerError, match="unexpected response") as info:
            client.features("hi")
        assert info.value.type == "invalid_response"
    no_index = npz_response(resid_post=[[[1.0]]])  # an npz without tokens, layers, ...
    with fake_client(lambda request: no_index) as client, pytest.raises(TillerError,
                                                                        match="tokens"):
        client.features("hi")


def test_features_and_embed_against_the_server(server: str, client: Client):
    np = pytest.importorskip("numpy")
    features = client.features(PROMPT, layers=[0, -1], points=["resid_pre", "resid_post"],
                               positions="last")
    raw = httpx.post(server + "/v1/features", headers={"Authorization": f"Bearer {KEY}"},
                     json={"input": PROMPT, "layers": [0, -1], "positions": "last",
                           "points": ["resid_pre", "resid_post"]}, timeout=60).json()
    assert features.tokens == raw["tokens"] == [1, *client.tokenize(PROMPT)]
    assert features.pieces == raw["pieces"] and features.layers == [0, 4]
    assert features.positions == [len(features.tokens) - 1]
    for point in ("resid_pre", "resid_post"):
        np.testing.assert_array_equal(features[point], np.asarray(raw["data"][point],
                                                                  dtype=np.float32))
    embeddings = client.embed([PROMPT, [1, 403]], pooling="mean")
    floats = httpx.post(server + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                        json={"input": [PROMPT, [1, 403]]}, timeout=60).json()
    assert embeddings.embeddings == [d["embedding"] for d in floats["data"]]
    assert embeddings.model == "stories260K.bin" and embeddings.usage == Usage(
        floats["usage"]["prompt_tokens"], 0, floats["usage"]["total_tokens"])
    with pytest.raises(BadRequestError) as bad:
        client.features(PROMPT, layers=[5])
    assert bad.value.param == "layers"
    with pytest.raises(ContextLengthError):
        client.embed([1] * 5000)


async def test_async_features_and_embed(server: str, client: Client):
    np = pytest.importorskip("numpy")
    want = client.features([1, 403, 407], points="mlp_out")
    async with AsyncClient(server, api_key=KEY, timeout=60) as aclient:
        got = await aclient.features([1, 403, 407], points="mlp_out")
        embedded = await aclient.embed("Once", layer=-2, normalize=False)
    assert got.points == ["mlp_out"] and got.layers == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(got["mlp_out"], want["mlp_out"])
    assert embedded.embeddings == client.embed("Once", layer=-2, normalize=False).embeddings


def test_steering_vectors_through_the_client(client: Client):
    import numpy as np

    made = client.steering.create("actadd", add="dog", sub="cat", layer=2)
    assert made.kind == "actadd" and made.layers == [2] and made.id.startswith("sv-")
    assert client.steering.create("actadd", add="dog", sub="cat", layer=2).id == made.id
    assert made.id in [v.id for v in client.steering.list()]
    assert client.steering.get(made.id) == made
    rows = np.load(io.BytesIO(client.steering.download(made.id)))
    assert rows.shape == tuple(made.shape)
    steered = client.complete(PROMPT, max_tokens=30, temperature=0.8, seed=3,
                              steering=[{"vector": made.id, "layer": 3, "scale": 8.0}])
    plain = client.complete(PROMPT, max_tokens=30, temperature=0.8, seed=3)
    assert steered.text != plain.text
    control = client.steering.create("mean", positive=["a dog", "dogs run"],
                                     negative=["a cat", "cats nap"], layers=[2, 3])
    gguf_bytes = client.steering.download(control.id, "gguf")
    imported = client.steering.import_gguf(gguf_bytes)
    assert imported.layers == [2, 3] and imported.kind == "control"
    client.steering.delete(made.id)
    with pytest.raises(NotFoundError):
        client.steering.get(made.id)


async def test_async_steering(server: str):
    async with AsyncClient(server, api_key=KEY, timeout=60) as client:
        made = await client.steering.create("actadd", add="sun", sub="rain", layer=1)
        assert (await client.steering.get(made.id)).id == made.id
        assert made.id in [v.id for v in await client.steering.list()]
        await client.steering.delete(made.id)
        with pytest.raises(NotFoundError):
            await client.steering.get(made.id)
