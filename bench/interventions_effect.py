"""What ablation and conditional steering (CAST) do to the built-in model, over HTTP.

    python bench/interventions_effect.py [--prompts 60] [--calibration 60] [--tokens 120]
                                         [--port N] [--json [PATH]]

Starts `tiller serve` on the built-in model (tiller-tiny) on a free loopback port (or talks to
--port). Every number comes from the server's answers (logprobs, `/v1/features` states,
`steering_conditions`); directions and thresholds are fitted in numpy on a calibration set of
other seeds than the measured (held-out) prompts.

1. Ablation, where the model prefers a mood from a nearby cue. A corpus story (train/corpus.py,
   half happy, half sad: the events and mood words the story tells) without its closing
   sentence, then the corpus's own closing template cut before the word it chooses:
   "... At the end of the day, {name} was very" -> " happy" or " sad". Measured: P(happy) /
   (P(happy) + P(sad)) as the next word (echo logprobs of both), per story kind, with a
   bootstrap 95% interval.
   The reference for "no mood": mood-free stories (make_story(neutral=True): the same beats,
   the animal's doings in place of the mood's events, no mood word) + the same closing, read by
   the unsteered model (held-out seed). Its share is what removing the mood should leave.
   Ways of removing it, all fitted on calibration stories (other seeds than the measured ones)
   and sent as inline `direction` entries at stream layers 1..6, every position:
   - bench/builtin_steering.py's mood vector, `ablate`d;
   - "1 dir": per layer the difference of the mean states of happy and sad calibration stories
     at the word's position (/v1/features, unsteered stream), set to 0 (`ablate`), or
     `clamp`ed to the component's mean over the (balanced) calibration stories, or over
     mood-free calibration stories (mean ablation to a neutral reference, as in LEACE);
   - "2 dirs": a subspace per layer, fitted layer by layer on the stream the earlier layers'
     ops leave (a block re-derives mood from the story's tokens, so a direction fitted on the
     unsteered stream misses what it writes): the class-mean difference at the word's
     position, then the top principal direction of the class-mean differences at the PROBE's
     tokens, orthonormal; set to 0, or clamped to the mood-free means (a separate fit each,
     since each fit reads the stream its own ops leave). 2 per layer: a request takes 16
     entries. Orthonormal ops one after another are the projection onto the subspace.
   - "1 dir at the word": fitted the same way (k = 1), clamped to the mood-free mean at the
     prompt's last token only (`positions` [T-1, T) per request), where the word is read and
     where the mood-free mean was taken: the ops above impose that one value at every position.
   After each: the share on the mood-free stories with the same op (a neutral op leaves the
   reference where it is); a difference-of-means probe refitted on the ablated calibration
   states, scored on the ablated held-out ones (at layer 6, what the classifier reads, the op
   is applied here in numpy: /v1/features captures the last block's output before it);
   |component - target| at layers 1..5; the larger distance of the two kinds' means from the
   reference.
   PASS (the issue's wording) for a row when the unsteered model prefers the story's mood
   (mean > 0.8 in happy stories, < 0.2 in sad ones) and the ablated one does not: both kinds'
   means within 0.3..0.7 ("about equally likely") and < 0.2 apart.
2. CAST, on chat requests whose mood the model does carry: "Tell me a sad story about a dog."
   and the other mood-naming requests of the chat corpus (train/corpus.py REQUESTS), sent to
   /v1/chat/completions (see answer(); /v1/features reads the same prompt ids, chat_ids()). The
   condition vector at stream layer l is the mean over the prompt's positions of the stream (as
   the server's prompt condition reads it), averaged over sad calibration requests minus the
   same over happy ones; the layer is the one whose cosines separate the calibration kinds best
   (d'), the threshold the midpoint of the kinds' mean cosines there. The entry adds
   bench/builtin_steering.py's mood vector at CAST_STEER_LAYERS, scale CAST_SCALE, to the
   generated tokens `when` the prompt's cosine is above the threshold ("greater": sad). Held-out
   requests (>= --prompts of each kind, none in the calibration set) are answered --tokens
   tokens at temperature 0.8 (seed = index), unsteered and with the entry. Reported: fired share
   per kind, the happy share of the corpus's mood words in the answers, and how many answers are
   bitwise the unsteered ones; the server's similarities are checked against the cosine computed
   here from /v1/features. PASS when it fired on >= 90% of the sad requests and <= 10% of the
   happy ones, the sad answers' happy share rose (its bootstrap 95% interval over requests above
   0), every answer whose condition did not fire is unchanged, and the server's similarity is
   the numpy cosine (within 1e-3).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
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
from tiller.engine.loader import load_tokenizer

from tests.live_server import free_port  # builtin_steering put the checkout's root on sys.path
from tiller import BUILTIN_MODEL
from train.corpus import (
    ANIMAL_NAMES,
    ANIMALS,
    GENDERS,
    MOODS,
    NAMES,
    PLACES,
    PLURALS,
    REQUESTS,
    make_story,
)

N_LAYERS = 6  # tiller-tiny's blocks; stream layer l < 6 is block l's resid_pre, 6 the output
STREAM = tuple(range(1, N_LAYERS + 1))  # layer 0 is the token embedding: the same token here
PROBE = " At the end of the day, {name} was very"  # a corpus closing, cut before the mood word
# NOTE: a chat answer restates the request's mood ("Here is a sad story about a dog.") and
# keeps to it: builtin_steering's layer-3 vector at its 2-unit scale (1.0) leaves sad answers
# sad (happy share 0.00 -> 0.00 on 12 requests, the retrained model; the previous one 0.02), at
# every block input 1..5 scale 0.5 moves them (0.22; 0.31) with the text still the corpus's,
# 0.75 there already garbles it (0.80) and 1.0 breaks it into pieces of words
CAST_SCALE = 0.5
CAST_STEER_LAYERS = (1, 2, 3, 4, 5)
CALIBRATION_SEED, TEST_SEED = 1, 2
NEUTRAL_CALIBRATION_SEED, NEUTRAL_TEST_SEED = 3, 4  # mood-free stories
BOOTSTRAP = 2000
SUFFIX = 10  # PROBE's tokens (each name is one): where the subspace's differences are read
# NOTE: a request takes at most 16 steering entries (server/protocol.py), one per direction
# and layer: 2 directions at each of the 6 layers
SUBSPACE_K = 2


# prompts ---------------------------------------------------------------------------------------


def probe_prompts(n_per_mood: int, seed: int) -> list[tuple[str, str]]:
    """(story without its closing sentence + PROBE, the story's mood), alternating moods."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    while len(out) < 2 * n_per_mood:
        mood = MOODS[len(out) % 2]
        story = make_story(rng, mood=mood)
        # the closing sentence is the last one (after the last ". " or paragraph break)
        body = story.text[:max(story.text.rfind(". "), story.text.rfind("\n")) + 1]
        out.append((body + PROBE.format(name=story.name), mood))
    return out


def chat_requests(n_per_mood: int, seed: int, exclude: frozenset[str] = frozenset()
                  ) -> list[tuple[str, str]]:
    """(a user request naming a mood, in the chat corpus's phrasings, that mood): sad first,
    then happy, alternating; distinct and not in `exclude`."""
    rng = random.Random(seed)
    keys = [k for k in REQUESTS if "mood" in k]
    out: list[tuple[str, str]] = []
    seen = set(exclude)
    while len(out) < 2 * n_per_mood:
        mood = ("sad", "happy")[len(out) % 2]
        gender = rng.choice(GENDERS)
        fields = {"mood": mood, "animal": rng.choice(ANIMALS), "pet": rng.choice(ANIMAL_NAMES),
                  "place": rng.choice(PLACES), "gender": gender,
                  "name": rng.choice(NAMES[gender])}
        text = rng.choice(REQUESTS[rng.choice(keys)]).format(
            **fields, plural=PLURALS[fields["animal"]])
        if text not in seen:
            seen.add(text)
            out.append((text, mood))
    return out


# statistics ------------------------------------------------------------------------------------


def mean_ci(x: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean and its bootstrap 95% interval."""
    a = np.asarray(x, np.float64)
    boot = np.random.default_rng(seed).choice(a, (BOOTSTRAP, len(a))).mean(axis=1)
    return float(a.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def diff_ci(x: Sequence[float], y: Sequence[float], seed: int = 0
            ) -> tuple[float, float, float]:
    """mean(x) - mean(y) and its bootstrap 95% interval (each resampled on its own)."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rng = np.random.default_rng(seed)
    boot = (rng.choice(a, (BOOTSTRAP, len(a))).mean(axis=1)
            - rng.choice(b, (BOOTSTRAP, len(b))).mean(axis=1))
    return float(a.mean() - b.mean()), float(np.quantile(boot, 0.025)), float(
        np.quantile(boot, 0.975))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def probe_accuracy(cal: np.ndarray, cal_y: np.ndarray, test: np.ndarray, test_y: np.ndarray
                   ) -> float:
    """A difference-of-means probe fitted on (cal, cal_y), its accuracy on (test, test_y)."""
    d = cal[cal_y].mean(axis=0) - cal[~cal_y].mean(axis=0)
    proj = cal @ d
    threshold = (proj[cal_y].mean() + proj[~cal_y].mean()) / 2
    return float(((test @ d > threshold) == test_y).mean())


# server calls ----------------------------------------------------------------------------------


async def stream_states(post: Post, texts: Sequence[str | list[int]],
                        positions: str | list[int], steering: list[dict] | None = None,
                        per_text: Sequence[list[dict] | None] | None = None
                        ) -> list[np.ndarray]:
    """Per text, the stream at layers 0..6 at `positions` ("last", "all" or indices, negative
    from the end): (7, T, dim). `per_text`: each text's own steering, instead of `steering`."""
    blocks = list(range(N_LAYERS))
    body: dict[str, Any] = {"layers": blocks, "points": ["resid_pre", "resid_post"],
                            "positions": positions}
    steerings = per_text if per_text is not None else [steering] * len(texts)

    async def one(text: str | list[int], entries: list[dict] | None) -> np.ndarray:
        request = {**body, "input": text}
        if entries is not None:
            request["steering"] = entries
        data = (await post("/v1/features", request))["data"]
        pre = np.asarray(data["resid_pre"], np.float64)  # (blocks, T, dim)
        post_last = np.asarray(data["resid_post"][-1], np.float64)[None]
        return np.concatenate([pre, post_last])
    return list(await asyncio.gather(*(one(t, e) for t, e in zip(texts, steerings,
                                                                 strict=True))))


async def token_counts(post: Post, texts: Sequence[str]) -> list[int]:
    """How many tokens the server makes of each text (with BOS): positions are absolute."""
    async def one(text: str) -> int:
        body = {"input": text, "layers": [0], "positions": "last"}
        return len((await post("/v1/features", body))["tokens"])
    return list(await asyncio.gather(*(one(t) for t in texts)))


async def next_word_logprob(post: Post, prompt: str, word: str, steering: list[dict] | None
                            ) -> float:
    """log P(word's tokens | prompt), from echo logprobs."""
    body: dict[str, Any] = {"prompt": prompt + word, "max_tokens": 0, "echo": True,
                            "logprobs": 0}
    if steering is not None:
        body["steering"] = steering
    lp = (await post("/v1/completions", body))["choices"][0]["logprobs"]
    return sum(x for x, start, tok in zip(lp["token_logprobs"], lp["text_offset"], lp["tokens"],
                                          strict=True)
               if x is not None and start + len(tok) > len(prompt))


async def p_happy(post: Post, prompt: str, steering: list[dict] | None) -> tuple[float, float]:
    """(P(" happy") / (P(" happy") + P(" sad")), P(" happy") + P(" sad")) as the next word."""
    h, s = await asyncio.gather(next_word_logprob(post, prompt, " happy", steering),
                                next_word_logprob(post, prompt, " sad", steering))
    return 1.0 / (1.0 + math.exp(s - h)), math.exp(h) + math.exp(s)


# 1. ablation -----------------------------------------------------------------------------------


def neutral_prompts(n: int, seed: int) -> list[str]:
    """Mood-free stories (train/corpus.py make_story(neutral=True): the same beats without a
    mood's events, words or closing) + PROBE: what the model says when no mood is set."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        story = make_story(rng, neutral=True)
        out.append(story.text + PROBE.format(name=story.name))
    return out


@dataclass(frozen=True)
class Ablation:
    """One way of removing the mood: per stream layer, orthonormal directions (k, dim) and the
    values their components are set to (None: 0, `ablate`; else `clamp`), sent as inline
    `direction` entries in row order (ops on orthonormal directions one after another set the
    subspace's coordinates: the affine projection onto it), or given as `steering`. At every
    position, or with at_word only at the prompt's last token (where the word is read)."""

    directions: dict[int, np.ndarray]  # layer -> (k, dim), orthonormal rows
    values: dict[int, np.ndarray] | None = None  # layer -> (k,); None: ablate (0)
    steering: list[dict] | None = None  # else built from the above
    energy: dict[int, float] | None = None  # fit_subspace's
    at_word: bool = False

    def entries(self, n_tokens: int | None = None) -> list[dict]:
        """The steering entries for a prompt of n_tokens (needed with at_word)."""
        if self.steering is not None:
            return self.steering
        out = []
        for layer, rows in self.directions.items():
            for d, value in zip(rows, self.target(layer), strict=True):
                e: dict[str, Any] = {"direction": d.tolist(), "layer": layer,
                                     "op": "ablate" if self.values is None else "clamp"}
                if self.values is not None:
                    e["value"] = float(value)
                if self.at_word:
                    assert n_tokens is not None
                    e["positions"] = [n_tokens - 1, n_tokens]
                out.append(e)
        return out

    def target(self, layer: int) -> np.ndarray:
        k = len(self.directions[layer])
        return np.zeros(k) if self.values is None else np.asarray(self.values[layer])

    def after_last_block(self, x: np.ndarray) -> np.ndarray:
        """The ops at stream layer 6 in numpy: /v1/features' resid_post of the last block is
        the stream before them (the classifier reads it after)."""
        y = x.copy()
        for d, value in zip(self.directions[N_LAYERS], self.target(N_LAYERS), strict=True):
            y += np.outer(value - y @ d, d)
        return y


async def steerings(post: Post, ab: Ablation | None, texts: Sequence[str]
                    ) -> list[list[dict] | None]:
    """Each text's steering entries for `ab` (None: unsteered)."""
    if ab is None or (not ab.directions and ab.steering is None):
        return [None] * len(texts)
    if not ab.at_word:
        return [ab.entries()] * len(texts)
    return [ab.entries(n) for n in await token_counts(post, texts)]


def mean_components(x: np.ndarray, directions: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Per layer, the mean of each direction's component over x (n, 7, dim)."""
    return {layer: (x[:, layer] @ rows.T).mean(axis=0) for layer, rows in directions.items()}


async def fit_subspace(post: Post, cal: Sequence[str], y: np.ndarray, neutral: Sequence[str],
                       k: int, clamp: bool, at_word: bool = False) -> Ablation:
    """k orthonormal mood directions per stream layer, fitted layer by layer on the stream as
    the layers before it leave it (their ops applied: a block re-derives mood from the tokens,
    so a direction fitted on the unsteered stream misses what it writes), set to 0 (ablate) or,
    with clamp, to the mean of each component on mood-free stories. The first direction is
    the class-mean difference where the word is read (the last token); the next ones the top
    principal directions of the class-mean differences at the PROBE's tokens (aligned from the
    end), orthogonalized. at_word: the ops act at the last token only.
    `energy`: per layer, the share of those differences' squared norm that the k span."""
    positions = list(range(-SUFFIX, 0))
    directions: dict[int, np.ndarray] = {}
    values: dict[int, np.ndarray] = {}
    energy: dict[int, float] = {}
    for layer in STREAM:
        so_far = Ablation(directions, values if clamp else None, at_word=at_word)
        x, xn = [await stream_states(post, texts, positions,
                                     per_text=await steerings(post, so_far, texts))
                 for texts in (cal, neutral)]
        xs, xns = np.stack(x)[:, layer], np.stack(xn)[:, layer]  # (n, SUFFIX, dim)
        diffs = xs[y].mean(axis=0) - xs[~y].mean(axis=0)  # (SUFFIX, dim)
        rows = [unit(diffs[-1])]
        for v in np.linalg.svd(diffs, full_matrices=False)[2]:
            if len(rows) == k:
                break
            v = v - sum((v @ r) * r for r in rows)
            if np.linalg.norm(v) > 1e-6:
                rows.append(unit(v))
        d = np.array(rows)
        directions[layer] = d
        values[layer] = (xns[:, -1] @ d.T).mean(axis=0)
        energy[layer] = float(np.linalg.norm(diffs @ d.T) ** 2 / np.linalg.norm(diffs) ** 2)
    return Ablation(directions, values if clamp else None, energy=energy, at_word=at_word)


def _row(share: Sequence[float], mass: Sequence[float], y: np.ndarray) -> dict[str, Any]:
    happy = [s for s, h in zip(share, y, strict=True) if h]
    sad = [s for s, h in zip(share, y, strict=True) if not h]
    return {"happy": mean_ci(happy), "sad": mean_ci(sad), "gap": diff_ci(happy, sad),
            "mass": float(np.mean(mass))}


async def ablation(post: Post, mood_vector: str, builtin: dict[int, np.ndarray],
                   n: int, n_cal: int) -> dict[str, Any]:
    cal = probe_prompts(n_cal, CALIBRATION_SEED)
    test = probe_prompts(n, TEST_SEED)
    neutral_cal = neutral_prompts(n_cal, NEUTRAL_CALIBRATION_SEED)
    neutral_test = neutral_prompts(n, NEUTRAL_TEST_SEED)
    cal_y = np.array([m == "happy" for _, m in cal])
    test_y = np.array([m == "happy" for _, m in test])
    cal_texts = [t for t, _ in cal]
    x_cal = np.stack([s[:, -1] for s in await stream_states(post, cal_texts, "last")])
    x_neutral = np.stack([s[:, -1] for s in await stream_states(post, neutral_cal, "last")])
    single = {layer: unit(x_cal[cal_y, layer].mean(0) - x_cal[~cal_y, layer].mean(0))[None]
              for layer in STREAM}
    sub_ablate, sub_clamp = [await fit_subspace(post, cal_texts, cal_y, neutral_cal, SUBSPACE_K,
                                                clamp) for clamp in (False, True)]
    at_word = await fit_subspace(post, cal_texts, cal_y, neutral_cal, 1, True, at_word=True)
    rows: dict[str, Ablation | None] = {
        "unsteered": None,
        "builtin vector, ablate": Ablation(builtin, steering=[{"vector": mood_vector,
                                                               "op": "ablate"}]),
        "1 dir, ablate (0)": Ablation(single),
        "1 dir, clamp to calibration mean": Ablation(single, mean_components(x_cal, single)),
        "1 dir, clamp to mood-free mean": Ablation(single, mean_components(x_neutral, single)),
        f"{SUBSPACE_K} dirs, ablate (0)": sub_ablate,
        f"{SUBSPACE_K} dirs, clamp to mood-free mean": sub_clamp,
        "1 dir at the word, clamp to mood-free": at_word,
    }
    out: dict[str, Any] = {"prompts_per_kind": n, "calibration_per_kind": n_cal,
                           "probe": PROBE.strip(), "subspace_k": SUBSPACE_K, "rows": {}}
    test_texts = [t for t, _ in test]
    for label, ab in rows.items():
        s_test, s_cal, s_free = [await steerings(post, ab, texts)
                                 for texts in (test_texts, cal_texts, neutral_test)]
        got = await asyncio.gather(*(p_happy(post, t, e) for t, e in zip(test_texts, s_test,
                                                                         strict=True)))
        row = _row([g[0] for g in got], [g[1] for g in got], test_y)
        # the same op on held-out mood-free stories: unsteered, the reference for "no mood"; a
        # neutral op leaves it where it is
        free = await asyncio.gather(*(p_happy(post, t, e) for t, e in zip(neutral_test, s_free,
                                                                          strict=True)))
        row["mood_free"] = mean_ci([g[0] for g in free])
        # what is left of the mood where the word is chosen: a difference-of-means probe
        # refitted on the ablated calibration states, scored on the ablated held-out ones
        xa_cal = np.stack([s[:, -1] for s in await stream_states(post, cal_texts, "last",
                                                                 per_text=s_cal)])
        xa_test = np.stack([s[:, -1] for s in await stream_states(post, test_texts, "last",
                                                                  per_text=s_test)])
        if ab is not None:
            xa_cal[:, N_LAYERS] = ab.after_last_block(xa_cal[:, N_LAYERS])
            xa_test[:, N_LAYERS] = ab.after_last_block(xa_test[:, N_LAYERS])
            # the op's own check: the components at layers 1..5 (captured after the ops) are
            # their targets
            row["component_error"] = max(
                float(np.abs(xa_test[:, layer] @ d.T - ab.target(layer)).max())
                for layer, d in ab.directions.items() if layer < N_LAYERS)
        if ab is not None and ab.energy is not None:
            row["subspace_energy"] = ab.energy
            row["directions_per_layer"] = len(ab.directions[N_LAYERS])
        row["probe_accuracy"] = {layer: probe_accuracy(xa_cal[:, layer], cal_y,
                                                       xa_test[:, layer], test_y)
                                 for layer in STREAM}
        out["rows"][label] = row
    reference = out["rows"]["unsteered"]["mood_free"][0]
    unsteered = out["rows"]["unsteered"]
    prefers = unsteered["happy"][0] > 0.8 and unsteered["sad"][0] < 0.2
    for label, row in out["rows"].items():
        if label == "unsteered":
            continue
        a, b = row["happy"][0], row["sad"][0]
        row["erased"] = abs(a - b) < 0.2
        row["equal"] = min(a, b) >= 0.3 and max(a, b) <= 0.7
        row["pass"] = prefers and row["erased"] and row["equal"]
        row["from_mood_free"] = max(abs(a - reference), abs(b - reference))
    out["unsteered_prefers"] = prefers
    out["pass"] = any(r.get("pass", False) for r in out["rows"].values())
    return out


# 2. CAST ---------------------------------------------------------------------------------------


def mood_share(texts: Sequence[str]) -> float:
    happy = sum(count(MOOD.positive_words, t) for t in texts)
    sad = sum(count(MOOD.negative_words, t) for t in texts)
    return happy / (happy + sad) if happy + sad else math.nan


async def answer(post: Post, user: str, seed: int, tokens: int, steering: list[dict] | None
                 ) -> dict[str, Any]:
    """The assistant's answer to one request, from /v1/chat/completions: the server renders
    the ChatML and tokenizes it with the markers as special tokens (each text fragment after a
    marker with its own dummy prefix), as the built-in model's chat stages were trained
    (train/tokenizer.py encode_fragments)."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": user}],
                            "max_tokens": tokens, "temperature": 0.8, "top_k": 0, "top_p": 1.0,
                            "min_p": 0.0, "seed": seed}
    if steering is not None:
        body["steering"] = steering
    out = await post("/v1/chat/completions", body)
    choice = out["choices"][0]
    return {"text": choice["message"]["content"],
            "conditions": choice.get("steering_conditions"),
            "prompt_tokens": out["usage"]["prompt_tokens"]}


async def chat_ids(post: Post, users: Sequence[str]) -> list[list[int]]:
    """Each request's prompt as /v1/chat/completions makes it, for /v1/features: the server's
    rendering (/apply-template), tokenized as server/prepare.py's chat_prompt does (BOS,
    special tokens parsed) with the built-in model's tokenizer."""
    tok = load_tokenizer(BUILTIN_MODEL)

    async def one(user: str) -> list[int]:
        text = (await post("/apply-template",
                           {"messages": [{"role": "user", "content": user}]}))["prompt"]
        return tok.encode(text, bos=True, special=True)
    return list(await asyncio.gather(*(one(u) for u in users)))


def share_rise_ci(before: Sequence[str], after: Sequence[str], seed: int = 0
                  ) -> tuple[float, float, float]:
    """The rise of the pooled happy share from `before` to `after` (the same requests' answers)
    and its bootstrap 95% interval over requests."""
    counts = np.array([[count(MOOD.positive_words, t), count(MOOD.negative_words, t)]
                       for t in (*before, *after)], np.float64).reshape(2, len(before), 2)
    def rise(idx: np.ndarray) -> np.ndarray:  # (B, n) request indices -> (B,)
        c = counts[:, idx].sum(axis=2)  # (2, B, 2)
        with np.errstate(invalid="ignore"):
            share = c[..., 0] / c.sum(axis=-1)
        return share[1] - share[0]
    n = len(before)
    boot = rise(np.random.default_rng(seed).integers(0, n, (BOOTSTRAP, n)))
    boot = boot[np.isfinite(boot)]
    return (float(rise(np.arange(n)[None])[0]), float(np.quantile(boot, 0.025)),
            float(np.quantile(boot, 0.975)))


def _cos(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (x @ v) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(v))


async def cast(post: Post, mood_vector: str, n: int, n_cal: int, tokens: int) -> dict[str, Any]:
    cal = chat_requests(n_cal, CALIBRATION_SEED)
    test = chat_requests(n, TEST_SEED, exclude=frozenset(u for u, _ in cal))
    cal_y = np.array([m == "sad" for _, m in cal])
    # the mean prompt stream per layer, as the server's prompt condition computes it
    m_cal = np.stack([s.mean(axis=1) for s in await stream_states(
        post, await chat_ids(post, [u for u, _ in cal]), "all")])  # (n, 7, dim)
    separation = {}
    for layer in range(N_LAYERS):  # the condition reads a block's input: layers 0..5
        v = m_cal[cal_y, layer].mean(0) - m_cal[~cal_y, layer].mean(0)
        c = _cos(m_cal[:, layer], v)
        spread = math.sqrt((c[cal_y].var() + c[~cal_y].var()) / 2)
        separation[layer] = float((c[cal_y].mean() - c[~cal_y].mean()) / spread)
    layer = max(separation, key=lambda k: separation[k])
    v = m_cal[cal_y, layer].mean(0) - m_cal[~cal_y, layer].mean(0)
    c = _cos(m_cal[:, layer], v)
    threshold = float((c[cal_y].mean() + c[~cal_y].mean()) / 2)
    entry = [{"vector": mood_vector, "layers": list(CAST_STEER_LAYERS), "scale": CAST_SCALE,
              "positions": "generated",
              "when": {"vector": v.tolist(), "layer": layer, "threshold": threshold,
                       "comparison": "greater"}}]
    plain = await asyncio.gather(*(answer(post, u, i, tokens, None)
                                   for i, (u, _) in enumerate(test)))
    steered = await asyncio.gather(*(answer(post, u, i, tokens, entry)
                                     for i, (u, _) in enumerate(test)))
    # the server's similarity against the cosine computed here from /v1/features, on the
    # chat route's own prompt (its length checked: a measurement error is no verdict)
    test_ids = await chat_ids(post, [u for u, _ in test])
    if [len(ids) for ids in test_ids] != [a["prompt_tokens"] for a in steered]:
        raise RuntimeError("the chat route's prompts are not the ids /v1/features was given")
    m_test = np.stack([s.mean(axis=1) for s in await stream_states(post, test_ids, "all")])
    ours = _cos(m_test[:, layer], v)
    theirs = np.array([s["conditions"][0]["similarity"] for s in steered])
    out: dict[str, Any] = {
        "prompts_per_kind": n, "calibration_per_kind": n_cal, "layer": layer,
        "separation": separation, "threshold": threshold,
        "calibration_similarity": {"sad": float(c[cal_y].mean()),
                                   "happy": float(c[~cal_y].mean())},
        "similarity_max_deviation": float(np.abs(ours - theirs).max()), "kinds": {}}
    unchanged_ok = True
    for mood in ("sad", "happy"):
        idx = [i for i, (_, m) in enumerate(test) if m == mood]
        fired = [bool(steered[i]["conditions"][0]["fired"]) for i in idx]
        same = [plain[i]["text"] == steered[i]["text"] for i in idx]
        unchanged_ok &= all(s for s, f in zip(same, fired, strict=True) if not f)
        out["kinds"][mood] = {
            "fired": sum(fired) / len(idx),
            "share_unsteered": mood_share([plain[i]["text"] for i in idx]),
            "share_cast": mood_share([steered[i]["text"] for i in idx]),
            "rise": share_rise_ci([plain[i]["text"] for i in idx],
                                  [steered[i]["text"] for i in idx]),
            "unchanged": sum(same), "fired_changed": sum(f and not s for f, s in
                                                         zip(fired, same, strict=True)),
            "example": steered[idx[0]]["text"][:200]}
    sad, happy = out["kinds"]["sad"], out["kinds"]["happy"]
    out["unfired_unchanged"] = unchanged_ok
    out["pass"] = (sad["fired"] >= 0.9 and happy["fired"] <= 0.1 and sad["rise"][1] > 0
                   and unchanged_ok and out["similarity_max_deviation"] < 1e-3)
    return out


# run and report --------------------------------------------------------------------------------


async def run(url: str, n: int, n_cal: int, tokens: int) -> dict[str, Any]:
    async with aiohttp.ClientSession(base_url=url) as session:
        post = session_post(session)
        every = await create_vector(post, MOOD, list(STREAM))
        steer = await create_vector(post, MOOD, list(CAST_STEER_LAYERS))
        # the stored vector's directions, one row per layer in order (its .npy download)
        response = await session.get(f"/v1/steering/{every}", params={"format": "npy"})
        rows = np.load(io.BytesIO(await response.read()))
        builtin = {layer: unit(r)[None] for layer, r in zip(STREAM, rows.astype(np.float64),
                                                          strict=True)}
        return {"ablation": await ablation(post, every, builtin, n, n_cal),
                "cast": await cast(post, steer, n, n_cal, tokens)}


def _ci(m: tuple[float, float, float]) -> str:
    return f"{m[0]:.3f} [{m[1]:.3f}, {m[2]:.3f}]"


def report(result: dict[str, Any]) -> None:
    a, c = result["ablation"], result["cast"]
    print(f"ablation: {a['prompts_per_kind']} held-out stories of each mood + "
          f"\"{a['probe']}\"; P(happy) / (P(happy) + P(sad)) as the next word, mean [95% CI]")
    ref = a["rows"]["unsteered"]["mood_free"]
    print(f"  mood-free stories ({a['prompts_per_kind']} held-out), unsteered: {_ci(ref)}  (what "
          "the model says when no mood is set: the reference)")
    print(f"  {'':<37} {'happy stories':>22} {'sad stories':>22} {'gap (happy - sad)':>24} "
          f"{'mass':>5} {'|-free|':>7} {'mood-free, same op':>22}  {'probe@1..6':<29} "
          f"{'err':>5}")
    for label, row in a["rows"].items():
        err = f"{row['component_error']:.0e}" if "component_error" in row else "-"
        free = f"{row['from_mood_free']:.3f}" if "from_mood_free" in row else "-"
        probes = " ".join(f"{row['probe_accuracy'][k]:.2f}" for k in STREAM)
        print(f"  {label:<37} {_ci(row['happy']):>22} {_ci(row['sad']):>22} "
              f"{row['gap'][0]:>+7.3f} [{row['gap'][1]:+.3f}, {row['gap'][2]:+.3f}] "
              f"{row['mass']:>5.2f} {free:>7} {_ci(row['mood_free']):>22}  {probes:<29} "
              f"{err:>5}")
    print("  (mass: P(happy) + P(sad); |-free|: the larger distance of the two kinds' means from "
          "the reference; mood-free, same op: the share on the mood-free stories with the row's "
          "op (a neutral op leaves the reference); probe@l: a difference-of-means probe "
          "refitted on the ablated calibration states, accuracy on the held-out ones; err: "
          "largest |component - target| at layers 1..5)")
    for label, row in a["rows"].items():
        if "subspace_energy" in row:
            energy = " ".join(f"{row['subspace_energy'][layer]:.2f}" for layer in STREAM)
            n = row["directions_per_layer"]
            print(f"  {label}: the {n} direction{'s' * (n > 1)} span{'s' * (n == 1)} this "
                  "share of the class-mean differences at the probe's tokens, layers 1..6: "
                  f"{energy}")
    for label, row in a["rows"].items():
        if label != "unsteered":
            print(f"  {label}: mood erased (gap < 0.2) {'yes' if row['erased'] else 'no'}, "
                  f"about equally likely (both 0.3..0.7) {'yes' if row['equal'] else 'no'}")
    print(f"{'PASS' if a['pass'] else 'FAIL'}: ablating the mood direction makes happy and sad "
          "about equally likely where the unsteered model prefers one")
    print(f"\nCAST: {c['prompts_per_kind']} held-out chat requests of each mood; condition at "
          f"layer {c['layer']} (best calibration d' {c['separation'][c['layer']]:.1f}), "
          f"threshold {c['threshold']:.4f} from {c['calibration_per_kind']} of each "
          f"(mean cosine sad {c['calibration_similarity']['sad']:.4f}, happy "
          f"{c['calibration_similarity']['happy']:.4f}); server vs numpy similarity "
          f"{c['similarity_max_deviation']:.1e}")
    print(f"  {'requests':<9} {'fired':>6} {'happy share unsteered':>22} {'with CAST':>10} "
          f"{'rise [95% CI]':>24} {'unchanged':>10} {'fired+changed':>14}")
    for mood, k in c["kinds"].items():
        r = k["rise"]
        print(f"  {mood:<9} {k['fired']:>6.0%} {k['share_unsteered']:>22.3f} "
              f"{k['share_cast']:>10.3f} {r[0]:>+7.3f} [{r[1]:+.3f}, {r[2]:+.3f}] "
              f"{k['unchanged']:>10} {k['fired_changed']:>14}")
    print(f"{'PASS' if c['pass'] else 'FAIL'}: a CAST entry conditioned on sad prompts steers "
          "only those")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--prompts", type=int, default=60, help="held-out prompts of each kind")
    p.add_argument("--calibration", type=int, default=60, help="calibration prompts per kind")
    p.add_argument("--tokens", type=int, default=120, help="CAST answer length")
    p.add_argument("--port", type=int, default=None, help="a running server (else one starts)")
    p.add_argument("--json", nargs="?", const="interventions_effect.json", default=None,
                   metavar="PATH")
    args = p.parse_args(argv)
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        port = args.port
        if port is None:
            port = free_port()
            proc = start_server(port, 32, 1024, Path(tmp) / "server.log", Path(tmp) / "steering")
        try:
            result = asyncio.run(run(f"http://127.0.0.1:{port}", args.prompts, args.calibration,
                                     args.tokens))
        finally:
            if proc is not None:
                stop_server(proc)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ablation"]["pass"] and result["cast"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
