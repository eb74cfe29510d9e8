"""Request and response bodies of the HTTP API, as pydantic models.

Shapes follow the originals: OpenAI's /v1/completions and /v1/chat/completions, llama.cpp's
/completion, /tokenize and /detokenize. Unknown fields are ignored, as both servers do, except
fields whose meaning we would silently drop (logit_bias, suffix, tools, ...): those are 400s.

Validation is strict (pydantic's strict mode): JSON types are taken as they are, so `true` is
no token id, `"2"` no number and `"yes"` no boolean. Emptiness is checked before the types
(mode="before") so that `[]` is "must not be empty" rather than a union's first mismatch, and
the same bounds appear in the types for /openapi.json.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

from ..engine.sampling import PENALTY_RANGE, REPETITION_PENALTY_RANGE

NonNegInt = Annotated[int, Field(ge=0)]
# the engine's bounds (engine/sampling.py): within them no penalty can make a logit non-finite
Penalty = Annotated[float, Field(ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1], allow_inf_nan=False)]
RepetitionPenalty = Annotated[float, Field(ge=REPETITION_PENALTY_RANGE[0],
                                           le=REPETITION_PENALTY_RANGE[1], allow_inf_nan=False)]
TokenIds = Annotated[list[int], Field(min_length=1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
Prompt = str | TokenIds | Annotated[list[str | TokenIds], Field(min_length=1)]
Stop = str | list[str] | None
MAX_PAIRS = 256  # contrastive pairs of one control vector: 512 prompts, built in waves


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    # fields other servers accept but tiller does not implement: refuse rather than ignore
    unsupported: ClassVar[tuple[str, ...]] = ()
    # fields of samplers tiller does not have: accepted at the values that turn them off (as
    # clients send them), refused at any other
    neutral: ClassVar[dict[str, tuple[Any, ...]]] = {}
    # fields that only chat serves (tool calls): refused elsewhere, saying where they work
    chat_only: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in cls.unsupported:
                if data.get(name) not in (None, False, [], {}, ""):
                    raise ValueError(f"{name}: not supported by this server")
            for name in cls.chat_only:
                if data.get(name) not in (None, [], ""):
                    raise ValueError(f"{name}: tool calls are served on /v1/chat/completions "
                                     "only")
            for name, off in cls.neutral.items():
                value = data.get(name)
                if value is not None and (isinstance(value, bool) or value not in off):
                    raise ValueError(f"{name}: not supported by this server (only "
                                     f"{' or '.join(map(str, off))}, which turns it off)")
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


# tiller's sampler chain, in its order (engine/sampling.py), by llama.cpp's sampler names
LLAMA_CHAIN = ("penalties", "top_k", "top_p", "min_p", "temperature")
# llama.cpp's samplers tiller does not have: harmless in `samplers` while their fields are off
ABSENT_SAMPLERS = ("dry", "top_n_sigma", "typ_p", "xtc")
# llama.cpp's one-letter names (a `samplers` string such as "edkypmxt")
SAMPLER_CHARS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p",
                 "p": "top_p", "m": "min_p", "x": "xtc", "t": "temperature"}
# llama.cpp's fields of samplers and features tiller lacks, at the values that turn them off
LLAMA_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "dynatemp_range": (0,), "typical_p": (1,), "dry_multiplier": (0,), "xtc_probability": (0,),
    "top_n_sigma": (-1,), "mirostat": (0,), "min_keep": (0, 1), "n_indent": (0,),
    "t_max_predict_ms": (0,), "n_cmpl": (1,)}


class LlamaFields(_Body):
    """llama-server's fields that every generating endpoint of it takes (its web UI sends them
    to /v1/chat/completions too): `samplers`, `timings_per_token`, and the fields of samplers
    tiller lacks, accepted only at the values that turn them off."""

    neutral = LLAMA_NEUTRAL
    samplers: list[str] | str | None = None
    timings_per_token: bool = False  # `timings` in every streamed chunk
    # reuse the KV cache of a prompt prefix computed before (server/runner.py): the output is
    # bitwise the same either way, false only costs the prompt's recomputation
    cache_prompt: bool = True

    @field_validator("samplers")
    @classmethod
    def _known_samplers(cls, v: list[str] | str | None) -> list[str] | str | None:
        names = [SAMPLER_CHARS.get(c, c) for c in v] if isinstance(v, str) else v or []
        for name in names:
            if name not in LLAMA_CHAIN and name not in ABSENT_SAMPLERS:
                raise ValueError(f"samplers: unknown sampler {name!r} (llama.cpp's names: "
                                 f"{', '.join(LLAMA_CHAIN + ABSENT_SAMPLERS)})")
        chain = [n for n in names if n in LLAMA_CHAIN]
        if len(set(chain)) < len(chain) or chain != sorted(chain, key=LLAMA_CHAIN.index):
            raise ValueError(f"samplers: {', '.join(chain)}: this server applies its samplers "
                             f"once each, in the order {', '.join(LLAMA_CHAIN)}")
        return v

    def chain(self) -> tuple[str, ...]:
        """The samplers that run: `samplers` (llama.cpp: one left out is not used) or all."""
        if self.samplers is None:
            return LLAMA_CHAIN
        names = {SAMPLER_CHARS.get(c, c) for c in self.samplers}
        return tuple(n for n in LLAMA_CHAIN if n in names)


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema: {name, description, schema, strict}."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # every schema is enforced, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's response_format; llama.cpp's json_object may carry a `schema` of its own."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    @model_validator(mode="after")
    def _schema_for_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format: type "json_schema" needs `json_schema`')
        return self


class ConstraintFields(_Body):
    """Structured outputs (server/constraints.py): at most one of these per request."""

    response_format: ResponseFormat | None = None
    json_schema: dict[str, Any] | None = None  # llama.cpp's
    grammar: str | None = None  # llama.cpp's GBNF



class SamplingFields(LlamaFields, ConstraintFields):
    """Sampling fields shared by the OpenAI-style endpoints (with llama.cpp/vLLM extensions)."""

    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: NonNegInt = 0
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    # llama.cpp's names, which its server takes on the OpenAI routes too: repeat_penalty is
    # repetition_penalty (give one of them), repeat_last_n the penalties' window (-1: all)
    repeat_penalty: RepetitionPenalty | None = None
    repeat_last_n: int = Field(-1, ge=-1, lt=2**31)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Stop = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    model: str | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _repeat_penalty_alias(self) -> SamplingFields:
        if self.repeat_penalty is not None:
            if "repetition_penalty" in self.model_fields_set \
                    and self.repetition_penalty != self.repeat_penalty:
                raise ValueError("repeat_penalty: llama.cpp's name of repetition_penalty; give "
                                 "one of them")
            # NOTE: assigned, so it counts as given: a server's --repeat-penalty must not win
            self.repetition_penalty = self.repeat_penalty
        return self


class CompletionRequest(SamplingFields):
    unsupported = ("suffix", "logit_bias", "best_of")
    chat_only = ("tools", "tool_choice")
    prompt: Prompt
    max_tokens: NonNegInt | None = 16
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt: must not be an empty list")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("prompt: token lists must not be empty")
        return v
    steering: Steering = []
    readouts: Readouts = []
    readout_prompt: bool = False  # readouts of the prompt tokens too
    hidden_states: HiddenStates | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict[str, Any]] | None = None


# tool calls (server/tools.py) -------------------------------------------------------------------

ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # OpenAI's rule


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object
    strict: bool | None = None  # a forced call is always held to the schema


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: ToolName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: FunctionName


class ToolFields(_Body):
    """OpenAI's tools: `tool_choice` defaults to "auto" when tools are given."""

    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class ChatCompletionRequest(SamplingFields, ToolFields):
    unsupported = ("logit_bias", "functions", "function_call")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: NonNegInt | None = None
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    steering: Steering = []
    readouts: Readouts = []
    readout_prompt: bool = False
    hidden_states: HiddenStates | None = None


