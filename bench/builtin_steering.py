"""Steering the built-in model over HTTP: a happy/sad and a dog/cat control vector, each at a
range of scales, counted with the corpus's own word lists.

    python bench/builtin_steering.py [--seeds 256] [--scales -2,-1,0,1,2] [--layers 3]
                                     [--mood-unit 0.5] [--animal-unit 0.3] [--tokens 100]
                                     [--port N] [--json [PATH]]

Starts `tiller serve` on the built-in model (tiller-tiny, no --model) on a free loopback port
(or --port) and talks to it only through HTTP, as any client would:

1. `POST /v1/steering {"method": "mean", ...}` builds a control vector per attribute from
   contrastive prompt pairs in the corpus's style that differ only in the attribute's word
   (happy/sad: MOOD_PAIRS; dog/cat: ANIMAL_PAIRS), read at --layers (default 3, the middle of
   tiller-tiny's 6 blocks: the stream entering block 3).
2. `POST /v1/completions` "Once upon a time", --tokens new tokens at temperature 0.8 (no
   top-k/top-p/min-p, so the counts follow the model's own distribution), seeds 0..N-1, once
   per scale with `"steering": [{"vector": id, "scale": x}]`, the scales being --scales times
   the attribute's unit s (--mood-unit, --animal-unit); the N requests of a scale are sent
   at once and the server runs them as one batch (--parallel N).
3. The unsteered NLL of each steered story: `echo: true, logprobs: 0, max_tokens: 0` on the
   prompt plus the story, without steering, averaged over the story's tokens (those at or
   after the end of the prompt). The corpus is easy for the model (held-out perplexity 1.78),
   so a story that stays near the unsteered NLL reads like the corpus; broken text costs nats.

Per scale: the share of the positive words among both families' words (happy: MOOD_WORDS'
happy words among all mood words; dog: "dog(s)" among dog and cat mentions), pooled over the
stories, the mean count of each family per story, and the NLL. PASS when the share never falls
as the scale grows and ends above where it started. tests/test_builtin_steering.py runs the
same measurement (run_attribute) in process at a smaller size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
try:
    from train.corpus import MOOD_WORDS, NAMES, PLURALS
except ModuleNotFoundError:  # run as a script: bench/ is on sys.path, the checkout's root is not
    sys.path.insert(0, str(ROOT))
    from train.corpus import MOOD_WORDS, NAMES, PLURALS
from tests.live_server import free_port, healthy  # noqa: E402  (the root is on sys.path now)

PROMPT = "Once upon a time"
TEMPERATURE = 0.8
DEFAULT_SEEDS = 256
DEFAULT_TOKENS = 100
DEFAULT_LAYERS = (3,)
# NOTE: scales are multiples of a unit s per attribute, picked by a sweep at layer 3 over 64
# seeds: the same scale moves dog/cat about three times as far as happy/sad (at 1 it already
# writes "dog" a dozen times a story, NLL 3), and at 2s each share is near its end (0.9-1.0)
# with the NLL still close to the unsteered one; beyond that the stories collapse into the
# attribute's words. Steps of s are well above the noise of the shares at this many seeds
# (about +-0.05 at 64); finer steps are not (a grid of 0.1 went up and down).
# NOTE: +-1.5s, not +-1s: on the shipped model the animal vector acts past a threshold (at
# +-0.8 the dog share is within noise of the unsteered 0.55), the mood vector all the way.
# Swept again on the retrained model (64 seeds, -3s..3s): the same units hold -- at +-2s the
# shares are near their ends (mood 0.03 / 0.89, dog 0.29 / 0.89) with NLL 0.52-0.57, at +-3s
# it passes 0.6 (0.64-0.80); dog at -0.8 is still the unsteered share (0.48 against 0.49)
DEFAULT_SCALES = (-2.0, -1.5, 0.0, 1.5, 2.0)
DEFAULT_UNITS = {"mood": 0.5, "animal": 0.8}  # a sweep on the shipped model: 2s keeps NLL < 0.6
START_TIMEOUT = 180.0  # the first start of a checkout compiles the kernels (numba)

# NOTE: every prompt ends on the word that differs: the "mean" method reads the last token's
# state, and at a sentence's full stop the model has already moved on from the mood (prompts
# ending in "." gave a vector that barely moved the happy share at any scale below breaking)
_PEOPLE = [(NAMES["boy"][0], "He"), (NAMES["girl"][0], "She"), (NAMES["boy"][1], "He"),
           (NAMES["girl"][1], "She")]
_MOOD_TEMPLATES = [  # (happy, sad): the corpus's own phrasings, cut after the mood word
    ("{name} was very happy", "{name} was very sad"),
    ("At the end of the day, {name} was happy", "At the end of the day, {name} was sad"),
    ("{name} smiled", "{name} cried"),
    ("{name} felt glad", "{name} felt lonely"),
    ("{he} laughed", "{he} cried"),
    ("It was a day full of joy", "It was a day full of tears"),
    ("{name} was so glad", "{name} was so upset"),
    ("{name} and the dog were happy", "{name} and the dog were sad"),
]
_ANIMAL_TEMPLATES = [  # filled with dog, then cat
    "At the park, {he_low} saw a little {animal}",
    "{name} had a pet {animal}",
    "There, {name} met a fluffy {animal}",
    "{name} saw a {animal}",
    "Near a tree, {he_low} found a small {animal}",
    "Suddenly, a funny {animal}",
    "{name} gave the {animal}",
    "Spot the {animal}",
]
MOOD_PAIRS = [(p.format(name=n, he=h), q.format(name=n, he=h))
              for p, q in _MOOD_TEMPLATES for n, h in _PEOPLE]
ANIMAL_PAIRS = [tuple(t.format(name=n, he_low=h.lower(), animal=a) for a in ("dog", "cat"))
                for t in _ANIMAL_TEMPLATES for n, h in _PEOPLE]


@dataclass(frozen=True)
class Attribute:
    name: str  # "mood"
    positive: str  # the direction of positive scales: "happy"
    negative: str
    pairs: Sequence[tuple[str, ...]]  # (positive prompt, negative prompt)
    positive_words: frozenset[str]
    negative_words: frozenset[str]


MOOD = Attribute("mood", "happy", "sad", MOOD_PAIRS, frozenset(MOOD_WORDS["happy"]),
                 frozenset(MOOD_WORDS["sad"]))
ANIMAL = Attribute("animal", "dog", "cat", ANIMAL_PAIRS, frozenset({"dog", PLURALS["dog"]}),
                   frozenset({"cat", PLURALS["cat"]}))
ATTRIBUTES = (MOOD, ANIMAL)


@dataclass
class Row:
    scale: float
    stories: int
    positive: int  # words of the positive family in all the stories
    negative: int
    share: float  # positive / (positive + negative); NaN when neither occurs
    nll: float  # unsteered NLL per story token, pooled over the stories (nats)
    tokens: float  # mean story length (tokens, as the NLL pass tokenized it)
    snippet: str  # seed 0's story

    @property
    def per_story(self) -> tuple[float, float]:
        return self.positive / self.stories, self.negative / self.stories


# -----------------------------------------------------------------------------------------------
# measurement, through any client that can POST JSON (a live server or aiohttp's test client)

Post = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


def session_post(session: Any) -> Post:
    """A Post over an aiohttp ClientSession (with base_url) or TestClient: raises on non-200."""
    async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await session.post(path, json=body)
        payload: dict[str, Any] = await response.json()
        if response.status != 200:
            raise RuntimeError(f"POST {path} -> {response.status}: {payload}")
        return payload
    return post


async def create_vector(post: Post, attribute: Attribute, layers: Sequence[int]) -> str:
    body = {"method": "mean", "positive": [p for p, _ in attribute.pairs],
            "negative": [n for _, n in attribute.pairs], "layers": list(layers)}
    return str((await post("/v1/steering", body))["id"])


async def generate(post: Post, vector: str, scale: float, seeds: Sequence[int],
                   tokens: int) -> list[str]:
    """The stories after PROMPT, one per seed, every request in flight at once."""
    async def one(seed: int) -> str:
        body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": tokens,
                                "temperature": TEMPERATURE, "top_k": 0, "top_p": 1.0,
                                "min_p": 0.0, "seed": seed}
        if scale:  # scale 0 is the plain model, not a zero vector
            body["steering"] = [{"vector": vector, "scale": scale}]
        return str((await post("/v1/completions", body))["choices"][0]["text"])
    return list(await asyncio.gather(*(one(s) for s in seeds)))


async def unsteered_nll(post: Post, story: str) -> tuple[float, int]:
    """(summed NLL, tokens) of the story's tokens given PROMPT, under the unsteered model."""
    body = {"prompt": PROMPT + story, "max_tokens": 0, "echo": True, "logprobs": 0}
    logprobs = (await post("/v1/completions", body))["choices"][0]["logprobs"]
    # NOTE: the text is tokenized afresh, so a token may straddle the prompt's end; it counts
    # with the story, which is where its last character is
    picked = [lp for lp, start, tok in zip(logprobs["token_logprobs"], logprobs["text_offset"],
                                          logprobs["tokens"], strict=True)
              if lp is not None and start + len(tok) > len(PROMPT)]
    return -sum(picked), len(picked)


