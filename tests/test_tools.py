"""Tool calls on chat: the parser of each format (whole and streamed), rendering with real
templates against plain jinja2 as transformers' apply_chat_template renders them, a round trip
with the official openai SDK on the built-in model (arguments checked with jsonschema), and the
400s of bad tool requests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import jsonschema
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tiller.server.app import ServerConfig, create_app
from tiller.server.chat import ChatTemplate
from tiller.server.errors import ApiError
from tiller.server.tool_parser import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    ToolCall,
    ToolCallParser,
    parse_output,
)
from tiller.server.tools import (
    ToolFormat,
    ToolRequest,
    detect_format,
    render_messages,
    tool_grammar,
    tool_request,
)

from tests.live_server import start_server
from tests.test_server import post
from tiller import BUILTIN_MODEL

NAMES = frozenset({"get_weather", "add"})
HERMES, LLAMA3, GENERIC = ToolFormat.HERMES, ToolFormat.LLAMA3, ToolFormat.GENERIC
MISTRAL = ToolFormat.MISTRAL

# NOTE: small schemas with bounded strings: the built-in model's context is 512 tokens, and its
# vocabulary of 1024 spends about one token per 1.5 characters of the tools' JSON
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
           "required": ["city"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "description": "Weather of a city",
                                           "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": ADD}}]
TIME = {"type": "object", "properties": {}, "additionalProperties": False}
# what the built-in model is offered: two tools fit its context with a round trip
SDK_TOOLS = [TOOLS[0], {"type": "function", "function": {"name": "get_time",
                                                         "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD, "get_time": TIME}


def streamed(fmt: ToolFormat, text: str, step: int = 1, stream_arguments: bool = False
             ) -> tuple[str, list[ToolCall]]:
    """The text pushed `step` characters at a time: content deltas joined, and the calls put
    together from their events as a client does (which must agree with the parser's own)."""
    parser = ToolCallParser(fmt, NAMES, stream_arguments)
    events = []
    for i in range(0, len(text), step):
        events += parser.push(text[i:i + step])
    events += parser.finish()
    calls: list[ToolCall] = []
    for e in events:
        if isinstance(e, CallStart):
            assert e.index == len(calls)
            calls.append(ToolCall(e.index, e.id, e.name, ""))
        elif isinstance(e, ArgumentsDelta):
            assert e.index == len(calls) - 1 and e.text
            calls[-1].arguments += e.text
    assert calls == parser.calls
    return "".join(e.text for e in events if isinstance(e, ContentDelta)), calls


def calls_of(calls: list[ToolCall]) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


# --- parsing -------------------------------------------------------------------------------

W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
A = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
PARIS = ("get_weather", {"city": "Paris"})
ONE_TWO = ("add", {"a": 1, "b": 2})

TAGGED_CASES = [
    # (output, content, calls)
    (f"<tool_call>\n{W}\n</tool_call>", None, [PARIS]),
    (f"Let me look.\n<tool_call>\n{W}\n</tool_call>", "Let me look.", [PARIS]),
    (f"<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{A}\n</tool_call>", None, [PARIS, ONE_TWO]),
    (f"A <tool_call>{W}</tool_call> and <tool_call>{A}</tool_call> done.",
     "A and done.", [PARIS, ONE_TWO]),
    ("\n<tool_call>" + A + "</tool_call>\n\nNow.\n", "Now.\n", [ONE_TWO]),
    # no closing tag at the end of the reply: the call is complete, so it counts
    (f"<tool_call>\n{W}\n", None, [PARIS]),
    # arguments as a JSON string, and "parameters" for "arguments": models do both
    ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>', None,
     [ONE_TWO]),
    ('<tool_call>{"name": "add", "parameters": {"a": 1, "b": 2}}</tool_call>', None, [ONE_TWO]),
    # malformed: stays content, whole
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', []),
    ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "launch", "arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "add"}</tool_call>', '<tool_call>{"name": "add"}</tool_call>', []),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',
     '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', []),
    (f"<tool_call>\n{W[:-9]}", f"<tool_call>\n{W[:-9]}", []),  # cut off (max_tokens)
    # a malformed call before a good one: each judged alone
    (f"<tool_call>oops</tool_call><tool_call>{A}</tool_call>", "<tool_call>oops</tool_call>",
     [ONE_TWO]),
    # text that only looks like the start of a marker
    ("a < b and <tool_ x", "a < b and <tool_ x", []),
    ("Hello!\n", "Hello!\n", []),
    ("", "", []),
]


