"""What ablation and conditional steering (CAST) do to the built-in model, over HTTP.

    python bench/interventions_effect.py [--tokens 160] [--port N] [--json [PATH]]

Starts `tiller serve` on the built-in model (tiller-tiny) on a free loopback port (or talks to
--port) and builds the happy/sad mean control vector of bench/builtin_steering.py (MOOD_PAIRS)
at every stream layer 1..6 (`POST /v1/steering`). Then:

1. Ablation. --prompts (80) stories of the training corpus's generator (train/corpus.py, seed
   0, half happy, half sad), each cut just before its last mood word (stories with at least two,
   so the mood is set by then). For each, the probability of the story's own word against its
   counterpart of the other mood (happy/sad, glad/upset, smiled/cried, joy/tears, ...) as the
   next word, from the logprobs of both continuations (echo), as P(the happy one) / (P(happy) +
   P(sad)); unsteered and with the mood direction ablated (`{"vector": id, "op": "ablate"}`:
   every layer's own direction, at every position); and with a 4-dimensional mood subspace
   ablated at layers 3..6 (16 inline `direction` entries: the top principal directions of the
   differences between happy and sad stories' states, from /v1/features on stories of another
   seed). PASS when the unsteered model follows the story (mean > 0.8 in happy stories, < 0.2
   in sad ones) and the ablated one cannot tell them apart: both means within 0.3..0.7 and less
   than 0.2 apart.
2. CAST. 80 story starts with a mood ("Once upon a time, {name} was very {mood}." and "{name}
   felt {glad|lonely} all day."), continued --tokens tokens at temperature 0.8 (seed = the
   prompt's index), unsteered and with one entry: the layer-3 mood direction added at +1 (2x
   builtin_steering's mood unit) to the generated tokens, `when` the cosine of the mean prompt
   stream at layer 3 with the same direction is below a threshold. The threshold is the
   midpoint of the two moods' mean similarities over the first 10 names' prompts (reported by
   the server with a never-firing condition), and the rest are the test set. Reported: how often
   the condition fired for sad and happy prompts, the happy share of the mood words
   (corpus MOOD_WORDS) in the continuations of each, and how many happy continuations are
   bitwise the unsteered ones. PASS when it fired for >= 90% of the sad prompts and <= 10% of
   the happy ones, the sad prompts' happy share rose by >= 0.2, and every happy prompt that did
   not fire is unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

try:
    from bench.builtin_steering import (
        MOOD,
        Post,
        count,
        create_vector,
        session_post,
        start_server,
        stop_server,
    )
except ModuleNotFoundError:  # run as a script: bench/ itself is on sys.path
    from builtin_steering import (
        MOOD,
        Post,
        count,
        create_vector,
        session_post,
        start_server,
        stop_server,
    )
from tests.live_server import free_port  # builtin_steering put the checkout's root on sys.path
from train.corpus import MOODS, NAMES, make_story

ALL_NAMES = NAMES["boy"] + NAMES["girl"]
ABLATE_TEMPLATES = ("{name} was very {mood}. At the end of the day, {name} was",
                    "{name} felt very {mood} that day. {name} was")
CAST_TEMPLATES = ("Once upon a time, {name} was very {mood}.",
                  "{name} felt {word} all day.")
CAST_WORD = {"happy": "glad", "sad": "lonely"}
CAST_SCALE = 1.0
CAST_LAYER = 3
CALIBRATION_NAMES = 10
SUBSPACE_LAYERS = (3, 4, 5, 6)
SUBSPACE_K = 4  # directions per layer: 16 entries, the most a request may have


COUNTERPART = {"happy": "sad", "sad": "happy", "glad": "upset", "upset": "glad",
               "lonely": "glad", "smiled": "cried", "laughed": "cried", "cried": "smiled",
               "joy": "tears", "tears": "joy"}


def ablation_prompts(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(story cut before its first mood word, that word, the story's mood): n corpus stories,
    half of each mood. The events before it (a pet that runs away, a game won) set the mood;
    no mood word does yet."""
    out: list[tuple[str, str, str]] = []
    rng = random.Random(seed)
    while len(out) < n:
        mood = MOODS[len(out) % 2]
        text = make_story(rng, mood=mood).text
        hits = [m for m in re.finditer(r"[A-Za-z]+", text) if m.group().lower() in COUNTERPART]
        if hits:
            first = hits[0]
            out.append((text[:first.start()].rstrip(" "), first.group(), mood))
    return out


