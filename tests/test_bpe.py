"""Byte-level BPE: llama.cpp's test vectors, a Qwen 2 vocabulary rebuilt from tiktoken ranks and
checked against the tiktoken package, a synthetic vocabulary, and broken files."""

from __future__ import annotations

import base64
import logging
import random
import time
from pathlib import Path

import gguf
import pytest
import regex
from tiller.engine.bpe import BYTE_TO_CHAR, BpeTokenizer
from tiller.engine.gguf import load_gguf_tokenizer, read_gguf
from tiller.engine.pretokenize import NON_ASCII_WHITESPACE, PRE_TOKENIZERS, Splitter
from tiller.engine.tokenizer import StreamDecoder, Tokenizer, TokenizerError, TokenType

SEPARATOR = "\n__ggml_vocab_test__\n"
# Qwen's own pattern (tokenization_qwen.py), which llama.cpp's qwen2 entry adapts.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def vectors(base: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 inputs and expected ids (read as its read_tests does)."""
    raw = base.with_name(base.name + ".inp").read_text("utf-8")
    inputs = raw.split(SEPARATOR)
    assert inputs[-1] == ""  # the file ends with a separator
    expected = base.with_name(base.name + ".out").read_text("utf-8").split("\n")
    assert len(expected) == len(inputs)
    return [(text, [int(x) for x in line.split()])
            for text, line in zip(inputs[:-1], expected[:-1], strict=True)]


def check_vectors(tok: Tokenizer, base: Path) -> None:
    cases = vectors(base)
    # NOTE: test-tokenizer-0 tokenizes with add_special=false, parse_special=false.
    failed = [(text, want, got) for text, want in cases
              if (got := tok.encode(text, bos=False)) != want]
    assert not failed, f"{len(failed)}/{len(cases)} inputs differ: {failed[:3]}"


def byte_level(data: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in data)


# --- llama.cpp's vectors on the shipped vocabularies ----------------------------------------

@pytest.mark.parametrize("name", ["gpt-2", "falcon", "starcoder", "refact", "mpt",
                                  "deepseek-coder", "deepseek-llm", "llama-spm", "phi-3"])
def test_ggml_vocab_vectors(shared_models: Path, name: str) -> None:
    base = shared_models / "vocab" / f"ggml-vocab-{name}.gguf"
    tok = load_gguf_tokenizer(base)
    assert isinstance(tok, BpeTokenizer) == (name not in ("llama-spm", "phi-3"))
    check_vectors(tok, base)


def test_short_word_scan_merges_as_the_heap(shared_models: Path) -> None:
    """Words up to _SCAN_BYTES merge with a list scan, longer ones with llama.cpp's heap:
    both must give the same symbols."""
    tok = load_gguf_tokenizer(shared_models / "vocab" / "ggml-vocab-gpt-2.gguf")
    assert isinstance(tok, BpeTokenizer)
    rng = random.Random(2)
    for text in random_texts(300, seed=9):
        for start in range(0, len(text), 7):
            word = byte_level(text[start:start + rng.randint(2, 30)].encode())
            assert tok._merge_scan(list(word)) == tok._merge_heap(list(word)), word


