"""Server-sent events, decoded as the HTML standard says (the "event stream" parsing rules).

Lines end at CRLF, LF or CR; `data:` lines accumulate (joined by "\\n") until a blank line
dispatches the event; lines starting with ":" are comments (keepalives); `event:` and `id:`
are kept, `retry:` and unknown fields are ignored; an event left unfinished at the end of the
stream is dropped.

NOTE: lines are split on bytes, not with str.splitlines() (which httpx's iter_lines() uses):
splitlines() also breaks at U+2028, U+0085 and friends, which JSON may carry unescaped inside a
string, and would cut such an event in two.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Incremental decoder: feed() bytes as they arrive, get the completed events back."""

    def __init__(self) -> None:
        self._buffer = b""
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        buffer = self._buffer + chunk
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._buffer = buffer  # might still be a byte-order mark
                return []
            self._started = True
            buffer = buffer.removeprefix(_BOM)
        events = []
        start = 0
        for match in _LINE_END.finditer(buffer):
            if match.group() == b"\r" and match.end() == len(buffer):
                break  # a CR at the end of the chunk may be half of a CRLF: wait for more
            event = self._line(buffer[start:match.start()].decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
            start = match.end()
        self._buffer = buffer[start:]
        return events

    def end(self) -> list[ServerSentEvent]:
        """The stream is over: a final CR still ends its line; an unfinished event is dropped."""
        buffer, self._buffer = self._buffer, b""
        event = None
        if buffer.endswith(b"\r"):
            event = self._line(buffer[:-1].decode("utf-8", errors="replace"))
        self._data, self._event = [], ""
        return [event] if event is not None else []

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: servers send these as keepalives
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._last_id = value
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent("\n".join(data), event or "message", self._last_id)


def iter_events(chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.end()


async def aiter_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[ServerSentEvent]:
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.end():
        yield event
