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

The parser of the output is server/tool_parser.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, cast

import llguidance

from .chat import ChatTemplate, ChatTemplateError, normalize_messages
from .constraints import JSON_OPTIONS, GrammarSpec
from .errors import ApiError

__all__ = ["ToolFormat", "ToolRequest", "detect_format", "generic_instructions",
           "render_messages", "tool_grammar", "tool_request"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_TAG = "[TOOL_CALLS]"


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