class ApplyTemplateRequest(ToolFields):
    """llama.cpp's POST /apply-template: the conversation as /v1/chat/completions takes it."""

    unsupported = ("functions", "function_call")
    messages: list[ChatMessage] = Field(min_length=1)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True


class ApplyTemplateResponse(BaseModel):
    prompt: str


class LlamaCompletionRequest(LlamaFields):
    """llama.cpp's POST /completion, with its defaults."""

    unsupported = ("logit_bias", "lora", "response_fields", "return_progress", "multimodal_data")
    chat_only = ("tools", "tool_choice")
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None
    prompt: str | Annotated[list[int | str], Field(min_length=1)]
    n_predict: int = Field(-1, ge=-1)
    temperature: float = Field(0.8, ge=0.0, le=100.0, allow_inf_nan=False)
    top_k: NonNegInt = 40
    top_p: float = Field(0.95, gt=0.0, le=1.0, allow_inf_nan=False)
    min_p: float = Field(0.05, ge=0.0, le=1.0, allow_inf_nan=False)
    repeat_penalty: RepetitionPenalty = 1.0
    repeat_last_n: int = Field(64, ge=-1)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: int = Field(-1, ge=-1, lt=2**63)
    stop: list[str] = []
    stream: bool = False
    n_probs: NonNegInt = Field(0, le=20)
    post_sampling_probs: bool = False
    ignore_eos: bool = False
    id_slot: int = Field(-1, ge=-1)  # no slot keeps anything between requests: any is the same
    return_tokens: bool = False
    steering: Steering = []
    readouts: Readouts = []
    readout_prompt: bool = False
    hidden_states: HiddenStates | None = None


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    # NOTE: llama.cpp's /tokenize cuts special tokens written in the text ("<|im_start|>") out
    # as their ids; parse_special false (later llama.cpp) tokenizes them as plain text
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