@pytest.mark.parametrize("fmt", [HERMES, GENERIC])
@pytest.mark.parametrize(("text", "content", "calls"), TAGGED_CASES)
def test_parse_tagged(fmt: ToolFormat, text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = parse_output(fmt, NAMES, text)
    assert (got_content, calls_of(got_calls)) == (content, calls)
    for step in (1, 3, 7):  # streamed in pieces: the same content and calls
        text_streamed, calls_streamed = streamed(fmt, text, step)
        assert text_streamed == (content or "")
        assert calls_of(calls_streamed) == calls
    assert [c.index for c in got_calls] == list(range(len(calls)))
    for call in got_calls:
        assert call.id.startswith("call_") and len(call.id) == 29
    assert len({c.id for c in got_calls}) == len(got_calls)


LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', None, [ONE_TWO]),
    ('\n {"type": "function", "name": "add", "parameters": {"a": 1, "b": 2}}', None, [ONE_TWO]),
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_weather", "parameters": '
     '{"city": "Paris"}}', None, [ONE_TWO, PARIS]),
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}\nThat adds them.', "That adds them.",
     [ONE_TWO]),
    # a call only at the start of the reply (as llama.cpp's trigger): later JSON is content
    ('Sure: {"name": "add", "parameters": {"a": 1, "b": 2}}',
     'Sure: {"name": "add", "parameters": {"a": 1, "b": 2}}', []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "add", "parameters": {"a": 1', '{"name": "add", "parameters": {"a": 1', []),
    ('{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}', []),
    ("<|python", "<|python", []),
    ("Just text.", "Just text.", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), LLAMA_CASES)
def test_parse_llama3(text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = parse_output(LLAMA3, NAMES, text)
    assert (got_content, calls_of(got_calls)) == (content, calls)
    for step in (1, 4):
        text_streamed, calls_streamed = streamed(LLAMA3, text, step)
        assert text_streamed == (content or "")
        assert calls_of(calls_streamed) == calls


# calls in the form the grammars write them (name first, arguments an object)
VALID = [(HERMES, text, calls) for text, _, calls in TAGGED_CASES[:5]] + [
    (LLAMA3, text, calls) for text, _, calls in (LLAMA_CASES[i] for i in (0, 1, 3, 4))]


@pytest.mark.parametrize(("fmt", "text", "calls"), VALID)
def test_forced_calls_stream_their_arguments(fmt: ToolFormat, text: str, calls: list) -> None:
    # what a grammar lets through parses the same with the arguments streamed
    whole = parse_output(fmt, NAMES, text, stream_arguments=True)
    assert calls_of(whole[1]) == calls
    parser = ToolCallParser(fmt, NAMES, stream_arguments=True)
    fragments = []
    for ch in text:
        fragments += [e for e in parser.push(ch) if isinstance(e, ArgumentsDelta)]
    parser.finish()
    assert calls_of(parser.calls) == calls
    # character by character, each call's arguments come in as many pieces
    assert len(fragments) == sum(len(c.arguments) for c in parser.calls)
    for step in (1, 5):
        assert calls_of(streamed(fmt, text, step, stream_arguments=True)[1]) == calls


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3])
def test_without_parallel_calls_only_the_first_is_a_call(fmt: ToolFormat) -> None:
    text = (f"<tool_call>{W}</tool_call>\n<tool_call>{A}</tool_call>" if fmt is HERMES
            else f"{W}; {A}".replace('"arguments"', '"parameters"'))
    rest = f"<tool_call>{A}</tool_call>" if fmt is HERMES \
        else A.replace('"arguments"', '"parameters"')
    for stream_arguments in (False, True):
        content, calls = parse_output(fmt, NAMES, text, stream_arguments, parallel=False)
        assert (content, calls_of(calls)) == (rest, [PARIS])


def test_a_forced_call_cut_short_keeps_its_arguments_so_far() -> None:
    parser = ToolCallParser(HERMES, NAMES, stream_arguments=True)
    assert parser.push('<tool_call>\n{"name": "add", "arguments": ') == []
    # the head and the start of an object start the call
    events = parser.push('{"a": 1,')
    assert [type(e) for e in events] == [CallStart, ArgumentsDelta]
    assert events[1] == ArgumentsDelta(0, '{"a": 1,')
    assert parser.finish() == []
    assert [(c.name, c.arguments) for c in parser.calls] == [("add", '{"a": 1,')]


MISTRAL_CASES = [
    (f"[TOOL_CALLS][{W}]", None, [PARIS]),
    (f" [{W}, {A}]", None, [PARIS, ONE_TWO]),  # the control token is not in the text
    (f"[{A}]\nDone.", "Done.", [ONE_TWO]),
    ('[{"name": "nope", "arguments": {}}]', '[{"name": "nope", "arguments": {}}]', []),
    (f"[{W}, 5]", f"[{W}, 5]", []),  # one bad element: the whole array is content
    (f"[{W[:-3]}", f"[{W[:-3]}", []),
    ("[1, 2] are numbers", "[1, 2] are numbers", []),
    ("Sunny.", "Sunny.", []),
    ("[", "[", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), MISTRAL_CASES)
def test_parse_mistral(text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = parse_output(MISTRAL, NAMES, text)
    assert (got_content, calls_of(got_calls)) == (content, calls)
    for call in got_calls:  # the ids its template takes back
        assert len(call.id) == 9 and call.id.isalnum()
    for step in (1, 4):
        text_streamed, calls_streamed = streamed(MISTRAL, text, step)
        assert text_streamed == (content or "")
        assert calls_of(calls_streamed) == calls
    if len(calls) > 1:  # without parallel calls, an array of several is content
        assert parse_output(MISTRAL, NAMES, text, parallel=False)[1] == []


def test_marker_prefixes_are_held_back_and_content_streams() -> None:
    parser = ToolCallParser(HERMES, NAMES)
    assert parser.push("It is") == [ContentDelta("It is")]
    assert parser.push(" sunny <tool") == [ContentDelta(" sunny")]  # " <tool" may be a call
    assert parser.push("s>") == [ContentDelta(" <tools>")]  # it was not
    assert parser.push("\n<tool_call>\n" + A[:10]) == []  # whitespace, then a call: held
    events = parser.push(A[10:] + "\n</tool_call>")
    # the newline before the call is dropped
    assert [type(e) for e in events] == [CallStart, ArgumentsDelta]
    assert parser.finish() == []


# --- forced-call grammars ------------------------------------------------------------------

def accepts(model, grammar, text: str) -> bool:
    """Whether the grammar's matcher takes `text` (as the built-in model's tokens) and may end
    there."""
    from tiller.server.constraints import Vocabulary
    matcher = Vocabulary(model.tokenizer, model.engine.config.vocab_size).constraint(grammar)
    assert matcher is not None
    tokens = model.tokenizer.encode_continuation(text)
    return all(matcher.matcher.consume_token(t) for t in tokens) \
        and matcher.matcher.is_accepting()


@pytest.mark.parametrize("fmt", [HERMES, GENERIC, LLAMA3, MISTRAL])
def test_forced_grammars_take_exactly_the_calls_the_parser_reads(model, fmt: ToolFormat) -> None:
    def grammar(choice: str, parallel: bool):
        names = frozenset(SCHEMAS) - {"get_time"}
        req = (ToolRequest(TOOLS, "required", parallel, fmt, names) if choice == "required"
               else ToolRequest(TOOLS, "named", parallel, fmt, names, choice))
        spec = tool_grammar(req)
        assert spec is not None
        return spec

    key = "parameters" if fmt is LLAMA3 else "arguments"
    paris = f'{{"name": "get_weather", "{key}": {{"city": "Paris"}}}}'
    add = f'{{"name": "add", "{key}": {{"a": 1, "b": 2}}}}'
    if fmt is LLAMA3:
        one, two = paris, f"{paris}; {add}"
    elif fmt is MISTRAL:
        one, two = f"[{paris}]", f"[{paris}, {add}]"
    else:
        one = f"<tool_call>\n{paris}\n</tool_call>"
        two = f"{one}\n<tool_call>\n{add}\n</tool_call>"
    for text, calls in ((one, [PARIS]), (two, [PARIS, ONE_TWO])):
        assert calls_of(parse_output(fmt, NAMES, text)[1]) == calls
    assert accepts(model, grammar("required", True), one)
    assert accepts(model, grammar("get_weather", False), one)
    assert not accepts(model, grammar("add", True), one)  # named: only that tool
    # several calls only with parallel_tool_calls, and never in Llama 3's format
    assert accepts(model, grammar("required", True), two) is (fmt is not LLAMA3)
    assert not accepts(model, grammar("required", False), two)
    # arguments held to the schema (maxLength 10; no extra keys), text around refused
    assert not accepts(model, grammar("required", True), one.replace("Paris", "Paris" * 3))
    assert not accepts(model, grammar("required", True),
                       one.replace('"Paris"', '"Paris", "x": 1'))
    assert not accepts(model, grammar("required", True), "Sure. " + one)
    assert not accepts(model, grammar("required", True), one + " Done.")


def test_forced_grammars_resolve_pydantic_defs_and_take_no_arguments_as_none(model) -> None:
    chatml = ChatTemplate.for_model(None, "<s>", "</s>")
    # as openai.pydantic_function_tool writes a model with a nested model: refs into $defs
    city = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
            "required": ["name"], "additionalProperties": False}
    visit = {"type": "object", "properties": {"city": {"$ref": "#/$defs/City"}},
             "required": ["city"], "additionalProperties": False, "$defs": {"City": city}}
    tools = [{"type": "function", "function": {"name": "visit", "parameters": visit}},
             {"type": "function", "function": {"name": "now"}}]
    req = tool_request(tools, "required", True, chatml)
    assert req is not None
    grammar = tool_grammar(req)
    visit_call = '<tool_call>\n{"name": "visit", "arguments": {"city": {"name": "Oslo"}}}\n'
    assert accepts(model, grammar, visit_call + "</tool_call>")
    assert not accepts(model, grammar, visit_call.replace("Oslo", "Oslo" * 3) + "</tool_call>")
    assert accepts(model, grammar, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    assert not accepts(model, grammar,
                       '<tool_call>\n{"name": "now", "arguments": {"x": 1}}\n</tool_call>')
    clash = [tools[0], {"type": "function", "function": {"name": "other", "parameters": {
        **visit, "$defs": {"City": {"type": "string"}}}}}]
    with pytest.raises(ApiError) as e:
        tool_grammar(tool_request(clash, "required", True, chatml))
    assert e.value.param == "tools" and "$defs/City" in e.value.message


def test_a_tool_may_be_named_like_a_tool_choice_mode() -> None:
    chatml = ChatTemplate.for_model(None, "<s>", "</s>")
    tools = [{"type": "function", "function": {"name": name, "parameters": TIME}}
             for name in ("auto", "required")]
    named = tool_request(tools, {"type": "function", "function": {"name": "required"}}, True,
                         chatml)
    assert named is not None and (named.mode, named.name) == ("named", "required")
    assert "Call required." in render_messages(chatml, QUESTION, named, True, {})
    assert tool_request(tools, "required", True, chatml).mode == "required"


# --- rendering against plain jinja2 --------------------------------------------------------

def hf_render(source: str, messages: list[dict], tools: list[dict] | None, **special: str) -> str:
    """What transformers' apply_chat_template renders: its sandbox, flags, filter and globals
    (transformers/utils/chat_template_utils.py), the messages and tools as given."""
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(messages=messages, tools=tools,
                                          add_generation_prompt=True, **special)


# the conversation as an OpenAI client sends it, and as transformers users write it
OPENAI_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_abc", "type": "function",
        "function": {"name": "get_weather",
                     "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_abc",
     "content": [{"type": "text", "text": "18 degrees, sunny"}]},
]
HF_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18 degrees, sunny"},
]
HF_TOOLS = [{"type": "function", "function": {k: v for k, v in t["function"].items()
                                              if k != "strict"}} for t in TOOLS]
TEMPLATES = {"qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", "", "<|im_end|>", HERMES),
             "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>",
                          "<|eot_id|>", LLAMA3),
             "gemma2": ("google-gemma-2-2b-it.jinja", "<bos>", "<eos>", GENERIC),
             "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>",
                              MISTRAL)}


