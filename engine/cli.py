"""The `tiller` command: `tiller generate` runs a model on a prompt from the terminal."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from engine.engine import Engine, tokenizer_path_for
from engine.generate import Timings, generate
from engine.llama2c import CheckpointError
from engine.sampling import SamplingParams
from engine.tokenizer import StreamDecoder, Tokenizer, TokenizerError
from engine.weights import DTYPES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="model file (llama2.c .bin)")
    p.add_argument("--tokenizer", type=Path,
                   help="llama2.c tokenizer.bin (default: tokenizer.bin beside the model)")
    p.add_argument("--dtype", choices=DTYPES, default="q8_0",
                   help="q8_0: int8 weights and activations (fast); f32: exact fp32 reference")
    p.add_argument("--threads", type=int, help="compute threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiller", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete a prompt, streamed to stdout")
    _add_model_args(g)
    g.add_argument("--prompt", default="", help="text to continue (default: empty, BOS only)")
    g.add_argument("--max-tokens", type=int, default=256, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, help="sampling seed (default: random, printed)")
    return parser


def _load(args: argparse.Namespace) -> tuple[Engine, Tokenizer]:
    tokenizer_path = args.tokenizer or tokenizer_path_for(args.model)
    engine = Engine.load(args.model, dtype=args.dtype, threads=args.threads)
    if not tokenizer_path.exists():
        raise TokenizerError(f"{tokenizer_path}: no tokenizer file (pass --tokenizer)")
    tokenizer = Tokenizer.from_llama2c(tokenizer_path, vocab_size=engine.config.vocab_size)
    return engine, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_tokens < 0:
        raise ValueError("--max-tokens must be >= 0")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    start = time.perf_counter()
    engine, tokenizer = _load(args)
    load_seconds = time.perf_counter() - start
    prompt = tokenizer.encode(args.prompt, bos=True)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    decoder = StreamDecoder(tokenizer, at_start=not args.prompt)
    timings = Timings()
    stop = frozenset({tokenizer.eos_id, tokenizer.bos_id})
    for token in generate(engine, prompt, params, args.max_tokens, stop, timings):
        out.write(decoder.feed(token))
        out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()
    print(f"load {load_seconds:.2f} s | prompt {timings.prompt_tokens} tokens, "
          f"{timings.prompt_tok_s:.1f} tok/s | generated {timings.generated_tokens} tokens, "
          f"{timings.generate_tok_s:.1f} tok/s | dtype {engine.dtype}, threads {engine.threads}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
    except (CheckpointError, TokenizerError, FileNotFoundError, IsADirectoryError,
            PermissionError) as e:
        print(f"tiller: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"tiller: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