def count(words: frozenset[str], text: str) -> int:
    return sum(w in words for w in re.findall(r"[a-z]+", text.lower()))


async def measure(post: Post, attribute: Attribute, vector: str, scale: float,
                  seeds: Sequence[int], tokens: int) -> Row:
    stories = await generate(post, vector, scale, seeds, tokens)
    nll = await asyncio.gather(*(unsteered_nll(post, s) for s in stories))
    pos = sum(count(attribute.positive_words, s) for s in stories)
    neg = sum(count(attribute.negative_words, s) for s in stories)
    n_tokens = sum(n for _, n in nll)
    return Row(scale=scale, stories=len(stories), positive=pos, negative=neg,
               share=pos / (pos + neg) if pos + neg else math.nan,
               nll=sum(x for x, _ in nll) / max(n_tokens, 1), tokens=n_tokens / len(stories),
               snippet=stories[0])


async def run_attribute(post: Post, attribute: Attribute, layers: Sequence[int],
                        scales: Sequence[float], seeds: Sequence[int],
                        tokens: int) -> list[Row]:
    """One Row per scale (in increasing order), the same seeds at each."""
    vector = await create_vector(post, attribute, layers)
    return [await measure(post, attribute, vector, s, seeds, tokens) for s in sorted(scales)]


