"""Structured outputs: JSON schemas and GBNF grammars as per-sequence token masks (llguidance).

Three parts, one per lifetime:
- `Vocabulary` (one per model): the tokenizer bridge. llguidance needs every token's bytes, the
  end-of-generation ids and a tokenize function; it is built on first use, on the worker pool,
  and kept with the model.
- `Constraint` (one per sequence): an llguidance matcher, created when the request is prepared
  (on the worker pool: compiling a large schema takes a while) and advanced by the engine
  thread with each sampled token.
- `MaskBatch` (one per runner): computes the allowed-token masks of every constrained sequence
  of a step at once, on llguidance's own threads, and applies one to a sequence's logits.

Request fields: OpenAI's `response_format` (json_object, json_schema), llama.cpp's `json_schema`
and `grammar` (GBNF; `%llguidance` grammars are taken as Lark, as llama.cpp does). An invalid
schema or grammar is a 400 naming its field, raised before the request is queued.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark

from ..engine.tokenizer import Tokenizer, TokenType
from .errors import ApiError
from .protocol import ResponseFormat

if TYPE_CHECKING:  # a TypedDict of the stubs only
    from llguidance._lib import JsonCompileOptions

__all__ = ["JSON_OPTIONS", "Constraint", "GrammarSpec", "MaskBatch", "Vocabulary",
           "request_grammar"]

# NOTE: the JSON compiler's defaults allow free whitespace between tokens, which a small model
# can fill forever; fixed separators make every JSON value end once its content does.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ",
                                    "key_separator": ": "}
_SPECIAL_MARKER = b"\xff"  # llguidance's prefix for special tokens (never valid UTF-8)
_LLGUIDANCE_PREFIX = "%llguidance"  # llama.cpp: a grammar in llguidance's Lark, not GBNF


@dataclass(frozen=True)
class GrammarSpec:
    """A request's grammar in llguidance's form, and the request field it came from."""

    grammar: str
    field: str


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(400, f"{field}: {message}", param=field, code="invalid_grammar")


def json_schema_grammar(schema: Any, field: str) -> GrammarSpec:
    if not isinstance(schema, dict):
        raise _invalid(field, "a JSON schema must be an object")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                 defaults=JSON_OPTIONS)
    except ValueError as e:
        raise _invalid(field, str(e)) from e
    return GrammarSpec(grammar, field)


def gbnf_grammar(text: str, field: str = "grammar") -> GrammarSpec:
    if text.lstrip().startswith(_LLGUIDANCE_PREFIX):
        lark = text
    else:
        try:
            lark = gbnf_to_lark(text)
        except Exception as e:  # the converter raises plain exceptions on bad GBNF
            raise _invalid(field, f"not a valid GBNF grammar: {e}") from e
    return GrammarSpec(llguidance.LLMatcher.grammar_from_lark(lark), field)


def request_grammar(body: Any) -> GrammarSpec | None:
    """The grammar a request asks for, from whichever of `response_format`, `json_schema` and
    `grammar` it sets (at most one); None when its output is free."""
    given = [name for name in ("response_format", "json_schema", "grammar")
             if getattr(body, name, None) not in (None, "")]  # llama.cpp: "" is no grammar
    fmt: ResponseFormat | None = getattr(body, "response_format", None)
    if fmt is not None and fmt.type == "text":
        given.remove("response_format")
    if len(given) > 1:
        raise _invalid(given[0], f"give one of {', '.join(given)}, not several")
    if not given:
        return None
    if given[0] == "grammar":
        return gbnf_grammar(body.grammar)
    if given[0] == "json_schema":
        return json_schema_grammar(body.json_schema, "json_schema")
    assert fmt is not None
    if fmt.json_schema is not None:  # type "json_schema" (the body's validation saw to it)
        return json_schema_grammar(fmt.json_schema.schema_, "response_format")
    # json_object: any object, or llama.cpp's {"type": "json_object", "schema": {...}}
    return json_schema_grammar(fmt.schema_ or {"type": "object"}, "response_format")


class Vocabulary:
    """The tokenizer bridge of one model: llguidance's view of its vocabulary, built once.

    `n_vocab` is the model's logit count, which may exceed the tokenizer's (padding rows):
    those tokens get no bytes, so no grammar ever allows them.
    """

    def __init__(self, tokenizer: Tokenizer, n_vocab: int) -> None:
        self.tokenizer = tokenizer
        self.n_vocab = max(n_vocab, tokenizer.vocab_size)
        self._lock = threading.Lock()
        self._ll: llguidance.LLTokenizer | None = None

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:  # two first requests at once build it once
            if self._ll is None:
                view = llguidance.TokenizerWrapper(_TokenizerView(self.tokenizer))
                self._ll = llguidance.LLTokenizer(view,
                                                  n_vocab=self.n_vocab,
                                                  eos_token=sorted(self.tokenizer.end_ids))
            return self._ll

    def constraint(self, spec: GrammarSpec | None) -> Constraint | None:
        """A fresh matcher for one sequence (None for free output); an invalid grammar or
        schema is a 400."""
        if spec is None:
            return None
        matcher = llguidance.LLMatcher(self.ll_tokenizer(), spec.grammar, log_level=0)
        if matcher.is_error():
            raise _invalid(spec.field, matcher.get_error())
        return Constraint(matcher, self.n_vocab)


class _TokenizerView:
    """What llguidance.TokenizerWrapper reads from a tokenizer: each token's bytes as they
    appear in generated text (special tokens marked), the EOS and BOS ids, and tokenization."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        special = (TokenType.CONTROL, TokenType.UNKNOWN)
        # NOTE: end-of-generation tokens are special whatever their type: ChatML's <|im_end|>
        # is often USER_DEFINED, and as text it would be valid inside a JSON string, where the
        # server's stop on it would cut the output short
        self.special_token_ids = [i for i in range(tokenizer.vocab_size)
                                  if tokenizer.token_type(i) in special
                                  or i in tokenizer.end_ids]
        self.tokens = [tokenizer.piece_bytes(i) for i in range(tokenizer.vocab_size)]
        for i in self.special_token_ids:
            # NOTE: marked so that a grammar can name them (<|im_end|>) without their text
            # ever matching plain output bytes
            self.tokens[i] = _SPECIAL_MARKER + tokenizer.piece(i).encode()

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode_continuation(text)


