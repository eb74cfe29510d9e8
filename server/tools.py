"""Tool calls on chat: which format a template's model writes calls in, the prompt that offers
the tools, the grammar that forces a call, and the parser that finds calls in the output.

Formats (as llama.cpp's `common/chat.cpp` and vLLM's tool parsers tell them apart, by the
template's source):

- `hermes` (Qwen 2.5, Hermes 2/3; the template mentions `<tool_call>`): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, several in a row for
  parallel calls, with text around them.
- `llama3` (Llama 3.1-3.3; the template writes `"parameters": ` or `<|python_tag|>`): the reply
  *starts* with `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`; several
  objects may follow, separated by `;` or whitespace (the template renders only one back).
- `mistral` (Mistral Nemo; the template writes `[TOOL_CALLS]`): the reply starts with a JSON
  array of calls, `[{"name": ..., "arguments": {...}}, ...]`, after `[TOOL_CALLS]` (a control
  token, so usually not in the text); call ids are 9 letters and digits, as its template
  demands when the calls come back.
- `generic`, for every other template (ChatML without tools, as the built-in model's, Gemma,
  ...): as llama.cpp's generic handler, the tools and the expected output form go into a system
  message that tiller adds, and the conversation's past calls and results are written as text
  (templates without tool support drop `tool_calls`, and some refuse the `tool` role). The form
  is Hermes's, so one parser serves both.

`tool_choice` "required" or a named function constrains generation with llguidance (a Lark
grammar of the call in the template's format, its arguments by the tool's schema), so the
output always parses; "auto" parses free output, where a call that does not parse (bad JSON,
an unknown name, no `arguments` object) stays content; "none" offers the tools (in native
formats) and parses nothing.

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
from enum import Enum
from typing import Any, Literal, cast

import llguidance

from .chat import ChatTemplate, ChatTemplateError, normalize_messages
from .constraints import JSON_OPTIONS, GrammarSpec
from .errors import ApiError

__all__ = ["ArgumentsDelta", "CallStart", "ContentDelta", "ToolCall", "ToolCallParser",
           "ToolFormat", "ToolRequest", "detect_format", "parse_output", "render_messages",
           "tool_grammar", "tool_request"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_TAG = "[TOOL_CALLS]"
_ID_CHARS = string.ascii_letters + string.digits


class ToolFormat(Enum):
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"
    GENERIC = "generic"


def detect_format(template: ChatTemplate) -> ToolFormat:
    """The call format the template's model was trained on, from its source (llama.cpp looks
    for the same markers)."""
    source = template.source
    if OPEN in source:
        return ToolFormat.HERMES
    if PYTHON_TAG in source or ("<|start_header_id|>" in source and '"parameters": ' in source):
        return ToolFormat.LLAMA3
    if MISTRAL_TAG in source:
        return ToolFormat.MISTRAL
    return ToolFormat.GENERIC


# --- the request ---------------------------------------------------------------------------


Mode = Literal["auto", "none", "required", "named"]


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools, checked. `mode` is tool_choice's "auto", "none", "required", or
    "named" with the tool's `name`."""

    tools: list[dict[str, Any]]  # [{"type": "function", "function": {name, description, ...}}]
    mode: Mode
    parallel: bool
    format: ToolFormat
    names: frozenset[str]
    name: str | None = None

    @property
    def forced(self) -> bool:
        """A call is required (and grammar-enforced)."""
        return self.mode in ("required", "named")

    @property
    def parses(self) -> bool:
        return self.mode != "none"


def tool_request(tools: list[Any] | None, choice: Any, parallel: bool,
                 template: ChatTemplate) -> ToolRequest | None:
    """The checked tools of a request (400s naming `tools` or `tool_choice`); None without
    tools. `tools` and `choice` are the pydantic models of protocol.py or plain dicts."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice: a tool call is required but no `tools` are given",
                           param="tool_choice")
        return None
    dumped = [t if isinstance(t, dict) else t.model_dump(by_alias=True, exclude_none=True)
              for t in tools]
    names: list[str] = []
    for i, tool in enumerate(dumped):
        fn = tool["function"]
        if fn["name"] in names:
            raise ApiError(400, f"tools[{i}].function.name: {fn['name']!r} is given twice",
                           param="tools")
        names.append(fn["name"])
        _check_schema(fn.get("parameters"), i)
    fmt = detect_format(template)
    if choice is None or isinstance(choice, str):
        mode = choice or "auto"
        if mode not in ("auto", "none", "required"):
            raise ApiError(400, f"tool_choice: {mode!r} is none of auto, none, required",
                           param="tool_choice")
        return ToolRequest(dumped, cast(Mode, mode), parallel, fmt, frozenset(names))
    fn_choice = choice["function"] if isinstance(choice, dict) else choice.function
    name = fn_choice["name"] if isinstance(fn_choice, dict) else fn_choice.name
    if name not in names:
        raise ApiError(400, f"tool_choice: no tool named {name!r} in `tools` "
                       f"({', '.join(names)})", param="tool_choice")
    return ToolRequest(dumped, "named", parallel, fmt, frozenset(names), name)


def _check_schema(parameters: Any, index: int) -> None:
    """The tool's arguments schema must be one llguidance compiles: it is the grammar of the
    arguments when a call is forced (the same rule as response_format's schemas)."""
    if parameters is None:
        return
    where = f"tools[{index}].function.parameters"
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ApiError(400, f"{where}: must be a JSON schema of an object",
                       param="tools", code="invalid_tool_schema")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(parameters))
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except ValueError as e:
        error = str(e)
    if error and not error.startswith("WARNING"):
        raise ApiError(400, f"{where}: {error}", param="tools", code="invalid_tool_schema")