def monotone(rows: Sequence[Row]) -> bool:
    """The share never falls as the scale grows, and ends above where it started."""
    shares = [r.share for r in rows]
    return (not any(math.isnan(s) for s in shares) and shares[-1] > shares[0]
            and all(b >= a for a, b in zip(shares, shares[1:], strict=False)))


# -----------------------------------------------------------------------------------------------
# report


def _snippet(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def format_table(attribute: Attribute, rows: Sequence[Row], width: int = 70) -> list[str]:
    pos, neg = attribute.positive, attribute.negative
    lines = [f"{'scale':>6} | {'stories':>7} | {pos + ' share':>11} | {pos + '/story':>10} | "
             f"{neg + '/story':>10} | {'nll/tok':>7} | {'tokens':>6} | example (seed 0)"]
    for r in rows:
        p, n = r.per_story
        lines.append(f"{r.scale:>6g} | {r.stories:>7} | {r.share:>11.3f} | {p:>10.2f} | "
                     f"{n:>10.2f} | {r.nll:>7.3f} | {r.tokens:>6.1f} | "
                     f"{_snippet(r.snippet, width)}")
    return lines


def verdict(attribute: Attribute, rows: Sequence[Row]) -> str:
    shares = " -> ".join(f"{r.share:.3f}" for r in rows)
    scales = " -> ".join(f"{r.scale:g}" for r in rows)
    word = "PASS" if monotone(rows) else "FAIL"
    return (f"{word}: {attribute.positive} share over scales {scales}: {shares} "
            "(non-decreasing, last above first)")


# -----------------------------------------------------------------------------------------------
# the server


def start_server(port: int, parallel: int, queue: int, log_path: Path, steering_dir: Path
                 ) -> subprocess.Popen[bytes]:
    """`tiller serve` on the built-in model; returns once GET /health is 200."""
    url = f"http://127.0.0.1:{port}"
    # NOTE: --parallel holds a whole scale's requests in one batch; its KV cache only needs
    # prompt + story + the NLL pass's BOS per sequence, not the 512-token context
    cmd = [sys.executable, "-m", "tiller", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(parallel), "--ctx-size", str(parallel * 256),
           "--max-queue", str(queue), "--steering-dir", str(steering_dir)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=ROOT,
                                env=os.environ | {"PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + START_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        if healthy(url):
            return proc
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"tiller serve did not become healthy (exit {proc.returncode}); log:\n"
                       + log_path.read_text(errors="replace")[-4000:])


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -----------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help="stories per scale (seeds 0..N-1)")
    p.add_argument("--scales", default=",".join(f"{s:g}" for s in DEFAULT_SCALES),
                   help="comma-separated multiples of each attribute's unit (at least 2; 0 is "
                        "the unsteered model)")
    for name, unit in DEFAULT_UNITS.items():
        p.add_argument(f"--{name}-unit", type=float, default=unit,
                       help=f"the {name} vector's unit scale s (default {unit:g})")
    p.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)),
                   help="layers the vectors are read at and added to (tiller's numbering)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="new tokens per story")
    p.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    p.add_argument("--json", nargs="?", const="builtin_steering.json", default=None,
                   metavar="PATH")
    args = p.parse_args(argv)
    try:
        args.scales = sorted({float(s) for s in args.scales.split(",") if s.strip()})
        args.layers = [int(s) for s in args.layers.split(",") if s.strip()]
    except ValueError as e:
        p.error(str(e))
    if len(args.scales) < 2 or not args.layers:
        p.error("give at least two scales and one layer")
    if args.seeds < 1 or args.tokens < 1:
        p.error("--seeds and --tokens must be at least 1")
    return args


