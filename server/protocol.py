"""Request and response bodies of the HTTP API, as pydantic models.

Shapes follow the originals: OpenAI's /v1/completions and /v1/chat/completions, llama.cpp's
/completion, /tokenize and /detokenize. Unknown fields are ignored, as both servers do, except
fields whose meaning we would silently drop (logit_bias, suffix, tools, ...): those are 400s.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NonNegInt = Annotated[int, Field(ge=0)]
Prompt = str | list[int] | list[str | list[int]]
Stop = str | list[str] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # fields other servers accept but tiller does not implement: refuse rather than ignore
    unsupported: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in cls.unsupported:
                if data.get(name) not in (None, False, [], {}, ""):
                    raise ValueError(f"{name}: not supported by this server")
        return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(_Body):
    """Sampling fields shared by the OpenAI-style endpoints (with llama.cpp/vLLM extensions)."""

    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: NonNegInt = 0
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Stop = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    model: str | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    unsupported = ("suffix", "logit_bias", "best_of")
    prompt: Prompt
    max_tokens: NonNegInt | None = 16
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and not v:
            raise ValueError("prompt: must not be an empty list")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("prompt: token lists must not be empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    unsupported = ("logit_bias", "tools", "tool_choice", "response_format", "functions")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: NonNegInt | None = None
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None


class LlamaCompletionRequest(_Body):
    """llama.cpp's POST /completion, with its defaults."""

    unsupported = ("logit_bias", "grammar", "json_schema")
    prompt: str | list[int | str]
    n_predict: int = Field(-1, ge=-1)
    temperature: float = Field(0.8, ge=0.0, le=100.0, allow_inf_nan=False)
    top_k: NonNegInt = 40
    top_p: float = Field(0.95, gt=0.0, le=1.0, allow_inf_nan=False)
    min_p: float = Field(0.05, ge=0.0, le=1.0, allow_inf_nan=False)
    repeat_penalty: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    repeat_last_n: int = Field(64, ge=-1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    seed: int = Field(-1, ge=-1, lt=2**63)
    stop: list[str] = []
    stream: bool = False
    n_probs: NonNegInt = Field(0, le=20)
    ignore_eos: bool = False
    cache_prompt: bool = True  # accepted for compatibility; every prompt is computed afresh


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


# responses (for /openapi.json and as the documented shapes) -----------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Timings(BaseModel):
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float


class LlamaCompletionResponse(BaseModel):
    content: str
    tokens: list[int] = []
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    stop: bool
    stop_type: Literal["none", "eos", "limit", "word"]
    stopping_word: str
    timings: Timings | None = None
    completion_probabilities: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    meta: dict[str, Any] = {}


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