# OpenAI: a function without parameters takes none (an empty object, not any object)
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_DEFS = ("$defs", "definitions")


def _call_schema(req: ToolRequest, key: str) -> dict[str, Any]:
    """The JSON schema of one call: {"name": <a tool>, key: <its arguments>}, name first.

    NOTE: each tool's `$defs` (pydantic's schemas have them) move to the root, where their
    `#/$defs/...` references point once the schema is nested in the call's."""
    options = []
    defs: dict[str, dict[str, Any]] = {k: {} for k in _DEFS}
    for t in req.tools:
        fn = t["function"]
        if req.mode == "named" and fn["name"] != req.name:
            continue
        arguments = dict(fn.get("parameters") or _NO_PARAMETERS)
        for k in _DEFS:
            for name, definition in (arguments.pop(k, None) or {}).items():
                if defs[k].setdefault(name, definition) != definition:
                    raise ApiError(400, f"tools: two tools define {k}/{name} differently; "
                                   "rename one", param="tools", code="invalid_tool_schema")
        options.append({"type": "object",
                        "properties": {"name": {"const": fn["name"]}, key: arguments},
                        "required": ["name", key], "additionalProperties": False})
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, **{k: v for k, v in defs.items() if v}, "x-guidance": JSON_OPTIONS}


def tool_grammar(req: ToolRequest) -> GrammarSpec | None:
    """The grammar of a forced call (None unless tool_choice is "required" or a name): one call,
    or one or more with parallel_tool_calls, in the template's format."""
    if not req.forced:
        return None
    if req.format is ToolFormat.LLAMA3:
        # NOTE: one call: Llama 3.1's template refuses to render several back
        body = json.dumps(_call_schema(req, "parameters"))
        return GrammarSpec(llguidance.LLMatcher.grammar_from_lark(
            f"%llguidance {{}}\nstart: %json {body}\n"), "tools")
    if req.format is ToolFormat.MISTRAL:
        call = _call_schema(req, "arguments")
        root = {k: call.pop(k) for k in (*_DEFS, "x-guidance") if k in call}
        array = {"type": "array", "items": call, "minItems": 1,
                 **({} if req.parallel else {"maxItems": 1}), **root}
        return GrammarSpec(llguidance.LLMatcher.grammar_from_lark(
            f"%llguidance {{}}\nstart: %json {json.dumps(array)}\n"), "tools")
    body = json.dumps(_call_schema(req, "arguments"))
    repeat = ' ("\\n" call)*' if req.parallel else ""
    lark = (f"%llguidance {{}}\nstart: call{repeat}\n"
            f'call: "{OPEN}\\n" %json {body} "\\n{CLOSE}"\n')
    return GrammarSpec(llguidance.LLMatcher.grammar_from_lark(lark), "tools")


# --- the prompt ----------------------------------------------------------------------------


def render_messages(template: ChatTemplate, messages: list[dict[str, Any]],
                    req: ToolRequest | None, add_generation_prompt: bool,
                    extra: dict[str, Any]) -> str:
    """The conversation through the template, with the tools offered in the template's way
    (native formats) or in a system message (generic)."""
    if req is None:
        return template.render(messages, add_generation_prompt=add_generation_prompt, **extra)
    if req.format is not ToolFormat.GENERIC:
        return template.render(messages, add_generation_prompt=add_generation_prompt,
                               tools=req.tools, **extra)
    chat = _written_as_text(normalize_messages(messages))
    if req.mode != "none":
        chat = _with_system(chat, generic_instructions(req))
    return template.render(chat, add_generation_prompt=add_generation_prompt, **extra)


def generic_instructions(req: ToolRequest) -> str:
    """The system text of the generic format: the tools, and how to call them. NOTE: short,
    because it costs context on every request (~130 tokens on the built-in model, plus the
    tools)."""
    tools = "\n".join(json.dumps({k: v for k, v in t["function"].items()
                                  if k != "strict" and v != ""}, ensure_ascii=False,
                                 separators=(",", ":"))
                      for t in req.tools)
    if req.mode == "required":
        rule = "Call a tool."
    elif req.mode == "named":
        rule = f"Call {req.name}."
    else:
        rule = "Call a tool if it helps, else answer."
    many = "one block per call" if req.parallel else "one call at a time"
    return (f"Tools:\n<tools>\n{tools}\n</tools>\n{rule} Write a call ({many}) as:\n"
            f'{OPEN}\n{{"name": <tool name>, "arguments": <JSON object>}}\n{CLOSE}')


def _with_system(chat: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The instructions after the first system message's text, or as a new first message (as
    llama.cpp's add_system)."""
    if chat and chat[0]["role"] == "system":
        first = chat[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *chat[1:]]
    return [{"role": "system", "content": text}, *chat]


def _written_as_text(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Past calls as Hermes blocks in the assistant's content, and tool results as a user
    message of <tool_response> blocks (consecutive results in one), for templates that know
    neither (minja's tool-call polyfills do the same)."""
    out: list[dict[str, Any]] = []
    for message in chat:
        if message.get("tool_calls"):
            blocks = [_call_block(c["function"]["name"], c["function"]["arguments"])
                      for c in message["tool_calls"]]
            text = "\n".join(filter(None, [message["content"], *blocks]))
            out.append({"role": "assistant", "content": text})
        elif message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        else:
            out.append(message)
    for message in out:
        message.pop("tool_results", None)
    return out


def _call_block(name: str, arguments: str) -> str:
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"arguments of tool call {name!r} are not valid JSON: {e}"
                                ) from e
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


# --- the output ----------------------------------------------------------------------------


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