# responses (for /openapi.json and as the documented shapes) -----------------------------------


class Timings(BaseModel):
    cache_n: int = 0  # prompt tokens reused from the prefix cache (not in prompt_n)
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class ReadoutSeries(BaseModel):
    """One readout per token: the projection on the unit direction, and the cosine."""

    projection: list[float | None]
    cosine: list[float | None]


class EncodedArray(BaseModel):
    """base64 of little-endian float32, with its shape (points, layers, tokens, dim)."""

    shape: list[int]
    dtype: Literal["float32"]
    data: str


class HiddenStatesOut(BaseModel):
    layers: list[int]
    points: list[str]
    generated: EncodedArray | None = None
    prompt: EncodedArray | None = None


class ConditionReport(BaseModel):
    """A CAST decision: once per prompt (scope "prompt"), or per generated token ("token")."""

    entry: int
    scope: Literal["prompt", "token"]
    layer: int | None = None
    similarity: float | list[float | None]
    fired: bool | list[bool | None]


class Readings(BaseModel):
    """What a choice reads besides its text (readouts, hidden_states, CAST's decisions)."""

    readouts: dict[str, ReadoutSeries] | None = None
    prompt_readouts: dict[str, ReadoutSeries] | None = None
    hidden_states: HiddenStatesOut | None = None
    steering_conditions: list[ConditionReport] | None = None


class CompletionChoice(Readings):
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
    timings: Timings | None = None  # llama.cpp's


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


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
    content: str | None  # None: only tool calls
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Readings):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    timings: Timings | None = None  # llama.cpp's


class ChatChunkChoice(Readings):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    # llama.cpp's: on the last chunk, and on every one with timings_per_token
    timings: Timings | None = None


class LlamaTokenProb(BaseModel):
    """A token of `completion_probabilities`: `logprob`, or `prob` with post_sampling_probs."""

    id: int
    token: str
    bytes: list[int]
    logprob: float | None = None
    prob: float | None = None


class LlamaTokenProbs(LlamaTokenProb):
    top_logprobs: list[LlamaTokenProb] | None = None
    top_probs: list[LlamaTokenProb] | None = None


class LlamaCompletionResponse(Readings):
    content: str
    tokens: list[int] = []
    id_slot: int = 0
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    stop: bool
    stop_type: Literal["none", "eos", "limit", "word"]
    stopping_word: str
    timings: Timings | None = None
    completion_probabilities: list[LlamaTokenProbs] | None = None


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


# steering ---------------------------------------------------------------------------------------

MAX_STEERING_ENTRIES = 16


Direction = Annotated[list[float], Field(min_length=1, max_length=65536)]
Op = Literal["add", "ablate", "clamp", "cap"]
# "all", "prompt", "generated", or [start, end) of absolute positions
Scope = Literal["all", "prompt", "generated"] | Annotated[list[int], Field(min_length=2,
                                                                           max_length=2)]