async def next_word_share(post: Post, prompt: str, word: str, steering: list[dict] | None
                          ) -> float:
    """P(word) / (P(word) + P(its counterpart of the other mood)) as the next word."""
    async def logprob(w: str) -> float:
        body: dict[str, Any] = {"prompt": prompt + " " + w, "max_tokens": 0, "echo": True,
                                "logprobs": 0}
        if steering is not None:
            body["steering"] = steering
        lp = (await post("/v1/completions", body))["choices"][0]["logprobs"]
        # the word's tokens: those that end after the prompt
        return sum(x for x, start, tok in zip(lp["token_logprobs"], lp["text_offset"],
                                              lp["tokens"], strict=True)
                   if x is not None and start + len(tok) > len(prompt))
    own, other = await asyncio.gather(logprob(word), logprob(COUNTERPART[word.lower()]))
    return 1.0 / (1.0 + math.exp(other - own))


async def mood_subspace(post: Post, n: int) -> list[dict]:
    """Ablation entries for the top SUBSPACE_K directions, at each of SUBSPACE_LAYERS, of the
    differences between happy and sad stories' last-token states (stories of another seed than
    the measured ones, cut as they are; states from /v1/features)."""
    train = ablation_prompts(n, seed=1)
    blocks = [layer for layer in SUBSPACE_LAYERS if layer < 6]
    states = await asyncio.gather(*(post("/v1/features", {
        "input": text, "layers": blocks + [5], "points": ["resid_pre", "resid_post"],
        "positions": "last"}) for text, _, _ in train))
    happy = np.array([m == "happy" for _, _, m in train])
    entries = []
    for layer in SUBSPACE_LAYERS:
        # stream layer l < 6 is block l's resid_pre; layer 6 is the last block's resid_post
        x = np.array([np.asarray(st["data"]["resid_pre"][blocks.index(layer)][0])
                      if layer < 6 else np.asarray(st["data"]["resid_post"][-1][0])
                      for st in states])
        diffs = (x[happy][:, None, :] - x[~happy][None, :, :]).reshape(-1, x.shape[1])
        vt = np.linalg.svd(diffs, full_matrices=False)[2]
        entries += [{"direction": vt[j].tolist(), "layer": layer, "op": "ablate"}
                    for j in range(SUBSPACE_K)]
    return entries


async def ablation(post: Post, vector: str, n: int) -> dict[str, Any]:
    prompts = ablation_prompts(n)
    out: dict[str, Any] = {"prompts": len(prompts)}
    subspace = await mood_subspace(post, n)
    for label, steering in (("unsteered", None),
                            ("ablated", [{"vector": vector, "op": "ablate"}]),
                            ("subspace", subspace)):
        shares = await asyncio.gather(*(next_word_share(post, p, w, steering)
                                        for p, w, _ in prompts))
        for mood in MOODS:
            # P(a happy word): the story's own word in happy stories, its counterpart in sad
            out[f"{label}_after_{mood}"] = statistics.mean(
                s if m == "happy" else 1.0 - s
                for s, (_, _, m) in zip(shares, prompts, strict=True) if m == mood)
    a, b = out["ablated_after_happy"], out["ablated_after_sad"]
    out["pass"] = (out["unsteered_after_happy"] > 0.8 and out["unsteered_after_sad"] < 0.2
                   and min(a, b) >= 0.3 and max(a, b) <= 0.7 and abs(a - b) < 0.2)
    return out


async def complete(post: Post, prompt: str, seed: int, tokens: int,
                   steering: list[dict] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.8,
                            "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": seed}
    if steering is not None:
        body["steering"] = steering
    return dict((await post("/v1/completions", body))["choices"][0])


def cast_entry(vector: str, threshold: float, comparison: str = "less") -> list[dict]:
    return [{"vector": vector, "layers": [CAST_LAYER], "scale": CAST_SCALE,
             "positions": "generated",
             "when": {"vector": vector, "layer": CAST_LAYER, "threshold": threshold,
                      "comparison": comparison}}]


def _share(texts: list[str]) -> float:
    happy = sum(count(MOOD.positive_words, t) for t in texts)
    sad = sum(count(MOOD.negative_words, t) for t in texts)
    return happy / (happy + sad) if happy + sad else math.nan


