"""The `tiller` command: `tiller serve` runs the HTTP server, `tiller generate` one prompt."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from engine.engine import Engine
from engine.generate import Timings, generate
from engine.llama2c import CheckpointError
from engine.loader import load_tokenizer
from engine.sampling import SamplingParams
from engine.tokenizer import StreamDecoder, Tokenizer, TokenizerError
from engine.weights import DTYPES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="model file: GGUF or llama2.c .bin")
    p.add_argument("--tokenizer", type=Path,
                   help="tokenizer.bin or GGUF (default: the GGUF's own vocabulary, or "
                        "tokenizer.bin beside a llama2.c model)")
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
    s = sub.add_parser("serve", help="run the HTTP server (OpenAI- and llama.cpp-compatible)")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--parallel", type=int, default=4, help="sequences decoded together")
    s.add_argument("--ctx-size", type=int,
                   help="KV-cache tokens shared by all sequences (default: parallel x context)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond the running ones; more get 503")
    s.add_argument("--batch-tokens", type=int, default=256,
                   help="tokens per engine step (decode tokens plus prompt chunks)")
    s.add_argument("--api-key", action="append", default=[],
                   help="require this bearer key (repeat for several)")
    s.add_argument("--alias", help="model name reported by the API (default: file name)")
    s.add_argument("--steering-dir", type=Path,
                   help="where steering vectors persist (default: ~/.cache/tiller/steering)")
    s.add_argument("--steering-max-mb", type=int, default=256,
                   help="bound on the steering store's total size")
    return parser


def _load(args: argparse.Namespace) -> tuple[Engine, Tokenizer]:
    engine = Engine.load(args.model, dtype=args.dtype, threads=args.threads)
    tokenizer = load_tokenizer(args.model, args.tokenizer, engine.config.vocab_size)
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


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from server.app import ServerConfig, create_app

    for name in ("parallel", "max_queue", "batch_tokens", "port"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if not args.model.is_file():
        raise FileNotFoundError(f"{args.model}: no such model file")
    if args.tokenizer is not None and not args.tokenizer.is_file():
        raise TokenizerError(f"{args.tokenizer}: no such tokenizer file")
    config = ServerConfig(model_path=args.model, tokenizer_path=args.tokenizer, dtype=args.dtype,
                          threads=args.threads, parallel=args.parallel, ctx_size=args.ctx_size,
                          max_waiting=args.max_queue, token_budget=args.batch_tokens,
                          api_keys=tuple(args.api_key), model_alias=args.alias,
                          steering_dir=args.steering_dir,
                          steering_max_bytes=args.steering_max_mb * 1024 * 1024)
    web.run_app(create_app(config), host=args.host, port=args.port, access_log=None,
                handler_cancellation=True, shutdown_timeout=10,
                print=lambda msg: logging.getLogger("tiller.server").info("%s", msg))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
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
