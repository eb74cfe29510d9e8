"""Measure the exported model with tiller's own engine (not torch): held-out perplexity, greedy
samples, and whether chat replies have the animal and mood the user asked for.

    python train/evaluate.py [--model tiller/models/tiller-tiny.gguf] [--seeds 50]

The chat test renders each request with the model's chat template (tiller's ChatTemplate),
tokenizes it as the server does (special tokens parsed: each text fragment between the ChatML
markers gets its own dummy prefix), samples at temperature 0.8 with seeds 0..N-1, stops at
<|im_end|> or EOS, and counts words (train/corpus.py's constants). "restated": the reply's
first paragraph restates the requested mood ("Here is a sad story about a dog."). The other
columns count the story without that paragraph: "both" is the share naming the animal and
using a word of the requested mood; "clean" also has no word of the other mood.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np
from corpus import ANIMALS, IM_END, MOOD_WORDS, MOODS, PLURALS, REQUESTS
from paths import BUILD, OUT
from tiller_api import (
    ChatTemplate,
    Engine,
    Sampler,
    SamplingParams,
    SeqRequest,
    Tokenizer,
    load_checkpoint,
    load_tokenizer,
)
from tokenizer import BOS_ID

CHAT_TEMPERATURE = 0.8
MAX_NEW_TOKENS = 300


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def split_reply(reply: str) -> tuple[str, str]:
    """(restatement, story): a first paragraph restating the request ("Here is a sad story
    about a dog.") is kept apart, since it only copies the request; the story has to keep to it.
    """
    head, sep, rest = reply.partition("\n\n")
    return (head, rest) if sep and "story about" in head else ("", reply)


def chat_prompt(template: ChatTemplate, tok: Tokenizer, request: str) -> list[int]:
    text = template.render([{"role": "user", "content": request}], add_generation_prompt=True)
    # NOTE: as server/prepare.py's chat_prompt (and llama.cpp) tokenize a rendered chat
    return tok.encode(text, bos=True, special=True)


def generate_batch(engine: Engine, prompts: list[list[int]], params: list[SamplingParams],
                   stop: frozenset[int], max_new: int) -> list[list[int]]:
    """Sample every prompt to a stop token or max_new tokens, decoding all of them in one
    batched step per token (prompts are prefilled one by one)."""
    seqs = [engine.new_sequence() for _ in prompts]
    samplers = [Sampler(p, ids) for p, ids in zip(params, prompts, strict=True)]
    out: list[list[int]] = [[] for _ in prompts]
    try:
        logits = [engine.step([SeqRequest(s, ids)])[0].logits for s, ids in
                  zip(seqs, prompts, strict=True)]
        live = list(range(len(prompts)))
        for _ in range(max_new):
            nxt = []
            for i in live:
                token = samplers[i].sample(logits[i])
                samplers[i].accept(token)
                if token not in stop:
                    out[i].append(token)
                    if seqs[i].length + 1 < engine.config.max_seq_len:
                        nxt.append(i)
            live = nxt
            if not live:
                break
            results = engine.step([SeqRequest(seqs[i], [out[i][-1]]) for i in live])
            for i, r in zip(live, results, strict=True):
                logits[i] = r.logits
    finally:
        for s in seqs:
            engine.release(s)
    return out


def attribute_table(engine: Engine, tok: Tokenizer, template: ChatTemplate, stop: frozenset[int],
                    n_seeds: int) -> list[tuple[str, ...]]:
    """(animal, mood, and the shares: restated, animal, mood, both, clean) per animal x mood;
    all but "restated" are counted in the story, without its restating first paragraph."""
    rows = []
    phrasings = REQUESTS[("animal", "mood")]
    for animal in ANIMALS:
        for mood in MOODS:
            other = next(m for m in MOODS if m != mood)
            prompts = [chat_prompt(template, tok, phrasings[s % len(phrasings)].format(
                animal=animal, mood=mood)) for s in range(n_seeds)]
            params = [SamplingParams(temperature=CHAT_TEMPERATURE, seed=s) for s in range(n_seeds)]
            parts = [split_reply(tok.decode(ids)) for ids in
                     generate_batch(engine, prompts, params, stop, MAX_NEW_TOKENS)]
            restated = [mood in words(head) for head, _ in parts]
            replies = [words(story) for _, story in parts]
            has_animal = [bool({animal, PLURALS[animal]} & w) for w in replies]
            has_mood = [bool(set(MOOD_WORDS[mood]) & w) for w in replies]
            has_other = [bool(set(MOOD_WORDS[other]) & w) for w in replies]
            both = [a and m for a, m in zip(has_animal, has_mood, strict=True)]
            clean = [b and not o for b, o in zip(both, has_other, strict=True)]
            rows.append((animal, mood, *(float(np.mean(x)) for x in
                                         (restated, has_animal, has_mood, both, clean))))
            print(f"{animal:7s} {mood:6s} " + "  ".join(f"{v:6.0%}" for v in rows[-1][2:]),
                  flush=True)
    return rows


def perplexity(engine: Engine, stream: np.ndarray, n_docs: int) -> float:
    """Per-token perplexity of the first n_docs held-out documents, each from its BOS."""
    starts = np.flatnonzero(stream == BOS_ID)
    nll, count = 0.0, 0
    for a, b in zip(starts[:n_docs], starts[1:n_docs + 1], strict=False):
        ids = stream[a:b].tolist()
        logits = engine.forward_all(ids).logits[:-1].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll -= float((logits[np.arange(len(ids) - 1), ids[1:]] - logz).sum())
        count += len(ids) - 1
    return math.exp(nll / count)


def samples(engine: Engine, tok: Tokenizer, template: ChatTemplate, stop: frozenset[int]) -> None:
    greedy = SamplingParams(temperature=0.0)
    story = tok.encode("Once upon a time", bos=True)
    chat = ["Tell me a sad story about a dog named Max.", "Hi! Can you tell me a happy story "
            "about a girl and a rabbit?"]
    prompts = [story] + [chat_prompt(template, tok, c) for c in chat]
    for prompt, out in zip(prompts, generate_batch(engine, prompts, [greedy] * 3, stop, 300),
                           strict=True):
        print("---\n" + tok.decode(prompt) + tok.decode(out) + "\n", flush=True)
    # a follow-up question about the story just told
    first = generate_batch(engine, [prompts[1]], [greedy], stop, 300)[0]
    text = template.render([{"role": "user", "content": chat[0]},
                            {"role": "assistant", "content": tok.decode(first)},
                            {"role": "user", "content": "What animal was in the story?"}])
    answer = generate_batch(engine, [tok.encode(text, special=True)], [greedy], stop, 50)[0]
    print("--- follow-up\n... What animal was in the story? ->", tok.decode(answer), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=OUT)
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--dtype", default="q8_0", choices=("q8_0", "f32"))
    p.add_argument("--ppl-docs", type=int, default=300)
    a = p.parse_args()
    engine = Engine.load(a.model, dtype=a.dtype, kv_sequences=a.seeds, max_tokens=512)
    tok = load_tokenizer(a.model)
    source = load_checkpoint(a.model).metadata.get("tokenizer.chat_template")
    template = ChatTemplate.for_model(source, tok.piece(tok.bos_id), tok.piece(tok.eos_id))
    # NOTE: <|im_end|> (the file's eot token) ends a reply; tiller's CLI and server stop on EOS only
    stop = frozenset({tok.eos_id, *(i for i in range(tok.vocab_size) if tok.piece(i) == IM_END)})
    # the held-out documents encoded whole (as pretraining saw them), and by fragments (chats
    # as the server tokenizes them, what the chat stages learn; plain stories are the same)
    for what, name in (("whole", "heldout.npy"), ("by fragments", "heldout-fragments.npy")):
        print(f"held-out perplexity (tiller {a.dtype}, {a.ppl_docs} documents, {what}): "
              f"{perplexity(engine, np.load(BUILD / name), a.ppl_docs):.3f}", flush=True)
    samples(engine, tok, template, stop)
    print(f"\nchat attributes, {a.seeds} seeds each, temperature {CHAT_TEMPERATURE}\n"
          "(in the story, without a first paragraph restating the request)\n"
          "animal  mood    restated animal   mood   both  clean")
    rows = attribute_table(engine, tok, template, stop, a.seeds)
    print("all            " + "  ".join(f"{np.mean([r[i] for r in rows]):6.0%}"
                                        for i in range(2, 7)))


if __name__ == "__main__":
    main()
