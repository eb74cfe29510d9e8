"""Response types: frozen dataclasses built from the server's JSON by `from_json`."""

from __future__ import annotations

import base64
import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ChatChoice",
    "ChatChunk",
    "ChatCompletion",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "Embeddings",
    "Features",
    "ModelInfo",
    "Readings",
    "TokenLogprob",
    "TokenPiece",
    "TopLogprob",
    "Usage",
]

Json = Mapping[str, Any]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_json(cls, data: Json) -> Usage:
        return cls(int(data["prompt_tokens"]), int(data["completion_tokens"]),
                   int(data["total_tokens"]))


# completions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionLogprobs:
    """OpenAI's completions logprobs: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first prompt token (echo)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    @classmethod
    def from_json(cls, data: Json | None) -> CompletionLogprobs | None:
        if data is None:
            return None
        return cls(list(data["tokens"]), list(data["token_logprobs"]),
                   list(data.get("top_logprobs") or []), list(data["text_offset"]))


@dataclass(frozen=True, eq=False)
class Readings:
    """What a choice (or a streamed chunk, for the tokens it carries) read besides its text.

    readouts[name]: float64 arrays (tokens,) of the projection on the readout's unit direction
    and the cosine, one per generated token (the state it was drawn from); prompt_readouts the
    same per prompt token (readout_prompt). hidden_states["generated" | "prompt"]: float32
    (len(points), len(layers), tokens, dim). conditions: the server's steering_conditions
    (CAST decisions: per prompt, or per generated token)."""

    readouts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    prompt_readouts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    hidden_states: dict[str, np.ndarray] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    points: list[str] = field(default_factory=list)
    conditions: list[dict[str, Any]] = field(default_factory=list)

    def projection(self, name: str) -> np.ndarray:
        return self.readouts[name]["projection"]

    def cosine(self, name: str) -> np.ndarray:
        return self.readouts[name]["cosine"]

    @classmethod
    def from_json(cls, choice: Json) -> Readings | None:
        keys = ("readouts", "prompt_readouts", "hidden_states", "steering_conditions")
        if not any(k in choice for k in keys):
            return None
        np = _numpy()

        def series(d: Json | None) -> dict[str, dict[str, np.ndarray]]:
            return {name: {k: np.array([np.nan if x is None else x for x in v], np.float64)
                           for k, v in r.items()} for name, r in (d or {}).items()}

        hs = choice.get("hidden_states") or {}
        arrays = {k: np.frombuffer(base64.b64decode(v["data"]), "<f4").reshape(v["shape"])
                  for k, v in hs.items() if k in ("generated", "prompt")}
        return cls(series(choice.get("readouts")), series(choice.get("prompt_readouts")),
                   arrays, list(hs.get("layers", [])), list(hs.get("points", [])),
                   list(choice.get("steering_conditions") or []))


@dataclass(frozen=True)
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None  # "stop" | "length"
    logprobs: CompletionLogprobs | None = None
    readings: Readings | None = None

    @classmethod
    def from_json(cls, data: Json) -> CompletionChoice:
        return cls(int(data["index"]), data["text"], data.get("finish_reason"),
                   CompletionLogprobs.from_json(data.get("logprobs")), Readings.from_json(data))


@dataclass(frozen=True)
class Completion:
    id: str
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    created: int = 0

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    @classmethod
    def from_json(cls, data: Json) -> Completion:
        return cls(data["id"], data["model"],
                   [CompletionChoice.from_json(c) for c in data["choices"]],
                   Usage.from_json(data["usage"]), data.get("system_fingerprint"),
                   int(data.get("created", 0)))


@dataclass(frozen=True)
class CompletionChunk:
    """One streamed piece of one choice: `text` is the new text (a delta), often a token's."""

    id: str
    model: str
    index: int
    text: str
    finish_reason: str | None  # set on the choice's last chunk only
    logprobs: CompletionLogprobs | None = None
    readings: Readings | None = None  # of the tokens this chunk carries

    @classmethod
    def from_json(cls, data: Json, choice: Json) -> CompletionChunk:
        return cls(data.get("id", ""), data.get("model", ""), int(choice["index"]),
                   choice.get("text") or "", choice.get("finish_reason"),
                   CompletionLogprobs.from_json(choice.get("logprobs")),
                   Readings.from_json(choice))


# chat -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int] | None = None

    @classmethod
    def from_json(cls, data: Json) -> TopLogprob:
        return cls(data["token"], float(data["logprob"]), data.get("bytes"))


@dataclass(frozen=True)
class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Json) -> TokenLogprob:
        return cls(data["token"], float(data["logprob"]), data.get("bytes"),
                   [TopLogprob.from_json(t) for t in data.get("top_logprobs") or []])


def _chat_logprobs(data: Json | None) -> list[TokenLogprob] | None:
    if data is None or data.get("content") is None:
        return None
    return [TokenLogprob.from_json(t) for t in data["content"]]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None  # "stop" | "length"
    logprobs: list[TokenLogprob] | None = None
    readings: Readings | None = None

    @classmethod
    def from_json(cls, data: Json) -> ChatChoice:
        m = data["message"]
        return cls(int(data["index"]), ChatMessage(m.get("role", "assistant"),
                                                   m.get("content") or ""),
                   data.get("finish_reason"), _chat_logprobs(data.get("logprobs")),
                   Readings.from_json(data))


