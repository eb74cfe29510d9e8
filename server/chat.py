"""Chat templates: OpenAI `messages` -> the prompt text a chat model was trained on.

A template is the model's Jinja source (`tokenizer.chat_template`), rendered the way HF
transformers' `apply_chat_template` renders it: an `ImmutableSandboxedEnvironment` with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, the `{% generation %}` tag,
the `raise_exception` / `strftime_now` globals and a `tojson` filter that keeps non-ASCII text
and takes `indent`. The variables are `messages`, `tools`, `add_generation_prompt`,
`bos_token`, `eos_token` and any extra keyword arguments (e.g. Llama 3.1's `date_string`).

Before rendering, requests are normalized as llama.cpp's server does (`common/chat.cpp`):

- `content` may be a string, null (an assistant turn with only `tool_calls`) or a list of
  content parts. Null becomes "". Text parts are joined with "\\n" (no newline while the text
  so far is empty); any other part type (image_url, input_audio, ...) is an error naming it.
- The `developer` role (OpenAI's newer name for system instructions) becomes `system`.
  Roles other than system, user, assistant, tool are rejected: a template would silently drop
  a message it has no branch for (llama.cpp passes them through).
- Only the OpenAI fields a template may read are kept (role, content, name, tool_call_id,
  reasoning_content, tool_calls); an empty or null `tool_calls` is dropped, because templates
  test for its presence (`'tool_calls' in message`), not its length. An empty `tools` list
  counts as no tools for the same reason.
- Two capabilities are probed once per template by rendering sample conversations, as
  llama.cpp does: whether a leading system message reaches the output, and whether tool-call
  arguments must be JSON objects rather than the JSON strings OpenAI sends. Without a system
  role (Gemma's template raises "System role not supported"), a leading system message is
  folded into the next message as `system + "\\n" + content`; a lone system message is an
  error (llama.cpp drops it with a warning: a silently missing instruction is worse).
  Templates that need object arguments (Qwen2.5, Llama 3.1, Mistral Nemo) get them parsed.

Deliberate differences from llama.cpp: its server also sets `date_string` to today's date,
which changes Llama 3.1's "Today Date" line; here the template's own default stands (as in
transformers) unless the caller passes `date_string`. The text is returned as rendered, BOS
included if the template writes `bos_token`; llama.cpp strips that leading BOS text when the
tokenizer adds BOS by itself, and the caller must do the same to avoid a double BOS.

Models without a chat template (llama2.c checkpoints such as stories260K) get
DEFAULT_CHAT_TEMPLATE, ChatML, which is llama.cpp's fallback in `common_chat_templates_init`:

    <|im_start|>{role}\\n{content}<|im_end|>\\n ... then <|im_start|>assistant\\n

Safety: messages are only ever template *data*, never template source. Templates come from the
model file and run in the sandbox: attributes starting with "_", mutating methods and unsafe
format strings raise instead of rendering empty; `*` / `**` / str padding methods refuse
results larger than MAX_PROMPT_CHARS, and so does the output itself. CPU time spent in loops
that print nothing is not bounded. Every template failure (syntax, undefined, raise_exception,
sandbox, Python errors inside the template) is a ChatTemplateError with a readable message.
"""

from __future__ import annotations

import json
import logging
import types
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)

