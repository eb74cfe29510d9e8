"""Pre-tokenizers of byte-level BPE vocabularies: llama.cpp's regex lists, by `tokenizer.ggml.pre`.

A pre-tokenizer cuts text into words before BPE runs on each word. llama.cpp
(src/llama-vocab.cpp, `llm_tokenizer_bpe`) gives every pre-tokenizer name a list of regexes
and applies them in turn (src/unicode.cpp, `unicode_regex_split`): each regex cuts every piece
the previous ones left into its matches *and* the text between them, so nothing is dropped.
The regexes below are llama.cpp's, character for character, compiled with the `regex` package
(Python's `re` has no `\\p{L}`); `split` reproduces the cutting.

NOTE: llama.cpp runs these regexes with C++ std::regex (ECMAScript) on a copy of the text in
which every non-ASCII whitespace character is replaced by U+000B (its \\s knows only ASCII), and
a few common patterns with hand-written equivalents. `split` matches on the same substituted
copy; `$` (end of input in ECMAScript, but also "before a final newline" in Python) is
compiled as `\\Z`. The `regex` package's \\s, \\p{L}, \\p{N} and \\p{P} are Unicode's White_Space
and general categories, as llama.cpp's tables are (tests/test_bpe.py checks llama.cpp's test
vectors for every pre-tokenizer we have a vocabulary for).
"""

from __future__ import annotations

from dataclasses import dataclass

import regex

# GPT-2's pattern; llama.cpp's "default" list and several others build on it.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3's pattern with (?i:...) spelled out, as llama.cpp adapts it (PR 6920).
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen 2: Llama 3's pattern with single digits.
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek's CJK ranges (CJK ideographs, the block before them, Hangul).
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# DeepSeek LLM's cased letters (Unicode's Lu/Ll/Lt ranges), written as escapes: the source has
# characters such as U+1F7D and U+212A that Unicode normalization would silently turn into others.
_DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    "\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+")


@dataclass(frozen=True)
class PreTokenizer:
    """One of llama.cpp's pre-tokenizer types: its regexes and the flags it sets."""

    regexes: tuple[str, ...]
    # llama.cpp's `ignore_merges`: a word that is itself a token is that token, without BPE.
    ignore_merges: bool = False
    # llama.cpp's default for add_bos when the file has no tokenizer.ggml.add_bos_token.
    add_bos: bool = False


_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_LLAMA3_TYPE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_GPT2_TYPE = PreTokenizer((_GPT2,))
_STARCODER = PreTokenizer((r"\p{N}", _GPT2))
_QWEN2_TYPE = PreTokenizer((_QWEN2,))

# tokenizer.ggml.pre -> pre-tokenizer, as llama.cpp's llama_vocab::impl::load maps the names.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    "llama3": _LLAMA3_TYPE, "llama-v3": _LLAMA3_TYPE, "llama-bpe": _LLAMA3_TYPE,
    "falcon3": _LLAMA3_TYPE,
    "dbrx": PreTokenizer((_LLAMA3,)), "smaug-bpe": PreTokenizer((_LLAMA3,)),
    "deepseek-llm": PreTokenizer(("[\r\n]", _DEEPSEEK_LETTERS,
                                  "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f"
                                  "\u3000-\u3002]+",
                                  r"\s+$", _DEEPSEEK_CJK, r"\p{N}+")),
    "deepseek-coder": PreTokenizer(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK,
                                    r"\p{N}")),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")),
    "starcoder": _STARCODER, "refact": _STARCODER, "command-r": _STARCODER,
    "smollm": _STARCODER, "codeshell": _STARCODER,
    "gpt-2": _GPT2_TYPE, "phi-2": _GPT2_TYPE, "mpt": _GPT2_TYPE, "olmo": _GPT2_TYPE,
    # NOTE: not a name llama.cpp's converter writes (its GPT-NeoX files carry no pre key), but
    # EleutherAI/gpt-neox-20b's tokenizer.json pre-tokenizes as GPT-2 does, and MPT, which
    # llama.cpp maps to the GPT-2 regex, uses that very tokenizer.
    "gpt-neox": _GPT2_TYPE,
    "qwen2": _QWEN2_TYPE, "deepseek-r1-qwen": _QWEN2_TYPE, "stablelm2": _QWEN2_TYPE,
    "megrez": _QWEN2_TYPE,
}

# llama.cpp's \s fallback: non-ASCII whitespace becomes U+000B before any regex runs.
# (Unicode's White_Space beyond ASCII; tests/test_bpe.py checks the list against the regex package.)
NON_ASCII_WHITESPACE = (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F,
                        0x3000)
_WHITESPACE_TO_VT = dict.fromkeys(NON_ASCII_WHITESPACE, 0x0B)
_NON_ASCII_WHITESPACE_RE = regex.compile("[" + "".join(map(chr, NON_ASCII_WHITESPACE)) + "]")


class Splitter:
    """Cuts text into words with one pre-tokenizer's regex list."""

    def __init__(self, regexes: tuple[str, ...]) -> None:
        # NOTE: a final `$` is ECMAScript's end of input, which is Python's \Z.
        self._compiled = [regex.compile(r[:-1] + r"\Z" if r.endswith("$") else r)
                          for r in regexes]

    def split(self, text: str) -> list[str]:
        """The words of `text`, in order; their concatenation is `text`."""
        view = (text.translate(_WHITESPACE_TO_VT)
                if not text.isascii() and _NON_ASCII_WHITESPACE_RE.search(text) else text)
        spans = [(0, len(text))]
        for pattern in self._compiled:
            cut: list[tuple[int, int]] = []
            for start, end in spans:
                # NOTE: most pieces do not match a later regex at all; a search finds that
                # several times faster than a finditer (none of the regexes looks behind).
                first = pattern.search(view, start, end) if end - start > 1 else None
                if first is None:  # (one character can only stay one piece)
                    cut.append((start, end))
                    continue
                pos = start
                for m in pattern.finditer(view, first.start(), end):
                    s, e = m.span()
                    if s == e:
                        continue
                    if s > pos:
                        cut.append((pos, s))
                    cut.append((s, e))
                    pos = e
                if pos < end:
                    cut.append((pos, end))
            spans = cut
        return [text[s:e] for s, e in spans]