@dataclass(frozen=True)
class ChatCompletion:
    id: str
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    created: int = 0

    @property
    def message(self) -> ChatMessage:
        """The first choice's message."""
        return self.choices[0].message

    @property
    def content(self) -> str:
        """The first choice's message content."""
        return self.choices[0].message.content

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    @classmethod
    def from_json(cls, data: Json) -> ChatCompletion:
        return cls(data["id"], data["model"], [ChatChoice.from_json(c) for c in data["choices"]],
                   Usage.from_json(data["usage"]), data.get("system_fingerprint"),
                   int(data.get("created", 0)))


@dataclass(frozen=True)
class ChatChunk:
    """One streamed piece of one choice: `content` is the new text (a delta, "" if none);
    `role` is set on each choice's first chunk, `finish_reason` on its last."""

    id: str
    model: str
    index: int
    content: str
    finish_reason: str | None
    role: str | None = None
    logprobs: list[TokenLogprob] | None = None
    readings: Readings | None = None

    @classmethod
    def from_json(cls, data: Json, choice: Json) -> ChatChunk:
        delta = choice.get("delta") or {}
        return cls(data.get("id", ""), data.get("model", ""), int(choice["index"]),
                   delta.get("content") or "", choice.get("finish_reason"), delta.get("role"),
                   _chat_logprobs(choice.get("logprobs")), Readings.from_json(choice))


# other endpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenPiece:
    """A token id and its text; `piece` is bytes when the token is part of a UTF-8 character."""

    id: int
    piece: str | bytes

    @classmethod
    def from_json(cls, data: Json) -> TokenPiece:
        piece = data["piece"]
        return cls(int(data["id"]), piece if isinstance(piece, str) else bytes(piece))


@dataclass(frozen=True)
class ModelInfo:
    id: str
    created: int
    owned_by: str
    meta: dict[str, Any] = field(default_factory=dict)  # tiller: key, n_ctx_train, n_vocab, ...

    @classmethod
    def from_json(cls, data: Json) -> ModelInfo:
        return cls(data["id"], int(data.get("created", 0)), data.get("owned_by", ""),
                   dict(data.get("meta") or {}))


# hidden states ----------------------------------------------------------------------------------


def _vector(value: Any) -> list[float]:
    """An embedding as floats: a JSON list, or base64 of little-endian float32 (OpenAI's)."""
    if isinstance(value, str):
        raw = base64.b64decode(value)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return [float(x) for x in value]


@dataclass(frozen=True)
class Embeddings:
    """/v1/embeddings: one vector per input, in the order of the inputs."""

    model: str
    embeddings: list[list[float]]
    usage: Usage  # completion_tokens is 0

    @property
    def embedding(self) -> list[float]:
        """The first input's vector."""
        return self.embeddings[0]

    @classmethod
    def from_json(cls, data: Json) -> Embeddings:
        items = sorted(data["data"], key=lambda d: int(d["index"]))
        usage = data.get("usage") or {}
        prompt = int(usage.get("prompt_tokens", 0))
        return cls(data.get("model", ""), [_vector(d["embedding"]) for d in items],
                   Usage(prompt, 0, int(usage.get("total_tokens", prompt))))


def _numpy() -> Any:
    try:
        import numpy
    except ImportError as e:  # an optional dependency: only the readout APIs need it
        raise ImportError("hidden states come as numpy arrays: "
                          "pip install 'tiller-client[numpy]'") from e
    return numpy


# the npz entries that index the arrays rather than hold hidden states
_FEATURE_INDEX = ("tokens", "pieces", "layers", "positions")


@dataclass(frozen=True, eq=False)
class Features:
    """/v1/features: `arrays[point]` (or `features[point]`) is float32 (layers, positions, dim),
    for the blocks in `layers` and the token indices in `positions` (both as resolved by the
    server: negative indices made positive)."""

    tokens: list[int]
    pieces: list[str]
    layers: list[int]
    positions: list[int]
    arrays: dict[str, np.ndarray]

    @property
    def points(self) -> list[str]:
        return list(self.arrays)

    def __getitem__(self, point: str) -> np.ndarray:
        return self.arrays[point]

    @classmethod
    def from_npz(cls, data: bytes) -> Features:
        np = _numpy()
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files if name not in _FEATURE_INDEX}
            return cls([int(t) for t in npz["tokens"]], [str(p) for p in npz["pieces"]],
                       [int(x) for x in npz["layers"]], [int(x) for x in npz["positions"]],
                       arrays)


# steering ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SteeringVector:
    """A stored steering vector (GET /v1/steering/{id}). Layers are tiller's: l = the stream
    entering block l, n_layers = after the last block."""

    id: str
    kind: str  # "actadd" (rows per position) | "control" (a direction per layer)
    model_key: str
    dim: int
    layers: list[int]
    shape: list[int]
    created: int
    request: dict[str, Any]

    @classmethod
    def from_json(cls, data: Json) -> SteeringVector:
        return cls(data["id"], data["kind"], data["model_key"], int(data["dim"]),
                   [int(x) for x in data["layers"]], [int(x) for x in data["shape"]],
                   int(data["created"]), dict(data.get("request") or {}))