def test_gpt_neox_vocabulary(shared_models: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The GPT-NeoX file has no tokenizer.ggml.pre (and no vectors of its own): loading it falls
    back to llama.cpp's 'default' with a warning; as 'gpt-neox' it is MPT's tokenizer."""
    vocab = shared_models / "vocab"
    with caplog.at_level(logging.WARNING):
        tok = load_gguf_tokenizer(vocab / "ggml-vocab-gpt-neox.gguf")
    assert isinstance(tok, BpeTokenizer) and tok.pre == "default"
    assert "no tokenizer.ggml.pre" in caplog.text
    meta = read_gguf(vocab / "ggml-vocab-gpt-neox.gguf").metadata
    assert meta["tokenizer.ggml.merges"] == read_gguf(vocab / "ggml-vocab-mpt.gguf").metadata[
        "tokenizer.ggml.merges"]
    neox = BpeTokenizer(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"],
                        meta["tokenizer.ggml.token_type"].tolist(), "gpt-neox", bos_id=0, eos_id=0)
    check_vectors(neox, vocab / "ggml-vocab-mpt.gguf")


@pytest.mark.parametrize("name", ["llama-bpe", "command-r"])
def test_unbuildable_vocabularies(name: str) -> None:
    pytest.skip(f"ggml-vocab-{name}.gguf is not shipped and its vocabulary cannot be rebuilt "
                "from the files we have (only the .inp/.out vectors are there)")


# --- Qwen 2, rebuilt from tiktoken ranks ----------------------------------------------------

def read_tiktoken(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def merge_parts(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The pair whose merge makes `token`: tiktoken's BPE on its bytes, stopped below its rank
    (how Hugging Face and llama.cpp's converter derive merges from tiktoken ranks)."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while True:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    assert len(parts) == 2, (token, parts)
    return parts[0], parts[1]


@pytest.fixture(scope="module")
def qwen_ranks(shared_models: Path) -> dict[bytes, int]:
    ranks = read_tiktoken(shared_models / "tiktoken" / "qwen.tiktoken")
    assert sorted(ranks.values()) == list(range(len(ranks))) and len(ranks) == 151643
    return ranks


@pytest.fixture(scope="module")
def qwen_gguf(qwen_ranks: dict[bytes, int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vocabulary-only Qwen 2 GGUF as convert_hf_to_gguf.py writes one (regular tokens as
    byte-level text, merges in rank order, the three specials as CONTROL tokens)."""
    by_rank = sorted(qwen_ranks, key=qwen_ranks.__getitem__)
    tokens = [byte_level(t) for t in by_rank] + QWEN_SPECIALS
    types = [int(TokenType.NORMAL)] * len(by_rank) + [int(TokenType.CONTROL)] * 3
    merges = [" ".join(map(byte_level, merge_parts(qwen_ranks, t))) for t in by_rank if len(t) > 1]
    path = tmp_path_factory.mktemp("qwen") / "qwen2-vocab.gguf"
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(151643)
    w.add_eos_token_id(151645)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def qwen(qwen_gguf: Path) -> Tokenizer:
    return load_gguf_tokenizer(qwen_gguf)


@pytest.fixture(scope="module")
def qwen_tiktoken(qwen_ranks: dict[bytes, int]):
    tiktoken = pytest.importorskip("tiktoken")
    specials = {s: 151643 + i for i, s in enumerate(QWEN_SPECIALS)}
    return tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=qwen_ranks,
                             special_tokens=specials)


@pytest.mark.parametrize("name", ["qwen2", "deepseek-r1-qwen"])
def test_qwen2_vectors(qwen: Tokenizer, shared_models: Path, name: str) -> None:
    # DeepSeek-R1's Qwen distills keep Qwen 2's regular tokens and pre-tokenizer.
    check_vectors(qwen, shared_models / "vocab" / f"ggml-vocab-{name}.gguf")


def random_texts(count: int, seed: int) -> list[str]:
    """Texts mixing what pre-tokenizers treat differently: letters of several scripts, digit
    runs, contractions, punctuation runs, every kind of whitespace, emoji, CJK."""
    rng = random.Random(seed)
    alphabets = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
                 " ", "  \t\n\r\u3000\u00a0\u2009", "'", ".,;:!?-_()[]{}<>/\\\"@#$%^&*+=~`|",
                 "éèàçñöüßÉøåæœ", "приветмир", "你好世界我想在工作", "한국어", "ελληνικά",
                 "🦙🚀😁👍🏽\u200d", "\u0301\u0308", "ँअआइईउ"]
    words = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", " the", " and", "\n\n"]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.15:
                parts.append(rng.choice(words))
            else:
                alphabet = rng.choice(alphabets)
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))))
        texts.append("".join(parts))
    return texts


def test_qwen2_matches_tiktoken_on_random_text(qwen: Tokenizer, qwen_tiktoken) -> None:
    texts = random_texts(2000, seed=11)
    differ = [t for t in texts if qwen.encode(t, bos=False) != qwen_tiktoken.encode_ordinary(t)]
    assert not differ, f"{len(differ)}/{len(texts)} texts differ, e.g. {differ[:3]!r}"
    for text in texts[:200]:
        assert qwen.decode(qwen.encode(text)) == text


