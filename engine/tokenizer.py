"""Tokenizers: the interface the engine and server use, the Llama SentencePiece-BPE tokenizer,
and streaming detokenization. (Byte-level BPE vocabularies are in bpe.py.)

Every tokenizer has a vocabulary of pieces with token types, BOS/EOS/EOT ids, and special
tokens (CONTROL, USER_DEFINED and UNKNOWN pieces) that `encode(..., special=True)` finds in
the text as whole tokens, as llama.cpp's `parse_special` does (tokenizer_st_partition).

The SentencePiece tokenizer:

Built from piece / score / token-type lists (what a GGUF file stores) or from llama2.c's
`tokenizer.bin`. Encoding reproduces sentencepiece's BPE model with the Llama normalizer spec
(identity normalization, add_dummy_prefix=true, remove_extra_whitespaces=false, byte_fallback):

    text  -> "▁" + text with every " " replaced by "▁"   (nothing else is normalized)
          -> one symbol per code point
          -> repeatedly merge the adjacent pair whose concatenation is a vocabulary piece with
             the highest score (ties: leftmost), as bpe_model.cc does with a heap of candidate
             pairs over a linked list of symbols
          -> symbols missing from the vocabulary become their UTF-8 bytes as <0xXX> tokens

tokenizer.bin layout (little-endian): int32 max_token_length, then per token float32 score,
int32 length, `length` bytes. The vocabulary size is not stored: it comes from the model header.
"""

from __future__ import annotations

import codecs
import heapq
import math
import os
import re
import struct
from abc import ABC, abstractmethod
from enum import IntEnum
from pathlib import Path

import regex

SPACE = "\u2581"  # "▁", sentencepiece's visible stand-in for a space

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_REPLACEMENT = "\ufffd".encode()
# Chunk-cache bounds: enough for the distinct words of a long prompt, small enough to ignore.


