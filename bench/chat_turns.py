"""The multi-turn chat scenario: what a prefix cache buys a chat client that re-sends its growing
conversation to /v1/chat/completions.

For each history length H (tokens of earlier turns) one client, alone on the server, sends:
- a one-line conversation (one short user message): the baseline TTFT;
- turn 1: a conversation of about H tokens of earlier turns plus a new question;
- turn 2: the same conversation with turn 1's answer and a further question appended.
TTFT is the time from sending the request to the first chunk whose delta carries content. With
a prefix cache, turn 2 recomputes only the answer and the new question, so its TTFT is close to
the baseline's whatever H is; without one it grows with H. Every conversation opens with a
system line naming the round and H, and the one-line message with a digest of the same, so no
measurement finds another's prefix in a cache beyond the chat template's opening.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

SENTENCES = (
    "The little dog ran across the garden to find his red ball.",
    "Mia asked her grandmother why the sky turns orange in the evening.",
    "They baked bread together and shared it with the neighbours.",
    "A small boat sailed slowly along the river under the old bridge.",
    "Tom counted the stars and fell asleep before he reached one hundred.",
    "The cat watched the rain from the window and waited for the sun.",
)
ANSWER_TOKENS = 16  # max_tokens of every turn


@dataclass
class Turn:
    ttft: float | None  # seconds; None: no content came back
    prompt_tokens: int
    text: str
    prompt_n: int | None  # timings.prompt_n: prompt tokens the server computed (None: absent)


@dataclass
class ChatRow:
    server: str
    history: int  # requested history tokens
    prompt_tokens: int  # turn 2's prompt, as the server counted it
    one_line: float
    turn1: float
    turn2: float
    turn2_computed: int | None  # turn 2's prompt tokens the server computed (not from cache)
    one_line_computed: int | None = None  # the same for the one-line conversation

    @property
    def ratio(self) -> float:
        return self.turn2 / self.one_line


def _digest(tag: str) -> str:
    """Eight hex digits naming a tag: text that differs between tags from its first token."""
    return hashlib.blake2s(tag.encode(), digest_size=4).hexdigest()


def _chatml(message: dict) -> str:
    return f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"


def history(tokens: int, count: Callable[[str], int], tag: str) -> list[dict]:
    """Earlier turns (user and assistant alternating) after a system line `tag`, of about
    `tokens` tokens as ChatML renders them (the default model's template; in a vocabulary
    without ChatML's special tokens each marker is several tokens), ending with the assistant
    (a short last answer may go a few tokens over)."""
    messages = [{"role": "system", "content": f"Conversation {tag}."}]
    total, i = count(_chatml(messages[0])), 0
    while True:
        text = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(2))
        message = {"role": "user" if i % 2 == 0 else "assistant", "content": text}
        cost = count(_chatml(message))
        if total + cost > tokens:
            break
        messages.append(message)
        total += cost
        i += 1
    if messages[-1]["role"] == "user":
        messages.append({"role": "assistant", "content": "I see."})
    return messages


async def chat_turn(session: aiohttp.ClientSession, url: str, messages: list[dict], seed: int,
                    temperature: float, top_p: float) -> Turn:
    body = {"messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": temperature,
            "top_p": top_p, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    prompt_tokens, prompt_n = 0, None
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        async for line in resp.content:
            now = time.perf_counter()
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            msg = json.loads(data)
            if "error" in msg:
                raise RuntimeError(f"{url}: {msg['error']}")
            for choice in msg.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if ttft is None:
                        ttft = now - t0
                    parts.append(content)
            if msg.get("usage"):
                prompt_tokens = msg["usage"]["prompt_tokens"]
            if isinstance(msg.get("timings"), dict) and "prompt_n" in msg["timings"]:
                prompt_n = msg["timings"]["prompt_n"]
    return Turn(ttft, prompt_tokens, "".join(parts), prompt_n)


async def chat_scenario(session: aiohttp.ClientSession, name: str, url: str,
                        histories: list[int], rounds: int, count: Callable[[str], int],
                        temperature: float, top_p: float, seed: int) -> list[ChatRow]:
    """One row per history length: medians over `rounds` of the baseline, turn 1 and turn 2.
    A round that fails (an error, no content) is reported and left out; a history whose every
    round failed has no row."""
    rows = []
    for h in histories:
        one, first, second, computed, one_computed, prompt = [], [], [], [], [], 0
        for r in range(rounds):
            try:
                base, t1, t2 = await _conversation(session, name, url, h, r, count, temperature,
                                                   top_p, seed + r)
            except (RuntimeError, aiohttp.ClientError, TimeoutError) as e:
                print(f"  chat {name} history {h} round {r} failed: {e}", flush=True)
                continue
            assert base.ttft is not None and t1.ttft is not None and t2.ttft is not None
            one.append(base.ttft)
            first.append(t1.ttft)
            second.append(t2.ttft)
            if t2.prompt_n is not None:
                computed.append(t2.prompt_n)
            if base.prompt_n is not None:
                one_computed.append(base.prompt_n)
            prompt = t2.prompt_tokens
            print(f"  chat {name} history {h} round {r}: TTFT one-line {base.ttft * 1e3:.1f} ms "
                  f"({base.prompt_tokens} prompt tokens, {base.prompt_n} computed), "
                  f"turn 1 {t1.ttft * 1e3:.1f} ms, turn 2 {t2.ttft * 1e3:.1f} ms "
                  f"({t2.prompt_tokens} prompt tokens, {t2.prompt_n} computed)", flush=True)
        if one:
            rows.append(ChatRow(name, h, prompt, statistics.median(one),
                                statistics.median(first), statistics.median(second),
                                int(statistics.median(computed)) if computed else None,
                                int(statistics.median(one_computed)) if one_computed else None))
    return rows


async def _conversation(session: aiohttp.ClientSession, name: str, url: str, h: int, r: int,
                        count: Callable[[str], int], temperature: float, top_p: float,
                        seed: int) -> tuple[Turn, Turn, Turn]:
    """The baseline, turn 1 and turn 2 of one round at history h."""
    tag = f"{name} round {r} history {h}"
    # NOTE: the one-line message opens with a digest of its tag: "Hello (<tag>)!" opened every
    # round's the same way, so each found the last one's first 10-13 tokens in the cache and
    # the baseline was itself a cache hit; now only the template's own opening is shared, as
    # between any two users' first messages
    base = await chat_turn(session, url, [{"role": "user", "content": f"{_digest(tag)}: hello!"}],
                           seed, temperature, top_p)
    messages = history(h, count, tag)
    messages.append({"role": "user", "content": "What happened next?"})
    t1 = await chat_turn(session, url, messages, seed, temperature, top_p)
    messages += [{"role": "assistant", "content": t1.text or "I do not know."},
                 {"role": "user", "content": "And then?"}]
    t2 = await chat_turn(session, url, messages, seed, temperature, top_p)
    for turn, what in ((base, "one-line"), (t1, "turn 1"), (t2, "turn 2")):
        if turn.ttft is None:
            raise RuntimeError(f"the {what} request sent no content")
    return base, t1, t2


def format_chat(rows: list[ChatRow]) -> list[str]:
    """The scenario's table: per server and history, TTFTs and turn 2 / one-line."""
    out = [f"{'server':>12}  {'history':>7}  {'prompt':>6}  {'one-line':>8}  {'turn 1':>8}  "
           f"{'turn 2':>8}  {'t2/one':>6}  {'t2 computed':>11}  {'one-line computed':>17}"]
    for r in rows:
        computed = "-" if r.turn2_computed is None else str(r.turn2_computed)
        one = "-" if r.one_line_computed is None else str(r.one_line_computed)
        out.append(f"{r.server:>12}  {r.history:>7}  {r.prompt_tokens:>6}  "
                   f"{r.one_line * 1e3:>6.1f}ms  {r.turn1 * 1e3:>6.1f}ms  {r.turn2 * 1e3:>6.1f}ms"
                   f"  {r.ratio:>5.2f}x  {computed:>11}  {one:>17}")
    return out
