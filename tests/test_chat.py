"""Chat templates: real model templates against hand-written prompts, message normalization,
template errors and the sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from tiller.server.chat import (
    DEFAULT_CHAT_TEMPLATE,
    MAX_PROMPT_CHARS,
    ChatTemplate,
    ChatTemplateError,
    normalize_messages,
    normalize_tools,
)

# (template file, bos_token, eos_token) as each model's tokenizer_config.json declares them.
MODELS = {
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", "", "<|im_end|>"),
    "gemma2": ("google-gemma-2-2b-it.jinja", "<bos>", "<eos>"),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>"),
}

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi. What do you need?"},
    {"role": "user", "content": "Name a prime number."},
]

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather",
    "description": "Météo actuelle",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}}
WEATHER_JSON = ('{"name": "get_weather", "description": "Météo actuelle", "parameters": '
                '{"type": "object", "properties": {"city": {"type": "string"}}, '
                '"required": ["city"]}}')

# A tool round trip as an OpenAI client sends it: null content, arguments as a JSON string.
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "abcDEF123", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "abcDEF123", "content": "18°C"},
]


@pytest.fixture(scope="module")
def templates(shared_models: Path) -> dict[str, ChatTemplate]:
    directory = shared_models / "chat-templates"
    if not directory.is_dir():
        pytest.skip(f"chat templates not found at {directory}")
    return {name: ChatTemplate((directory / file).read_text(encoding="utf-8"), bos, eos)
            for name, (file, bos, eos) in MODELS.items()}


def plain(source: str) -> ChatTemplate:
    return ChatTemplate(source, "<s>", "</s>")


USER = [{"role": "user", "content": "hi"}]

# --- real templates ------------------------------------------------------------------------


def test_qwen25(templates: dict[str, ChatTemplate]) -> None:
    assert templates["qwen2.5"].render(CHAT) == (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi. What do you need?<|im_end|>\n"
        "<|im_start|>user\nName a prime number.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a system message the template supplies its own; without the generation prompt
    # the text ends after the last turn.
    assert templates["qwen2.5"].render(CHAT[1:2], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
    )


def test_gemma2_folds_the_system_message(templates: dict[str, ChatTemplate]) -> None:
    gemma = templates["gemma2"]
    # The template itself raises "System role not supported"; the probe sees that, and the
    # system message is merged into the first user turn as llama.cpp does.
    assert not gemma.supports_system_role
    assert gemma.render(CHAT) == (
        "<bos><start_of_turn>user\nYou are a terse assistant.\nHello!<end_of_turn>\n"
        "<start_of_turn>model\nHi. What do you need?<end_of_turn>\n"
        "<start_of_turn>user\nName a prime number.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert gemma.render([{"role": "developer", "content": "Be brief."}, *USER]) == (
        "<bos><start_of_turn>user\nBe brief.\nhi<end_of_turn>\n<start_of_turn>model\n")


def test_gemma2_raise_exception_paths(templates: dict[str, ChatTemplate]) -> None:
    gemma = templates["gemma2"]
    alternate = "Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(ChatTemplateError) as e:
        gemma.render([*USER, *USER])
    assert str(e.value) == alternate
    with pytest.raises(ChatTemplateError) as e:
        gemma.render([*USER, CHAT[2], CHAT[2]])
    assert str(e.value) == alternate
    # Only a leading system message is folded; the template's own check only looks at "user",
    # so a later one slips through as a "system" turn (in llama.cpp too).
    assert gemma.render([*USER, {"role": "system", "content": "x"}], False) == (
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>system\nx<end_of_turn>\n")
    with pytest.raises(ChatTemplateError, match="no message after the system message"):
        gemma.render(CHAT[:1])


def test_llama31(templates: dict[str, ChatTemplate]) -> None:
    llama = templates["llama3.1"]
    assert llama.render(CHAT) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are a terse assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi. What do you need?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a prime number.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # Extra keyword arguments are template variables.
    assert "Today Date: 01 Jan 2025\n\n<|eot_id|>" in llama.render(USER, date_string="01 Jan 2025")


def test_llama31_tool_calls(templates: dict[str, ChatTemplate]) -> None:
    llama = templates["llama3.1"]
    assert llama.requires_object_arguments
    assert llama.render(TOOL_CHAT).endswith(
        "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        # A string `is iterable`, so the template JSON-encodes the tool result.
        '<|start_header_id|>ipython<|end_header_id|>\n\n"18°C"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    two_calls = json.loads(json.dumps(TOOL_CHAT[:2]))
    two_calls[1]["tool_calls"] *= 2
    with pytest.raises(ChatTemplateError) as e:
        llama.render(two_calls)
    assert str(e.value) == "This model only supports single tool-calls at once!"


def test_mistral_nemo(templates: dict[str, ChatTemplate]) -> None:
    mistral = templates["mistral-nemo"]
    # The system message goes into the last user turn; there is no generation prompt.
    expected = ("<s>[INST]Hello![/INST]Hi. What do you need?</s>"
                "[INST]You are a terse assistant.\n\nName a prime number.[/INST]")
    assert mistral.render(CHAT) == expected
    assert mistral.render(CHAT, add_generation_prompt=False) == expected
    with pytest.raises(ChatTemplateError) as e:
        mistral.render([*USER, CHAT[0], *USER])
    assert str(e.value).startswith("Only user and assistant roles are supported")


def test_mistral_nemo_tools(templates: dict[str, ChatTemplate]) -> None:
    mistral = templates["mistral-nemo"]
    assert mistral.render(TOOL_CHAT, tools=[WEATHER_TOOL]) == (
        '<s>[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "get_weather", '
        '"description": "Météo actuelle", "parameters": {"type": "object", "properties": '
        '{"city": {"type": "string"}}, "required": ["city"]}}}][/AVAILABLE_TOOLS]'
        "[INST]Weather in Paris?[/INST]"
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, '
        '"id": "abcDEF123"}]</s>'
        '[TOOL_RESULTS]{"content": 18°C, "call_id": "abcDEF123"}[/TOOL_RESULTS]'
    )
    bad_id = json.loads(json.dumps(TOOL_CHAT[:2]))
    bad_id[1]["tool_calls"][0]["id"] = "call_1"
    with pytest.raises(ChatTemplateError) as e:
        mistral.render(bad_id)
    assert str(e.value) == "Tool call IDs should be alphanumeric strings with length 9!"


def test_qwen25_tools(templates: dict[str, ChatTemplate]) -> None:
    qwen = templates["qwen2.5"]
    assert qwen.render(TOOL_CHAT, tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
        '<tools>\n{"type": "function", "function": ' + WEATHER_JSON + "}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18°C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # An empty tool list is no tools (Llama 3.1 would otherwise announce an empty toolbox).
    assert qwen.render(USER, tools=[]) == qwen.render(USER)


def test_capability_probes(templates: dict[str, ChatTemplate]) -> None:
    caps = {name: (t.supports_system_role, t.requires_object_arguments)
            for name, t in templates.items()}
    assert caps == {"qwen2.5": (True, True), "gemma2": (False, False),
                    "llama3.1": (True, True), "mistral-nemo": (True, True)}


# --- the default template ------------------------------------------------------------------


def test_default_template_is_chatml() -> None:
    for source in (None, "", "chatml"):
        chat = ChatTemplate.for_model(source, "<s>", "</s>")
        assert chat.source == DEFAULT_CHAT_TEMPLATE
    assert chat.supports_system_role and not chat.requires_object_arguments
    assert chat.render(CHAT) == (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi. What do you need?<|im_end|>\n"
        "<|im_start|>user\nName a prime number.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chat.render(USER, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"
    own = "{{ bos_token }}{{ messages[0].content }}"
    assert ChatTemplate.for_model(own, "<s>", "</s>").render(USER) == "<s>hi"


# --- message normalization -----------------------------------------------------------------


def test_content_parts_are_joined_with_newlines() -> None:
    chat = ChatTemplate.for_model(None, "", "")
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert chat.render([{"role": "user", "content": parts}], add_generation_prompt=False) == (
        "<|im_start|>user\nfirst\nsecond<|im_end|>\n")
    # llama.cpp adds no newline while the text so far is empty.
    messages = normalize_messages([{"role": "user", "content": [
        {"type": "text", "text": ""}, {"type": "text", "text": "a"},
        {"type": "text", "text": ""}, {"type": "text", "text": "b"}]}])
    assert messages[0]["content"] == "a\n\nb"
    assert normalize_messages([{"role": "user", "content": []}])[0]["content"] == ""


@pytest.mark.parametrize(("content", "error"), [
    ([{"type": "image_url", "image_url": {"url": "data:,"}}],
     r"messages\[0\]\.content\[0\]: unsupported content part type 'image_url'"),
    ([{"type": "text", "text": "a"}, {"type": "input_audio"}], "'input_audio'"),
    ([{"text": "no type"}], r"content\[0\] must be an object with a 'type'"),
    (["bare string"], "must be an object with a 'type'"),
    ([{"type": "text", "text": 5}], r"content\[0\]\.text must be a string"),
    (42, "content must be a string, null or a list of parts"),
])
def test_bad_content(content: object, error: str) -> None:
    with pytest.raises(ChatTemplateError, match=error):
        normalize_messages([{"role": "user", "content": content}])


def test_normalized_shape() -> None:
    [system, user, assistant, tool] = normalize_messages([
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "q", "name": "ann", "extra_field": 1},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "f", "arguments": {"x": "é"}}}]},
        {"role": "tool", "content": "r", "tool_call_id": "c1"},
    ])
    assert system == {"role": "system", "content": "rules"}
    assert user == {"role": "user", "content": "q", "name": "ann"}
    assert assistant == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{"x": "é"}'}, "id": "c1"}]}
    assert tool == {"role": "tool", "content": "r", "tool_call_id": "c1"}
    # Empty tool_calls are dropped: templates test `'tool_calls' in message`.
    assert normalize_messages([{"role": "assistant", "content": "a", "tool_calls": []}]) == [
        {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(("messages", "error"), [
    ([], "'messages' must be a non-empty list"),
    ("hi", "'messages' must be a non-empty list"),
    (["hi"], r"messages\[0\] must be an object"),
    ([{"role": "function", "content": "x"}], "unsupported role 'function'"),
    ([{"content": "x"}], "unsupported role None"),
    ([{"role": "user"}], "needs 'content' or 'tool_calls'"),
    ([{"role": "user", "content": "x", "name": 3}], r"messages\[0\]\.name must be a string"),
    ([{"role": "assistant", "tool_calls": {"id": "x"}}], "tool_calls must be a list"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}],
     r"tool_calls\[0\] must be an object with \"type\": \"function\""),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}],
     "needs a string 'name' and 'arguments'"),
])
def test_bad_messages(messages: object, error: str) -> None:
    with pytest.raises(ChatTemplateError, match=error):
        normalize_messages(messages)


def test_tools_normalization() -> None:
    assert normalize_tools(None) is None
    assert normalize_tools([]) is None
    assert normalize_tools([{"type": "function", "function": {"name": "f", "strict": True}}]) == [
        {"type": "function", "function": {"name": "f", "description": "", "parameters": {}}}]
    with pytest.raises(ChatTemplateError, match=r"tools\[0\] must be an object"):
        normalize_tools([{"type": "retrieval"}])
    with pytest.raises(ChatTemplateError, match="'tools' must be a list"):
        normalize_tools({"type": "function"})


def test_invalid_tool_arguments_for_object_templates() -> None:
    source = "{% for m in messages %}{% for c in m.tool_calls %}{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}"  # noqa: E501
    chat = plain(source)
    assert chat.requires_object_arguments
    broken = [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]
    with pytest.raises(ChatTemplateError, match="arguments of tool call 'f' are not valid JSON"):
        chat.render(broken)


def test_messages_are_data_not_template_source() -> None:
    hostile = "{{ raise_exception('pwned') }}{% for %}{{ ''.__class__ }}"
    chat = ChatTemplate.for_model(None, "", "")
    assert chat.render([{"role": "user", "content": hostile}], add_generation_prompt=False) == (
        f"<|im_start|>user\n{hostile}<|im_end|>\n")


def test_caller_messages_are_not_modified() -> None:
    messages = json.loads(json.dumps(TOOL_CHAT))
    chat = plain("{% for m in messages %}{% for c in m.tool_calls %}"
                 "{{ c.function.arguments | tojson }}{% endfor %}{{ m.content }}{% endfor %}")
    assert chat.requires_object_arguments
    assert chat.render(messages) == 'Weather in Paris?{"city": "Paris"}18°C'
    assert messages == TOOL_CHAT


# --- the template environment --------------------------------------------------------------


def test_transformers_globals_and_filters() -> None:
    assert plain("{{ x | tojson }}").render(USER, x={"é": "<&>"}) == '{"é": "<&>"}'
    assert plain("{{ x | tojson(indent=2) }}").render(USER, x={"a": [1]}) == (
        '{\n  "a": [\n    1\n  ]\n}')
    year = plain("{{ strftime_now('%Y') }}").render(USER)
    assert year in {str(datetime.now().year - 1), str(datetime.now().year)}
    loop = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
            "{% if m.role == 'assistant' %}{% continue %}{% endif %}{{ m.content }};{% endfor %}")
    assert plain(loop).render(CHAT[1:]) == "Hello!;"
    assert plain("{% generation %}{{ 'x' }}{% endgeneration %}").render(USER) == "x"
    # trim_blocks / lstrip_blocks: block tags on their own lines leave no whitespace behind.
    assert plain("{% if true %}\n    {% if true %}\nA\n    {% endif %}\n{% endif %}\n").render(
        USER) == "A\n"


def test_reserved_variables_cannot_be_overridden() -> None:
    with pytest.raises(ChatTemplateError, match="'bos_token' cannot be set"):
        plain("{{ bos_token }}").render(USER, bos_token="<evil>")


@pytest.mark.parametrize(("source", "error"), [
    ("{% for %}", "chat template syntax error at line 1: "),
    ("\n\n{{ messages[0].content", "chat template syntax error at line 3: "),
    ("{% generation %}never closed", "syntax error"),
    ("{% endfor %}", "syntax error"),
])
def test_syntax_errors(source: str, error: str) -> None:
    with pytest.raises(ChatTemplateError, match=error):
        plain(source)


@pytest.mark.parametrize(("source", "error"), [
    ("{{ raise_exception('Custom message: roles!') }}", r"^Custom message: roles!$"),
    ("{{ foo.bar }}", "^chat template error at line 1: 'foo' is undefined$"),
    ("\n{{ messages[0].content + 1 }}",
     r"^chat template error at line 2: TypeError: can only concatenate str"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ messages | tojson }}{{ x | tojson }}", "TypeError: Object of type Undefined"),
])
def test_render_errors(source: str, error: str) -> None:
    with pytest.raises(ChatTemplateError, match=error):
        plain(source).render(USER)


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('id') }}",
    "{{ raise_exception.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ self._TemplateReference__context }}",
    "{% set _ = messages.append(1) %}",
    "{% set _ = messages[0].update({'role': 'system'}) %}",
    "{{ '{0.__class__}'.format(messages) }}",
])
def test_sandbox_blocks_escapes(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="unsafe"):
        plain(source).render(USER)


@pytest.mark.parametrize(("source", "error"), [
    ("{{ 'x' * 10 ** 9 }}", "repetition of 1000000000 items exceeds the limit"),
    ("{{ [0] * 10 ** 9 }}", "repetition"),
    ("{{ 'x'.ljust(10 ** 9) }}", "str.ljust of 1000000000 items"),
    ("{% set n = 10 %}{{ n ** (n ** n) }}", r"10 \*\* 10000000000 is too large"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}0123456789{% endfor %}"
     "{% endfor %}", f"output exceeds {MAX_PROMPT_CHARS} characters"),
])
def test_sandbox_blocks_memory_bombs(source: str, error: str) -> None:
    with pytest.raises(ChatTemplateError, match=error):
        plain(source).render(USER)
    # Ordinary arithmetic and repetition still work.
    assert plain("{{ 2 ** 10 }} {{ '-' * 3 }} {{ 'a'.ljust(3) }}|").render(USER) == "1024 --- a  |"