# Llama 3's own pattern (its tokenizer.json), which llama.cpp's llama3 entry adapts.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def test_llama3_pre_tokenizer_matches_tiktoken(qwen_gguf: Path, qwen_ranks) -> None:
    """Llama 3's vocabulary is not here, but its pre-tokenizer (and ignore_merges) can be
    checked on Qwen's tokens: tiktoken with Llama 3's pattern is the reference."""
    tiktoken = pytest.importorskip("tiktoken")
    reference = tiktoken.Encoding("llama3-pattern", pat_str=LLAMA3_PATTERN,
                                  mergeable_ranks=qwen_ranks, special_tokens={})
    meta = read_gguf(qwen_gguf).metadata
    tok = BpeTokenizer(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"],
                       meta["tokenizer.ggml.token_type"].tolist(), "llama-bpe",
                       bos_id=151643, eos_id=151643)
    texts = random_texts(1000, seed=17)
    differ = [t for t in texts if tok.encode(t, bos=False) != reference.encode_ordinary(t)]
    assert not differ, f"{len(differ)}/{len(texts)} texts differ, e.g. {differ[:3]!r}"


def test_qwen2_special_tokens(qwen: Tokenizer, qwen_tiktoken) -> None:
    chat = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ids = qwen.encode(chat, special=True)
    assert ids == qwen_tiktoken.encode(chat, allowed_special="all")
    assert ids[0] == 151644 and 151645 in ids
    # user text: the same characters are plain text
    plain = qwen.encode(chat)
    assert plain == qwen_tiktoken.encode_ordinary(chat) and 151644 not in plain
    assert qwen.bos_id == 151643 and not qwen.add_bos
    assert qwen.encode("Hi", bos=True) == qwen_tiktoken.encode_ordinary("Hi")
    assert qwen.end_ids == {151645}
    assert qwen.piece(151644) == "<|im_start|>" and qwen.piece_bytes(151644) == b""
    assert qwen.decode(ids) == "user\nHi there\nassistant\n"  # control tokens print nothing


def test_encode_speed(qwen: Tokenizer) -> None:
    """20,000 characters of fresh mixed-script text in well under 100 ms (measured ~25 ms of
    CPU with a cold word cache, ~4 ms warm). CPU time, because the test machine is shared;
    the bounds leave room for a slow one."""
    texts = random_texts(400, seed=5)
    text = "".join(texts)[:20_000]
    assert isinstance(qwen, BpeTokenizer)
    qwen._cache.clear()
    start = time.process_time()
    ids = qwen.encode(text)
    cold = time.process_time() - start
    start = time.process_time()
    assert qwen.encode(text) == ids
    warm = time.process_time() - start
    assert cold < 0.25 and warm < 0.1, (cold, warm)


# --- a synthetic vocabulary -----------------------------------------------------------------

def tiny(pre: str = "gpt-2", extra: list[tuple[str, int]] = (), merges: list[str] | None = None,
         **kwargs) -> BpeTokenizer:
    """The 256 byte tokens, a few merges, and `extra` (text, type) tokens at the end."""
    tokens = list(BYTE_TO_CHAR)
    merges = ["a b", "ab c", "Ġ a", "b c", "Ġa b"] if merges is None else merges
    tokens += ["ab", "abc", "Ġa", "bc", "Ġab"]
    types = [1] * len(tokens)
    for text, kind in extra:
        tokens.append(text)
        types.append(kind)
    kwargs.setdefault("bos_id", len(tokens) - 1)
    kwargs.setdefault("eos_id", len(tokens) - 1)
    return BpeTokenizer([t.encode() for t in tokens], [m.encode() for m in merges], types, pre,
                        **kwargs)


def test_byte_table() -> None:
    assert len(set(BYTE_TO_CHAR)) == 256
    assert BYTE_TO_CHAR[0x20] == "Ġ" and BYTE_TO_CHAR[0x0A] == "Ċ" and BYTE_TO_CHAR[0x41] == "A"
    assert [c for c in range(0x80, 0x110000) if regex.match(r"\s", chr(c))] == \
        list(NON_ASCII_WHITESPACE)