# ChatML, as llama.cpp's CHATML_TEMPLATE_SRC renders it (no BOS: the tokenizer adds it).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# llama.cpp's built-in template names (`--chat-template NAME`, src/llama-chat.cpp), written as
# the Jinja that renders what llm_chat_apply_template writes for them; BOS comes from the
# tokenizer, as there. Any other --chat-template value is taken as Jinja source.
BUILTIN_TEMPLATES = {
    "chatml": DEFAULT_CHAT_TEMPLATE,
    # llama2: no <<SYS>> block, the system text opens the first [INST]; llama2-sys: with it
    "llama2": (
        "{{ '[INST] ' }}{% set ns = namespace(inside=true) %}{% for m in messages %}"
        "{% if not ns.inside %}{{ '[INST] ' }}{% set ns.inside = true %}{% endif %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n' }}"
        "{% elif m['role'] == 'user' %}{{ m['content'] + ' [/INST]' }}"
        "{% else %}{{ m['content'] + '</s>' }}{% set ns.inside = false %}{% endif %}"
        "{% endfor %}"
    ),
    "llama2-sys": (
        "{{ '[INST] ' }}{% set ns = namespace(inside=true) %}{% for m in messages %}"
        "{% if not ns.inside %}{{ '[INST] ' }}{% set ns.inside = true %}{% endif %}"
        "{% if m['role'] == 'system' %}{{ '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ m['content'] + ' [/INST]' }}"
        "{% else %}{{ m['content'] + '</s>' }}{% set ns.inside = false %}{% endif %}"
        "{% endfor %}"
    ),
    "llama3": (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + m['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    # gemma: the system text (trimmed) opens the next user turn; the assistant is "model"
    "gemma": (
        "{% set ns = namespace(system='') %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] | trim %}"
        "{% else %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' }}"
        "{% if ns.system and role != 'model' %}{{ ns.system + '\n\n' }}"
        "{% set ns.system = '' %}{% endif %}"
        "{{ m['content'] | trim }}{{ '<end_of_turn>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}"
        "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|endoftext|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}


def template_source(value: str) -> str:
    """`--chat-template`'s value: a built-in name, or Jinja source (anything with `{{`/`{%`).
    Another bare word is a ValueError listing the names, as llama-server refuses it."""
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r}: not a built-in template "
                     f"({', '.join(BUILTIN_TEMPLATES)}) nor Jinja source")


# Far above any context window (~4 chars per token), far below what hurts the server.
MAX_PROMPT_CHARS = 1 << 22
# Integer results of `**` wider than this many bits are refused (10 ** (10 ** 10) would hang).
_MAX_POWER_BITS = 1 << 16

_ROLES = ("system", "user", "assistant", "tool")
_OPTIONAL_STR_FIELDS = ("name", "tool_call_id", "reasoning_content")
_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})
_TEMPLATE_FILENAME = "<template>"  # what jinja names frames of a from_string template


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or the messages cannot be rendered."""


# --- the sandbox ---------------------------------------------------------------------------


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, made loud about unsafe access and refusing memory bombs."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # NOTE: jinja returns an Undefined here, and a plain Undefined prints as "": a probe such
        # as `{{ x.__class__ }}` would render empty instead of failing.
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any,
                   right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int):
                    _check_size(len(seq) * n, "repetition")
        elif (operator == "**" and isinstance(left, int) and isinstance(right, int)
              and abs(left) > 1 and right * left.bit_length() > _MAX_POWER_BITS):
            raise SecurityError(f"{left} ** {right} is too large")
        return super().call_binop(context, operator, left, right)

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any,
             **kwargs: Any) -> Any:
        # str.ljust / center / zfill / expandtabs allocate whatever width they are given.
        if isinstance(getattr(obj, "__self__", None), str):
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, int):
                    _check_size(arg, f"str.{obj.__name__}")
        return super().call(context, obj, *args, **kwargs)


def _check_size(size: int, what: str) -> None:
    if size > MAX_PROMPT_CHARS:
        raise SecurityError(f"{what} of {size} items exceeds the limit of {MAX_PROMPT_CHARS}")


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (marks assistant text for
    training masks); for inference the block renders as its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: Any) -> None:
    raise ChatTemplateError(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # NOTE: jinja's own tojson HTML-escapes < > & ' and returns Markup; templates expect JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_line(exc: BaseException) -> int | None:
    """Line of the template being executed when `exc` was raised (jinja rewrites tracebacks
    so that template frames carry template line numbers)."""
    if isinstance(exc, TemplateSyntaxError):
        return exc.lineno
    line = None
    tb: types.TracebackType | None = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _describe(exc: BaseException, what: str) -> str:
    line = _template_line(exc)
    where = f" at line {line}" if line is not None else ""
    detail = str(exc) if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {exc}"
    return f"chat template {what}{where}: {detail}"


# --- message normalization -----------------------------------------------------------------


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages -> fresh dicts in the shape templates read (see module doc)."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("'messages' must be a non-empty list")
    return [_normalize_message(f"messages[{i}]", m) for i, m in enumerate(messages)]


def _normalize_message(where: str, message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ChatTemplateError(f"{where} must be an object")
    role = message.get("role")
    if role == "developer":
        role = "system"
    if role not in _ROLES:
        raise ChatTemplateError(
            f"{where}: unsupported role {role!r} (expected system, developer, user, assistant "
            "or tool)")
    if "content" not in message and "tool_calls" not in message:
        raise ChatTemplateError(f"{where} needs 'content' or 'tool_calls'")
    out: dict[str, Any] = {"role": role, "content": _content_text(where, message.get("content"))}
    for key in _OPTIONAL_STR_FIELDS:
        value = message.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise ChatTemplateError(f"{where}.{key} must be a string")
        out[key] = value
    if message.get("tool_calls"):
        out["tool_calls"] = _tool_calls(where, message["tool_calls"])
    return out


def _content_text(where: str, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(f"{where}.content must be a string, null or a list of parts")
    text = ""
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or "type" not in part:
            raise ChatTemplateError(f"{at} must be an object with a 'type'")
        if part["type"] != "text":
            raise ChatTemplateError(
                f"{at}: unsupported content part type {part['type']!r} (only 'text' parts are "
                "supported)")
        piece = part.get("text")
        if not isinstance(piece, str):
            raise ChatTemplateError(f"{at}.text must be a string")
        if text:
            text += "\n"
        text += piece
    return text


def _tool_calls(where: str, calls: Any) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise ChatTemplateError(f"{where}.tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict) or call.get("type") != "function":
            raise ChatTemplateError(f"{at} must be an object with \"type\": \"function\"")
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or "arguments" not in fn:
            raise ChatTemplateError(f"{at}.function needs a string 'name' and 'arguments'")
        args = fn["arguments"]
        # OpenAI sends arguments as a JSON string; keep that canonical form (parsed back to an
        # object only for templates that need one, like llama.cpp).
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        entry: dict[str, Any] = {"type": "function",
                                 "function": {"name": fn["name"], "arguments": args}}
        call_id = call.get("id")
        if call_id is not None and call_id != "":
            if not isinstance(call_id, str):
                raise ChatTemplateError(f"{at}.id must be a string")
            entry["id"] = call_id
        out.append(entry)
    return out


def normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    """OpenAI `tools` -> `[{"type": "function", "function": {name, description, parameters}}]`
    with llama.cpp's defaults filled in, or None when there are none."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ChatTemplateError("'tools' must be a list")
    out = []
    for j, tool in enumerate(tools):
        at = f"tools[{j}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ChatTemplateError(f"{at} must be an object with \"type\": \"function\"")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatTemplateError(f"{at}.function needs a string 'name'")
        out.append({"type": "function", "function": {
            "name": fn["name"],
            "description": fn.get("description") or "",
            "parameters": fn.get("parameters") or {},
        }})
    return out or None


