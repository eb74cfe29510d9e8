"""Tool calls in a chat reply: content and calls out of generated text, incrementally, for
each format of server/tools.py.

The parser is incremental, for streaming, and the non-streamed reply is what it gives for the
whole text, so both agree. Text that might still become a call marker is held back. Under
"auto" a call is released once its text is complete and valid (the closing tag, or the JSON
object's end), since a malformed one must stay content; a forced call, valid by construction,
starts as soon as its head (`{"name": "...", "arguments": {`) is written and its arguments
stream as they are generated, as OpenAI's do. Whitespace next to a call is dropped.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from .tools import CLOSE, MISTRAL_TAG, OPEN, PYTHON_TAG, ToolFormat

__all__ = ["ArgumentsDelta", "CallStart", "ContentDelta", "Event", "ToolCall", "ToolCallParser",
           "call_id", "parse_output"]

_ID_CHARS = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    """A call begins: its index in the reply, id and tool name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    """More of the arguments' JSON text of call `index`."""

    index: int
    text: str


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


Event = ContentDelta | CallStart | ArgumentsDelta

# the head of a call written name first, up to the `{` of its arguments (which the lookahead
# requires, so that a head is taken only once its arguments are known to be an object)
_HEAD = {key: re.compile(rf'\s*\{{\s*"name"\s*:\s*"([A-Za-z0-9_-]+)"\s*,\s*"{key}"\s*:\s*(?=\{{)')
         for key in ("arguments", "parameters")}


def call_id(fmt: ToolFormat = ToolFormat.GENERIC) -> str:
    """OpenAI's form, call_ and 24 random letters and digits; 9 letters and digits for Mistral
    (its template refuses other ids)."""
    if fmt is ToolFormat.MISTRAL:
        return "".join(secrets.choice(_ID_CHARS) for _ in range(9))
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


