"""TextStream tests: stop strings, held-back text, split characters, offsets, stop validation."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from tiller.engine.tokenizer import SPACE, SpmTokenizer, StreamDecoder, Tokenizer
from tiller.server.textstream import MAX_STOP, Delta, TextStream, normalize_stop

# --- a tiny in-memory vocabulary -------------------------------------------------------------

BYTES = [f"<0x{b:02X}>" for b in range(256)]
WORDS = ["a", "b", "c", "d", "ab", "abc", "abcd", "ba", "aab", "Hi", SPACE + "there", "x",
         "xENDy", "END", "E", "N", "EN", "D", "<", "/", ">", "</", "s>", "/s>", "<|", "end", "|>",
         "!", "more", "é", "\n", SPACE, SPACE + "a"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    pieces = ["<unk>", "<s>", "</s>"] + BYTES + WORDS
    return SpmTokenizer([p.encode() for p in pieces], [0.0] * len(pieces))


def ids(tok: Tokenizer, *pieces: str) -> list[int]:
    """Token ids by piece text; "<0xF0>"-style names give byte tokens."""
    index = {tok.piece(i): i for i in range(tok.vocab_size)}
    return [index[p] for p in pieces]


def run(tok: Tokenizer, tokens: list[int], stop: list[str], at_start: bool = False
        ) -> tuple[TextStream, list[Delta], str]:
    stream = TextStream(tok, stop, at_start=at_start)
    deltas = []
    for t in tokens:
        deltas.append(stream.push(t))
        if deltas[-1].stopped:
            break
    return stream, deltas, stream.finish()


def oracle(tok: Tokenizer, tokens: list[int], stop: tuple[str, ...], at_start: bool = False
           ) -> tuple[str, str | None, list[int]]:
    """Brute force: rescan the whole text after every token (llama.cpp's rule, quadratic).

    Returns the completion, the stop string that ended it, and each token's start offset in
    the uncut text.
    """
    decoder = StreamDecoder(tok, at_start=at_start)
    text, starts = "", []
    for t in tokens:
        starts.append(len(text))
        text += decoder.feed(t)
        found = [(text.find(s), i) for i, s in enumerate(stop) if s in text]
        if found:
            cut, i = min(found)
            return text[:cut], stop[i], starts
    text += decoder.flush()
    found = [(text.find(s), i) for i, s in enumerate(stop) if s in text]
    if found:
        cut, i = min(found)
        return text[:cut], stop[i], starts
    return text, None, starts


# --- stop strings --------------------------------------------------------------------------------

def test_no_stop_streams_everything(tok: Tokenizer) -> None:
    stream, deltas, tail = run(tok, ids(tok, "Hi", SPACE + "there", "!"), [])
    assert [d.text for d in deltas] == ["Hi", " there", "!"] and tail == ""
    assert stream.text == "Hi there!" and not stream.stopped and stream.stop_string is None
    assert list(stream.text_offset) == [0, 2, 8]


def test_leading_space_follows_at_start(tok: Tokenizer) -> None:
    assert run(tok, ids(tok, SPACE + "there"), [])[0].text == " there"
    assert run(tok, ids(tok, SPACE + "there"), [], at_start=True)[0].text == "there"


def test_stop_inside_one_token(tok: Tokenizer) -> None:
    stream, deltas, tail = run(tok, ids(tok, "Hi", "xENDy", "more"), ["END"])
    assert deltas == [Delta("Hi"), Delta("x", True, "END")]
    assert tail == "" and stream.text == "Hix" and stream.stop_string == "END"
    # The token straddling the cut keeps its start; it is partly in the completion.
    assert list(stream.text_offset) == [0, 2]


def test_stop_across_three_tokens(tok: Tokenizer) -> None:
    stream, deltas, _ = run(tok, ids(tok, "Hi", "<|", "end", "|>", "more"), ["<|end|>"])
    assert deltas == [Delta("Hi"), Delta(""), Delta(""), Delta("", True, "<|end|>")]
    assert stream.text == "Hi"
    # Tokens inside the stop string point at the end of the completion.
    assert list(stream.text_offset) == [0, 2, 2, 2]


def test_stop_at_the_very_start(tok: Tokenizer) -> None:
    stream, deltas, tail = run(tok, ids(tok, "END", "Hi"), ["END"])
    assert deltas == [Delta("", True, "END")] and tail == "" and stream.text == ""
    assert list(stream.text_offset) == [0]
    stream, deltas, _ = run(tok, ids(tok, "E", "N", "D"), ["END"])
    assert [d.text for d in deltas] == ["", "", ""] and deltas[-1].stopped


def test_overlapping_stop_strings(tok: Tokenizer) -> None:
    # The shorter one completes first when tokens arrive one character at a time...
    for stop in (["ab", "abc"], ["abc", "ab"]):
        stream, deltas, _ = run(tok, ids(tok, "x", "a", "b", "c"), stop)
        assert stream.text == "x" and stream.stop_string == "ab"
    # ...in one token both start at 0: the one listed first wins (only the name differs).
    assert run(tok, ids(tok, "x", "abc"), ["abc", "ab"])[0].stop_string == "abc"
    assert run(tok, ids(tok, "x", "abc"), ["ab", "abc"])[0].stop_string == "ab"
    # Completed in the same token, the earliest start wins even if it ends later.
    stream = run(tok, ids(tok, "abcd"), ["c", "abcd"])[0]
    assert (stream.text, stream.stop_string) == ("", "abcd")
    stream = run(tok, ids(tok, "ab", "c", "d"), ["c", "abcd"])[0]
    assert (stream.text, stream.stop_string) == ("ab", "c")
    # Matches that start inside an earlier partial match (the failure links).
    stream, deltas, _ = run(tok, ids(tok, "a", "a", "a", "b"), ["aab"])
    assert [d.text for d in deltas] == ["", "", "a", ""] and stream.text == "a"
    stream = run(tok, ids(tok, "ab", "ab", "a", "c"), ["abac", "bab"])[0]
    assert (stream.text, stream.stop_string) == ("a", "bab")


def test_held_back_prefix_released_when_ruled_out(tok: Tokenizer) -> None:
    stream, deltas, tail = run(tok, ids(tok, "Hi", "E", "N", "x", "E"), ["END"])
    assert [d.text for d in deltas] == ["Hi", "", "", "ENx", ""]
    assert not any(d.stopped for d in deltas)
    assert tail == "E" and stream.text == "HiENxE"
    # Partly ruled out: "abab" still ends in "ab", so only the first "ab" is released.
    stream, deltas, _ = run(tok, ids(tok, "ab", "ab", "c"), ["abac"])
    assert [d.text for d in deltas] == ["", "ab", "abc"] and stream.text == "ababc"


def test_prefix_that_never_completes_is_released_by_finish(tok: Tokenizer) -> None:
    stream = TextStream(tok, ["END"])
    assert stream.push(ids(tok, "x")[0]) == Delta("x")
    assert stream.push(ids(tok, "EN")[0]) == Delta("")
    assert stream.text == "x" and list(stream.text_offset) == [0, 1]
    assert stream.finish() == "EN" and stream.text == "xEN" and not stream.stopped


def test_split_emoji_never_emitted_broken(tok: Tokenizer) -> None:
    emoji = ids(tok, "<0xF0>", "<0x9F>", "<0x98>", "<0x80>")  # 😀
    stream, deltas, _ = run(tok, ids(tok, "x") + emoji + ids(tok, "!"), [])
    assert [d.text for d in deltas] == ["x", "", "", "", "😀", "!"]
    assert list(stream.text_offset) == [0, 1, 1, 1, 1, 2]
    # A stop string starting with the emoji holds it back whole, then cuts it.
    stream, deltas, _ = run(tok, ids(tok, "x") + emoji + ids(tok, "!"), ["😀!"])
    assert [d.text for d in deltas] == ["x", "", "", "", "", ""] and stream.text == "x"
    # A stop string ending in the emoji completes on its last byte, not before.
    stream, deltas, _ = run(tok, ids(tok, "x") + emoji + ids(tok, "!"), ["x😀"])
    assert [d.stopped for d in deltas] == [False, False, False, False, True]
    # A stop string sharing only the first bytes never matches part of a character.
    stream, deltas, tail = run(tok, ids(tok, "x") + emoji[:3], ["😁"])
    assert all("\ufffd" not in d.text for d in deltas) and tail == "\ufffd"
    assert stream.text == "x\ufffd" and not stream.stopped


def test_stop_string_on_the_flushed_replacement_character(tok: Tokenizer) -> None:
    stream, _, tail = run(tok, ids(tok, "x", "<0xF0>"), ["\ufffd"])
    assert tail == "" and stream.text == "x" and stream.stop_string == "\ufffd"


def test_text_offsets_index_the_emitted_text(tok: Tokenizer) -> None:
    tokens = ids(tok, "Hi", SPACE + "there", "<", "/s>", "more")
    stream, _, _ = run(tok, tokens, ["</s>"])
    assert stream.text == "Hi there" and list(stream.text_offset) == [0, 2, 8, 8]
    pieces = ["Hi", " there"]
    for offset, piece in zip(stream.text_offset, pieces, strict=False):
        assert stream.text[offset:offset + len(piece)] == piece


def test_lifecycle_errors(tok: Tokenizer) -> None:
    stream = TextStream(tok, ["END"])
    stream.push(ids(tok, "END")[0])
    with pytest.raises(RuntimeError, match="stopped"):
        stream.push(ids(tok, "x")[0])
    assert stream.finish() == "" and stream.finish() == ""
    stream = TextStream(tok)
    stream.push(ids(tok, "x")[0])
    assert stream.finish() == "" and stream.finished
    with pytest.raises(RuntimeError, match="finished"):
        stream.push(ids(tok, "x")[0])
    # EOS adds no text; the caller ends with finish().
    stream = TextStream(tok, ["D"])
    assert stream.push(tok.eos_id) == Delta("") and stream.finish() == ""


# --- random sequences against the brute-force oracle --------------------------------------------

def check_against_oracle(tok: Tokenizer, tokens: list[int], stop: tuple[str, ...]) -> None:
    stream = TextStream(tok, stop)
    longest = max(map(len, stop), default=1)
    decoder, decoded = StreamDecoder(tok, at_start=False), 0
    emitted = []
    for t in tokens:
        delta = stream.push(t)
        emitted.append(delta.text)
        assert stream.text == "".join(emitted)
        if delta.stopped:
            break
        # Held back: at most the longest stop string less one character.
        decoded += len(decoder.feed(t))
        assert decoded - len(stream.text) <= longest - 1
    emitted.append(stream.finish())
    want, want_stop, starts = oracle(tok, tokens, stop)
    assert "".join(emitted) == stream.text == want, (tokens, stop)
    assert stream.stop_string == want_stop
    offsets = list(stream.text_offset)
    assert offsets == [min(s, len(want)) for s in starts[:len(offsets)]]
    assert offsets == sorted(offsets) and all(o <= len(want) for o in offsets)


def random_stops(rng: random.Random, text: str, pool: list[str]) -> tuple[str, ...]:
    """Stop strings likely to match: substrings of the text (often overlapping) and a pool."""
    stops = []
    for _ in range(rng.randint(1, 4)):
        if text and rng.random() < 0.7:
            start = rng.randrange(len(text))
            stops.append(text[start:start + rng.randint(1, 6)])
        else:
            stops.append(rng.choice(pool))
    return normalize_stop(stops)


def test_random_sequences_tiny_vocab(tok: Tokenizer) -> None:
    rng = random.Random(5)
    alphabet = ids(tok, "a", "b", "c", "ab", "ba", "aab", "abc", "<", "/", ">", "</", "s>",
                   "é", SPACE + "a", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "<0xC3>")
    pool = ["ab", "aab", "abab", "ba", "c", "</s>", "é", "😀", "\ufffd", " a", "bc", "abcab"]
    for _ in range(300):
        tokens = [rng.choice(alphabet) for _ in range(rng.randint(0, 20))]
        check_against_oracle(tok, tokens, random_stops(rng, tok.decode(tokens), pool))


@pytest.mark.parametrize("name, vocab_size", [("tok512.bin", 512),
                                              ("llama2-tokenizer.bin", 32000)])
def test_random_sequences_real_vocab(shared_models: Path, name: str, vocab_size: int) -> None:
    real = SpmTokenizer.from_llama2c(shared_models / name, vocab_size=vocab_size)
    rng = random.Random(vocab_size)
    text = "Once upon a time, Lily said: \"Stop!\" 🦙 naïve 猫.\nThe end.</s> ###"
    encoded = real.encode(text, bos=False)
    pool = ["\n", "The end", "</s>", "###", "🦙", "Stop", " ", "."]
    for _ in range(60):
        # Real text (spans of the encoding) mixed with random ids, bytes included.
        start = rng.randrange(len(encoded))
        tokens = encoded[start:start + rng.randint(1, 30)]
        tokens += [rng.randrange(3, vocab_size) for _ in range(rng.randint(0, 5))]
        if rng.random() < 0.3:
            rng.shuffle(tokens)
        check_against_oracle(real, tokens, random_stops(rng, real.decode(tokens), pool))


def test_cost_does_not_grow_with_the_output(tok: Tokenizer) -> None:
    # NOTE: a generous bound only a rescan of the whole output would break (measured ~0.1 s):
    # "ab" tokens keep a partial match of the stop string alive all the time.
    stream = TextStream(tok, ["ab" * 30 + "c", "b" * 50])
    token = ids(tok, "ab")[0]
    start = time.perf_counter()
    for _ in range(30_000):
        stream.push(token)
    assert time.perf_counter() - start < 3.0
    assert len(stream.text) >= 60_000 - 61 and not stream.stopped


# --- the `stop` field -----------------------------------------------------------------------------

def test_normalize_stop_accepts() -> None:
    assert normalize_stop(None) == () and normalize_stop([]) == ()
    assert normalize_stop("###") == ("###",)
    assert normalize_stop(["a", "b", "a"]) == ("a", "b")
    assert len(normalize_stop([str(i) for i in range(MAX_STOP)])) == MAX_STOP
    assert TextStream(SpmTokenizer([b"<unk>", b"<s>", b"</s>"], [0.0] * 3), "ab").stop == ("ab",)


@pytest.mark.parametrize("stop, message", [
    ("", r"stop\[0\] is empty"),
    (["a", ""], r"stop\[1\] is empty"),
    ([str(i) for i in range(MAX_STOP + 1)], f"stop may hold at most {MAX_STOP}"),
    (["a", 3], r"stop\[1\] must be a string, got int"),
    (5, "stop must be a string or a list of strings, got int"),
])
def test_normalize_stop_rejects(stop: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_stop(stop)  # type: ignore[arg-type]
    if not isinstance(stop, int):
        with pytest.raises(ValueError, match=message):
            TextStream(SpmTokenizer([b"<unk>", b"<s>", b"</s>"], [0.0] * 3), stop)  # type: ignore
