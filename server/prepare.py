"""Request preparation: a validated body turned into its choices, ready to submit -- prompt
tokens, limits, stop strings and sampling parameters, each checked against the model with a 400
naming the field.

Tokenizing and template rendering take time in proportion to the text, so routes call these
functions on the worker pool (ServerState.run), never on the event loop; and a text too long
for the context by its length alone is refused before it is tokenized (`check_text_length`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple, cast

from ..engine.engine import SteeringTerm
from ..engine.sampling import SamplingParams
from .chat import ChatTemplateError
from .constraints import request_grammar
from .errors import ApiError
from .protocol import (
    ApplyTemplateRequest,
    ChatCompletionRequest,
    CompletionRequest,
    LlamaCompletionRequest,
)
from .runner import GenerationRequest, Runner
from .state import Model
from .textstream import normalize_stop
from .tools import ToolRequest, render_messages, tool_grammar, tool_request

GenerationSpec = tuple[GenerationRequest, tuple[str, ...], bool]  # request, stop strings, at_start


class Choice(NamedTuple):
    """One choice of a request, ready to submit, with the prompt it continues."""

    spec: GenerationSpec
    prompt: list[int]
    echo: str = ""  # completions' `echo`: the prompt text the choice starts with
    tools: ToolRequest | None = None  # chat: the tools whose calls its output is parsed for


def completion_choices(model: Model, runner: Runner, body: CompletionRequest,
                       steering: tuple[SteeringTerm, ...]) -> list[Choice]:
    """OpenAI completions: n choices for each prompt, prompt by prompt."""
    stop = stop_strings(body.stop)
    prompts = _prompts(body)
    check_admissible(runner, len(prompts) * body.n, "n" if body.n > 1 else "prompt")
    grammar = request_grammar(body)
    choices = []
    for prompt in prompts:
        ids = tokenize_prompt(model, prompt, runner=runner)
        n_new = max_new_tokens(runner, ids, body.max_tokens)
        echo = ""
        if body.echo:
            echo = prompt if isinstance(prompt, str) else model.tokenizer.decode(ids)
        for j in range(body.n):
            params = chained(sampling(body.temperature, body.top_p, body.top_k, body.min_p,
                                      choice_seed(body.seed, j), body.repetition_penalty,
                                      body.frequency_penalty, body.presence_penalty,
                                      body.repeat_last_n),
                             body.chain())
            gen = GenerationRequest(ids, params, n_new, model.tokenizer.end_ids,
                                    logprobs=body.logprobs,
                                    prompt_logprobs=body.echo and body.logprobs is not None,
                                    steering=steering,
                                    constraint=model.vocabulary.constraint(grammar),
                                    cache_prompt=body.cache_prompt, follow=j > 0)
            choices.append(Choice((gen, stop, False), ids, echo))
    return choices


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if all(isinstance(x, int) for x in p):
        return [cast(list[int], p)]  # one prompt as token ids
    return list(cast(list[str | list[int]], p))  # several prompts: strings or token-id lists


def chat_choices(model: Model, runner: Runner, body: ChatCompletionRequest,
                 steering: tuple[SteeringTerm, ...]) -> list[Choice]:
    """OpenAI chat: n choices continuing the conversation rendered by the chat template."""
    stop = stop_strings(body.stop)
    check_admissible(runner, body.n, "n")
    tools = chat_tools(model, body)
    grammar = request_grammar(body)
    forced = tool_grammar(tools) if tools is not None else None
    if forced is not None and grammar is not None:
        raise ApiError(400, f"tool_choice: a forced tool call cannot be combined with "
                       f"{grammar.field}", param="tool_choice")
    parsed = tools if tools is not None and tools.parses and grammar is None else None
    grammar = grammar or forced
    ids = chat_prompt(model, body, runner)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    n_new = max_new_tokens(runner, ids, requested,
                           "max_completion_tokens" if body.max_completion_tokens is not None
                           else "max_tokens")
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    choices = []
    for j in range(body.n):
        params = chained(sampling(body.temperature, body.top_p, body.top_k, body.min_p,
                                  choice_seed(body.seed, j), body.repetition_penalty,
                                  body.frequency_penalty, body.presence_penalty,
                                  body.repeat_last_n), body.chain())
        gen = GenerationRequest(ids, params, n_new, model.tokenizer.end_ids,
                                logprobs=top_n, steering=steering,
                                constraint=model.vocabulary.constraint(grammar),
                                cache_prompt=body.cache_prompt, follow=j > 0)
        choices.append(Choice((gen, stop, False), ids, tools=parsed))
    return choices


def chat_tools(model: Model, body: ChatCompletionRequest | ApplyTemplateRequest
               ) -> ToolRequest | None:
    """The request's tools, checked (400s naming `tools` or `tool_choice`)."""
    return tool_request(body.tools, body.tool_choice, body.parallel_tool_calls,
                        model.chat_template)