class Constraint:
    """One sequence's grammar state: the tokens it allows next, advanced by each sampled one."""

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int) -> None:
        self.matcher = matcher
        self.n_vocab = n_vocab

    def apply(self, logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """A copy of `logits` (vocab,) with the tokens `allowed` (vocab,) bool forbids at -inf.

        NOTE: a matcher in its error state allows only EOS, which would end the request as if
        its output were complete: it fails the request instead."""
        if self.matcher.is_error():
            raise ValueError(f"the grammar failed: {self.matcher.get_error()}")
        return apply_mask(logits, allowed)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"the grammar refused token {token}: {self.matcher.get_error()}")


class MaskBatch:
    """Allowed-token masks of the constrained sequences of a step, computed together."""

    def __init__(self, threads: int | None = None) -> None:
        self._threads = threads
        self._executor: llguidance.LLExecutor | None = None
        self._bits = np.empty((0, 0), np.int32)

    def compute(self, constraints: list[Constraint]) -> np.ndarray:
        """(len(constraints), n_vocab) bool: row i holds the tokens constraint i allows."""
        if not constraints:
            return np.empty((0, 0), bool)
        n_vocab = constraints[0].n_vocab
        words = (n_vocab + 31) // 32
        if self._bits.shape[0] < len(constraints) or self._bits.shape[1] != words:
            self._bits = np.empty((len(constraints), words), np.int32)
        bits = self._bits[: len(constraints)]
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self._threads)
        # NOTE: llguidance's threads write the rows with the GIL released
        self._executor.unsafe_compute_mask_ptr(
            [(c.matcher, i) for i, c in enumerate(constraints)], bits.ctypes.data, words * 4,
            len(constraints))
        # bit j of little-endian word w is token 32 w + j
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")
        return allowed[:, :n_vocab].view(bool)


def apply_mask(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """A copy of `logits` (vocab,) with the tokens `allowed` (vocab,) bool forbids at -inf."""
    return np.where(allowed[: logits.size], logits, np.float32(-np.inf)
                    ).astype(np.float32, copy=False)