@pytest.fixture(scope="module")
def template_dir(shared_models: Path) -> Path:
    directory = shared_models / "chat-templates"
    if not directory.is_dir():
        pytest.skip(f"chat templates not found at {directory}")
    return directory


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_format_detection(template_dir: Path, name: str) -> None:
    file, bos, eos, fmt = TEMPLATES[name]
    assert detect_format(ChatTemplate((template_dir / file).read_text(), bos, eos)) is fmt


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.1", "mistral-nemo"])
def test_rendering_matches_transformers(template_dir: Path, name: str) -> None:
    file, bos, eos, _ = TEMPLATES[name]
    source = (template_dir / file).read_text()
    template = ChatTemplate(source, bos, eos)
    req = tool_request(TOOLS, "auto", True, template)
    openai_chat, hf_chat = json.loads(json.dumps(OPENAI_CHAT)), json.loads(json.dumps(HF_CHAT))
    if name == "mistral-nemo":  # its ids: 9 letters and digits, in both
        openai_chat[1]["tool_calls"][0]["id"] = openai_chat[2]["tool_call_id"] = "abcDEF123"
        hf_chat[1]["tool_calls"][0]["id"] = "abcDEF123"
        hf_chat[2]["tool_call_id"] = "abcDEF123"
    ours = render_messages(template, openai_chat, req, True, {})
    assert ours == hf_render(source, hf_chat, HF_TOOLS, bos_token=bos, eos_token=eos)
    # the tools (their schemas), the call and its result are all in the prompt
    assert '"maxLength": 10' in ours and "Add two numbers" in ours
    assert "18 degrees, sunny" in ours
    assert '"city": "Paris"' in ours