def test_merges_by_rank_leftmost_first() -> None:
    tok = tiny()
    ab, abc, a_space, bc, ab_space = range(256, 261)
    assert tok.encode("abc", bos=False) == [abc]  # "a b" (rank 0) before "b c" (rank 3)
    assert tok.encode("bc", bos=False) == [bc]
    assert tok.encode(" abab", bos=False) == [0x20, ab, ab]
    assert tok.encode(" ab", bos=False) == [0x20, ab]  # "a b" (rank 0) first: no "Ġa"
    assert tok.encode(" a", bos=False) == [a_space]
    # with "Ġ a" first, " ab" goes on to "Ġa b"
    assert tiny(merges=["Ġ a", "a b", "ab c", "b c", "Ġa b"]).encode(" ab", bos=False) == [ab_space]
    assert tok.encode("xyz", bos=False) == [ord("x"), ord("y"), ord("z")]
    # rank order, not vocabulary order: with "b c" first, "abc" is "a" + "bc"
    swapped = tiny(merges=["b c", "a b", "ab c", "Ġ a", "Ġa b"])
    assert swapped.encode("abc", bos=False) == [ord("a"), bc]
    assert tok.decode(tok.encode(" abc xyz é")) == " abc xyz é"


def test_ignore_merges_takes_whole_words() -> None:
    # "abc" is a token but no merge path builds it once "ab c" is gone
    merges = ["a b", "Ġ a", "b c", "Ġa b"]
    assert tiny("gpt-2", merges=merges).encode("abc", bos=False) == [256, ord("c")]
    assert tiny("llama3", merges=merges).encode("abc", bos=False) == [257]


def test_special_tokens_parse_only_when_allowed() -> None:
    tok = tiny(extra=[("<|end|>", 3), ("<tag>", 4)], bos_id=261, eos_id=261)
    end, tag = 261, 262
    assert tok.encode("ab<|end|>ab", bos=False, special=True) == [256, end, 256]
    plain = tok.encode("ab<|end|>ab", bos=False)
    assert end not in plain and tok.decode(plain) == "ab<|end|>ab"
    # USER_DEFINED tokens are cut out either way, as llama.cpp does
    assert tok.encode("ab<tag>ab", bos=False) == [256, tag, 256]
    assert tok.piece_bytes(tag) == b"<tag>" and tok.piece_bytes(end) == b""
    assert tok.token_type(end) == TokenType.CONTROL


def test_longest_special_first() -> None:
    tok = tiny(extra=[("<a>", 3), ("<a><b>", 3)])
    assert tok.encode("x<a><b><a>", bos=False, special=True) == [ord("x"), 262, 261]


def test_add_bos_follows_the_file() -> None:
    assert tiny("gpt-2").encode("ab") == [256]
    assert tiny("llama3").encode("ab") == [260, 256]  # llama.cpp's default for llama3
    assert tiny("gpt-2", add_bos=True).encode("ab", eos=True) == [260, 256, 260]
    assert tiny("gpt-2", add_bos=True).encode("ab", bos=False) == [256]


def test_stream_decoder_holds_back_split_characters() -> None:
    tok = tiny()
    text = "é🦙 ab"
    ids = tok.encode(text)
    assert len(ids) > 4  # one token per byte of the non-ASCII characters
    stream = StreamDecoder(tok)
    outputs = [stream.feed(i) for i in ids]
    assert "".join(outputs) + stream.flush() == text
    assert all("\ufffd" not in out for out in outputs)


def test_splitter_applies_regexes_in_turn() -> None:
    # falcon: punctuation runs first, then GPT-2's pattern on the rest, then digit triples
    falcon = Splitter(PRE_TOKENIZERS["falcon"].regexes)
    assert falcon.split("Hi, (you) 12345!") == ["Hi", ",", " ", "(", "you", ")", " ", "123", "45",
                                               "!"]
    # deepseek-llm: newlines alone, then letters, ..., then trailing whitespace ("\s+$")
    ds = Splitter(PRE_TOKENIZERS["deepseek-llm"].regexes)
    assert ds.split("a  \nb") == ["a", "  ", "\n", "b"]
    for text in random_texts(50, seed=3):
        for pre in PRE_TOKENIZERS.values():
            assert "".join(Splitter(pre.regexes).split(text)) == text


