"""The direct path: a plain stream's token chunks written by the engine thread straight into the
client's socket (Generation.stream_directly, http.SocketWriter), with what a full socket did not
take handed back to the event loop. Clients see the same bytes either way: the streamed text
equals the whole response's, the HTTP chunking stays valid (aiohttp's client parses it
strictly), and the writes really come from the engine thread."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiller.engine.engine import Engine
from tiller.server import http as http_module
from tiller.server.app import ServerConfig
from tiller.server.http import Sent, SocketWriter

from tests.test_server import post, sse_events


@pytest.fixture(scope="module")
def config(shared_models: Path, tmp_path_factory) -> ServerConfig:
    return ServerConfig(model_path=shared_models / "stories260K.bin",
                        tokenizer_path=shared_models / "tok512.bin", parallel=8,
                        token_budget=64, steering_dir=tmp_path_factory.mktemp("steering"))


PLAIN = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0.9, "seed": 11,
         "stream": True, "stream_options": {"include_usage": True}}


class Spy:
    """SocketWriter.write, recording each call's thread and result."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, Sent]] = []
        real = SocketWriter.write

        def write(writer: SocketWriter, frame: bytes) -> Sent:
            sent = real(writer, frame)
            self.calls.append((threading.current_thread().name, sent))
            return sent

        monkeypatch.setattr(SocketWriter, "write", write)

    def results(self) -> list[Sent]:
        return [sent for _, sent in self.calls]


async def streamed(client, path: str, body: dict) -> tuple[str, dict | None, list]:
    events = await sse_events(await client.post(path, json=body))
    assert events[-1] == "[DONE]"
    usage = next((e["usage"] for e in events[:-1] if e.get("usage")), None)
    if usage is not None:  # the prefix cache's share differs from run to run
        usage.pop("prompt_tokens_details")
    if path.endswith("chat/completions"):
        text = "".join(c["delta"].get("content") or "" for e in events[:-1]
                       for c in e["choices"])
    else:
        text = "".join(c["text"] for e in events[:-1] for c in e["choices"])
    return text, usage, events


async def test_plain_streams_are_written_by_the_engine_thread(client, monkeypatch):
    spy = Spy(monkeypatch)
    # NOTE: this model's steps take microseconds; at a real model's pace (milliseconds) the
    # event loop has caught up with the stream's first events before the next token, however
    # busy the machine running the tests is
    step = Engine.step

    def slow_step(engine: Engine, *args, **kwargs):
        time.sleep(0.003)
        return step(engine, *args, **kwargs)

    monkeypatch.setattr(Engine, "step", slow_step)
    text, usage, events = await streamed(client, "/v1/completions", PLAIN)
    whole = await post(client, "/v1/completions", {**PLAIN, "stream": False})
    whole["usage"].pop("prompt_tokens_details")
    assert text == whole["choices"][0]["text"] and usage == whole["usage"]
    texts = sum(1 for e in events[:-1] for c in e["choices"] if c["text"])
    assert {name for name, _ in spy.calls} == {"tiller-engine"}
    # the first token may come before the response is ready for the engine thread
    assert texts - 2 <= len(spy.calls) <= texts and set(spy.results()) == {Sent.ALL}

    spy.calls.clear()
    chat = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 30,
            "temperature": 0.9, "seed": 5, "stream": True}
    text, _, _ = await streamed(client, "/v1/chat/completions", chat)
    whole = await post(client, "/v1/chat/completions", {**chat, "stream": False})
    assert text == whole["choices"][0]["message"]["content"] and len(spy.calls) >= 20

    spy.calls.clear()  # llama.cpp's /completion: its chunk carries the token and the count too
    llama = {"prompt": "Once upon a time", "n_predict": 30, "temperature": 0.9, "seed": 3}
    whole = await post(client, "/completion", llama)
    events = await sse_events(await client.post("/completion", json={**llama, "stream": True}))
    assert "".join(e["content"] for e in events) == whole["content"] and len(spy.calls) >= 20
    assert [e["tokens_predicted"] for e in events[:-1]] == list(range(1, len(events)))
    assert {k: events[-1][k] for k in ("tokens_cached", "has_new_line", "tokens_predicted")} \
        == {k: whole[k] for k in ("tokens_cached", "has_new_line", "tokens_predicted")}


@pytest.mark.parametrize("changes", [{"logprobs": 2}, {"n": 2}, {"timings_per_token": True}])
async def test_streams_with_more_than_text_stay_on_the_event_loop(client, monkeypatch, changes):
    spy = Spy(monkeypatch)
    text, _, _ = await streamed(client, "/v1/completions", {**PLAIN, **changes})
    assert text and spy.calls == []