async def run(url: str, args: argparse.Namespace) -> dict[str, list[Row]]:
    results = {}
    async with aiohttp.ClientSession(base_url=url,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        post = session_post(session)
        for attribute in ATTRIBUTES:
            t0 = time.perf_counter()
            unit = getattr(args, f"{attribute.name}_unit")
            rows = await run_attribute(post, attribute, args.layers,
                                       [m * unit for m in args.scales], range(args.seeds),
                                       args.tokens)
            print(f"\n## {attribute.positive} vs {attribute.negative}: mean of "
                  f"{len(attribute.pairs)} pairs (e.g. {attribute.pairs[0][0]!r} / "
                  f"{attribute.pairs[0][1]!r}) at layers {args.layers}, s = {unit:g}, scales "
                  f"{', '.join(f'{m:g}s' for m in args.scales)} "
                  f"({time.perf_counter() - t0:.1f}s)")
            for line in format_table(attribute, rows):
                print(line)
            print(verdict(attribute, rows), flush=True)
            results[attribute.name] = rows
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = args.port or free_port()
    print(f"tiller-tiny (built-in) over HTTP on 127.0.0.1:{port}; prompt {PROMPT!r}, "
          f"{args.seeds} seeds per scale, {args.tokens} new tokens, temperature {TEMPERATURE:g} "
          "(no top-k/p), each scale's requests sent at once; nll/tok = the unsteered model's "
          "NLL of the story (nats per token, echo + logprobs)")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="builtin-steering-") as tmp:
        log = Path(tmp) / "serve.log"
        proc = start_server(port, parallel=min(args.seeds, 128), queue=max(args.seeds, 64),
                            log_path=log, steering_dir=Path(tmp) / "steering")
        try:
            results = asyncio.run(run(f"http://127.0.0.1:{port}", args))
        finally:
            stop_server(proc)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"prompt": PROMPT, "seeds": args.seeds, "tokens": args.tokens,
             "temperature": TEMPERATURE, "layers": args.layers,
             "units": {a.name: getattr(args, f"{a.name}_unit") for a in ATTRIBUTES},
             "attributes": {k: {"pass": monotone(v), "rows": [asdict(r) for r in v]}
                            for k, v in results.items()}}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(monotone(rows) for rows in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