def check_admissible(runner: Runner, sequences: int, field: str) -> None:
    """A request whose sequences are submitted together (n choices of several prompts, all
    streamed at once) must fit what the server can ever hold: --parallel running plus
    --max-queue waiting. More is a 400 -- a 503 would tell the client to retry in vain."""
    most = runner.scheduler.max_running + runner.scheduler.max_waiting
    if sequences > most:
        raise ApiError(400, f"{field}: this request needs {sequences} sequences at once (n x "
                       f"prompts); the server runs at most {most} (--parallel "
                       f"{runner.scheduler.max_running} + --max-queue "
                       f"{runner.scheduler.max_waiting})", param=field,
                       code="too_many_sequences")


def chat_prompt(model: Model, body: ChatCompletionRequest,
                runner: Runner | None = None) -> list[int]:
    """The conversation rendered by the chat template and tokenized; with `runner`, a rendering
    too long for its context is refused before it is tokenized."""
    text = render_chat(model, body)
    if runner is not None:
        check_text_length(model, runner, text, "messages")
    return model.tokenizer.encode(text, bos=True, special=True)


def render_chat(model: Model, body: ChatCompletionRequest | ApplyTemplateRequest,
                add_generation_prompt: bool = True) -> str:
    """The conversation as the chat template writes it, without a BOS the template writes
    first: tokenizing adds BOS (chat, and /completion for /apply-template's text), and
    templates that write it themselves would get a second one."""
    messages = [m.model_dump(exclude_none=False) for m in body.messages]
    tools = chat_tools(model, body)
    try:
        text = render_messages(model.chat_template, messages, tools, add_generation_prompt,
                               body.chat_template_kwargs or {})
    except ChatTemplateError as e:
        raise ApiError(400, str(e), param="messages") from e
    except TypeError as e:  # a chat_template_kwargs key the template reserves
        raise ApiError(400, f"chat_template_kwargs: {e}", param="chat_template_kwargs") from e
    bos = model.chat_template.bos_token
    # NOTE: in chat, the special tokens a template writes (<|im_start|>, ...) are tokens, as in
    # llama.cpp (chat_prompt tokenizes with special=True)
    return text.removeprefix(bos) if bos else text


def llama_choice(model: Model, runner: Runner, body: LlamaCompletionRequest,
                 steering: tuple[SteeringTerm, ...]) -> Choice:
    """llama.cpp's /completion: one choice; n_predict -1 is 'as many as fit'."""
    ids = tokenize_prompt(model, body.prompt, runner=runner)
    n_new = max_new_tokens(runner, ids, None if body.n_predict < 0 else body.n_predict,
                           "n_predict")
    params = chained(sampling(body.temperature, body.top_p, body.top_k, body.min_p,
                              None if body.seed < 0 else body.seed, body.repeat_penalty,
                              body.frequency_penalty, body.presence_penalty,
                              body.repeat_last_n), body.chain())
    grammar = request_grammar(body)
    # a grammar's end is the generation's end, ignore_eos or not
    stop_ids = frozenset() if body.ignore_eos and not grammar else model.tokenizer.end_ids
    gen = GenerationRequest(ids, params, n_new, stop_ids,
                            logprobs=body.n_probs if body.n_probs else None,
                            post_sampling_probs=body.post_sampling_probs, steering=steering,
                            constraint=model.vocabulary.constraint(grammar),
                            cache_prompt=body.cache_prompt)
    return Choice((gen, stop_strings(body.stop), False), ids)


def min_tokens(model: Model, text: str) -> int:
    """A lower bound of the tokens `text` encodes to (without BOS), from its length alone: with
    byte fallback every token stands for at most `max_token_chars` characters of the text."""
    bound = model.max_token_chars
    if bound is None or not text:
        return 0
    return -(-len(text) // bound)


def check_text_length(model: Model, runner: Runner, text: str, field: str,
                      before: int = 1) -> None:
    """Refuse a text that cannot fit the context whatever it tokenizes to, without tokenizing it
    (megabytes of text take seconds to tokenize). `before`: tokens ahead of it (BOS)."""
    limit = runner.context_limit()
    at_least = before + min_tokens(model, text)
    if at_least > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, "
                       f"{field} has {len(text)} characters, at least {at_least} tokens. "
                       f"Please reduce the {field}.", param=field.split("[")[0].split(".")[0],
                       code="context_length_exceeded")