class SteeringCondition(_Body):
    """CAST's condition (`when`): the cosine of the stream at `layer` with `vector` (a stored
    control vector's direction at that layer, or a list of floats), compared with `threshold`.
    scope "prompt": decided once from the mean prompt stream, the entry then acts on the
    generated tokens if it holds; "token": decided for each token (layer <= the entry's)."""

    vector: str | Direction
    layer: int
    threshold: float = Field(ge=-1.0, le=1.0, allow_inf_nan=False)
    comparison: Literal["greater", "less"] = "greater"
    scope: Literal["prompt", "token"] = "prompt"


class SteeringEntry(_Body):
    """One steering entry of a request: a stored vector, or ActAdd inline (llama.cpp's flags).

    Stored: {"vector": id, "layers" | "layer", "scale"}. Inline: {"add", "sub", "source_layer",
    "layer", "mul"} -- built once per model and kept in the store under its content id; or
    {"direction": [floats], "layer"}. Layers are tiller's: l = the stream entering block l,
    n_layers = after the last block; negative numbers count from the end (-1 = after the last
    block). `op` (add, ablate, clamp, cap; `value` for clamp and cap), `norm_match`,
    `positions` and `when` apply to any entry (engine/interventions.py).
    """

    direction: Direction | None = None
    op: Op = "add"
    value: float | None = Field(None, ge=-1e6, le=1e6, allow_inf_nan=False)
    norm_match: bool = False
    positions: Scope | None = None
    when: SteeringCondition | None = None
    vector: str | None = None
    layers: list[int] | None = Field(None, max_length=1024)
    layer: int | None = None
    scale: float = Field(1.0, ge=-1e4, le=1e4, allow_inf_nan=False)
    add: str | None = Field(None, max_length=65536)
    sub: str | None = Field(None, max_length=65536)
    source_layer: int | None = None
    mul: float | None = Field(None, ge=-1e4, le=1e4, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_form(self) -> SteeringEntry:
        inline = self.add is not None or self.sub is not None
        forms = (self.vector is not None) + inline + (self.direction is not None)
        if forms == 0:
            raise ValueError("an entry needs `vector` (a stored id), `direction` or `add` and "
                             "`sub`")
        if forms > 1:
            raise ValueError("an entry takes `vector`, `direction` or `add`/`sub`, not both")
        if self.direction is not None and self.layer is None and not self.layers:
            raise ValueError("a `direction` entry needs `layer` (or `layers`)")
        if self.op in ("clamp", "cap") and self.value is None:
            raise ValueError(f"op {self.op!r} needs `value`")
        if isinstance(self.positions, list) and not 0 <= self.positions[0] < self.positions[1]:
            raise ValueError(f"positions: [{self.positions[0]}, {self.positions[1]}) is an "
                             "empty range (start must be >= 0 and below end)")
        if inline and (self.add is None or self.sub is None):
            raise ValueError("inline ActAdd needs both `add` and `sub`")
        if inline and self.layer is None:
            raise ValueError("inline ActAdd needs `layer` (where to add)")
        return self


Steering = Annotated[list[SteeringEntry], Field(max_length=MAX_STEERING_ENTRIES)]


class ReadoutSpec(_Body):
    """A readout: the projection of the hidden state at block `layer`'s `point` on a direction
    (a stored control vector's, or a list of floats), reported per token under `name`."""

    name: str = Field(min_length=1, max_length=128)
    vector: str | Direction
    layer: int  # a block, as /v1/features: negative from the end
    point: Literal["resid_pre", "attn_out", "mlp_out", "resid_post"] = "resid_pre"


MAX_READOUTS = 16
Readouts = Annotated[list[ReadoutSpec], Field(max_length=MAX_READOUTS)]


def _resid_post() -> list[Any]:
    return ["resid_post"]


class HiddenStates(_Body):
    """Hidden states returned with a completion, base64 float32 with their shapes."""

    layers: list[int] = Field(min_length=1, max_length=1024)  # blocks, as /v1/features
    points: list[Literal["resid_pre", "attn_out", "mlp_out", "resid_post"]] = Field(
        default_factory=lambda: _resid_post(), min_length=1, max_length=4)
    positions: Literal["prompt", "generated", "all"] = "generated"


class SteeringCreateRequest(_Body):
    """POST /v1/steering: {"method": "actadd", "add", "sub", "layer"} (layer: where to read) or
    {"method": "mean" | "pca", "positive": [...], "negative": [...], "layers": [...]}."""

    method: Literal["actadd", "mean", "pca"]
    add: str | None = Field(None, max_length=65536)
    sub: str | None = Field(None, max_length=65536)
    layer: int | None = None
    positive: list[str] | None = Field(None, min_length=1, max_length=MAX_PAIRS)
    negative: list[str] | None = Field(None, min_length=1, max_length=MAX_PAIRS)
    layers: list[int] | None = Field(None, max_length=1024)

    @model_validator(mode="after")
    def _fields_for_method(self) -> SteeringCreateRequest:
        if self.method == "actadd":
            if self.add is None or self.sub is None or self.layer is None:
                raise ValueError("actadd needs `add`, `sub` and `layer`")
        elif not self.positive or not self.negative:
            raise ValueError(f"{self.method} needs `positive` and `negative` prompt lists")
        return self


class SteeringDownloadQuery(_Body):
    """GET /v1/steering/{id}: `format` json (the description), npy, or gguf (control vectors)."""

    format: Literal["json", "npy", "gguf"] = "json"


class SteeringVectorInfo(BaseModel):
    id: str
    object: Literal["steering.vector"] = "steering.vector"
    kind: Literal["actadd", "control"]
    model_key: str
    dim: int
    layers: list[int]
    shape: list[int]
    created: int
    request: dict[str, Any]
    bytes: int


for _model in (CompletionRequest, ChatCompletionRequest, LlamaCompletionRequest):
    _model.model_rebuild()


# features and embeddings ----------------------------------------------------------------------

CapturePoint = Literal["resid_pre", "attn_out", "mlp_out", "resid_post"]
# texts and id lists mixed, as Prompt, none of them empty
Embeddable = NonEmptyStr | TokenIds | Annotated[list[NonEmptyStr | TokenIds], Field(min_length=1)]
LlamaPart = int | NonEmptyStr | Annotated[list[int | NonEmptyStr], Field(min_length=1)]
LlamaEmbeddable = NonEmptyStr | Annotated[list[LlamaPart], Field(min_length=1)]


def _default_points() -> list[CapturePoint]:
    return ["resid_post"]


def _no_empty_prompt(value: Any, field: str) -> Any:
    """'' and [] are no input; neither is a list holding one."""
    if isinstance(value, str | list) and not value:
        raise ValueError(f"{field}: must not be empty")
    if isinstance(value, list) and any(isinstance(p, str | list) and not p for p in value):
        raise ValueError(f"{field}: must not contain an empty string or token list")
    return value


FeaturePoint = Literal["resid_pre", "attn_out", "mlp_out", "resid_post", "logit_lens"]
FeaturePositions = Literal["all", "last"] | Annotated[list[int], Field(min_length=1)]
MAX_FEATURE_INPUTS = 64


def _no_empty_positions(v: Any) -> Any:
    if isinstance(v, list) and not v:
        raise ValueError("positions: must not be an empty list")
    return v


class FeatureInput(_Body):
    """One input of a batched /v1/features request, with its own positions and steering
    (omitted: the request's)."""

    input: NonEmptyStr | TokenIds
    positions: FeaturePositions | None = None
    steering: Steering | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        return _no_empty_prompt(v, "input")

    @field_validator("positions", mode="before")
    @classmethod
    def _positions(cls, v: Any) -> Any:
        return _no_empty_positions(v)


class FeaturesRequest(_Body):
    """POST /v1/features: hidden states of one input (`input`) or of several run in one shared
    batch (`inputs`, each with its own positions and steering), as a PyTorch forward hook would
    see them.

    `layers` are block indices (0..n_layers-1, negative from the end: -1 = the last block);
    `resid_pre` of block l is the stream entering it (steering's layer l), `resid_post` the
    stream leaving it (steering's layer l + 1), `attn_out`/`mlp_out` the block's attention and
    MLP outputs before their residual adds; `logit_lens`: the `top_k` tokens and logprobs of
    `resid_post` read through the final norm and classifier. `positions`: "all", "last" or
    token indices (negative from the end).
    """

    input: NonEmptyStr | TokenIds | None = None
    inputs: list[FeatureInput] | None = Field(None, min_length=1, max_length=MAX_FEATURE_INPUTS)
    layers: list[int] | None = Field(None, min_length=1, max_length=1024)
    points: list[FeaturePoint] = Field(default_factory=lambda: _resid_post(), min_length=1,
                                       max_length=16)
    positions: FeaturePositions = "all"
    top_k: int = Field(5, ge=1, le=20)  # logit_lens
    format: Literal["json", "npz", "safetensors"] = "json"
    steering: Steering = []
    model: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        return _no_empty_prompt(v, "input")

    @field_validator("positions", mode="before")
    @classmethod
    def _positions(cls, v: Any) -> Any:
        return _no_empty_positions(v)

    @model_validator(mode="after")
    def _one_input_form(self) -> FeaturesRequest:
        if self.input is None and self.inputs is None:
            raise ValueError("input: Field required (`input`, or `inputs` for a batch)")
        if self.input is not None and self.inputs is not None:
            raise ValueError("input: give `input` (one) or `inputs` (a batch), not both")
        return self


class EmbeddingsRequest(_Body):
    """OpenAI's POST /v1/embeddings, plus `pooling`, `normalize` (L2), `layer` and `steering`.

    The default state is the model's final hidden state after its final RMSNorm (as llama.cpp
    embeds); `layer` (a block index, negative from the end) takes that block's output instead,
    without the norm.
    """

    unsupported = ("dimensions",)
    input: Embeddable
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    pooling: Literal["mean", "last", "first"] = "mean"
    normalize: bool = True
    layer: int | None = None
    steering: Steering = []
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        return _no_empty_prompt(v, "input")


class LlamaEmbeddingRequest(_Body):
    """llama.cpp's POST /embedding: `content` (or `input`), `embd_normalize` (-1 none,
    0 max-abs to int16 range, 1 taxicab, 2 L2, p > 2 p-norm; only for pooled vectors).

    llama.cpp sets pooling per server (`--pooling`; a Llama model defaults to "none": one
    vector per token, unnormalized); tiller takes it per request ("cls" = "first").
    """

    content: LlamaEmbeddable | None = None
    input: LlamaEmbeddable | None = None
    embd_normalize: int = Field(2, ge=-1, le=2**31 - 1)  # llama.cpp's int
    pooling: Literal["none", "mean", "last", "first", "cls"] = "none"
    layer: int | None = None
    steering: Steering = []

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        return _no_empty_prompt(v, "content")

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        return _no_empty_prompt(v, "input")

    @model_validator(mode="after")
    def _some_input(self) -> LlamaEmbeddingRequest:
        if self.content is None and self.input is None:
            raise ValueError('content: "content" or "input" must be provided')
        return self


class LogitLens(BaseModel):
    """Per layer and position, the top_k tokens: (len(layers), len(positions), top_k)."""

    ids: list[list[list[int]]]
    tokens: list[list[list[str]]]
    logprobs: list[list[list[float]]]


class FeaturesResult(BaseModel):
    tokens: list[int]
    pieces: list[str]
    layers: list[int]
    points: list[FeaturePoint]
    positions: list[int]
    shape: list[int]  # (len(layers), len(positions), dim) for every point
    data: dict[str, list[list[list[float]]]]
    logit_lens: LogitLens | None = None


class FeaturesResponse(BaseModel):
    """One input: FeaturesResult's fields beside `model`; a batch (`inputs`): `results`."""

    model: str
    tokens: list[int] | None = None
    pieces: list[str] | None = None
    layers: list[int] | None = None
    points: list[FeaturePoint] | None = None
    positions: list[int] | None = None
    shape: list[int] | None = None
    data: dict[str, list[list[list[float]]]] | None = None
    logit_lens: LogitLens | None = None
    results: list[FeaturesResult] | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class LlamaEmbeddingItem(BaseModel):
    index: int
    embedding: list[list[float]]  # one vector per token (pooling "none"), else one


class LlamaEmbeddingResponse(RootModel[list[LlamaEmbeddingItem]]):
    pass


class TokenPiece(BaseModel):
    id: int
    piece: str | list[int]  # bytes of a partial UTF-8 character as a list, as llama.cpp


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]


class DetokenizeResponse(BaseModel):
    content: str
