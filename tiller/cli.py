"""The `tiller` command: `tiller serve` runs the HTTP server, `tiller generate` one prompt,
`tiller convert` writes a model as GGUF."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import BUILTIN_MODEL
from .engine.engine import Engine
from .engine.generate import Timings, generate
from .engine.kvcache import CACHE_TYPES
from .engine.llama2c import CheckpointError
from .engine.loader import load_tokenizer
from .engine.sampling import SamplingParams
from .engine.tokenizer import StreamDecoder, Tokenizer, TokenizerError
from .engine.weights import DTYPES, Progress


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", type=Path, default=BUILTIN_MODEL,
                   help="model file: GGUF or llama2.c .bin (default: tiller's built-in model, "
                        f"{BUILTIN_MODEL.stem})")
    p.add_argument("--tokenizer", type=Path,
                   help="tokenizer.bin or GGUF (default: the GGUF's own vocabulary, or "
                        "tokenizer.bin beside a llama2.c model)")
    p.add_argument("--dtype", choices=DTYPES, default="q8_0",
                   help="q8_0: int8 weights and activations (fast); f32: exact fp32 reference")
    p.add_argument("-t", "--threads", type=int, help="compute threads (default: all cores)")
    for short, name in (("-ctk", "k"), ("-ctv", "v")):
        p.add_argument(short, f"--cache-type-{name}", choices=CACHE_TYPES,
                       help=f"the KV cache's {'keys' if name == 'k' else 'values'}: bf16 (half "
                            "the memory, faster attention; the default with --dtype q8_0) or "
                            "f32 (the default with --dtype f32)")
    p.add_argument("--no-weight-cache", dest="weight_cache", action="store_false",
                   help="build the engine's weights from the file every time instead of mapping "
                        "them from <cache root>/weights ($TILLER_WEIGHT_CACHE=0 does the same)")


# llama-server flags tiller takes so that its command lines run unchanged, but does not act on:
# (flags, argparse keywords, why). cmd_serve logs one line for each one given.
IGNORED: list[tuple[tuple[str, ...], dict[str, Any], str]] = [
    (("--embedding", "--embeddings"), {"action": "store_true"},
     "embeddings are always on (/v1/embeddings, /embedding)"),
    (("--metrics",), {"action": "store_true"}, "/metrics is always on"),
    (("--slots",), {"action": "store_true"}, "/slots is always on"),
    (("--jinja",), {"action": "store_true"}, "chat templates are always rendered as Jinja"),
    (("-cb", "--cont-batching"), {"action": "store_true"}, "batching is always continuous"),
    (("--timeout", "-to"), {"type": int, "metavar": "N"},
     "tiller sets no read/write timeout: a request runs until it finishes or its client goes"),
    (("-ngl", "--n-gpu-layers", "--gpu-layers"), {"metavar": "N"},
     "tiller runs on the CPU only"),
]


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
    st = sub.add_parser("steer", help="build a steering vector offline and write it to a file")
    _add_model_args(st)
    st.add_argument("--method", choices=("actadd", "mean", "pca"), default="actadd")
    st.add_argument("--add", help="actadd: the prompt to add (llama.cpp's --steering-add)")
    st.add_argument("--sub", help="actadd: the prompt to subtract (--steering-sub)")
    st.add_argument("--layer", type=int, help="actadd: the layer to read (--steering-source)")
    st.add_argument("--positive", type=Path, help="mean/pca: a file of prompts, one per line")
    st.add_argument("--negative", type=Path, help="mean/pca: the contrasting prompts, paired")
    st.add_argument("--layers", help="mean/pca: comma-separated layers (default 2..n_layers)")
    st.add_argument("--out", required=True, type=Path,
                    help=".npy (any vector) or .gguf (llama.cpp control vector: mean/pca)")
    ft = sub.add_parser("features", help="write a text's hidden states to a .npz file")
    _add_model_args(ft)
    ft.add_argument("--input", required=True, help="the text (tokenized with BOS)")
    ft.add_argument("--layers", help="comma-separated blocks, negatives from the end "
                    "(default: all)")
    ft.add_argument("--out", required=True, type=Path, help="output .npz")
    cv = sub.add_parser("convert", help="write a llama2.c or GGUF model as a GGUF file")
    cv.add_argument("input", type=Path, help="model file: GGUF or llama2.c .bin")
    cv.add_argument("output", type=Path, help="GGUF file to write (replaced atomically)")
    cv.add_argument("--type", required=True, choices=("f32", "f16", "q8_0"),
                    help="tensor type of the matrices (norms stay f32)")
    cv.add_argument("--tokenizer", type=Path,
                    help="a llama2.c model's tokenizer.bin or GGUF vocabulary (default: "
                         "tokenizer.bin beside the model)")
    cv.add_argument("--progress", action="store_true",
                    help="show the progress bar on stderr even when it is not a terminal")
    s = sub.add_parser("serve", help="run the HTTP server (OpenAI- and llama.cpp-compatible)",
                       description="Flags with a short alias are llama-server's (README: Flags).")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    # NOTE: "-np" and "-ngl" are llama.cpp's multi-letter single-dash flags; argparse takes an
    # exact match before splitting "-n" + "p", so "-np 4" is --parallel 4 and "-n 4" stays -n
    s.add_argument("-np", "--parallel", type=int, default=4, help="sequences decoded together")
    s.add_argument("-c", "--ctx-size", type=int,
                   help="KV-cache tokens shared by all sequences (default: parallel x context)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond the running ones; more get 503")
    s.add_argument("--batch-tokens", type=int, default=256,
                   help="tokens per engine step (decode tokens plus prompt chunks)")
    s.add_argument("--api-key", action="append", default=[],
                   help="require this bearer key (repeat, or comma-separate as llama-server)")
    s.add_argument("-a", "--alias", help="model name reported by the API (default: file name)")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let pages from ORIGIN (scheme://host[:port], or * for any) call the "
                        "API from a browser; repeat for several (default: none)")
    s.add_argument("--steering-dir", type=Path,
                   help="where steering vectors persist (default: <cache root>/steering, the "
                        "cache root being $TILLER_CACHE_DIR or ~/.cache/tiller)")
    s.add_argument("--steering-store", metavar="redis://HOST:PORT/DB",
                   help="keep steering vectors on this Redis server, shared by every replica "
                        "that names it (default: the --steering-dir directory, this server's "
                        "own)")
    s.add_argument("--steering-max-mb", type=int, default=256,
                   help="bound on the steering store's total size")
    s.add_argument("--max-body-mb", type=float, default=8,
                   help="largest request body (MiB); larger ones get 413")
    s.add_argument("--max-feature-values", type=int, default=4 * 1024 * 1024,
                   help="numbers one /v1/features or embeddings response may hold "
                        "(positions x layers x points x width); more is a 400")
    s.add_argument("--no-webui", action="store_true",
                   help="do not serve the steering playground page at / (llama-server's flag)")
    s.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt afresh: keep no KV blocks of earlier prompts for "
                        "later requests with the same prefix (a request's cache_prompt: false "
                        "does so for itself)")
    s.add_argument("--workers", type=int, default=2,
                   help="threads for tokenizing, encoding and vector math off the event loop")
    d = s.add_argument_group("sampling defaults (llama-server's; a request's own fields win)")
    d.add_argument("-n", "--n-predict", type=int,
                   help="default and ceiling of the tokens a request generates (-1: no limit)")
    d.add_argument("--temp", type=float, help="temperature (0 = greedy)")
    d.add_argument("--top-k", type=int)
    d.add_argument("--top-p", type=float)
    d.add_argument("--min-p", type=float)
    d.add_argument("--seed", type=int, help="-1: random per request")
    d.add_argument("--repeat-penalty", type=float)
    t = s.add_mutually_exclusive_group()
    t.add_argument("--chat-template", metavar="NAME|JINJA",
                   help="a llama.cpp built-in name (chatml, llama2, llama2-sys, llama3, gemma, "
                        "phi3, zephyr) or Jinja source, instead of the model's template")
    t.add_argument("--chat-template-file", type=Path, help="a Jinja chat template file")
    v = s.add_argument_group("control vectors applied to every request that gives no `steering`")
    v.add_argument("--control-vector", action="append", default=[], type=Path, metavar="FILE",
                   help="a llama.cpp control-vector GGUF, at scale 1 (repeat to sum several)")
    v.add_argument("--control-vector-scaled", action="append", default=[], nargs=2,
                   metavar=("FILE", "SCALE"), help="a control vector times SCALE")
    v.add_argument("--control-vector-layer-range", nargs=2, type=int, metavar=("START", "END"),
                   help="steer only llama.cpp layers START..END (inclusive)")
    i = s.add_argument_group("llama-server flags accepted and ignored (a log line says why)")
    for flags, kwargs, why in IGNORED:
        i.add_argument(*flags, **kwargs, help=f"ignored: {why}")
    return parser


def progress_bar(force: bool = False, delay: float = 0.0, leave: bool = True) -> Progress:
    """A tqdm bar on stderr (a terminal, or any stderr with `force`) driven as a Progress
    callback; it closes itself when the last tensor is done. `delay`: seconds before it shows,
    so that quick loads print nothing."""
    from tqdm import tqdm

    try:
        sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        sized = False
    # NOTE: tqdm draws nothing at all on a terminal that reports a 0 x 0 size (a pty nobody
    # sized: `docker run -t`, some CI runners): it takes -1 rows from it. 80 x 20 there.
    bar = tqdm(unit="tensor", file=sys.stderr, disable=not (force or sys.stderr.isatty()),
               dynamic_ncols=sized, ncols=None if sized else 80, nrows=None if sized else 20,
               leave=leave, delay=delay)

    def progress(done: int, total: int, name: str) -> None:
        bar.total = total
        bar.set_postfix_str(name, refresh=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return progress


# NOTE: a bar for loads only when they take a while (quantized files are decoded at load)
LOAD_BAR_DELAY = 1.0


def _load(args: argparse.Namespace) -> tuple[Engine, Tokenizer]:
    engine = Engine.load(args.model, dtype=args.dtype, threads=args.threads,
                         progress=progress_bar(delay=LOAD_BAR_DELAY, leave=False),
                         weight_cache=args.weight_cache, cache_type_k=args.cache_type_k,
                         cache_type_v=args.cache_type_v)
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
    stop = tokenizer.end_ids | {tokenizer.bos_id}
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


def _int_list(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from e


def _prompts(path: Path, name: str) -> list[str]:
    lines = [line for line in path.read_text("utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts in the {name} file")
    return lines


def cmd_steer(args: argparse.Namespace) -> int:
    import numpy as np

    from .engine import steering

    engine, tokenizer = _load(args)
    if args.method == "actadd":
        if args.add is None or args.sub is None or args.layer is None:
            raise ValueError("actadd needs --add, --sub and --layer")
        if args.out.suffix != ".npy":
            raise ValueError(f"{args.out}: an ActAdd vector (one row per position) is written "
                             "as .npy")
        rows = steering.build_actadd(engine, tokenizer, args.add, args.sub, args.layer)
        np.save(args.out, rows)
        print(f"wrote {args.out}: {rows.shape[0]} positions x {rows.shape[1]}, read at layer "
              f"{args.layer}", file=sys.stderr)
        return 0
    if args.positive is None or args.negative is None:
        raise ValueError(f"{args.method} needs --positive and --negative prompt files")
    n = engine.config.n_layers
    layers = _int_list(args.layers, "--layers") or list(range(2, n + 1))
    directions = steering.build_control(engine, tokenizer, _prompts(args.positive, "positive"),
                                        _prompts(args.negative, "negative"), layers,
                                        args.method)
    if args.out.suffix == ".gguf":
        from .engine.cvec import ControlVector, write_control_vector

        write_control_vector(args.out, ControlVector(directions, "llama"), n)
    elif args.out.suffix == ".npy":
        np.save(args.out, np.stack([directions[k] for k in sorted(directions)]))
    else:
        raise ValueError(f"{args.out}: write .gguf or .npy")
    print(f"wrote {args.out}: layers {sorted(directions)}", file=sys.stderr)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    import numpy as np

    from .engine.forward import CAPTURE_POINTS
    from .engine.layers import normalize_block

    engine, tokenizer = _load(args)
    n = engine.config.n_layers
    layers = _int_list(args.layers, "--layers") or list(range(n))
    blocks = [normalize_block(layer, n, "--layers: block") for layer in layers]
    tokens = tokenizer.encode(args.input, bos=True)
    if len(tokens) > engine.config.max_seq_len:
        raise ValueError(f"--input: {len(tokens)} tokens exceed the context of "
                         f"{engine.config.max_seq_len}")
    captures = engine.forward_all(tokens, capture_layers=sorted(set(blocks))).captures
    assert captures is not None  # blocks is not empty
    order = [sorted(set(blocks)).index(b) for b in blocks]
    arrays = {point: captures[i][order] for i, point in enumerate(CAPTURE_POINTS)}
    np.savez(args.out, tokens=np.array(tokens), layers=np.array(blocks), **arrays)
    print(f"wrote {args.out}: {len(tokens)} tokens x {len(blocks)} layers x {engine.config.dim} "
          f"({', '.join(CAPTURE_POINTS)})", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .engine.convert import convert

    logging.getLogger("gguf").setLevel(logging.WARNING)  # NOTE: GGUFWriter chats at INFO
    start = time.perf_counter()
    result = convert(args.input, args.output, args.type, args.tokenizer,
                     progress_bar(force=args.progress))
    size = result.path.stat().st_size
    print(f"wrote {result.path}: {args.type}, {len(result.tensor_types)} tensors, "
          f"{size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s | uuid {result.uuid} | "
          f"source key {result.source_key[:16]}", file=sys.stderr)
    return 0


def _serve_options(args: argparse.Namespace) -> dict[str, Any]:
    """The llama-server flags as ServerConfig fields, checked (ValueError naming the flag)."""
    from .server.chat import ChatTemplate, template_source
    from .server.cors import normalize_origins
    from .server.defaults import SamplingDefaults

    template = None
    if args.chat_template_file is not None:
        template = args.chat_template_file.read_text("utf-8")
    elif args.chat_template is not None:
        template = template_source(args.chat_template)
    if template is not None:  # a syntax error stops the server now, not at the first chat
        try:
            ChatTemplate(template, "<s>", "</s>")
        except ValueError as e:
            name = args.chat_template_file or "--chat-template"
            raise ValueError(f"{name}: {e}") from None
    vectors = [(path, 1.0) for path in args.control_vector]
    for path, scale in args.control_vector_scaled:
        try:
            vectors.append((Path(path), float(scale)))
        except ValueError:
            raise ValueError(f"--control-vector-scaled {path} {scale}: SCALE must be a "
                             "number") from None
    for path, scale in vectors:
        if not math.isfinite(scale):
            raise ValueError(f"--control-vector-scaled {path} {scale}: SCALE must be finite")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such control-vector file")
    layer_range = args.control_vector_layer_range
    if layer_range is not None and not 1 <= layer_range[0] <= layer_range[1]:
        raise ValueError(f"--control-vector-layer-range {layer_range[0]} {layer_range[1]}: "
                         "expected 1 <= START <= END (llama.cpp's layer numbers)")
    return {
        "api_keys": tuple(k.strip() for keys in args.api_key for k in keys.split(",")
                          if k.strip()),
        "cors_origins": normalize_origins(args.cors_origin),
        "sampling": SamplingDefaults.from_flags(args.temp, args.top_k, args.top_p, args.min_p,
                                                args.seed, args.repeat_penalty, args.n_predict),
        "chat_template": template,
        "control_vectors": tuple(vectors),
        "control_vector_layers": tuple(layer_range) if layer_range is not None else None,
    }


def _log_ignored(args: argparse.Namespace) -> None:
    log = logging.getLogger("tiller.server")
    for flags, _, why in IGNORED:
        # argparse's dest: the first long flag
        dest = next(f for f in flags if f.startswith("--")).lstrip("-").replace("-", "_")
        if getattr(args, dest) not in (None, False):
            log.info("ignoring %s: %s", "/".join(flags), why)


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .server.app import STATE, ServerConfig, create_app

    for name in ("parallel", "max_queue", "batch_tokens", "port", "max_feature_values",
                 "workers"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if not args.model.is_file():
        raise FileNotFoundError(f"{args.model}: no such model file")
    if args.tokenizer is not None and not args.tokenizer.is_file():
        raise TokenizerError(f"{args.tokenizer}: no such tokenizer file")
    if args.alias is None and args.model == BUILTIN_MODEL:
        args.alias = BUILTIN_MODEL.stem
    options = _serve_options(args)
    _log_ignored(args)
    config = ServerConfig(model_path=args.model, tokenizer_path=args.tokenizer, dtype=args.dtype,
                          threads=args.threads, weight_cache=args.weight_cache,
                          parallel=args.parallel, ctx_size=args.ctx_size,
                          max_waiting=args.max_queue, token_budget=args.batch_tokens,
                          model_alias=args.alias,
                          steering_dir=args.steering_dir, steering_store=args.steering_store,
                          steering_max_bytes=args.steering_max_mb * 1024 * 1024,
                          load_progress=progress_bar(delay=LOAD_BAR_DELAY, leave=False),
                          max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                          max_feature_values=args.max_feature_values, workers=args.workers,
                          webui=not args.no_webui, prefix_cache=not args.no_prefix_cache,
                          cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
                          **options)
    if config.max_body_bytes < 1024:
        raise ValueError("--max-body-mb must allow at least 1 KiB")
    app = create_app(config, on_load_error=_stop_serving)
    web.run_app(app, host=args.host, port=args.port, access_log=None,
                handler_cancellation=True, shutdown_timeout=10,
                print=lambda msg: logging.getLogger("tiller.server").info("%s", msg))
    error = app[STATE].load_error
    if error is not None:  # a server without its model would answer 503 for ever
        print(f"tiller: error: {error}", file=sys.stderr)
        return 2
    return 0


def _stop_serving(message: str) -> None:
    """Make web.run_app shut the server down, as it does on SIGTERM: its signal handler raises
    GracefulExit from a loop callback, which the loop lets through and run_app catches."""
    import asyncio

    from aiohttp import web

    def graceful_exit() -> None:
        raise web.GracefulExit()

    asyncio.get_running_loop().call_soon(graceful_exit)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "steer":
            return cmd_steer(args)
        if args.command == "features":
            return cmd_features(args)
        if args.command == "convert":
            return cmd_convert(args)
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