class TokenType(IntEnum):
    """SentencePiece piece types; GGUF's tokenizer.ggml.token_type uses the same numbers."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Pieces that BPE may build; the others are only ever produced by id (sentencepiece keeps them
# in a separate "reserved" map that merges never consult).
_MERGEABLE = (TokenType.NORMAL, TokenType.USER_DEFINED, TokenType.UNUSED)
# Pieces llama.cpp finds in text as whole tokens before tokenizing the rest.
_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)


class PieceCache(dict[str, list[int]]):
    """Token ids of text pieces (pre-tokenizer words, whitespace-free chunks) already encoded:
    bounded, and cleared when full (cheaper than tracking use; text repeats its pieces)."""

    MAX_ENTRIES = 1 << 16
    MAX_CHARS = 64  # longer pieces are rare: not worth keeping

    def add(self, piece: str, ids: list[int]) -> list[int]:
        if len(piece) <= self.MAX_CHARS:
            if len(self) >= self.MAX_ENTRIES:
                self.clear()
            self[piece] = ids
        return ids


class TokenizerError(ValueError):
    """A vocabulary or tokenizer file is malformed, or a token id is out of range."""


class Tokenizer(ABC):
    """What the engine and server use of a tokenizer, whatever its kind.

    Subclasses give the piece texts (as in the vocabulary), their token types and the raw
    bytes each token stands for in decoded text, and implement `encode`.
    """

    def __init__(self, texts: list[str], types: list[TokenType], token_bytes: list[bytes], *,
                 bos_id: int, eos_id: int, eot_id: int | None, unk_id: int | None,
                 add_bos: bool, source: str) -> None:
        n = len(texts)
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("unk_id", unk_id),
                            ("eot_id", eot_id)):
            if value is not None and not 0 <= value < n:
                raise TokenizerError(f"{source}: {name} {value} outside vocabulary of {n} tokens")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eot_id = eot_id  # end of turn (chat models: ChatML's <|im_end|>), if the file says
        self.unk_id = unk_id
        self.add_bos = add_bos  # whether encode(bos=True) starts with BOS (the file's choice)
        self.source = source
        self._texts = texts
        self._types = types
        self._bytes = token_bytes
        # Special tokens, longest first, as llama.cpp's cache_special_tokens (ties by id).
        self._specials = sorted(
            ((texts[i], i, types[i]) for i in range(n)
             if types[i] in _SPECIAL_TYPES and texts[i]), key=lambda s: (-len(s[0]), s[1]))
        self._finders = {control: _SpecialFinder([s[0] for s in self._specials if control
                                                  or s[2] == TokenType.USER_DEFINED])
                         for control in (False, True)}

    # --- accessors ---------------------------------------------------------------------------

    @property
    def end_ids(self) -> frozenset[int]:
        """Tokens that end a generation: end of text and, for chat models, end of turn (as
        llama.cpp stops at any end-of-generation token)."""
        return frozenset({self.eos_id} if self.eot_id is None else {self.eos_id, self.eot_id})

    @property
    def vocab_size(self) -> int:
        return len(self._texts)

    def piece(self, token_id: int) -> str:
        """The piece text as in the vocabulary (e.g. "▁the" or "<0x0A>" in SentencePiece
        vocabularies, "Ġthe" in byte-level BPE ones)."""
        self._check_id(token_id)
        return self._texts[token_id]

    def piece_bytes(self, token_id: int) -> bytes:
        """Raw bytes a token stands for in decoded text; control and unknown tokens -> b""."""
        self._check_id(token_id)
        return self._bytes[token_id]

    def token_type(self, token_id: int) -> TokenType:
        self._check_id(token_id)
        return self._types[token_id]

    def _check_id(self, token_id: int) -> None:
        # NOTE: a negative id would otherwise index from the end of the vocabulary.
        if not 0 <= token_id < len(self._texts):
            raise TokenizerError(f"token id {token_id} outside vocabulary of {len(self._texts)}")

    # --- encoding ----------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False,
               special: bool = False) -> list[int]:
        """Token ids of `text`: BOS first if `bos` and the vocabulary adds one (`add_bos`), EOS
        last if `eos`. `special=True` parses special-token texts in `text` as those tokens
        (for text the server renders, such as chat templates); user text keeps the default."""
        ids = [self.bos_id] if bos and self.add_bos else []
        for part in self._parts(text, special):
            if isinstance(part, int):
                ids.append(part)
            else:
                self._encode_fragment(part, ids)
        if eos:
            ids.append(self.eos_id)
        return ids

    @abstractmethod
    def _parts(self, text: str, special: bool) -> list[str | int]:
        """`text` as the fragments each vocabulary encodes on its own, and special-token ids."""

    @abstractmethod
    def _encode_fragment(self, text: str, ids: list[int]) -> None:
        """Append the ids of one text fragment (no special tokens in it) to `ids`."""

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of `text` as it would continue a text already begun: no BOS, no special
        tokens, and no SentencePiece dummy prefix (what a grammar's forced bytes become in
        the middle of a generation)."""
        return self.encode(text, bos=False)

    def _split_special(self, text: str, control: bool) -> list[str | int]:
        """`text` as text fragments and special-token ids, as llama.cpp's tokenizer_st_partition:
        each special token in turn, longest first, is cut out of every text fragment left.
        USER_DEFINED tokens are always cut; CONTROL and UNKNOWN ones only with `control`."""
        parts: list[str | int] = [text]
        present = self._finders[control].present(text)
        for piece, token_id, _ in self._specials:
            if piece not in present:
                continue
            cut: list[str | int] = []
            for part in parts:
                if isinstance(part, int) or piece not in part:
                    cut.append(part)
                    continue
                chunks = part.split(piece)
                for k, chunk in enumerate(chunks):
                    if k:
                        cut.append(token_id)
                    if chunk:
                        cut.append(chunk)
            parts = cut
        return parts

    # --- decoding ----------------------------------------------------------------------------

    def _text_bytes(self, token_id: int, at_start: bool) -> tuple[bytes, bool]:
        """The bytes a token adds to the text, and whether the text is still at its start
        (before any output: what SentencePiece's dummy prefix depends on)."""
        self._check_id(token_id)
        data = self._bytes[token_id]
        return data, at_start and not data

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. from byte tokens) becomes U+FFFD."""
        parts = []
        at_start = True
        for token_id in ids:
            data, at_start = self._text_bytes(token_id, at_start)
            parts.append(data)
        return b"".join(parts).decode("utf-8", errors="replace")


class _SpecialFinder:
    """Which special-token texts occur in a text, in one regex pass (a vocabulary may have
    thousands of special tokens; testing each with `in` took ~20 ms for 20,000 characters)."""

    def __init__(self, pieces: list[str]) -> None:
        # Single characters (DeepSeek has hundreds) are found with a set, the rest with a
        # regex. NOTE: an overlapped search reports, at every position, the longest piece
        # starting there; the other pieces at that position are its prefixes, so the prefixes
        # of each reported piece complete the set.
        self._chars = {p for p in pieces if len(p) == 1}
        longer = sorted({p for p in pieces if len(p) > 1}, key=len, reverse=True)
        self._pattern = regex.compile("|".join(map(regex.escape, longer))) if longer else None
        known = set(longer)
        self._prefixes = {p: [p[:k] for k in range(2, len(p) + 1) if p[:k] in known]
                          for p in longer}

    def present(self, text: str) -> set[str]:
        found = self._chars.intersection(text) if self._chars else set()
        if self._pattern is not None:
            for piece in {m.group() for m in self._pattern.finditer(text, overlapped=True)}:
                found.update(self._prefixes[piece])
        return found


class SpmTokenizer(Tokenizer):
    """SentencePiece-BPE tokenizer over a Llama-style vocabulary.

    `pieces` are the UTF-8 piece texts; a space in a piece means "▁" (llama2.c's export writes
    spaces, GGUF and .model files write "▁"). `token_types` (TokenType values) may be None, in
    which case `unk_id` is UNKNOWN, `bos_id`/`eos_id` are CONTROL, `<0xXX>` pieces are BYTE and
    everything else is NORMAL.
    """

    def __init__(self, pieces: list[bytes], scores: list[float],
                 token_types: list[int] | None = None, bos_id: int = 1, eos_id: int = 2,
                 unk_id: int = 0, source: str = "<memory>", eot_id: int | None = None,
                 add_bos: bool = True) -> None:
        n = len(pieces)

        def fail(what: str) -> TokenizerError:
            return TokenizerError(f"{source}: {what}")

        if n == 0:
            raise fail("empty vocabulary")
        if len(scores) != n:
            raise fail(f"{len(scores)} scores for {n} pieces")
        if token_types is not None and len(token_types) != n:
            raise fail(f"{len(token_types)} token types for {n} pieces")
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("unk_id", unk_id),
                            ("eot_id", eos_id if eot_id is None else eot_id)):
            if not 0 <= value < n:
                raise fail(f"{name} {value} outside vocabulary of {n} tokens")

        texts: list[str] = []
        for i, raw in enumerate(pieces):
            try:
                texts.append(bytes(raw).decode("utf-8").replace(" ", SPACE))
            except UnicodeDecodeError as e:
                raise fail(f"token {i} is not valid UTF-8 ({e.reason})") from None
        for i, s in enumerate(scores):
            # NOTE: a NaN score would silently scramble the merge order.
            if not math.isfinite(s):
                raise fail(f"token {i} has non-finite score {s!r}")

        if token_types is None:
            types = [TokenType.BYTE if _BYTE_PIECE.fullmatch(t) else TokenType.NORMAL
                     for t in texts]
            types[unk_id] = TokenType.UNKNOWN
            types[bos_id] = types[eos_id] = TokenType.CONTROL
        else:
            types = []
            for i, t in enumerate(token_types):
                try:
                    types.append(TokenType(t))
                except ValueError:
                    raise fail(f"token {i} has unknown token type {t!r}") from None

        byte_ids: list[int | None] = [None] * 256
        token_bytes: list[bytes] = []
        for i, (text, kind) in enumerate(zip(texts, types, strict=True)):
            if kind == TokenType.BYTE:
                m = _BYTE_PIECE.fullmatch(text)
                if m is None:
                    raise fail(f"byte token {i} is {text!r}, expected <0xXX>")
                value = int(m.group(1), 16)
                if byte_ids[value] is None:
                    byte_ids[value] = i
                token_bytes.append(bytes([value]))
            elif kind in (TokenType.CONTROL, TokenType.UNKNOWN):
                token_bytes.append(b"")
            else:
                token_bytes.append(text.replace(SPACE, " ").encode())

        super().__init__(texts, types, token_bytes, bos_id=bos_id, eos_id=eos_id, eot_id=eot_id,
                         unk_id=unk_id, add_bos=add_bos, source=source)
        self._unk = unk_id  # (the base class allows None: byte-level vocabularies may have none)
        # Byte fallback needs every byte; without it unknown characters become unk_id.
        found = [i for i in byte_ids if i is not None]
        self._byte_ids = found if len(found) == 256 else None

        # piece -> id / score for the pieces merges may produce (first id wins on duplicates).
        self._ids: dict[str, int] = {}
        self._scores: dict[str, float] = {}
        for i, (text, kind) in enumerate(zip(texts, types, strict=True)):
            if kind in _MERGEABLE and text and text not in self._ids:
                self._ids[text] = i
                self._scores[text] = float(scores[i])
        self._unused = {texts[i] for i, k in enumerate(types) if k == TokenType.UNUSED}
        # Single characters that sentencepiece resolves through its reserved map (e.g. a
        # one-character control piece) rather than byte fallback.
        self._reserved = {t: i for i, t in reversed(list(enumerate(texts)))
                          if types[i] not in _MERGEABLE and len(t) == 1}

        # User-defined pieces are matched whole (longest first) before BPE, and never merged.
        user = sorted({texts[i] for i, k in enumerate(types)
                       if k == TokenType.USER_DEFINED and texts[i]}, key=len, reverse=True)
        self._user_re = re.compile("|".join(map(re.escape, user))) if user else None

        # NOTE: splitting the text before every "▁" that follows a non-"▁" character, and
        # running BPE per chunk, gives exactly the same result as one BPE over the whole text
        # when no mergeable piece contains such a boundary: no candidate pair can then straddle
        # two chunks, and merges in different chunks never affect each other. Llama's
        # vocabularies satisfy this (whitespace only ever starts a piece); we check rather than
        # assume. UNUSED pieces disable it too, because their resegmentation map is per text.
        boundary = re.compile(f"[^{SPACE}]{SPACE}")
        splittable = not self._unused and not any(boundary.search(t) for t in self._ids)
        self._chunk_re = re.compile(f"{SPACE}+[^{SPACE}]*|[^{SPACE}]+") if splittable else None
        self._cache = PieceCache()

    @classmethod
    def from_llama2c(cls, path: str | os.PathLike[str],
                     vocab_size: int | None = None) -> SpmTokenizer:
        """Load a llama2.c tokenizer.bin; vocab_size=None reads tokens until end of file."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror})") from e

        def fail(what: str) -> TokenizerError:
            return TokenizerError(f"{path}: {what}")

        if vocab_size is not None and vocab_size <= 0:
            raise fail(f"vocab_size must be positive, got {vocab_size}")
        if len(data) < 4:
            raise fail(f"file too short ({len(data)} bytes) for the max_token_length header")
        (max_len,) = struct.unpack_from("<i", data, 0)
        if not 0 < max_len <= len(data):
            raise fail(f"max_token_length {max_len} is not in 1..{len(data)} (the file size)")
        # Each token takes at least 8 bytes; checked up front so a lying vocab_size fails fast.
        if vocab_size is not None and 4 + 8 * vocab_size > len(data):
            raise fail(f"file of {len(data)} bytes is too short for {vocab_size} tokens")

        pieces: list[bytes] = []
        scores: list[float] = []
        offset = 4
        while offset < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            i = len(pieces)
            if offset + 8 > len(data):
                raise fail(f"truncated: token {i} header at byte {offset} runs past the end")
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            if not 0 <= length <= max_len:
                raise fail(f"token {i} has length {length}, outside 0..{max_len} "
                           "(max_token_length)")
            if offset + length > len(data):
                raise fail(f"truncated: token {i} needs {length} bytes at byte {offset}, "
                           f"file has {len(data) - offset}")
            pieces.append(data[offset:offset + length])
            scores.append(score)
            offset += length
        if vocab_size is not None and len(pieces) < vocab_size:
            raise fail(f"file ends after {len(pieces)} tokens, expected vocab_size {vocab_size}")
        if offset != len(data):
            raise fail(f"{len(data) - offset} trailing bytes after {len(pieces)} tokens")
        if len(pieces) < 3:
            raise fail(f"only {len(pieces)} tokens; need at least <unk>, <s>, </s>")
        # NOTE: llama2.c's export decorates BOS/EOS as "\n<s>\n" and "\n</s>\n"; undo that so
        # piece() shows the sentencepiece names.
        for i in (1, 2):
            if pieces[i].startswith(b"\n") and pieces[i].endswith(b"\n"):
                pieces[i] = pieces[i][1:-1]
        return cls(pieces, scores, None, bos_id=1, eos_id=2, unk_id=0, source=str(path))

    # --- encoding ----------------------------------------------------------------------------

    def _parts(self, text: str, special: bool) -> list[str | int]:
        """sentencepiece's encode takes the whole text; with `special`, special-token texts
        become those tokens and each fragment between them is encoded on its own, with its own
        dummy prefix, as llama.cpp does."""
        return self._split_special(text, control=True) if special else [text]

    def encode_continuation(self, text: str) -> list[int]:
        ids: list[int] = []
        self._encode_fragment(text, ids, prefix=False)
        return ids

    def _encode_fragment(self, text: str, ids: list[int], prefix: bool = True) -> None:
        # sentencepiece adds no dummy prefix to an empty input.
        if text:
            text = (SPACE if prefix else "") + text.replace(" ", SPACE)
            if self._user_re is None:
                self._encode_plain(text, ids)
            else:
                start = 0
                for m in self._user_re.finditer(text):
                    self._encode_plain(text[start:m.start()], ids)
                    ids.append(self._ids[m.group()])
                    start = m.end()
                self._encode_plain(text[start:], ids)
            if self._byte_ids is None:
                # Without byte fallback sentencepiece collapses a run of unknowns into one.
                ids[:] = [t for k, t in enumerate(ids)
                          if not (t == self.unk_id and k and ids[k - 1] == self.unk_id)]

    def _encode_plain(self, text: str, out: list[int]) -> None:
        if not text:
            return
        if self._chunk_re is None:
            out.extend(self._bpe(text))
            return
        cache = self._cache
        for chunk in self._chunk_re.findall(text):
            ids = cache.get(chunk)
            out.extend(ids if ids is not None else cache.add(chunk, self._bpe(chunk)))

    def _bpe(self, text: str) -> list[int]:
        """Score-ordered pair merges over a linked list of symbols (bpe_model.cc's algorithm)."""
        scores, unused = self._scores, self._unused
        sym = list(text)  # one symbol per code point; "" marks a symbol merged into its left
        n = len(sym)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        rev_merge: dict[str, tuple[str, str]] = {}
        # Heap entries: (-score, left, right, merged length). Lowest left wins ties, like
        # sentencepiece's comparator. An entry is stale once either symbol changed, which the
        # length check detects because symbols only ever grow or empty.
        heap: list[tuple[float, int, int, int]] = []

        def add_pair(left: int, right: int) -> None:
            merged = sym[left] + sym[right]
            score = scores.get(merged)
            if score is not None:
                heapq.heappush(heap, (-score, left, right, len(merged)))
                if unused and merged in unused:
                    rev_merge[merged] = (sym[left], sym[right])

        for i in range(n - 1):
            add_pair(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = sym[left], sym[right]
            if not a or not b or len(a) + len(b) != size:
                continue
            sym[left] = a + b
            sym[right] = ""
            after = nxt[right]
            nxt[left] = after
            if after != -1:
                prev[after] = left
                add_pair(left, after)
            if prev[left] != -1:
                add_pair(prev[left], left)

        out: list[int] = []
        ids = self._ids
        for s in sym:
            if s:
                token_id = ids.get(s)
                if token_id is None or unused:
                    self._emit(s, rev_merge, out)
                else:
                    out.append(token_id)
        return out

    def _emit(self, piece: str, rev_merge: dict[str, tuple[str, str]], out: list[int]) -> None:
        token_id = self._ids.get(piece)
        if token_id is None:
            token_id = self._reserved.get(piece)
        if token_id is not None:
            if piece in self._unused and piece in rev_merge:
                # UNUSED pieces may be built but are emitted as the two halves they came from.
                left, right = rev_merge[piece]
                self._emit(left, rev_merge, out)
                self._emit(right, rev_merge, out)
            else:
                out.append(token_id)
        elif self._byte_ids is not None:
            try:
                data = piece.encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate: sentencepiece turns malformed input into U+FFFD.
                data = _REPLACEMENT
            out.extend(self._byte_ids[b] for b in data)
        else:
            out.append(self._unk)

    # --- decoding ----------------------------------------------------------------------------

    def _text_bytes(self, token_id: int, at_start: bool) -> tuple[bytes, bool]:
        """The bytes a token adds to the text, and whether the text is still at its start.

        At the start of a text (before any output, or right after BOS) the leading space of
        the first piece is the dummy prefix encode added, so it is dropped; byte tokens are
        taken literally, as in llama2.c and sentencepiece.
        """
        self._check_id(token_id)
        if token_id == self.bos_id:
            return b"", True
        data = self._bytes[token_id]
        if not data:
            return b"", at_start
        if at_start and data[0] == 0x20 and self._types[token_id] != TokenType.BYTE:
            data = data[1:]
        return data, False


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get back only complete UTF-8 text.

    Bytes of a character split across byte tokens are held back until the character is
    complete, so nothing is ever emitted broken; `flush()` returns what is left at the end
    (incomplete bytes as U+FFFD). Concatenating every `feed()` and `flush()` gives `decode()`.
    Pass `at_start=False` when the ids continue text already shown (e.g. generation after a
    prompt), so a leading space of the first piece is kept.
    """

    def __init__(self, tokenizer: Tokenizer, at_start: bool = True) -> None:
        self._tokenizer = tokenizer
        self._at_start = at_start
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        data, self._at_start = self._tokenizer._text_bytes(token_id, self._at_start)
        return self._utf8.decode(data) if data else ""

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
