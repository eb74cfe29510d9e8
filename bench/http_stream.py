"""A lean streaming HTTP/1.1 client for the load generator: many clients on one thread, one
POST per connection, the SSE `data:` payloads of each response handed to a callback with the
time their bytes arrived.

Why not aiohttp's client: on this 2-core machine the load generator shares the cores with the
server it measures, and every CPU millisecond it spends is taken from the server's threads.
aiohttp's streaming read cost 0.2-0.3 CPU ms per token at one stream: an event loop turn,
a task switch and an async iteration per line, and asyncio's 256 KiB receive buffer, which
glibc serves with a fresh mmap on every read. One thread waiting on the sockets with a
selector, reading into 64 KiB and parsing in place, costs about half of that (bench/README.md,
Session 25), for either server alike.

It speaks only what the benchmark needs: `Connection: close`, a chunked, sized or
read-to-close body, `data:` lines (each one a message, as both servers send them).
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit


class StreamError(ValueError):
    """The server broke the protocol or the connection."""


# called with (arrival time, payload after "data:"), returns True to end the request early
OnData = Callable[[float, bytes], bool]


class ResponseParser:
    """An HTTP/1.1 response fed as its bytes arrive: `feed` returns True once it is complete
    (or `on_data` ended it), `close` says the connection closed. `status` and, for a status
    other than 200, `body` hold what came."""

    def __init__(self, on_data: OnData) -> None:
        self.on_data = on_data
        self.raw = bytearray()  # bytes not parsed yet (head, chunk framing)
        self.lines = bytearray()  # body bytes not split into lines yet
        self.status = 0
        self.chunked = False
        self.remaining: int | None = None  # a sized body's bytes still to come
        self.chunk_left = 0  # bytes of the current chunk still to come; -1: its CRLF next
        self.head_done = False
        self.complete = False
        self.body = bytearray()  # a non-200 response's body, for its error message

    def feed(self, data: bytes, now: float) -> bool:
        if self.complete:
            return True
        self.raw += data
        if self.head_done or self._head():
            self._body(now)
        return self.complete

    def close(self, now: float) -> None:
        """The server closed the connection: the end of a body without a length, else an
        error."""
        if self.complete:
            return
        if self.head_done and not self.chunked and self.remaining is None:
            self._feed(b"", now, final=True)
            self.complete = True
            return
        raise StreamError("connection closed mid-response")

    def _head(self) -> bool:
        end = self.raw.find(b"\r\n\r\n")
        if end < 0:
            if len(self.raw) > 65536:
                raise StreamError("response head over 64 KiB")
            return False
        lines = bytes(self.raw[:end]).decode("latin-1").split("\r\n")
        del self.raw[:end + 4]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise StreamError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "transfer-encoding":
                self.chunked = "chunked" in value.lower()
            elif name == "content-length":
                self.remaining = int(value)
        if self.chunked:
            self.remaining = None
        self.head_done = True
        return True

    def _body(self, now: float) -> None:
        if not self.chunked:
            data = bytes(self.raw)
            self.raw.clear()
            if self.remaining is not None:
                data = data[:self.remaining]
                self.remaining -= len(data)
            self._feed(data, now, final=self.remaining == 0)
            if self.remaining == 0:
                self.complete = True
            return
        raw = self.raw
        pos = 0
        while not self.complete:
            if self.chunk_left > 0:
                take = min(self.chunk_left, len(raw) - pos)
                if take <= 0:
                    break
                self._feed(raw[pos:pos + take], now)
                pos += take
                self.chunk_left -= take
                if self.chunk_left:
                    break
                self.chunk_left = -1
            if self.chunk_left == -1:
                if len(raw) - pos < 2:
                    break
                if raw[pos:pos + 2] != b"\r\n":
                    raise StreamError("a chunk not followed by CRLF")
                pos += 2
                self.chunk_left = 0
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                if len(raw) - pos > 1024:
                    raise StreamError("chunk size line over 1 KiB")
                break
            size_text = bytes(raw[pos:eol]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise StreamError(f"bad chunk size {size_text[:20]!r}") from None
            pos = eol + 2
            if size == 0:  # the last chunk: trailers are not read
                self._feed(b"", now, final=True)
                self.complete = True
                break
            self.chunk_left = size
        del raw[:pos]

    def _feed(self, data: bytes | bytearray, now: float, final: bool = False) -> None:
        if self.status != 200:
            self.body += data
            return
        lines = self.lines
        lines += data
        start = 0
        while not self.complete:
            eol = lines.find(b"\n", start)
            if eol < 0:
                break
            if lines.startswith(b"data:", start) \
                    and self.on_data(now, bytes(lines[start + 5:eol]).strip()):
                self.complete = True
            start = eol + 1
        del lines[:start]
        if final and not self.complete and lines.startswith(b"data:"):  # no last newline
            self.on_data(now, bytes(lines[5:]).strip())
            lines.clear()


@dataclass
class Request:
    """One POST: its JSON body, what gets its `data:` payloads, and what hears how it ended:
    on_end(HTTP status (0 if none came), the body of a status other than 200, the error or
    None)."""

    body: bytes
    on_data: OnData
    on_end: Callable[[int, bytes, Exception | None], None]


@dataclass
class _Connection:
    sock: socket.socket
    request: Request
    parser: ResponseParser
    last_data: float


def run_clients(url: str, concurrency: int, next_request: Callable[[], Request | None], *,
                read_timeout: float, connect_timeout: float = 30.0) -> None:
    """`concurrency` clients, each POSTing to `url` the requests `next_request` gives, one
    after another, until it gives None; all on this thread, one connection per request.

    NOTE: one thread waiting on every socket at once: a step of the server that sends to many
    clients wakes it once, where a thread per client would take a core from the server's
    threads once per client. A connection that sends nothing for `read_timeout` seconds
    ends its request with a TimeoutError."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url}: only http:// URLs")
    host, port = parts.hostname, parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            "Content-Length: {}\r\nConnection: close\r\n\r\n")
    selector = selectors.DefaultSelector()

    def start() -> bool:
        """The next request on a new connection; False when there is none."""
        while (request := next_request()) is not None:
            try:
                sock = socket.create_connection((host, port), timeout=connect_timeout)
            except OSError as e:
                request.on_end(0, b"", e)
                continue
            try:
                sock.sendall(head.format(len(request.body)).encode("latin-1") + request.body)
                sock.setblocking(False)
            except OSError as e:
                sock.close()
                request.on_end(0, b"", e)
                continue
            selector.register(sock, selectors.EVENT_READ, _Connection(
                sock, request, ResponseParser(request.on_data), time.perf_counter()))
            return True
        return False

    def end(connection: _Connection, error: Exception | None) -> None:
        selector.unregister(connection.sock)
        connection.sock.close()
        parser = connection.parser
        connection.request.on_end(parser.status, bytes(parser.body), error)
        start()

    for _ in range(concurrency):
        if not start():
            break
    checked = time.perf_counter()
    while selector.get_map():
        ready = selector.select(timeout=1.0)
        now = time.perf_counter()
        for key, _ in ready:
            connection: _Connection = key.data
            connection.last_data = now
            try:
                # NOTE: 64 KiB: a larger buffer is a fresh mmap for every token (glibc)
                data = connection.sock.recv(65536)
                if data:
                    done = connection.parser.feed(data, now)
                else:
                    connection.parser.close(now)
                    done = True
            except BlockingIOError:
                continue
            except (OSError, ValueError) as e:  # StreamError, or on_data's bad JSON
                end(connection, e)
                continue
            if done:
                end(connection, None)
        if now - checked >= 1.0:
            checked = now
            for key in list(selector.get_map().values()):
                connection = key.data
                if now - connection.last_data >= read_timeout:
                    end(connection, TimeoutError(
                        f"no byte from {url} for {read_timeout:g}s"))
    selector.close()