def test_lone_surrogates_become_replacement_characters() -> None:
    tok = tiny()
    assert tok.encode("a\ud800b", bos=False) == tok.encode("a\ufffdb", bos=False)


# --- broken vocabularies --------------------------------------------------------------------

def write_bpe_vocab(path: Path, *, pre: str | None = "gpt-2", merges: list[str] | None = None,
                    types: list[int] | None = None, drop_merges: bool = False) -> Path:
    tokens = [*BYTE_TO_CHAR, "ab"]
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens) if types is None else types)
    if not drop_merges:
        w.add_token_merges(["a b"] if merges is None else merges)
    w.add_bos_token_id(256)
    w.add_eos_token_id(256)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


BAD_VOCABS = {
    "unknown pre-tokenizer": ({"pre": "no-such-pre"}, "tokenizer.ggml.pre 'no-such-pre' is not"),
    "merge of unknown tokens": ({"merges": ["a b", "ab zz"]},
                                r"tokenizer.ggml.merges: merge 1 \('ab zz'\) names 'zz'"),
    "merge without a space": ({"merges": ["ab"]}, r"merge 0 \('ab'\) is not 'left right'"),
    "missing merges": ({"drop_merges": True}, r"no merges \(tokenizer.ggml.merges\)"),
    "types for fewer tokens": ({"types": [1] * 200},
                               "tokenizer.ggml.token_type has 200 entries for 257 tokens"),
    "unknown token type": ({"types": [1] * 256 + [9]},
                           "tokenizer.ggml.token_type: token 256 has unknown type 9"),
}


@pytest.mark.parametrize("name", BAD_VOCABS)
def test_bad_vocabularies(tmp_path: Path, name: str) -> None:
    kwargs, message = BAD_VOCABS[name]
    path = write_bpe_vocab(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(TokenizerError, match=message) as info:
        load_gguf_tokenizer(path)
    assert str(info.value).startswith(str(path))


def test_good_vocabulary_loads(tmp_path: Path) -> None:
    tok = load_gguf_tokenizer(write_bpe_vocab(tmp_path / "good.gguf"))
    assert tok.encode("ab ab", bos=False) == [256, 0x20, 256]  # "Ġ" is the byte 0x20


def test_duplicate_tokens_are_refused() -> None:
    with pytest.raises(TokenizerError, match="'ab' is both token 256 and 261"):
        tiny(extra=[("ab", 1)])


def test_chat_prompt_parses_the_template_special_tokens(qwen: Tokenizer, qwen_tiktoken) -> None:
    """The server encodes what the chat template renders with special=True, as llama.cpp
    does: <|im_start|> and <|im_end|> are single tokens."""
    from types import SimpleNamespace

    from tiller.server.chat import ChatTemplate
    from tiller.server.prepare import chat_prompt
    from tiller.server.protocol import ChatCompletionRequest

    template = ChatTemplate.for_model(None, qwen.piece(qwen.bos_id), qwen.piece(qwen.eos_id))
    model = SimpleNamespace(chat_template=template, tokenizer=qwen)
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}]})
    ids = chat_prompt(model, body)  # type: ignore[arg-type]
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ids == qwen_tiktoken.encode(text, allowed_special="all")
    assert ids.count(151644) == 2 and ids.count(151645) == 1


def test_symbols_that_are_not_tokens_fall_back_as_llama_cpp() -> None:
    # "ab" and "Ã©" (the stand-ins of é's UTF-8 bytes) are merges but not tokens: llama.cpp
    # emits the ASCII bytes of the symbol's text as one-byte tokens, and drops the rest
    tokens = [*BYTE_TO_CHAR]
    tok = BpeTokenizer([t.encode() for t in tokens], [b"a b", "\u00c3 \u00a9".encode()], None,
                       "gpt-2", bos_id=0, eos_id=0)
    assert tok.encode("ab", bos=False) == [ord("a"), ord("b")]
    assert tok.encode("é", bos=False) == []
