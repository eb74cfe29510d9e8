"""Byte-level BPE tokenizer (GPT-2 style; GGUF's tokenizer.ggml.model = "gpt2"), as llama.cpp.

    text  -> special tokens cut out (USER_DEFINED always; CONTROL too with special=True)
          -> each remaining fragment cut into words by the pre-tokenizer (pretokenize.py)
          -> each word's UTF-8 bytes as GPT-2's printable stand-ins (bytes_to_unicode: the
             byte 0x20 is "Ġ", 0x0A is "Ċ", ...), one symbol per byte
          -> repeatedly merge the adjacent pair with the lowest merge rank (ties: leftmost),
             as llama.cpp's llm_tokenizer_bpe_session does with a heap over a linked list
             (we do the same on long words, and a list scan on short ones)
          -> each symbol's token id

Merges are "left right" strings; their rank is their position in tokenizer.ggml.merges.
Pre-tokenizers that set `ignore_merges` (Llama 3) take a word that is a token as that token.
Results are cached per word, so a long text costs one regex pass plus BPE on its new words.
"""

from __future__ import annotations

import codecs
import heapq
import re
from collections.abc import Sequence
from itertools import pairwise

from .pretokenize import PRE_TOKENIZERS, PreTokenizer, Splitter
from .tokenizer import PieceCache, Tokenizer, TokenizerError, TokenType

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Word-cache bounds: enough for the distinct words of a long prompt, small enough to ignore.
_SURROGATES = re.compile("[\ud800-\udfff]")


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the
    others (controls, space, 0x7F-0xA0, 0xAD) for U+0100 onwards in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# bytes -> stand-ins in one C call (codecs.charmap_decode with a 256-character table)
_DECODING_TABLE = "".join(BYTE_TO_CHAR)
_NO_RANK = 1 << 62
# Words up to this many bytes merge with a list scan (C-level min/index), longer ones with
# a heap: the scan is quadratic, the heap's Python overhead is not worth it on short words.
_SCAN_BYTES = 48


