"""Does steering change what stories260K writes? A dose-response table over the steering scale.

The concept is the story's protagonist: a boy (Tim, he, his) rather than a girl (Lily, she,
her). Unsteered, stories260K mostly continues "Once upon a time" with "there was a little girl
named Lily". For each scale `mul` the script samples one story per seed (the same seeds for
every mul) and reports the fraction of stories mentioning the boy family (and the girl family,
which should fall), and the stories' mean NLL per token under the unsteered model, which says
when steering starts breaking the text rather than changing its subject.

Three ways of steering, one table each:

- `control`: a control vector (engine.steering.build_control: the mean difference of a handful
  of boy/girl prompt pairs' last-token states at the layer), `mul x vector` added at every
  position of that layer, as llama.cpp's --control-vector does.
- `actadd`: ActAdd as llama.cpp's steering experiment did it (engine.steering.build_actadd),
  with a story opening as the steering prompts, the two differing only in the protagonist:
  their rows are zero over the shared prefix and non-zero from "boy"/"girl" on, and ActAdd adds
  them to the first positions of the sequence, generated ones included, which is where the
  model writes its protagonist. Read at layer 0 (token embeddings) and injected at layer 3.
- `actadd-word`: ActAdd with the one-word prompts "boy" / "girl", as the experiment is usually
  run: its rows touch only positions 1-3 (the prompt's first words), which a 5-layer model
  barely attends to afterwards, so the effect is weak and the text breaks first.

Every mul x seed of a table runs as ONE batch through `Engine.step`: each sequence has its own
Sampler (its seed) and its own steering, as the server batches requests. Batch invariance makes
that equal to running each alone, which the script checks at the end (`batch == solo`).

    python bench/steering_effect.py [--seeds 100] [--tokens 80] [--temperature 0.8]
        [--methods control,actadd,actadd-word] [--layer N] [--source N] [--muls a,b,...]
        [--scan] [--dtype q8_0|f32] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tiller.engine.engine import Engine, SeqRequest, SteeringTerm
from tiller.engine.kvcache import blocks_for
from tiller.engine.sampling import Sampler, SamplingParams
from tiller.engine.steering import actadd_term, build_actadd, build_control, control_terms
from tiller.engine.tokenizer import SpmTokenizer, Tokenizer

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
MODEL = MODELS / "stories260K.bin"
TOKENIZER = MODELS / "tok512.bin"
PROMPT = "Once upon a time"

BOY = re.compile(r"\b(boy|boys|tim|timmy|tom|he|him|his)\b")
GIRL = re.compile(r"\b(girl|girls|lily|she|her|hers)\b")
# control vector: contrastive pairs, the concept in their last tokens
CONTROL_PAIRS = [
    ("Once upon a time, there was a little boy named Tim",
     "Once upon a time, there was a little girl named Lily"),
    ("He", "She"),
    ("Tim", "Lily"),
    ("his", "her"),
]
# ActAdd: a story opening, aligned with how the model starts its stories
ACTADD_ADD = "Once upon a time, there was a little boy named Tim. He"
ACTADD_SUB = "Once upon a time, there was a little girl named Lily. She"
WORD_ADD, WORD_SUB = "boy", "girl"

METHODS = ("control", "actadd", "actadd-word")
# injection layers and ActAdd source layers: the cleanest of a scan (see bench/README.md)
DEFAULT_LAYER = {"control": 1, "actadd": 3, "actadd-word": 0}
DEFAULT_SOURCE = {"actadd": 0, "actadd-word": 0}
DEFAULT_MULS = {"control": (0, 0.0625, 0.125, 0.25, 0.5, 1, 2),
                "actadd": (0, 1, 2, 4, 8, 16, 32),
                "actadd-word": (0, 1, 2, 4, 8, 16, 32)}
STOP_IDS = frozenset({1, 2})  # llama2.c models end a story with BOS (or EOS)


# -----------------------------------------------------------------------------------------------
# generation


def generate_batch(engine: Engine, prompt: list[int], seeds: Seq[int],
                   steering: Seq[Seq[SteeringTerm]], params: SamplingParams,
                   max_new_tokens: int, stop_ids: frozenset[int] = STOP_IDS
                   ) -> list[list[int]]:
    """Sample up to max_new_tokens after `prompt` for every seed, all sequences in one batch.

    Sequence i samples with seed seeds[i] and is created with steering[i], which it keeps for
    every step (ActAdd rows only touch the positions they have rows for). A sequence leaves the
    batch at a stop id or a full context.
    """
    if len(seeds) != len(steering):
        raise ValueError(f"{len(seeds)} seeds but {len(steering)} steering lists")
    samplers = [Sampler(replace(params, seed=s), prompt) for s in seeds]
    seqs = [engine.new_sequence(steering=list(terms)) for terms in steering]
    out: list[list[int]] = [[] for _ in seeds]
    live = list(range(len(seeds)))
    try:
        requests = [SeqRequest(seqs[i], prompt) for i in live]
        while live:
            results = engine.step(requests)
            still = []
            for i, result in zip(live, results, strict=True):
                token = samplers[i].sample(result.logits)
                samplers[i].accept(token)
                if token in stop_ids:
                    continue
                out[i].append(token)
                if len(out[i]) < max_new_tokens and seqs[i].length < engine.config.max_seq_len:
                    still.append(i)
            live = still
            requests = [SeqRequest(seqs[i], [out[i][-1]]) for i in live]
    finally:
        for seq in seqs:
            engine.release(seq)
    return out


def engine_for(path: Path, n_sequences: int, prompt_len: int, max_new_tokens: int,
               dtype: str = "q8_0") -> Engine:
    """An engine whose step and KV cache hold n_sequences prompts and generations at once."""
    per_seq = 16 * blocks_for(prompt_len + max_new_tokens + 1)
    return Engine.load(path, dtype=dtype, max_tokens=max(256, n_sequences * prompt_len),
                       kv_tokens=n_sequences * per_seq)


def unsteered_nll(engine: Engine, prompt: list[int], outs: list[list[int]]) -> list[float]:
    """Mean negative log-likelihood per generated token under the unsteered model (teacher
    forced): how far steering pushed the text from what the model would write (nan if empty)."""
    nll = [float("nan")] * len(outs)
    todo = [i for i, o in enumerate(outs) if o]
    while todo:
        batch, size = [], 0
        while todo and size + len(prompt) + len(outs[todo[0]]) <= engine.max_tokens:
            batch.append(todo.pop(0))
            size += len(prompt) + len(outs[batch[-1]])
        if not batch:
            raise ValueError("a generation does not fit in one step")
        seqs = [engine.new_sequence() for _ in batch]
        try:
            results = engine.step([SeqRequest(q, prompt + outs[i], logits="all")
                                   for q, i in zip(seqs, batch, strict=True)])
        finally:
            for q in seqs:
                engine.release(q)
        for i, r in zip(batch, results, strict=True):
            logits = r.logits[len(prompt) - 1:-1].astype(np.float64)  # predicting outs[i]
            logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) \
                + logits.max(1)
            nll[i] = float(np.mean(logz - logits[np.arange(len(outs[i])), outs[i]]))
    return nll


# -----------------------------------------------------------------------------------------------
# steering and statistics


def steering_for(engine: Engine, tok: Tokenizer, method: str, layer: int,
                 source: int | None = None) -> Callable[[float], list[SteeringTerm]]:
    """mul -> the SteeringTerms of `method` at injection `layer` (ActAdd read at `source`)."""
    if method == "control":
        directions = build_control(engine, tok, [p for p, _ in CONTROL_PAIRS],
                                   [n for _, n in CONTROL_PAIRS], [layer])
        return lambda mul: control_terms(directions, mul) if mul else []
    if method in ("actadd", "actadd-word"):
        add, sub = (ACTADD_ADD, ACTADD_SUB) if method == "actadd" else (WORD_ADD, WORD_SUB)
        rows = build_actadd(engine, tok, add, sub, layer if source is None else source)
        return lambda mul: [actadd_term(rows, layer, mul)] if mul else []
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@dataclass
class Row:
    mul: float
    generations: int
    boy: float  # fraction of generations mentioning the boy family
    girl: float  # fraction mentioning the girl family
    boy_per_100_words: float
    nll: float  # mean NLL per generated token under the unsteered model (fluency; lower = fluent)
    snippet: str  # the first seed's generated text


def row_for(mul: float, texts: list[str], nll: Seq[float] = (), prompt: str = PROMPT) -> Row:
    """Statistics of the generated part of `texts` (each the prompt and what followed)."""
    lower = [t[len(prompt):].lower() for t in texts]
    words = sum(len(re.findall(r"[a-z]+", t)) for t in lower)
    return Row(mul=mul, generations=len(texts),
               boy=float(np.mean([bool(BOY.search(t)) for t in lower])),
               girl=float(np.mean([bool(GIRL.search(t)) for t in lower])),
               boy_per_100_words=100 * sum(len(BOY.findall(t)) for t in lower) / max(words, 1),
               nll=float(np.nanmean(nll)) if len(nll) else float("nan"),
               snippet=texts[0][len(prompt):])


def sweep(engine: Engine, tok: Tokenizer, terms: Callable[[float], list[SteeringTerm]],
          muls: Seq[float], seeds: Seq[int], params: SamplingParams, max_new_tokens: int,
          prompt: str = PROMPT) -> list[Row]:
    """One Row per mul, the same seeds for each; every mul x seed in one batch."""
    ids = tok.encode(prompt, bos=True)
    steering = [terms(mul) for mul in muls for _ in seeds]
    outs = generate_batch(engine, ids, [s for _ in muls for s in seeds], steering, params,
                          max_new_tokens)
    nll = unsteered_nll(engine, ids, outs)
    n = len(seeds)
    return [row_for(mul, [tok.decode([*ids, *o]) for o in outs[k * n:(k + 1) * n]],
                    nll[k * n:(k + 1) * n], prompt) for k, mul in enumerate(muls)]


def monotone_prefix(values: Seq[float]) -> int:
    """How many leading values are non-decreasing (at least 1)."""
    k = 1
    while k < len(values) and values[k] >= values[k - 1]:
        k += 1
    return k


# -----------------------------------------------------------------------------------------------
# report


def _snippet(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def format_table(rows: list[Row], width: int = 90) -> list[str]:
    lines = [f"{'mul':>6} | {'gens':>4} | {'boy':>5} | {'girl':>5} | {'boy/100w':>8} | "
             f"{'nll':>5} | example (seed 0, after the prompt)"]
    for r in rows:
        lines.append(f"{r.mul:>6g} | {r.generations:>4} | {r.boy:>5.2f} | {r.girl:>5.2f} | "
                     f"{r.boy_per_100_words:>8.1f} | {r.nll:>5.2f} | {_snippet(r.snippet, width)}")
    return lines


def monotone_sentence(rows: list[Row]) -> str:
    boy = [r.boy for r in rows]
    k = monotone_prefix(boy)
    girl_k = monotone_prefix([-r.girl for r in rows])
    muls = [f"{r.mul:g}" for r in rows]
    span = f"mul {muls[0]} -> {muls[k - 1]}"
    text = (f"boy fraction {boy[0]:.2f} -> {boy[k - 1]:.2f}, non-decreasing over {span}"
            + (" (the whole grid)" if k == len(rows) else
               f", then {boy[k]:.2f} at mul {muls[k]}"))
    text += (f"; girl fraction {rows[0].girl:.2f} -> {rows[girl_k - 1].girl:.2f}, "
             f"non-increasing over mul {muls[0]} -> {muls[girl_k - 1]}")
    return text + "."


def batch_equals_solo(engine: Engine, tok: Tokenizer, steering: Seq[Seq[SteeringTerm]],
                      seeds: Seq[int], params: SamplingParams, max_new_tokens: int) -> bool:
    """Sequences with different steering in one batch each get the tokens they get alone."""
    ids = tok.encode(PROMPT, bos=True)
    batch = generate_batch(engine, ids, seeds, steering, params, max_new_tokens)
    return all(generate_batch(engine, ids, [seed], [terms], params, max_new_tokens)[0] == got
               for seed, terms, got in zip(seeds, steering, batch, strict=True))


def describe(method: str, layer: int, source: int | None) -> str:
    if method == "control":
        return (f"control vector (mean of {len(CONTROL_PAIRS)} boy/girl pairs) added at every "
                f"position of layer {layer}")
    add, sub = (ACTADD_ADD, ACTADD_SUB) if method == "actadd" else (WORD_ADD, WORD_SUB)
    return f"ActAdd {add!r} - {sub!r}, source layer {source}, injection layer {layer}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    p.add_argument("--dtype", choices=("q8_0", "f32"), default="q8_0")
    p.add_argument("--seeds", type=int, default=100, help="generations per mul (seeds 0..N-1)")
    p.add_argument("--tokens", type=int, default=80, help="new tokens per generation")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--layer", type=int, default=None,
                   help="injection layer (default: control 1, actadd 3, actadd-word 0)")
    p.add_argument("--source", type=int, default=None,
                   help="ActAdd source layer (default: 0)")
    p.add_argument("--muls", default=None, help="comma-separated scales (default per method)")
    p.add_argument("--scan", action="store_true",
                   help="also scan every injection layer (boy fraction per mul)")
    p.add_argument("--json", nargs="?", const="steering_effect.json", default=None,
                   metavar="PATH")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := [m for m in args.methods if m not in METHODS]:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if args.seeds < 1 or args.tokens < 1:
        p.error("--seeds and --tokens must be at least 1")
    if args.muls is not None:
        args.muls = [float(m) for m in args.muls.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.model.exists() or not args.tokenizer.exists():
        print(f"model or tokenizer not found ({args.model}, {args.tokenizer})", file=sys.stderr)
        return 2
    tok = SpmTokenizer.from_llama2c(args.tokenizer, vocab_size=512)
    prompt_len = len(tok.encode(PROMPT, bos=True))
    n_muls = max(len(args.muls or m) for m in DEFAULT_MULS.values())
    engine = engine_for(args.model, n_muls * args.seeds, prompt_len, args.tokens, args.dtype)
    params = SamplingParams(temperature=args.temperature)
    seeds = list(range(args.seeds))
    print(f"stories260K ({args.dtype}), prompt {PROMPT!r}, {args.seeds} seeds per mul, "
          f"{args.tokens} new tokens, temperature {args.temperature:g}; every mul x seed of a "
          "table in one batch")
    print(f"boy family {BOY.pattern}; girl family {GIRL.pattern}; "
          "statistic = fraction of generations mentioning the family")

    results = {}
    mixed: list[tuple[int, list[SteeringTerm]]] = []  # (seed, steering) for the solo check
    for method in args.methods:
        layer = DEFAULT_LAYER[method] if args.layer is None else args.layer
        source = None if method == "control" else (
            DEFAULT_SOURCE[method] if args.source is None else args.source)
        muls = args.muls or DEFAULT_MULS[method]
        terms = steering_for(engine, tok, method, layer, source)
        t0 = time.perf_counter()
        rows = sweep(engine, tok, terms, muls, seeds, params, args.tokens)
        seconds = time.perf_counter() - t0
        print(f"\n## {method}: {describe(method, layer, source)}")
        print(f"({len(muls) * args.seeds} sequences in one batch, {seconds:.1f}s with the "
              "fluency pass)")
        for line in format_table(rows):
            print(line)
        print(monotone_sentence(rows))
        results[method] = {"layer": layer, "source": source, "muls": list(muls),
                           "rows": [asdict(r) for r in rows]}
        mixed += [(seed, terms(mul)) for mul in muls[1::2] for seed in seeds[:2]]
        if args.scan:
            print(f"injection layer scan (boy fraction / nll at mul "
                  f"{', '.join(f'{m:g}' for m in muls)}):")
            scan = {}
            for scan_layer in range(engine.config.n_layers + 1):
                scan_rows = sweep(engine, tok, steering_for(engine, tok, method, scan_layer,
                                                            source),
                                  muls, seeds, params, args.tokens)
                scan[scan_layer] = [(r.boy, r.nll) for r in scan_rows]
                k = monotone_prefix([r.boy for r in scan_rows])
                print(f"  layer {scan_layer}: "
                      + "  ".join(f"{r.boy:.2f}/{r.nll:.1f}" for r in scan_rows)
                      + f"   (non-decreasing over the first {k})", flush=True)
            results[method]["scan"] = scan

    same = batch_equals_solo(engine, tok, [t for _, t in mixed], [s for s, _ in mixed], params,
                             args.tokens)
    print(f"\nbatch == solo: {'yes' if same else 'NO'} ({len(mixed)} sequences steered by "
          f"{', '.join(args.methods)} at several muls in one batch, each token for token "
          "equal to its run alone)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"prompt": PROMPT, "seeds": args.seeds, "tokens": args.tokens,
             "temperature": args.temperature, "dtype": args.dtype, "batch_equals_solo": same,
             "methods": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
