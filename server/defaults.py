"""Server-wide sampling defaults (llama-server's `--temp`, `--top-k`, `--top-p`, `--min-p`,
`--seed`, `--repeat-penalty`, `-n/--n-predict`) and how a request meets them.

The rule: a field the request gives wins; a field it omits takes the server's default when that
flag was given, and the endpoint's own default otherwise (OpenAI's for /v1/completions and
/v1/chat/completions, llama.cpp's for /completion: protocol.py). "Omitted" is pydantic's
`model_fields_set`, so `"temperature": 1.0` is given even though it equals OpenAI's default.

`-n N` (N > 0) is also a ceiling, as in llama-server (a request's n_predict above the server's
is lowered to it, and -1 "no limit" means the server's N): max_tokens,
max_completion_tokens and n_predict alike. `-n -1` (its default) sets no limit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

from ..engine.sampling import REPETITION_PENALTY_RANGE
from .protocol import ChatCompletionRequest, CompletionRequest, LlamaCompletionRequest

R = TypeVar("R", CompletionRequest, ChatCompletionRequest, LlamaCompletionRequest)

# llama.cpp's /completion defaults (common/common.h), reported by /props for unset flags
LLAMA_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.95,
                                  "min_p": 0.05, "seed": -1, "repeat_penalty": 1.0,
                                  "n_predict": -1}


@dataclass(frozen=True)
class SamplingDefaults:
    """The flags given on the command line; None = not given (the endpoint's default)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None  # -1 (llama.cpp's "random") is stored as None
    repeat_penalty: float | None = None
    n_predict: int | None = None  # > 0; -1 ("no limit") is stored as None

    def __post_init__(self) -> None:
        """The bounds the request fields have (protocol.py), as errors naming the flag."""
        checks = {"temp": (self.temperature, 0.0, 100.0), "top-p": (self.top_p, 1e-9, 1.0),
                  "min-p": (self.min_p, 0.0, 1.0), "top-k": (self.top_k, 0, 2**31 - 1),
                  "repeat-penalty": (self.repeat_penalty, *REPETITION_PENALTY_RANGE),
                  "seed": (self.seed, 0, 2**63 - 1), "n-predict": (self.n_predict, 1, 2**31)}
        for flag, (value, low, high) in checks.items():
            if value is not None and not low <= value <= high:  # NaN fails too
                raise ValueError(f"--{flag} {value}: expected {low:g}..{high:g}")

    @classmethod
    def from_flags(cls, temperature: float | None, top_k: int | None, top_p: float | None,
                   min_p: float | None, seed: int | None, repeat_penalty: float | None,
                   n_predict: int | None) -> SamplingDefaults:
        """llama-server's values: --seed -1 is a random seed per request, -n -1 (and -2,
        "until the context is full") no limit: both are what happens without the flag."""
        if seed is not None and seed < -1:
            raise ValueError(f"--seed {seed}: expected -1 (random) or 0..{2**63 - 1}")
        if n_predict is not None and n_predict < -2:
            raise ValueError(f"--n-predict {n_predict}: expected -1 (no limit) or a count")
        return cls(temperature, top_k, top_p, min_p, None if seed == -1 else seed,
                   repeat_penalty, None if n_predict in (-1, -2, None) else n_predict)

    def fill(self, body: R) -> R:
        """The request with its omitted fields set to the server's defaults, and its token
        limit lowered to -n."""
        llama = isinstance(body, LlamaCompletionRequest)
        ours = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "min_p": self.min_p, "seed": self.seed,
                "repeat_penalty" if llama else "repetition_penalty": self.repeat_penalty}
        given = body.model_fields_set
        update = {k: v for k, v in ours.items() if v is not None and k not in given}
        if self.n_predict is not None:
            update.update(self._limit(body, given))
        return body.model_copy(update=update) if update else body

    def _limit(self, body: R, given: set[str]) -> dict[str, int]:
        n = self.n_predict
        assert n is not None
        if isinstance(body, LlamaCompletionRequest):
            return {"n_predict": n if body.n_predict < 0 or body.n_predict > n
                    else body.n_predict}
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            return {"max_completion_tokens": min(body.max_completion_tokens, n)}
        if "max_tokens" not in given or body.max_tokens is None:
            return {"max_tokens": n}
        return {"max_tokens": min(body.max_tokens, n)}

    def report(self) -> dict[str, Any]:
        """/props' default_generation_settings: what a /completion that sets nothing gets."""
        out = dict(LLAMA_DEFAULTS)
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out
