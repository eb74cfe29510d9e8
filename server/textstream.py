"""From generated token ids to the text a client sees: streaming detokenization with stop strings.

`TextStream` sits on `engine.tokenizer.StreamDecoder` (which already holds back incomplete
UTF-8 and applies the leading-space rule) and adds stop strings with OpenAI semantics: the
completion ends just before the first stop string, and nothing of the stop string, nor anything
after it, is ever sent. Text that could still become a stop string is held back until it either
completes (then it is dropped) or is ruled out (then it is released); `finish()` releases a
prefix that never completed, as OpenAI does when generation ends for another reason.

Which stop string wins (the llama.cpp server's rule, `find_stopping_strings` in
tools/server/server.cpp): after each token, among the stop strings that occur completely in the
text not yet sent, the one that *starts* earliest wins; for equal starts the one listed first.
Matching is checked once per token, so when a single token completes two stop strings the
earlier-starting one wins even if it ends later: with stop=["c", "abcd"], the tokens "ab", "c",
"d" stop at "c" (text "ab"), while one token "abcd" stops at "abcd" (text ""). vLLM instead
takes the first stop string *in list order* that occurs in the new text, which lets a later
match win over an earlier one; we prefer llama.cpp's "earliest in the text".

Cost: the stop strings are compiled into an Aho-Corasick automaton that reads each new character
once, and its state depth is exactly the length of the longest suffix of the text that is a
proper prefix of a stop string, i.e. how much to hold back. A token costs
O(len(new text) + longest stop string), whatever the length of the output.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..engine.tokenizer import StreamDecoder, Tokenizer

# NOTE: OpenAI rejects more than 4 stop strings; llama.cpp takes any number. We accept up to 16
# so that clients built for llama.cpp (chat templates often bring several end markers) keep
# working, while the per-character matching work stays bounded.
MAX_STOP = 16


def normalize_stop(stop: str | list[str] | None) -> tuple[str, ...]:
    """Validate a request's `stop` field: None, one string, or a list of up to MAX_STOP strings.

    Returns the stop strings in order without duplicates. Raises ValueError (message starting
    with "stop") for an empty string, which would match at once and end every completion empty,
    for a non-string entry, and for more than MAX_STOP entries.
    """
    if stop is None:
        return ()
    if isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list | tuple):
        stops = list(stop)
    else:
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(stops) > MAX_STOP:
        raise ValueError(f"stop may hold at most {MAX_STOP} strings, got {len(stops)}")
    for i, s in enumerate(stops):
        if not isinstance(s, str):
            raise ValueError(f"stop[{i}] must be a string, got {type(s).__name__}")
        if not s:
            raise ValueError(f"stop[{i}] is empty; stop strings must not be empty")
    return tuple(dict.fromkeys(stops))


@dataclass(frozen=True, slots=True)
class Delta:
    """What one `push()` adds to the completion."""

    text: str  # new text, safe to send now
    stopped: bool = False  # a stop string completed: generation must end
    stop_string: str | None = None  # which one (OpenAI's finish_reason "stop")


class _StopMatcher:
    """Aho-Corasick automaton over the stop strings, fed one character at a time.

    States are trie nodes, i.e. prefixes of stop strings; after reading a text the state is its
    longest suffix that is such a prefix, so `depth[state]` is how much may still grow into a
    stop string. `ends[state]` lists (stop index, length) of every stop string that is a suffix
    of the state, i.e. that has just been completed.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        goto: list[dict[str, int]] = [{}]
        depth = [0]
        own: list[list[tuple[int, int]]] = [[]]
        for index, s in enumerate(stops):
            node = 0
            for ch in s:
                child = goto[node].get(ch)
                if child is None:
                    child = len(goto)
                    goto[node][ch] = child
                    goto.append({})
                    depth.append(depth[node] + 1)
                    own.append([])
                node = child
            own[node].append((index, len(s)))

        # Failure links breadth-first, so a node's link (always shallower) is set before it.
        fail = [0] * len(goto)
        ends: list[tuple[tuple[int, int], ...]] = [()] * len(goto)
        queue = deque(goto[0].values())
        for child in queue:
            ends[child] = tuple(own[child])
        while queue:
            node = queue.popleft()
            for ch, child in goto[node].items():
                link = fail[node]
                while link and ch not in goto[link]:
                    link = fail[link]
                fail[child] = goto[link].get(ch, 0)
                ends[child] = tuple(own[child]) + ends[fail[child]]
                queue.append(child)

        self.goto = goto
        self.fail = fail
        self.depth = depth
        self.ends = ends

    def step(self, state: int, ch: str) -> int:
        # NOTE: each failure step makes the state shallower and each character deepens it by at
        # most one, so this loop is O(1) amortized per character of the whole stream.
        goto, fail = self.goto, self.fail
        while state and ch not in goto[state]:
            state = fail[state]
        return goto[state].get(ch, 0)