def test_generic_format_on_a_template_with_other_conventions(template_dir: Path) -> None:
    # Gemma has no system role and refuses the tool role: written as text, the conversation
    # renders
    file, bos, eos, _ = TEMPLATES["gemma2"]
    template = ChatTemplate((template_dir / file).read_text(), bos, eos)
    prompt = render_messages(template, OPENAI_CHAT, tool_request(TOOLS, "auto", True, template),
                             True, {})
    assert "<tools>" in prompt and "Weather in Paris?" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in prompt


def test_generic_format_writes_tools_calls_and_results_as_text() -> None:
    chatml = ChatTemplate.for_model(None, "<s>", "</s>")
    assert detect_format(chatml) is GENERIC
    req = tool_request(TOOLS, "required", False, chatml)
    chat = [{"role": "system", "content": "Be brief."}, *OPENAI_CHAT,
            {"role": "tool", "tool_call_id": "call_abc", "content": "wind 5 km/h"}]
    prompt = render_messages(chatml, chat, req, True, {})
    system = prompt[:prompt.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\nBe brief.\n\nTools:\n<tools>\n")
    for tool in TOOLS:  # each tool's name, description and schema, as JSON
        fn = tool["function"]
        line = json.dumps({"name": fn["name"], "description": fn["description"],
                           "parameters": fn["parameters"]}, separators=(",", ":"))
        assert line in system
    assert "Call a tool." in system and "one call at a time" in system
    assert prompt.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18 degrees, sunny\n</tool_response>\n"
        "<tool_response>\nwind 5 km/h\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    # tool_choice "none": the tools are not offered, the history still reads as text
    none = render_messages(chatml, OPENAI_CHAT, tool_request(TOOLS, "none", True, chatml),
                           True, {})
    assert "<tools>" not in none and "<tool_response>" in none


# --- through the openai SDK on the built-in model ----------------------------------------

@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ServerConfig:
    return ServerConfig(model_path=BUILTIN_MODEL, parallel=4, token_budget=64,
                        steering_dir=tmp_path_factory.mktemp("steering"))


@pytest.fixture
async def sdk(aiohttp_server, config, model):
    openai = pytest.importorskip("openai")
    server = await aiohttp_server(create_app(config, model=model))
    return openai.AsyncOpenAI(base_url=f"http://{server.host}:{server.port}/v1",
                              api_key="unused", max_retries=0)


QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(calls: list[dict], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]),
                            SCHEMAS[call["function"]["name"]])