class ToolCallParser:
    """Generated text in (push, then finish), content and calls out; `calls` holds the calls
    so far, each with the arguments sent for it.

    `stream_arguments` (for forced calls, whose text the grammar makes valid): a call starts as
    soon as its head (`{"name": "...", "arguments": `) is complete, and its arguments follow as
    they are written; a call cut short (max_tokens) then keeps the arguments it has, as OpenAI's
    do. Otherwise (auto) a call is released only once its whole text is known to be valid, so
    that a malformed one can stay content. Without `parallel`, calls after the first are
    content too: the client asked for one at most.
    """

    def __init__(self, fmt: ToolFormat, names: frozenset[str],
                 stream_arguments: bool = False, parallel: bool = True) -> None:
        self.format = fmt
        self.names = names
        self.stream_arguments = stream_arguments
        self.parallel = parallel
        self.calls: list[ToolCall] = []
        self._key = "parameters" if fmt is ToolFormat.LLAMA3 else "arguments"
        self._pending = ""  # text not yet released
        self._in_call = False  # tagged formats: inside <tool_call>
        self._open: ToolCall | None = None  # a call whose arguments are streaming
        self._args_at = 0  # where the open call's arguments start in _pending
        self._head = True  # llama3: still at the start of the reply, where calls may be
        self._space = ""  # trailing whitespace of the content: sent if more content follows
        self._after_call = False  # whitespace right after a call is dropped
        self._released = False  # some content went out

    def push(self, text: str) -> list[Event]:
        self._pending += text
        return self._parse(final=False)

    def finish(self) -> list[Event]:
        """The end of the reply: release what was held back."""
        events = self._parse(final=True)
        if self._space and not self._after_call:
            events.append(ContentDelta(self._space))
        self._space = ""
        return events

    def _parse(self, final: bool) -> list[Event]:
        if self.format is ToolFormat.LLAMA3:
            return self._json_calls(final)
        if self.format is ToolFormat.MISTRAL:
            return self._array_calls(final)
        return self._tagged(final)

    # tagged: <tool_call> ... </tool_call> -------------------------------------------------

    def _tagged(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            text = self._pending
            if not self._in_call:
                start = text.find(OPEN)
                if start < 0:
                    keep = 0 if final else _partial_suffix(text, OPEN)
                    events += self._content(text[:len(text) - keep])
                    self._pending = text[len(text) - keep:]
                    return events
                events += self._content(text[:start])
                self._pending = text[start:]
                self._in_call = True
                continue
            if self._open is not None or self._start_streaming(len(OPEN), events):
                end = self._stream_arguments(events, final)
                if end < 0:
                    return events
                close = text.find(CLOSE, end)
                if close < 0 and not final:
                    return events
                self._close_open()
                self._in_call = False
                self._pending = text[len(text) if close < 0 else close + len(CLOSE):]
                continue
            end = text.find(CLOSE)
            if end < 0 and not final:
                return events
            # NOTE: a reply that ends inside a call without its closing tag still counts if the
            # call is complete (llama.cpp's parser accepts it too)
            consumed = len(text) if end < 0 else end + len(CLOSE)
            call = self._whole_call(text[len(OPEN):end if end >= 0 else len(text)])
            self._in_call = False
            self._pending = text[consumed:]
            events += self._content(text[:consumed]) if call is None else call

    # llama3: {"name": ..., "parameters": ...} at the start ---------------------------------

    def _json_calls(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while self._head:
            if self._open is not None:
                end = self._stream_arguments(events, final)
                if end < 0:
                    if final:
                        self._close_open()
                        self._head, self._pending = False, ""
                    return events
                rest = self._pending[end:].lstrip()
                if not rest and not final:
                    return events  # the call's closing brace is still to come
                self._close_open()
                self._pending = rest.removeprefix("}")
                continue
            text = self._pending.lstrip()
            if self.calls:
                text = text.removeprefix(";").lstrip()
            if not final and PYTHON_TAG.startswith(text):
                return events  # nothing yet, or the start of the tag: wait
            text = text.removeprefix(PYTHON_TAG).lstrip()
            if not final and not text:
                return events
            if text.startswith("{") and self.stream_arguments:
                saved, self._pending = self._pending, text
                if self._start_streaming(0, events):
                    continue
                self._pending = saved
            end = _json_end(text) if text.startswith("{") else -1
            if end < 0 and text.startswith("{") and not final:
                return events  # the object is not finished yet
            call = self._whole_call(text[:end]) if end > 0 else None
            if call is None:
                self._head = False
                if self.calls:
                    self._pending = text
            else:
                events += call
                self._pending = text[end:]
        events += self._content(self._pending)
        self._pending = ""
        return events

    # mistral: [TOOL_CALLS][{...}, ...] at the start ----------------------------------------

    def _array_calls(self, final: bool) -> list[Event]:
        """NOTE: the array is released whole, forced or not (no argument streaming)."""
        events: list[Event] = []
        if self._head:
            text = self._pending.lstrip()
            if not final and MISTRAL_TAG.startswith(text):
                return events  # nothing yet, "[" of either the tag or the array: wait
            text = text.removeprefix(MISTRAL_TAG).lstrip()
            end = _json_end(text) if text.startswith("[") else -1
            if not final and (not text or (text.startswith("[") and end < 0)):
                return events
            self._head = False
            calls = self._array(text[:end]) if end > 0 else None
            if calls is not None:
                events += calls
                self._pending = text[end:]
        events += self._content(self._pending)
        self._pending = ""
        return events

    def _array(self, body: str) -> list[Event] | None:
        """The events of a JSON array of valid calls, or None (then it is all content)."""
        try:
            items = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(items, list) or not items or (len(items) > 1 and not self.parallel):
            return None
        checked = [self._checked(item) for item in items]
        if any(c is None for c in checked):
            return None
        events: list[Event] = []
        for name, args in (c for c in checked if c is not None):
            call = self._new_call(name, json.dumps(args, ensure_ascii=False))
            events += [CallStart(call.index, call.id, call.name),
                       ArgumentsDelta(call.index, call.arguments)]
        self._after_call = True
        return events

    # calls ----------------------------------------------------------------------------------

    def _new_call(self, name: str, arguments: str) -> ToolCall:
        call = ToolCall(len(self.calls), call_id(self.format), name, arguments)
        self.calls.append(call)
        return call

    def _start_streaming(self, at: int, events: list[Event]) -> bool:
        """With stream_arguments: open a call if its head is complete at `at` in _pending."""
        if not self.stream_arguments or (self.calls and not self.parallel):
            return False
        head = _HEAD[self._key].match(self._pending, at)
        if head is None or head.group(1) not in self.names:
            return False
        self._open = self._new_call(head.group(1), "")
        self._args_at = head.end()
        events.append(CallStart(self._open.index, self._open.id, self._open.name))
        return True

    def _stream_arguments(self, events: list[Event], final: bool) -> int:
        """Send the open call's new argument text; returns where its arguments end in
        _pending, or -1 while they go on (at the end of the reply: what there is)."""
        call = self._open
        assert call is not None
        args = self._pending[self._args_at:]
        end = _json_end(args)
        upto = len(args) if end < 0 else end
        if upto > len(call.arguments):
            events.append(ArgumentsDelta(call.index, args[len(call.arguments):upto]))
            call.arguments = args[:upto]
        if end < 0 and final:
            self._close_open()
            self._in_call, self._pending = False, ""
        return -1 if end < 0 else self._args_at + end

    def _close_open(self) -> None:
        self._open = None
        self._after_call = True

    def _whole_call(self, body: str) -> list[Event] | None:
        """A complete call's events from its JSON text, or None when it is not a valid call
        of a known tool."""
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        checked = self._checked(obj)
        if checked is None or (self.calls and not self.parallel):
            return None
        call = self._new_call(checked[0], json.dumps(checked[1], ensure_ascii=False))
        self._after_call = True
        return [CallStart(call.index, call.id, call.name),
                ArgumentsDelta(call.index, call.arguments)]

    def _checked(self, obj: Any) -> tuple[str, dict[str, Any]] | None:
        """(name, arguments) of a parsed call object naming a known tool, or None."""
        if not isinstance(obj, dict) or obj.get("name") not in self.names:
            return None
        # either key in either format: models mix them up
        args = obj.get(self._key, obj.get("parameters" if self._key == "arguments"
                                          else "arguments"))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        return (obj["name"], args) if isinstance(args, dict) else None

    # content --------------------------------------------------------------------------------

    def _content(self, text: str) -> list[Event]:
        """Release content. Whitespace around calls: what precedes a call waits and goes out
        only between two pieces of content ("A <call> B" -> "A B"), what follows one is
        dropped."""
        if self._after_call:
            text = text.lstrip()
            if not text:
                return []
            self._after_call = False
            if not self._released:
                self._space = ""
        body = text.rstrip()
        if not body:
            self._space += text
            return []
        out = self._space + body
        self._space = text[len(body):]
        self._released = True
        return [ContentDelta(out)]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _json_end(text: str) -> int:
    """Index just after the JSON object `text` starts with, or -1 while it is unfinished."""
    depth = 0
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def parse_output(fmt: ToolFormat, names: frozenset[str], text: str,
                 stream_arguments: bool = False, parallel: bool = True
                 ) -> tuple[str | None, list[ToolCall]]:
    """A whole reply: its content (None when only calls) and its calls."""
    parser = ToolCallParser(fmt, names, stream_arguments, parallel)
    events = parser.push(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return (content or None) if parser.calls else content, parser.calls