async def cast(post: Post, vector: str, tokens: int) -> dict[str, Any]:
    prompts = [(t.format(name=n, mood=m, word=CAST_WORD[m]), m, n in
                ALL_NAMES[:CALIBRATION_NAMES]) for t in CAST_TEMPLATES for n in ALL_NAMES
               for m in ("happy", "sad")]
    # calibration: a condition that never fires reports every prompt's similarity
    never = cast_entry(vector, -1.0)
    calib = [p for p in prompts if p[2]]
    sims = await asyncio.gather(*(complete(post, p, 0, 1, never) for p, _, _ in calib))
    by_mood = {m: [c["steering_conditions"][0]["similarity"]
                   for c, (_, mood, _) in zip(sims, calib, strict=True) if mood == m]
               for m in ("happy", "sad")}
    threshold = (statistics.mean(by_mood["happy"]) + statistics.mean(by_mood["sad"])) / 2
    test = [(i, p, m) for i, (p, m, cal) in enumerate(prompts) if not cal]
    entry = cast_entry(vector, threshold)
    plain = await asyncio.gather(*(complete(post, p, i, tokens, None) for i, p, _ in test))
    steered = await asyncio.gather(*(complete(post, p, i, tokens, entry) for i, p, _ in test))
    out: dict[str, Any] = {"calibration_prompts": len(calib), "test_prompts": len(test),
                           "threshold": threshold,
                           "similarity_happy": statistics.mean(by_mood["happy"]),
                           "similarity_sad": statistics.mean(by_mood["sad"])}
    unchanged_ok = True
    for mood in ("happy", "sad"):
        rows = [(a, b) for a, b, (_, _, m) in zip(plain, steered, test, strict=True)
                if m == mood]
        fired = [b["steering_conditions"][0]["fired"] for _, b in rows]
        out[f"fired_{mood}"] = sum(fired) / len(rows)
        out[f"share_{mood}_unsteered"] = _share([a["text"] for a, _ in rows])
        out[f"share_{mood}_cast"] = _share([b["text"] for _, b in rows])
        same = [a["text"] == b["text"] for a, b in rows]
        out[f"unchanged_{mood}"] = sum(same)
        unchanged_ok &= all(s for s, f in zip(same, fired, strict=True) if not f)
    out["pass"] = (out["fired_sad"] >= 0.9 and out["fired_happy"] <= 0.1
                   and out["share_sad_cast"] - out["share_sad_unsteered"] >= 0.2
                   and unchanged_ok)
    return out


async def run(url: str, tokens: int, prompts: int) -> dict[str, Any]:
    async with aiohttp.ClientSession(base_url=url) as session:
        post = session_post(session)
        every = await create_vector(post, MOOD, list(range(1, 7)))
        layer3 = await create_vector(post, MOOD, [CAST_LAYER])
        return {"ablation": await ablation(post, every, prompts),
                "cast": await cast(post, layer3, tokens)}


def report(result: dict[str, Any]) -> None:
    a, c = result["ablation"], result["cast"]
    print(f"ablation ({a['prompts']} corpus stories cut before their first mood word): mean "
          "P(the happy word) / P(happy or sad word)")
    print(f"  {'':<10} {'happy stories':>14} {'sad stories':>12}")
    for label in ("unsteered", "ablated", "subspace"):
        print(f"  {label:<10} {a[f'{label}_after_happy']:>14.3f} "
              f"{a[f'{label}_after_sad']:>12.3f}")
    print(f"{'PASS' if a['pass'] else 'FAIL'}: ablating the mood direction makes happy and sad "
          "about equally likely")
    print("  ablated: the mean happy/sad control vector's direction at layers 1..6; subspace: "
          f"the top {SUBSPACE_K} directions of happy-minus-sad story states at layers "
          f"{', '.join(map(str, SUBSPACE_LAYERS))} (another seed's stories), ablated together")
    print(f"\nCAST ({c['test_prompts']} test prompts, threshold {c['threshold']:.3f} from "
          f"{c['calibration_prompts']}: mean similarity happy {c['similarity_happy']:.3f}, "
          f"sad {c['similarity_sad']:.3f})")
    print(f"  {'prompts':<8} {'fired':>6} {'happy share unsteered':>22} {'with CAST':>10} "
          f"{'unchanged':>10}")
    for mood in ("happy", "sad"):
        print(f"  {mood:<8} {c[f'fired_{mood}']:>6.0%} {c[f'share_{mood}_unsteered']:>22.3f} "
              f"{c[f'share_{mood}_cast']:>10.3f} {c[f'unchanged_{mood}']:>10}")
    print(f"{'PASS' if c['pass'] else 'FAIL'}: a CAST entry conditioned on sad prompts steers "
          "only those")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--tokens", type=int, default=160)
    p.add_argument("--prompts", type=int, default=80, help="stories for the ablation")
    p.add_argument("--port", type=int, default=None, help="a running server (else one starts)")
    p.add_argument("--json", nargs="?", const="interventions_effect.json", default=None,
                   metavar="PATH")
    args = p.parse_args(argv)
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        port = args.port
        if port is None:
            port = free_port()
            proc = start_server(port, 32, 512, Path(tmp) / "server.log", Path(tmp) / "steering")
        try:
            result = asyncio.run(run(f"http://127.0.0.1:{port}", args.tokens, args.prompts))
        finally:
            if proc is not None:
                stop_server(proc)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ablation"]["pass"] and result["cast"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