async def accumulate(stream) -> tuple[str | None, list[dict], str | None]:
    """A streamed reply put together as OpenAI's docs show: content joined, tool-call deltas
    merged by index (id, type and name from the first, arguments appended)."""
    content: str | None = None
    calls: dict[int, dict] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content = (content or "") + delta.content
            for tc in delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "type": None, "function": {
                    "name": "", "arguments": ""}})
                call["id"] = tc.id or call["id"]
                call["type"] = tc.type or call["type"]
                if tc.function and tc.function.name:
                    call["function"]["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    call["function"]["arguments"] += tc.function.arguments
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice", ["required", "named"])
async def test_sdk_round_trip(sdk, stream: bool, choice: str) -> None:
    tool_choice: Any = "required" if choice == "required" else {
        "type": "function", "function": {"name": "get_weather"}}
    answers: list[str] = []
    for seed in range(3):
        # NOTE: one call, so that the round trip fits the built-in model's context
        args = {"model": "any", "tools": SDK_TOOLS, "seed": seed}
        first = {"tool_choice": tool_choice, "parallel_tool_calls": False}
        if stream:
            content, calls, finish = await accumulate(await sdk.chat.completions.create(
                messages=QUESTION, stream=True, **first, **args))
        else:
            reply = await sdk.chat.completions.create(messages=QUESTION, **first, **args)
            message = reply.choices[0].message
            content, finish = message.content, reply.choices[0].finish_reason
            calls = [c.model_dump() for c in message.tool_calls or []]
        assert finish == "tool_calls" and content is None and len(calls) == 1
        check_calls(calls, {"get_weather"} if choice == "named" else set(SCHEMAS))
        # the call and its result go back; the model answers
        history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": calls},
                   *({"role": "tool", "tool_call_id": c["id"], "content": "18 degrees"}
                     for c in calls)]
        if stream:
            content, calls, finish = await accumulate(await sdk.chat.completions.create(
                messages=history, stream=True, **args))
        else:
            reply = await sdk.chat.completions.create(messages=history, **args)
            message = reply.choices[0].message
            content, finish = message.content, reply.choices[0].finish_reason
            calls = [c.model_dump() for c in message.tool_calls or []]
        assert finish in ("stop", "length", "tool_calls")
        if finish == "tool_calls":
            check_calls(calls, set(SCHEMAS))  # auto: a call again, or an answer
        else:
            assert not calls
            answers.append(content or "")
    assert any(answers), answers  # the tiny model sometimes ends at once, not every time


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`tiller serve` on the built-in model, as a user starts it (its GGUF is its tokenizer)."""
    url, process = start_server(tmp_path_factory.mktemp("tools"), "--threads", "1",
                                model=BUILTIN_MODEL, tokenizer=BUILTIN_MODEL)
    yield url
    process.stop()


def test_round_trip_against_tiller_serve(served: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)
    args: dict[str, Any] = {"model": "tiller-tiny", "tools": SDK_TOOLS, "seed": 7}
    for stream in (False, True):
        first = client.chat.completions.create(
            messages=QUESTION, tool_choice="required", parallel_tool_calls=False,
            stream=stream, **args)
        if stream:
            calls: dict[int, dict] = {}
            finish = None
            for chunk in first:  # accumulated as OpenAI's docs show
                for choice in chunk.choices:
                    for tc in choice.delta.tool_calls or []:
                        call = calls.setdefault(tc.index, {"id": tc.id, "type": tc.type,
                                                           "function": {"name": "",
                                                                        "arguments": ""}})
                        call["function"]["name"] += tc.function.name or ""
                        call["function"]["arguments"] += tc.function.arguments or ""
                    finish = choice.finish_reason or finish
            made = [calls[i] for i in sorted(calls)]
        else:
            made = [c.model_dump() for c in first.choices[0].message.tool_calls or []]
            finish = first.choices[0].finish_reason
        assert finish == "tool_calls" and len(made) == 1
        check_calls(made, set(SCHEMAS))
        answer = client.chat.completions.create(messages=[
            *QUESTION, {"role": "assistant", "content": None, "tool_calls": made},
            {"role": "tool", "tool_call_id": made[0]["id"], "content": "18 degrees"}],
            tool_choice="none", max_tokens=30, **args)
        assert answer.choices[0].message.tool_calls is None
        assert isinstance(answer.choices[0].message.content, str)


async def test_streamed_and_whole_agree_and_parallel_calls_validate(sdk) -> None:
    for seed in range(4):
        args = {"model": "any", "messages": QUESTION, "tools": SDK_TOOLS, "seed": seed,
                "tool_choice": "required", "temperature": 1.5}
        reply = await sdk.chat.completions.create(**args)
        content, calls, finish = await accumulate(
            await sdk.chat.completions.create(stream=True, **args))
        whole = [c.model_dump() for c in reply.choices[0].message.tool_calls or []]
        assert [c["function"] for c in calls] == [c["function"] for c in whole]
        assert finish == reply.choices[0].finish_reason
        if finish == "tool_calls":
            check_calls(whole, set(SCHEMAS))


async def test_auto_and_none_on_the_built_in_model(client) -> None:
    # auto: the tiny model writes what it writes; the reply is well formed either way
    for choice in ("auto", "none"):
        reply = await post(client, "/v1/chat/completions", {
            "messages": QUESTION, "tools": SDK_TOOLS, "tool_choice": choice, "seed": 3,
            "max_tokens": 40})
        message = reply["choices"][0]["message"]
        if reply["choices"][0]["finish_reason"] == "tool_calls":
            check_calls(message["tool_calls"], set(SCHEMAS))
        else:
            assert isinstance(message["content"], str) and "tool_calls" not in message
    # "none" without a tools list is the plain chat
    plain = await post(client, "/v1/chat/completions", {"messages": QUESTION, "seed": 3,
                                                        "max_tokens": 20})
    none = await post(client, "/v1/chat/completions", {"messages": QUESTION, "seed": 3,
                                                       "max_tokens": 20, "tool_choice": "none"})
    assert none["choices"][0]["message"] == plain["choices"][0]["message"]


async def test_response_format_wins_over_auto_tools(client) -> None:
    # the reply is the response the format asks for: never parsed as a call
    schema = {"type": "object", "properties": {"name": {"const": "add"}, "arguments": ADD},
              "required": ["name", "arguments"], "additionalProperties": False}
    reply = await post(client, "/v1/chat/completions", {
        "messages": QUESTION, "tools": SDK_TOOLS[:1], "seed": 1, "response_format": {
            "type": "json_schema", "json_schema": {"name": "call", "schema": schema}}})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)


async def test_apply_template_offers_the_tools(client) -> None:
    prompt = (await post(client, "/apply-template", {
        "messages": OPENAI_CHAT, "tools": TOOLS}))["prompt"]
    assert "<tools>" in prompt and "<tool_response>\n18 degrees, sunny" in prompt


# --- bad requests --------------------------------------------------------------------------

BAD = [
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "launch"}}}, "tool_choice", "no tool named"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice", "no `tools`"),
    ("/v1/chat/completions", {"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice", ""),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": 5}}}]}, "tools",
     "properties must be an object"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]}, "tools", "schema of an object"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {
            "x": {"type": "array", "uniqueItems": True}}}}}]}, "tools", "uniqueItems"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "bad name!"}}]}, "tools", "pattern"),
    ("/v1/chat/completions", {"tools": [{"type": "retrieval"}]}, "tools", ""),
    ("/v1/chat/completions", {"tools": [TOOLS[0], TOOLS[0]]}, "tools", "given twice"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {
        "name": "required"}}}, "tool_choice", "no tool named 'required'"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "tool_choice",
     "response_format"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions", "not supported"),
    ("/v1/chat/completions", {"repeat_penalty": 1.2, "repetition_penalty": 1.1},
     "repeat_penalty", "give one of them"),
    ("/v1/chat/completions", {"messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "add", "arguments": "{oops"}}]}], "tools": TOOLS}, "messages",
     "not valid JSON"),
    ("/v1/completions", {"prompt": "hi", "tools": TOOLS}, "tools", "/v1/chat/completions"),
    ("/v1/completions", {"prompt": "hi", "tool_choice": "auto"}, "tool_choice",
     "/v1/chat/completions"),
    ("/completion", {"prompt": "hi", "tools": TOOLS}, "tools", "/v1/chat/completions"),
]


@pytest.mark.parametrize(("path", "body", "param", "message"), BAD)
async def test_bad_tool_requests(client, path: str, body: dict, param: str,
                                 message: str) -> None:
    if path == "/v1/chat/completions":
        body = {"messages": QUESTION, **body}
    error = (await post(client, path, body, status=400))["error"]
    assert error["param"] == param, error
    assert message in error["message"]
