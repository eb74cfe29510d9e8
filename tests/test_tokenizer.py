"""Tokenizer tests: a synthetic vocabulary (always runs), llama2.c files, sentencepiece parity."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import pytest
from tiller.engine.tokenizer import (
    SPACE,
    SpmTokenizer,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    TokenType,
)

# --- a tiny synthetic vocabulary ------------------------------------------------------------

BYTES = [f"<0x{b:02X}>" for b in range(256)]


def tiny(extra: list[tuple[str, float]], byte_fallback: bool = True,
         types: list[int] | None = None) -> Tokenizer:
    """<unk> <s> </s> [<0x00>..<0xFF>] then `extra` (piece, score) pairs."""
    pieces = ["<unk>", "<s>", "</s>"] + (BYTES if byte_fallback else []) + [p for p, _ in extra]
    scores = [0.0] * (len(pieces) - len(extra)) + [s for _, s in extra]
    return SpmTokenizer([p.encode() for p in pieces], scores, types)


def pieces_of(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.piece(i) for i in ids]


BASE = [(SPACE, -10.0), ("a", -11.0), ("b", -12.0), ("c", -13.0)]


def test_merge_order_follows_score() -> None:
    tok = tiny(BASE + [("ab", -2.0), ("bc", -1.0)])
    assert pieces_of(tok, tok.encode("abc", bos=False)) == [SPACE, "a", "bc"]
    tok = tiny(BASE + [("ab", -1.0), ("bc", -2.0)])
    assert pieces_of(tok, tok.encode("abc", bos=False)) == [SPACE, "ab", "c"]


def test_merge_ties_go_leftmost() -> None:
    tok = tiny(BASE + [("ab", -1.0), ("bc", -1.0)])
    assert pieces_of(tok, tok.encode("abc", bos=False)) == [SPACE, "ab", "c"]


def test_merges_need_intermediate_pieces() -> None:
    tok = tiny(BASE + [("abc", 0.0)])
    assert pieces_of(tok, tok.encode("abc", bos=False)) == [SPACE, "a", "b", "c"]
    tok = tiny(BASE + [("bc", -1.0), ("abc", -5.0), (SPACE + "a", -0.5)])
    # ▁a wins first and blocks a+bc: merges are greedy, not a best segmentation.
    assert pieces_of(tok, tok.encode("abc", bos=False)) == [SPACE + "a", "bc"]


def test_spaces_and_dummy_prefix() -> None:
    tok = tiny(BASE + [(SPACE + "a", -1.0), (SPACE * 2, -3.0)])
    assert tok.encode("") == [tok.bos_id]
    assert tok.encode("", bos=False, eos=True) == [tok.eos_id]
    assert pieces_of(tok, tok.encode(" a", bos=False)) == [SPACE, SPACE + "a"]
    assert pieces_of(tok, tok.encode("a  b", bos=False)) == [SPACE + "a", SPACE * 2, "b"]
    # A literal "▁" in the text is indistinguishable from a space, as in sentencepiece.
    assert tok.encode(f"a{SPACE}a") == tok.encode("a a")


def test_byte_fallback_and_unknown() -> None:
    tok = tiny(BASE)
    assert pieces_of(tok, tok.encode("é", bos=False)) == [SPACE, "<0xC3>", "<0xA9>"]
    assert pieces_of(tok, tok.encode("\t", bos=False)) == [SPACE, "<0x09>"]
    # A lone surrogate cannot be UTF-8; sentencepiece maps malformed input to U+FFFD.
    assert pieces_of(tok, tok.encode("\ud800", bos=False)) == [SPACE, "<0xEF>", "<0xBF>",
                                                                 "<0xBD>"]
    no_bytes = tiny(BASE, byte_fallback=False)
    unk = no_bytes.unk_id
    assert no_bytes.encode("éé", bos=False) == [no_bytes.encode("a", bos=False)[0], unk]
    assert pieces_of(no_bytes, no_bytes.encode("éaé", bos=False)) == [
        SPACE, "<unk>", "a", "<unk>"]


def test_control_pieces_are_never_merged() -> None:
    tok = tiny(BASE + [("<", -1.0), ("s", -1.0), (">", -1.0), ("<s", -1.0)])
    assert pieces_of(tok, tok.encode("<s>", bos=False)) == [SPACE, "<s", ">"]


def test_special_pieces_parse_only_when_allowed() -> None:
    tok = tiny(BASE)
    # llama.cpp's parse_special: each text fragment after a special token gets its own prefix
    assert tok.encode("a</s>a", bos=False, special=True) == (
        tok.encode("a", bos=False) + [tok.eos_id] + tok.encode("a", bos=False))
    assert tok.encode("<s>a", special=True) == [tok.bos_id, tok.bos_id] + tok.encode("a", bos=False)
    plain = tok.encode("a</s>a", bos=False)
    assert tok.eos_id not in plain and tok.decode(plain) == "a</s>a"
    assert SpmTokenizer([b"<unk>", b"<s>", b"</s>"], [0.0] * 3, add_bos=False).encode("") == []


def test_user_defined_and_unused_pieces() -> None:
    extra = BASE + [("<|x|>", -1.0), ("ab", -1.0), ("abc", -2.0)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * 4 + [TokenType.USER_DEFINED, TokenType.UNUSED,
                                       TokenType.NORMAL]
    tok = tiny(extra, types=types)
    assert pieces_of(tok, tok.encode("a<|x|>b", bos=False)) == [SPACE, "a", "<|x|>", "b"]
    # An UNUSED piece may be built on the way to a bigger one but is never emitted itself.
    assert pieces_of(tok, tok.encode("abc", bos=False)) == [SPACE, "abc"]
    assert pieces_of(tok, tok.encode("ab", bos=False)) == [SPACE, "a", "b"]


def test_piece_crossing_whitespace_disables_chunking() -> None:
    tok = tiny(BASE + [("a" + SPACE, -1.0), ("a" + SPACE + "b", -2.0)])
    assert pieces_of(tok, tok.encode("a b", bos=False)) == [SPACE, "a" + SPACE + "b"]


def test_accessors_and_piece_bytes() -> None:
    tok = tiny(BASE + [(SPACE + "a", -1.0)])
    assert tok.vocab_size == 3 + 256 + 5
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert tok.piece(0) == "<unk>" and tok.token_type(0) == TokenType.UNKNOWN
    assert tok.token_type(1) == TokenType.CONTROL and tok.token_type(3) == TokenType.BYTE
    assert tok.piece_bytes(1) == tok.piece_bytes(2) == tok.piece_bytes(0) == b""
    assert tok.piece_bytes(3 + 0x41) == b"A"
    assert tok.piece_bytes(tok.vocab_size - 1) == b" a"
    for bad in (-1, tok.vocab_size):
        with pytest.raises(TokenizerError, match="outside vocabulary"):
            tok.piece(bad)
        with pytest.raises(TokenizerError, match="outside vocabulary"):
            tok.decode([bad])


def test_decode_strips_only_the_dummy_prefix() -> None:
    tok = tiny(BASE + [(SPACE + "a", -1.0), (SPACE * 2, -3.0)])
    for text in ["a", " a", "  a b ", "a  ", "é a", "\ta"]:
        assert tok.decode(tok.encode(text)) == text
    sa, sp = tok.encode("a", bos=False)[0], tok.encode(" ", bos=False)[0]
    assert tok.decode([sa, sa]) == "a a"
    assert tok.decode([sa, tok.bos_id, sa]) == "aa"  # BOS starts a new text
    assert tok.decode([tok.bos_id, tok.eos_id, sa]) == "a"
    assert tok.decode([3 + 0x20, sa]) == "  a"  # a byte token is taken literally
    assert tok.decode([sp]) == " "
    assert tok.decode([3 + 0xC3]) == "\ufffd"


def test_stream_decoder_holds_back_split_characters() -> None:
    tok = tiny(BASE + [(SPACE + "a", -1.0)])
    ids = tok.encode("a 🦙é a")
    stream = StreamDecoder(tok)
    outputs = [stream.feed(i) for i in ids]
    assert "".join(outputs) + stream.flush() == "a 🦙é a" == tok.decode(ids)
    llama_at = pieces_of(tok, ids).index("<0xF0>")
    assert outputs[llama_at:llama_at + 4] == ["", "", "", "🦙"]
    assert all("\ufffd" not in out for out in outputs)
    # Continuing after a prompt keeps the first piece's space.
    cont = StreamDecoder(tok, at_start=False)
    assert [cont.feed(i) for i in tok.encode("a", bos=False)] == [" a"]
    # A truncated character comes out as U+FFFD only at the end.
    cut = StreamDecoder(tok)
    assert cut.feed(3 + 0xF0) == "" and cut.flush() == "\ufffd"


def test_stream_decoder_matches_decode_on_random_ids() -> None:
    tok = tiny(BASE + [(SPACE + "a", -1.0), (SPACE * 2, -3.0)])
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 12))]
        stream = StreamDecoder(tok)
        assert "".join(stream.feed(i) for i in ids) + stream.flush() == tok.decode(ids)


@pytest.mark.parametrize("kwargs, message", [
    ({"scores": [0.0] * 2}, "2 scores for 3 pieces"),
    ({"token_types": [1, 1]}, "2 token types"),
    ({"bos_id": 3}, "bos_id 3 outside"),
    ({"eot_id": 3}, "eot_id 3 outside"),
    ({"scores": [0.0, float("nan"), 0.0]}, "non-finite score"),
    ({"pieces": [b"<unk>", b"\xff", b"x"]}, "token 1 is not valid UTF-8"),
    ({"token_types": [2, 3, 9]}, "unknown token type 9"),
    ({"token_types": [2, 3, 6]}, "byte token 2 is 'x'"),
])
def test_constructor_validates(kwargs: dict, message: str) -> None:
    args = {"pieces": [b"<unk>", b"<s>", b"x"], "scores": [0.0] * 3, "token_types": None,
            "bos_id": 1, "eos_id": 1} | kwargs
    with pytest.raises(TokenizerError, match=message):
        SpmTokenizer(**args)


def test_end_ids_are_eos_and_eot() -> None:
    pieces = [b"<unk>", b"<s>", b"</s>", b"<|im_end|>"]
    assert SpmTokenizer(pieces, [0.0] * 4).end_ids == {2}
    assert SpmTokenizer(pieces, [0.0] * 4, eot_id=3).end_ids == {2, 3}


# --- llama2.c tokenizer.bin files -----------------------------------------------------------

def llama2c_bytes(pieces: list[bytes], scores: list[float] | None = None,
                  max_len: int | None = None) -> bytes:
    scores = scores or [0.0] * len(pieces)
    out = [struct.pack("<i", max(map(len, pieces)) if max_len is None else max_len)]
    for p, s in zip(pieces, scores, strict=True):
        out.append(struct.pack("<fi", s, len(p)) + p)
    return b"".join(out)


SMALL = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"a", b"b", b" a", b"ab"]


def test_from_llama2c_synthetic(tmp_path: Path) -> None:
    path = tmp_path / "tok.bin"
    path.write_bytes(llama2c_bytes(SMALL, [0, 0, 0, -5, -6, -7, -1, -2]))
    tok = SpmTokenizer.from_llama2c(path)
    assert tok.vocab_size == 8 == SpmTokenizer.from_llama2c(path, vocab_size=8).vocab_size
    assert tok.piece(1) == "<s>" and tok.piece(6) == SPACE + "a"
    assert tok.encode("ab a") == [1, 6, 5, 6]
    assert tok.decode(tok.encode("ab a")) == "ab a"


def _header(max_len: int) -> bytes:
    return struct.pack("<i", max_len)


GOOD = llama2c_bytes(SMALL)
BAD_FILES = {
    "empty": (b"", None, "too short"),
    "truncated inside a piece": (GOOD[:-1], None, "truncated: token 7"),
    "truncated inside a header": (GOOD + b"\0\0\0", None, "truncated: token 8 header"),
    "negative length": (GOOD + struct.pack("<fi", 0.0, -4), None, "token 8 has length -4"),
    "length beyond file": (_header(100) + GOOD[4:] + struct.pack("<fi", 0.0, 90) + b"xy", None,
                           "truncated: token 8 needs 90 bytes"),
    "length above max_token_length": (_header(2) + GOOD[4:], None, "token 0 has length 5"),
    "zero max_token_length": (_header(0) + GOOD[4:], None, "max_token_length 0"),
    "negative max_token_length": (_header(-7) + GOOD[4:], None, "max_token_length -7"),
    "huge max_token_length": (_header(2**31 - 1) + GOOD[4:], None, "max_token_length 2147483647"),
    "fewer tokens than vocab_size": (GOOD + struct.pack("<fi", 0.0, 1) + b"z", 10,
                                     "ends after 9 tokens, expected vocab_size 10"),
    "more tokens than vocab_size": (GOOD, 5, "trailing bytes after 5 tokens"),
    "absurd vocab_size": (GOOD, 10**12, "too short for 1000000000000 tokens"),
    "negative vocab_size": (GOOD, -1, "vocab_size must be positive"),
    "too few tokens": (llama2c_bytes(SMALL[:2]), None, "only 2 tokens"),
    "nan score": (llama2c_bytes(SMALL, [float("nan")] * 8), None, "non-finite score"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_llama2c_files(tmp_path: Path, name: str) -> None:
    data, vocab_size, message = BAD_FILES[name]
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    with pytest.raises(TokenizerError, match=message) as info:
        SpmTokenizer.from_llama2c(path, vocab_size)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.bin"
    with pytest.raises(TokenizerError, match="cannot read") as info:
        SpmTokenizer.from_llama2c(path)
    assert str(path) in str(info.value)


def test_tok512_round_trips(shared_models: Path) -> None:
    tok = SpmTokenizer.from_llama2c(shared_models / "tok512.bin", vocab_size=512)
    assert tok.vocab_size == 512 and tok.piece(1) == "<s>" and tok.piece(3) == "<0x00>"
    ids = tok.encode("Once upon a time")
    assert ids[0] == tok.bos_id and tok.decode(ids) == "Once upon a time"
    for text in ["Lily and Tom played in the park.\nThe end.", "  two  spaces  ", "naïve 🦙 猫",
                 "", "x\ty\r\n"]:
        assert tok.decode(tok.encode(text)) == text


# --- sentencepiece parity on the Llama 2 vocabulary -----------------------------------------

@pytest.fixture(scope="module")
def llama(shared_models: Path) -> Tokenizer:
    return SpmTokenizer.from_llama2c(shared_models / "llama2-tokenizer.bin", vocab_size=32000)


@pytest.fixture(scope="module")
def sp(shared_models: Path):
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(shared_models / "llama2-tokenizer.model"))


CORPUS = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\t\n", "a", " a", "a ", "  a  ",
    "Hello world", " Hello world", "Hello World!", "Hello, world! How's it going?",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a little girl named Lily.",
    "Führer café naïve résumé Ångström", "Ελληνικά γράμματα", "Привет, как дела?",
    "مرحبا بالعالم", "שלום עולם", "你好，世界！今天天气很好。", "こんにちは世界", "안녕하세요",
    "हिन्दी भाषा", "ไทย", "🦙 llama.cpp 🚀", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "👍🏽 ok",
    "\U0001fae0\U0001fae8 new emoji", "\x00\x01\x7f", "\ufffd\ufeff\u200b\u00a0",
    "tabs\tand\ttabs\t\t", "trailing newline\n", "\r\n\r\nwindows", "  leading and trailing  ",
    "def f(x: int) -> int:\n    return x ** 2  # square\n", "if (a && b) { return c[i]; }",
    "<s>not a bos</s> <unk> <0x41>", "1234567890 3.14159 1e-9 0x1F 2024-01-01",
    "w048 7tuijk dsdfhu", "▁already▁escaped", "a\u2581\u2581b", "      ", "\t\t\t  \n\n  ",
    "ied 4 ½ months", "Hello" * 50, " ".join(["word"] * 40),
]


def random_texts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E)] * 4 + [(0x09, 0x0D), (0xA0, 0x24F), (0x370, 0x52F), (0x600, 0x6FF),
                                   (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
                                   (0xE000, 0xFFFD), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 30)):
            lo, hi = rng.choice(ranges)
            chars.append(" " if rng.random() < 0.15 else chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


def test_pieces_match_sentencepiece(llama: Tokenizer, sp) -> None:
    assert llama.vocab_size == sp.get_piece_size()
    for i in range(llama.vocab_size):
        assert llama.piece(i) == sp.id_to_piece(i), i
        kind = llama.token_type(i)
        assert (kind == TokenType.BYTE) == sp.is_byte(i), i
        assert (kind == TokenType.CONTROL) == sp.is_control(i), i
        assert (kind == TokenType.UNKNOWN) == sp.is_unknown(i), i


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_sentencepiece(llama: Tokenizer, sp, text: str) -> None:
    ids = llama.encode(text)
    assert ids == [llama.bos_id] + sp.encode(text)
    assert llama.decode(ids) == sp.decode(ids) == text.replace(SPACE, " ")


def test_encode_matches_sentencepiece_random(llama: Tokenizer, sp) -> None:
    for text in random_texts(400):
        ids = llama.encode(text, bos=False)
        assert ids == sp.encode(text), text
        assert llama.decode(ids) == sp.decode(ids) == text


def test_ggml_vocab_vectors(llama: Tokenizer, shared_models: Path) -> None:
    base = shared_models / "vocab" / "ggml-vocab-llama-spm.gguf"
    inputs = base.with_suffix(".gguf.inp").read_text("utf-8").split("\n__ggml_vocab_test__\n")
    expected = base.with_suffix(".gguf.out").read_text("utf-8").split("\n")
    for text, line in zip(inputs, expected, strict=True):
        assert llama.encode(text, bos=False) == [int(x) for x in line.split()], text


def test_chunk_cache_equals_whole_text_bpe(llama: Tokenizer) -> None:
    rng = random.Random(7)
    texts = random_texts(50, seed=7) + ["".join(rng.choice(" ab\t") for _ in range(300))]
    for text in texts:
        normalized = SPACE + text.replace(" ", SPACE)
        assert llama.encode(text, bos=False) == llama._bpe(normalized), text


def test_stream_decoder_on_emoji_bytes(llama: Tokenizer) -> None:
    text = "Hi 🦙 there, 👨‍👩‍👧 café"
    ids = llama.encode(text)
    assert any(llama.token_type(i) == TokenType.BYTE for i in ids)
    stream = StreamDecoder(llama)
    outputs = [stream.feed(i) for i in ids]
    assert "".join(outputs) + stream.flush() == text
    assert all("\ufffd" not in out for out in outputs)
    assert "🦙" in outputs


def test_encode_is_not_quadratic(llama: Tokenizer) -> None:
    # NOTE: a generous bound that only a quadratic rescan would break (measured ~50 ms).
    rng = random.Random(3)
    cjk = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(20_000))
    words = " ".join("".join(rng.choice("etaoinshrdlu") for _ in range(rng.randint(1, 9)))
                     for _ in range(3_000))[:20_000]
    for text in (cjk, words):
        start = time.perf_counter()
        llama.encode(text)
        assert time.perf_counter() - start < 2.0
