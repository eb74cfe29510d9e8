"""bench/http_stream.py, the load generator's client, against aiohttp's server as the
reference HTTP implementation: the `data:` payloads it sends come out in order, however the
bytes are cut, and a broken, failed or stalled response ends its request with the error."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from bench.http_stream import Request, ResponseParser, StreamError, run_clients

PAYLOADS = [json.dumps({"choices": [{"text": f"tok{i} é\n", "index": 0}]}) for i in range(40)]


async def _sse(request: web.Request) -> web.StreamResponse:
    """The payloads as SSE, written in pieces that cut lines (and chunks) anywhere."""
    body = await request.json()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    text = "".join(f"data: {p}\n\n" for p in PAYLOADS[:body["n"]]) + "data: [DONE]\n\n"
    data = text.encode()
    cut = body.get("cut", 7)
    for i in range(0, len(data), cut):
        await resp.write(data[i:i + cut])
        if body.get("pause"):
            await asyncio.sleep(0.001)
    await resp.write_eof()
    return resp


async def _sized(request: web.Request) -> web.Response:
    text = "".join(f"data: {p}\n\n" for p in PAYLOADS[:3]) + "data: [DONE]"  # no newline
    return web.Response(text=text, content_type="text/event-stream")


async def _error(request: web.Request) -> web.Response:
    return web.json_response({"error": {"message": "bad field", "param": "x"}}, status=400)


STALLED: set[asyncio.Task] = set()  # handlers that never finish, cancelled at teardown


async def _stall(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(f"data: {PAYLOADS[0]}\n\n".encode())
    task = asyncio.current_task()
    assert task is not None
    STALLED.add(task)
    await asyncio.sleep(3600)
    return resp


async def _cut_off(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(f"data: {PAYLOADS[0]}\n\n".encode())
    assert request.transport is not None
    request.transport.close()  # mid-response: no last chunk
    return resp


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = web.Application()
    app.router.add_post("/sse", _sse)
    app.router.add_post("/sized", _sized)
    app.router.add_post("/error", _error)
    app.router.add_post("/stall", _stall)
    app.router.add_post("/cut", _cut_off)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"

    async def stop() -> None:
        for task in STALLED:
            task.cancel()
        await runner.cleanup()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


class Recorded:
    def __init__(self, body: dict) -> None:
        self.body = json.dumps(body).encode()
        self.payloads: list[bytes] = []
        self.times: list[float] = []
        self.end: tuple[int, bytes, Exception | None] | None = None

    def request(self) -> Request:
        def on_data(now: float, data: bytes) -> bool:
            self.payloads.append(data)
            self.times.append(now)
            return data == b"[DONE]"

        def on_end(status: int, body: bytes, error: Exception | None) -> None:
            assert self.end is None, "a request ended twice"
            self.end = (status, body, error)

        return Request(self.body, on_data, on_end)


def run(url: str, recorded: list[Recorded], concurrency: int = 1,
        read_timeout: float = 30.0) -> None:
    queue = list(reversed(recorded))
    run_clients(url, concurrency, lambda: queue.pop().request() if queue else None,
                read_timeout=read_timeout)


def expected(n: int) -> list[bytes]:
    return [p.encode() for p in PAYLOADS[:n]] + [b"[DONE]"]


@pytest.mark.parametrize("cut", [1, 3, 7, 64, 100_000])
def test_payloads_in_order_however_cut(server: str, cut: int) -> None:
    rec = Recorded({"n": 40, "cut": cut, "pause": cut >= 64})
    run(f"{server}/sse", [rec])
    assert rec.end == (200, b"", None)
    assert rec.payloads == expected(40)
    assert rec.times == sorted(rec.times)


def test_many_clients_each_get_their_own(server: str) -> None:
    recs = [Recorded({"n": i % 7 + 1, "cut": 5 + i, "pause": True}) for i in range(12)]
    run(f"{server}/sse", recs, concurrency=4)
    for i, rec in enumerate(recs):
        assert rec.end == (200, b"", None)
        assert rec.payloads == expected(i % 7 + 1)


def test_a_sized_body_and_its_last_line_without_newline(server: str) -> None:
    rec = Recorded({})
    run(f"{server}/sized", [rec])
    assert rec.end == (200, b"", None)
    assert rec.payloads == expected(3)


def test_an_error_status_keeps_its_body(server: str) -> None:
    rec = Recorded({})
    run(f"{server}/error", [rec])
    assert rec.end is not None
    status, body, error = rec.end
    assert (status, error) == (400, None)
    assert json.loads(body) == {"error": {"message": "bad field", "param": "x"}}
    assert rec.payloads == []


def test_a_connection_closed_mid_response_is_an_error(server: str) -> None:
    rec = Recorded({})
    run(f"{server}/cut", [rec])
    assert rec.end is not None and isinstance(rec.end[2], StreamError)
    assert rec.payloads == expected(1)[:1]


def test_a_stalled_response_times_out(server: str) -> None:
    rec = Recorded({})
    start = time.perf_counter()
    run(f"{server}/stall", [rec], read_timeout=0.5)
    assert rec.end is not None and isinstance(rec.end[2], TimeoutError)
    assert rec.payloads == expected(1)[:1]
    assert time.perf_counter() - start < 10


def test_nothing_listening_ends_the_request_with_the_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    rec = Recorded({})
    run(f"http://127.0.0.1:{port}/sse", [rec])
    assert rec.end is not None and isinstance(rec.end[2], ConnectionRefusedError)


def test_parser_fed_aiohttp_bytes_one_at_a_time(server: str) -> None:
    """The exact bytes aiohttp sends (chunked), fed one byte per call."""
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"n": 10, "cut": 11}).encode()
    raw = bytearray()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /sse HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        while data := sock.recv(65536):
            raw += data
    assert b"transfer-encoding: chunked" in raw.lower()
    got: list[bytes] = []
    parser = ResponseParser(lambda now, d: got.append(d) or d == b"[DONE]")
    done = [parser.feed(raw[i:i + 1], 0.0) for i in range(len(raw))]
    assert done[-1] and got == expected(10)


def test_parser_rejects_broken_framing() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    with pytest.raises(StreamError, match="chunk size"):
        ResponseParser(lambda now, d: False).feed(head + b"zz\r\n", 0.0)
    with pytest.raises(StreamError, match="CRLF"):
        ResponseParser(lambda now, d: False).feed(head + b"3\r\nabcXY", 0.0)
    with pytest.raises(StreamError, match="status line"):
        ResponseParser(lambda now, d: False).feed(b"SPDY/3 200\r\n\r\n", 0.0)