def tokenize_prompt(model: Model, prompt: str | list, field: str = "prompt",
                    runner: Runner | None = None) -> list[int]:
    """A string (BOS + text) or token ids (used as given) -> ids, validated against the vocab.
    Special tokens written in the text (<|im_start|>, </s>) are cut out as their ids, as
    llama.cpp's completion routes (and vLLM's) tokenize a prompt. With `runner`, text that
    cannot fit its context is refused before it is tokenized."""
    tok = model.tokenizer
    if isinstance(prompt, str):
        if runner is not None:
            check_text_length(model, runner, prompt, field)
        return tok.encode(prompt, bos=True, special=True)
    ids: list[int] = []
    for i, part in enumerate(prompt):  # llama.cpp allows strings and ids mixed
        if isinstance(part, str):
            if runner is not None:
                check_text_length(model, runner, part, field, before=len(ids) + (not ids))
            ids.extend(tok.encode(part, bos=not ids, special=True))
        elif isinstance(part, int) and not isinstance(part, bool):
            if not 0 <= part < tok.vocab_size:
                raise ApiError(400, f"{field}[{i}]: token id {part} outside "
                               f"0..{tok.vocab_size - 1}", param=field)
            ids.append(part)
        else:
            raise ApiError(400, f"{field}[{i}]: expected a token id or a string", param=field)
    if not ids:
        raise ApiError(400, f"{field}: empty prompt", param=field)
    return ids


def max_new_tokens(runner: Runner, prompt: list[int], requested: int | None,
                   field: str = "max_tokens") -> int:
    """Check prompt + requested tokens fit the context; None means 'as many as fit'."""
    limit = runner.context_limit()
    room = limit - len(prompt)
    if room < 0 or (requested is not None and requested > room):
        wanted = len(prompt) + (requested or 0)
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, "
                       f"you requested {wanted} tokens ({len(prompt)} in the prompt, "
                       f"{requested or 0} for the completion). Please reduce the prompt or "
                       f"{field}.", param=field if room >= 0 else "prompt",
                       code="context_length_exceeded")
    return room if requested is None else requested


def input_ids(model: Model, runner: Runner, prompt: str | list, field: str) -> list[int]:
    """Text (with BOS) or token ids of a prompt-only input (features, embeddings) that must fit
    the context (else context_length_exceeded)."""
    ids = tokenize_prompt(model, prompt, field, runner)
    limit = runner.context_limit()
    if len(ids) > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, "
                       f"{field} has {len(ids)} tokens. Please reduce the input.", param=field,
                       code="context_length_exceeded")
    return ids


def stop_strings(stop: Any, field: str = "stop") -> tuple[str, ...]:
    try:
        return normalize_stop(stop)
    except ValueError as e:
        raise ApiError(400, str(e), param=field) from e


def sampling(temperature: float, top_p: float, top_k: int, min_p: float, seed: int | None,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, repeat_last_n: int = -1) -> SamplingParams:
    try:
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              seed=seed, repetition_penalty=repetition_penalty,
                              frequency_penalty=frequency_penalty,
                              presence_penalty=presence_penalty, repeat_last_n=repeat_last_n)
    except ValueError as e:  # the message starts with the field's name
        field = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), param=field if field.isidentifier() else None) from e


# what turns each of tiller's samplers off, by llama.cpp's name (protocol.LLAMA_CHAIN)
_OFF: dict[str, dict[str, Any]] = {
    "penalties": {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0},
    "top_k": {"top_k": 0}, "top_p": {"top_p": 1.0}, "min_p": {"min_p": 0.0},
    "temperature": {"temperature": 1.0}}


def chained(params: SamplingParams, chain: tuple[str, ...]) -> SamplingParams:
    """llama.cpp's `samplers`: a sampler left out of the chain is not used (without
    `temperature`, the draw is at temperature 1)."""
    off = {k: v for name, fields in _OFF.items() if name not in chain for k, v in fields.items()}
    return replace(params, **off) if off else params


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of n gets seed + i: reproducible as a whole, different from its siblings."""
    return None if seed is None else (seed + index) % 2**63