async def test_stop_strings_on_the_direct_path(client, monkeypatch):
    spy = Spy(monkeypatch)
    body = {"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "stop": "Lily."}
    whole = await post(client, "/v1/completions", body)
    text, _, events = await streamed(client, "/v1/completions", {**body, "stream": True})
    assert text == whole["choices"][0]["text"] == ", there was a little girl named "
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and len(spy.calls) > 5


def short_writes(monkeypatch: pytest.MonkeyPatch, pattern: str) -> list[str]:
    """Make the socket writer's os.write follow `pattern`, cyclically, call by call: 'a' all,
    'h' half of it (the socket took part), 'n' nothing (EAGAIN). Returns the pattern's letters
    as they are used."""
    used: list[str] = []

    def write(fd: int, data: bytes) -> int:
        kind = pattern[len(used) % len(pattern)]
        used.append(kind)
        if kind == "n":
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return os.write(fd, data if kind == "a" else data[:len(data) // 2])

    monkeypatch.setattr(http_module, "os", SimpleNamespace(write=write, dup=os.dup,
                                                           close=os.close, name=os.name))
    return used


@pytest.mark.parametrize("pattern", ["aahan", "h", "n", "an"])
async def test_a_full_socket_hands_the_rest_to_the_event_loop(client, monkeypatch, pattern):
    """A frame the socket took part of is finished by the event loop before anything else it
    writes, and one it took none of is written by the event loop; either way the engine thread
    goes on once the loop has written everything: the client sees one valid chunked stream with
    the whole text."""
    whole = await post(client, "/v1/completions", {**PLAIN, "stream": False})
    spy = Spy(monkeypatch)
    used = short_writes(monkeypatch, pattern)
    text, usage, _ = await streamed(client, "/v1/completions", PLAIN)
    whole["usage"].pop("prompt_tokens_details")
    assert text == whole["choices"][0]["text"] and usage == whole["usage"]
    assert set(used) == set(pattern)
    results = spy.results()
    assert (Sent.PART in results) == ("h" in pattern) and (Sent.NONE in results) == ("n" in pattern)
    if "a" in pattern:
        assert Sent.ALL in results


async def test_concurrent_direct_streams_equal_their_solo_runs(client, monkeypatch):
    used = short_writes(monkeypatch, "aaah")
    bodies = [{**PLAIN, "seed": seed, "max_tokens": 30} for seed in range(6)]
    solo = [(await streamed(client, "/v1/completions", b))[0] for b in bodies]
    together = await asyncio.gather(*(streamed(client, "/v1/completions", b) for b in bodies))
    assert [t for t, _, _ in together] == solo and len(set(solo)) > 1 and "h" in used


async def test_every_writer_is_closed(client, monkeypatch):
    """A stream that ends, one a stop string ends and one whose client hangs up mid-way each
    close their writer's descriptor (the hung-up one once its write fails)."""
    writers: list[SocketWriter] = []
    init = SocketWriter.__init__

    def record(writer: SocketWriter, fd: int, chunked: bool) -> None:
        init(writer, fd, chunked)
        writers.append(writer)

    monkeypatch.setattr(SocketWriter, "__init__", record)
    await streamed(client, "/v1/completions", PLAIN)
    await streamed(client, "/v1/completions", {**PLAIN, "temperature": 0, "stop": "Lily."})
    response = await client.post("/v1/completions", json={**PLAIN, "max_tokens": 400})
    for _ in range(3):
        await response.content.readline()
    response.close()  # hang up mid-stream
    for _ in range(200):
        state = await (await client.get("/slots")).json()
        if not any(s["is_processing"] for s in state) and all(w._fd < 0 for w in writers):
            break
        await asyncio.sleep(0.05)
    assert len(writers) == 3 and [w._fd for w in writers] == [-1, -1, -1]


# the writer itself, on a socket pair ---------------------------------------------------------

def read_all(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = b""
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    ours.setblocking(False)  # as asyncio's
    return ours, theirs


def test_socket_writer_frames_chunks_and_stops_at_a_full_socket():
    ours, theirs = tcp_pair()
    try:
        writer = SocketWriter(ours.fileno(), chunked=True)
        assert writer.write(b"data: x\n\n") is Sent.ALL
        assert read_all(theirs) == b"9\r\ndata: x\n\n\r\n"
        raw = SocketWriter(ours.fileno(), chunked=False)
        assert raw.write(b"data: y\n\n") is Sent.ALL and read_all(theirs) == b"data: y\n\n"
        raw.close()
        # fill the socket: the frame that does not fit is taken in part (or not at all)
        frame = b"z" * 4000
        wire = b"%x\r\n%b\r\n" % (len(frame), frame)
        results = [writer.write(frame) for _ in range(10_000)]
        short = next(i for i, r in enumerate(results) if r is not Sent.ALL)
        if results[short] is Sent.PART:
            assert wire.endswith(writer.unsent) and 0 < len(writer.unsent) < len(wire)
        # nothing more until the event loop has written what is left
        assert set(results[short + 1:]) == {Sent.NONE}
        taken = wire[:len(wire) - len(writer.unsent)] if results[short] is Sent.PART else b""
        received = b""
        while len(received) < short * len(wire) + len(taken):
            received += theirs.recv(1 << 16)
        assert received == wire * short + taken
        writer.close()
        assert writer.write(b"data: x\n\n") is Sent.NONE  # closed: never writes again
    finally:
        ours.close()
        theirs.close()


def test_socket_writer_outlives_the_loops_descriptor():
    """The writer has a descriptor of its own: when the event loop closes the connection's, a
    write fails on that socket (its client gone), and never reaches whatever socket is given
    the number next."""
    ours, theirs = tcp_pair()
    writer = SocketWriter(ours.fileno(), chunked=True)
    ours.close()
    other, peer = tcp_pair()  # may get the number just freed
    try:
        theirs.close()  # the client went away
        results = [writer.write(b"data: late\n\n") for _ in range(50)]
        assert results[-1] is Sent.NONE  # its reset seen; the writer closed itself
        assert read_all(peer) == b""
    finally:
        writer.close()
        other.close()
        peer.close()