def _fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge a leading system message into the next one, for templates without a system role."""
    if messages[0]["role"] != "system":
        return messages
    if len(messages) == 1:
        raise ChatTemplateError(
            "this model's chat template has no system role, and there is no message after the "
            "system message to fold it into")
    system, first = messages[0], messages[1]
    return [{**first, "content": system["content"] + "\n" + first["content"]}, *messages[2:]]


def _parse_arguments(messages: Iterable[dict[str, Any]]) -> None:
    for message in messages:
        for call in message.get("tool_calls", ()):
            fn = call["function"]
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError as e:
                raise ChatTemplateError(
                    f"arguments of tool call {fn['name']!r} are not valid JSON: {e}") from e


# --- the template --------------------------------------------------------------------------

_SYSTEM_PROBE = "<<tiller system probe>>"
_ARGS_PROBE = {"argument_needle": "print('Hello, World!')"}


def _tool_call_probe(arguments: Any) -> list[dict[str, Any]]:
    call = {"type": "function", "id": "call00001",  # 9 characters, as Mistral's template demands
            "function": {"name": "probe_tool", "arguments": arguments}}
    return [{"role": "user", "content": "probe"},
            {"role": "assistant", "content": "", "tool_calls": [call]}]


class ChatTemplate:
    """One model's chat template, compiled once; `render` is safe to call concurrently."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                       extensions=[_GenerationTag, loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except (TemplateError, RecursionError) as e:
            raise ChatTemplateError(_describe(e, "syntax error")) from e
        self.supports_system_role = _SYSTEM_PROBE in self._try_render(
            [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "probe"}])
        # As minja decides it: arguments given as a JSON string do not render as JSON, given as
        # an object they do (Qwen2.5 / Llama 3.1 write `arguments | tojson`).
        as_string = self._try_render(_tool_call_probe(json.dumps(_ARGS_PROBE)))
        as_object = self._try_render(_tool_call_probe(dict(_ARGS_PROBE)))
        self.requires_object_arguments = (not _renders_args(as_string)
                                          and _renders_args(as_object))
        log.debug("chat template: system role %s, object arguments %s",
                  self.supports_system_role, self.requires_object_arguments)

    @classmethod
    def for_model(cls, source: str | None, bos_token: str, eos_token: str) -> ChatTemplate:
        """The model's own template, or DEFAULT_CHAT_TEMPLATE (ChatML) when it has none or
        names "chatml", as llama.cpp decides."""
        if source is None or not source.strip() or source.strip() == "chatml":
            source = DEFAULT_CHAT_TEMPLATE
        return cls(source, bos_token, eos_token)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **extra: Any) -> str:
        """The prompt text for OpenAI-style `messages` (and `tools`); `extra` become template
        variables. Raises ChatTemplateError for bad messages and any template failure."""
        clash = _RESERVED & extra.keys()
        if clash:
            raise ChatTemplateError(f"template variable {sorted(clash)[0]!r} cannot be set")
        chat = normalize_messages(messages)
        if not self.supports_system_role:
            chat = _fold_system(chat)
        if self.requires_object_arguments:
            _parse_arguments(chat)
        return self._render(chat, add_generation_prompt, normalize_tools(tools), extra)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None, extra: dict[str, Any]) -> str:
        context = {**extra, "messages": messages, "tools": tools,
                   "add_generation_prompt": add_generation_prompt,
                   "bos_token": self.bos_token, "eos_token": self.eos_token}
        pieces: list[str] = []
        size = 0
        try:
            # NOTE: generate() rather than render() so a runaway loop stops at the size limit.
            for piece in self._template.generate(context):
                size += len(piece)
                if size > MAX_PROMPT_CHARS:
                    raise ChatTemplateError(
                        f"chat template output exceeds {MAX_PROMPT_CHARS} characters")
                pieces.append(piece)
        except ChatTemplateError:
            raise  # raise_exception() or the size limit: the message is already the point
        except TemplateError as e:
            raise ChatTemplateError(_describe(e, "error")) from e
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError,
                RecursionError) as e:
            # Python errors from template expressions, e.g. 'text' + none.
            raise ChatTemplateError(_describe(e, "error")) from e
        return "".join(pieces)

    def _try_render(self, messages: list[dict[str, Any]]) -> str:
        """Render for a capability probe: a template that rejects the probe renders ""."""
        try:
            return self._render(messages, False, None, {})
        except ChatTemplateError:
            return ""


def _renders_args(text: str) -> bool:
    return '"argument_needle":' in text or "'argument_needle':" in text