class BpeTokenizer(Tokenizer):
    """A byte-level BPE vocabulary with its merges and pre-tokenizer.

    `tokens` are the vocabulary texts (byte-level stand-ins for NORMAL tokens, raw text for
    CONTROL and USER_DEFINED ones); `merges` the "left right" merge strings in rank order;
    `pre` a tokenizer.ggml.pre name (pretokenize.PRE_TOKENIZERS). `add_bos` None takes the
    pre-tokenizer's default, as llama.cpp does when the file does not say.
    """

    def __init__(self, tokens: Sequence[bytes], merges: Sequence[bytes],
                 token_types: Sequence[int] | None, pre: str, *, bos_id: int, eos_id: int,
                 eot_id: int | None = None, unk_id: int | None = None,
                 add_bos: bool | None = None, source: str = "<memory>") -> None:
        def fail(what: str) -> TokenizerError:
            return TokenizerError(f"{source}: {what}")

        n = len(tokens)
        if n == 0:
            raise fail("empty vocabulary (tokenizer.ggml.tokens)")
        if pre not in PRE_TOKENIZERS:
            raise fail(f"tokenizer.ggml.pre {pre!r} is not a pre-tokenizer we know (known: "
                       f"{', '.join(sorted(PRE_TOKENIZERS))})")
        pretok: PreTokenizer = PRE_TOKENIZERS[pre]
        if token_types is not None and len(token_types) != n:
            raise fail(f"tokenizer.ggml.token_type has {len(token_types)} entries for {n} "
                       "tokens (tokenizer.ggml.tokens)")

        texts: list[str] = []
        ids: dict[str, int] = {}
        for i, raw in enumerate(tokens):
            try:
                text = bytes(raw).decode("utf-8")
            except UnicodeDecodeError as e:
                raise fail(f"tokenizer.ggml.tokens: token {i} is not valid UTF-8 "
                           f"({e.reason})") from None
            if not text:
                text = f"[EMPTY_{i}]"  # NOTE: llama.cpp's name for an empty token
            if text in ids:
                # NOTE: llama.cpp refuses these too: text -> id would be ambiguous.
                raise fail(f"tokenizer.ggml.tokens: {text!r} is both token {ids[text]} and {i}")
            ids[text] = i
            texts.append(text)

        types: list[TokenType] = []
        for i, t in enumerate(token_types if token_types is not None else [1] * n):
            try:
                types.append(TokenType(t))
            except ValueError:
                raise fail(f"tokenizer.ggml.token_type: token {i} has unknown type {t!r}") from None

        token_bytes = [_token_bytes(text, kind) for text, kind in zip(texts, types, strict=True)]
        super().__init__(texts, types, token_bytes, bos_id=bos_id, eos_id=eos_id, eot_id=eot_id,
                         unk_id=unk_id, add_bos=pretok.add_bos if add_bos is None else add_bos,
                         source=source)
        self.pre = pre

        if not merges:
            raise fail("no merges (tokenizer.ggml.merges is empty)")
        ranks: dict[tuple[str, str], int] = {}
        for rank, raw in enumerate(merges):
            try:
                line = bytes(raw).decode("utf-8")
            except UnicodeDecodeError as e:
                raise fail(f"tokenizer.ggml.merges: merge {rank} is not valid UTF-8 "
                           f"({e.reason})") from None
            # NOTE: llama.cpp splits at the first space after the first character, so a left
            # part may itself be a space.
            cut = line.find(" ", 1)
            if cut < 0:
                raise fail(f"tokenizer.ggml.merges: merge {rank} ({line!r}) is not 'left right'")
            pair = (line[:cut], line[cut + 1:])
            for part in pair:
                if part not in ids:
                    raise fail(f"tokenizer.ggml.merges: merge {rank} ({line!r}) names "
                               f"{part!r}, which is not a token")
            ranks.setdefault(pair, rank)  # the first rank wins, as in llama.cpp's map
        self._ranks = ranks
        self._ids = ids
        self._splitter = Splitter(pretok.regexes)
        self._ignore_merges = pretok.ignore_merges
        self._cache = PieceCache()

    # --- encoding ----------------------------------------------------------------------------

    def _parts(self, text: str, special: bool) -> list[str | int]:
        if _SURROGATES.search(text):
            # Lone surrogates are not UTF-8; llama.cpp reads malformed input as U+FFFD.
            text = _SURROGATES.sub("\ufffd", text)
        return self._split_special(text, control=special) if text else []

    def _encode_fragment(self, text: str, ids: list[int]) -> None:
        cache = self._cache
        for word in self._splitter.split(text):
            known = cache.get(word)
            ids.extend(known if known is not None else cache.add(word, self._encode_word(word)))

    def _encode_word(self, word: str) -> list[int]:
        encoded = codecs.charmap_decode(word.encode("utf-8"), "strict", _DECODING_TABLE)[0]
        ids = self._ids
        if self._ignore_merges and encoded in ids:
            return [ids[encoded]]
        out: list[int] = []
        for symbol in self._merge(encoded):
            token_id = ids.get(symbol)
            if token_id is not None:
                out.append(token_id)
            else:
                # NOTE: llama.cpp's fallback for a symbol that is not a token: each UTF-8 byte
                # of its text that is a one-byte token, and nothing for the others (a byte
                # of 0x80 and above alone is no UTF-8 text, so never a token).
                out.extend(ids[chr(b)] for b in symbol.encode("utf-8")
                           if b < 0x80 and chr(b) in ids)
        return out

    def _merge(self, word: str) -> list[str]:
        """The symbols of `word` after BPE: lowest rank first, leftmost on ties.

        NOTE: the heap below is llama.cpp's algorithm; the scan for short words merges the
        same pairs in the same order, because both always merge the leftmost of the
        lowest-ranked adjacent pairs (tests/test_bpe.py compares them).
        """
        sym = list(word)
        if len(sym) < 2:
            return sym
        return self._merge_scan(sym) if len(sym) <= _SCAN_BYTES else self._merge_heap(sym)

    def _merge_scan(self, sym: list[str]) -> list[str]:
        ranks = self._ranks
        pair_ranks = [ranks.get((a, b), _NO_RANK) for a, b in pairwise(sym)]
        while pair_ranks:
            best = min(pair_ranks)
            if best == _NO_RANK:
                break
            i = pair_ranks.index(best)  # the leftmost of the lowest
            sym[i:i + 2] = [sym[i] + sym[i + 1]]
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = ranks.get((sym[i - 1], sym[i]), _NO_RANK)
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get((sym[i], sym[i + 1]), _NO_RANK)
        return sym

    def _merge_heap(self, sym: list[str]) -> list[str]:
        n = len(sym)
        ranks = self._ranks
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        # Heap entries: (rank, left, right, merged length). An entry is stale once either
        # symbol changed: symbols only grow, or empty when merged into their left neighbour,
        # so the lengths show it (llama.cpp compares the texts, which is the same test).
        heap: list[tuple[int, int, int, int]] = []
        for i in range(n - 1):
            rank = ranks.get((sym[i], sym[i + 1]))
            if rank is not None:
                heap.append((rank, i, i + 1, 2))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, left, right, size = pop(heap)
            a, b = sym[left], sym[right]
            if not a or not b or len(a) + len(b) != size:
                continue
            merged = sym[left] = a + b
            sym[right] = ""
            after = nxt[right]
            nxt[left] = after
            if after != -1:
                prev[after] = left
                rank = ranks.get((merged, sym[after]))
                if rank is not None:
                    push(heap, (rank, left, after, size + len(sym[after])))
            before = prev[left]
            if before != -1:
                rank = ranks.get((sym[before], merged))
                if rank is not None:
                    push(heap, (rank, before, left, len(sym[before]) + size))
        return [s for s in sym if s]


def _token_bytes(text: str, kind: TokenType) -> bytes:
    """What a token adds to decoded text (llama.cpp's token_to_piece without specials)."""
    if kind in (TokenType.CONTROL, TokenType.UNKNOWN):
        return b""
    if kind == TokenType.USER_DEFINED:
        return text.encode()  # added tokens are stored as their text, not byte-level
    if kind == TokenType.BYTE:
        m = _BYTE_PIECE.fullmatch(text)
        if m is not None:
            return bytes([int(m.group(1), 16)])
    # NOTE: a character outside GPT-2's table (a malformed vocabulary) stands for itself.
    return b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode() for c in text)