class TextStream:
    """Token ids in, client-visible text out: UTF-8 safe, stop strings cut out, offsets tracked.

    `push(token_id)` for every generated token, then `finish()` once generation ends for any
    reason. Concatenating every `Delta.text` and the `finish()` result gives `text`, which is
    the decoded completion cut just before the first stop string (see the module docstring for
    which one wins). Pass `at_start=True` only when there is no prompt text before the
    completion; after a prompt the first piece's leading space is part of the completion.

    `text_offset[i]` is the character offset in `text` at which token i's text starts (OpenAI's
    `logprobs.text_offset`, relative to the completion: add len(prompt) when echoing it).
    - It is fixed when the token is pushed, even if its text is held back (an incomplete UTF-8
      character, or a possible stop-string prefix): held-back text is released later at exactly
      that place. Tokens that add no text (BOS/EOS, the first bytes of a split character) get
      the offset where the next text starts; all bytes of a split character share its offset.
    - Tokens whose text starts inside the stop string, or after it in the same token, get
      `len(text)` (the end of the completion), so that offsets always index into `text` and
      never decrease. A token straddling the cut keeps its start offset: its text is partly in
      the completion.
    - While the stream runs, held-back text is not yet in `text`, so an offset may briefly exceed
      `len(text)`; after a stop or `finish()` every offset is <= len(text).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (),
                 at_start: bool = False) -> None:
        # NOTE: a bare str is a Sequence[str] of its characters; treat it as one stop string.
        self.stop = normalize_stop(stop if isinstance(stop, str) else list(stop))
        self._decoder = StreamDecoder(tokenizer, at_start=at_start)
        self._matcher = _StopMatcher(self.stop) if self.stop else None
        self._state = 0  # matcher state after all text decoded so far
        self._pending = ""  # decoded but held back: the possible start of a stop string
        self._decoded = 0  # characters decoded so far (before any cut): the next token's offset
        self._parts: list[str] = []  # emitted text, joined lazily
        self._offsets: list[int] = []
        self._stop_string: str | None = None
        self._finished = False

    # --- state ---------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def text_offset(self) -> Sequence[int]:
        """Per pushed token, the offset in `text` where its text starts (see the class doc)."""
        return self._offsets

    @property
    def stopped(self) -> bool:
        return self._stop_string is not None

    @property
    def stop_string(self) -> str | None:
        return self._stop_string

    @property
    def finished(self) -> bool:
        """True after a stop string completed or `finish()` was called: no more pushes."""
        return self._finished or self.stopped

    # --- streaming -----------------------------------------------------------------------------

    def push(self, token_id: int) -> Delta:
        """Add one generated token; returns the text that became safe to send."""
        if self.finished:
            raise RuntimeError("push() after the text stream ended "
                               f"({'stopped' if self.stopped else 'finished'})")
        new = self._decoder.feed(token_id)
        self._offsets.append(self._decoded)
        return Delta(self._advance(new), self.stopped, self._stop_string)

    def finish(self) -> str:
        """End of generation: release held-back text and any incomplete character (as U+FFFD).

        A stop-string prefix that never completed is part of the completion. Returns "" after a
        stop string (the rest was cut) and on later calls.
        """
        if self.finished:
            self._finished = True
            return ""
        self._finished = True
        # NOTE: the flushed U+FFFD goes through the matcher like any text, so a stop string
        # containing it still cuts, and `text` is always decode() cut at the first stop string.
        out = self._advance(self._decoder.flush())
        if not self.stopped and self._pending:
            out += self._pending
            self._parts.append(self._pending)
            self._pending = ""
        return out

    def _advance(self, new: str) -> str:
        """Run freshly decoded text through the stop matcher; returns what may be emitted."""
        if not new:
            return ""
        self._decoded += len(new)
        matcher = self._matcher
        if matcher is None:
            self._parts.append(new)
            return new

        # Window = held-back text + new text. Nothing before it can start a match: anything
        # that could was held back, so matches are found by reading only the new characters.
        window = self._pending + new
        state = self._state
        best: tuple[int, int] | None = None  # (start in window, stop index), smallest wins
        for end, ch in enumerate(new, len(self._pending) + 1):
            state = matcher.step(state, ch)
            for index, length in matcher.ends[state]:
                found = (end - length, index)
                if best is None or found < best:
                    best = found
        self._state = state

        if best is not None:
            cut, index = best
            out = window[:cut]
            self._stop_string = self.stop[index]
            self._pending = ""
            # Tokens that start at or after the cut point into the stop string: clamp them to
            # the end of the completion. Offsets never decrease, so only a tail can be affected.
            end_of_text = self._decoded - len(window) + cut
            offsets = self._offsets
            i = len(offsets) - 1
            while i >= 0 and offsets[i] > end_of_text:
                offsets[i] = end_of_text
                i -= 1
        else:
            keep = matcher.depth[state]
            out = window[:len(window) - keep]
            self._pending = window[len(window) - keep:]
        if out:
            self._parts.append(out)
        return out
