"""What the running server holds: its configuration, the loaded model, the runner, the store.

One ServerState per application, reached through `request.app[STATE]` (an aiohttp AppKey, no
module globals). The model loads on a worker thread after the server starts listening, so until
then `ready()` answers 503.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import blake3
from aiohttp import web

from .. import __version__
from ..engine.cvec import load_control_vectors
from ..engine.engine import Engine, SeqRequest, SteeringTerm
from ..engine.identity import model_key, model_uuid
from ..engine.loader import load_checkpoint, load_tokenizer
from ..engine.paths import cache_root
from ..engine.tokenizer import SpmTokenizer, Tokenizer, TokenType
from ..engine.weights import Progress
from .chat import ChatTemplate
from .constraints import Vocabulary
from .defaults import SamplingDefaults
from .errors import ApiError
from .metrics import Metrics
from .runner import Runner
from .steering_dir import DirectoryStore
from .steering_redis import RedisStore
from .steering_store import SteeringStore

T = TypeVar("T")


@dataclass
class ServerConfig:
    model_path: Path
    tokenizer_path: Path | None = None  # None: the GGUF's vocabulary or tokenizer.bin beside
    dtype: str = "q8_0"
    threads: int | None = None
    weight_cache: bool = True  # map the weights from the weight cache (engine/weight_cache.py)
    parallel: int = 4  # sequences running at once
    ctx_size: int | None = None  # KV cache tokens shared by all sequences
    max_waiting: int = 64  # queued requests beyond the running ones; more is a 503
    token_budget: int = 256  # tokens per engine step (decode tokens plus prompt chunks)
    api_keys: tuple[str, ...] = ()
    model_alias: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    steering_dir: Path | None = None  # default: <cache root>/steering (engine/paths.py)
    steering_store: str | None = None  # redis://HOST:PORT/DB: shared by replicas; else the dir
    steering_max_bytes: int = 256 * 1024 * 1024
    load_progress: Progress | None = None  # follows the weights' conversion (the CLI's bar)
    # numbers one /v1/features or embeddings response may carry (positions x layers x points x
    # width): 4 Mi floats are 16 MiB as npz, ~80 MB as JSON
    max_feature_values: int = 4 * 1024 * 1024
    workers: int = 2  # the pool for work that must stay off the event loop (ServerState.run)
    cors_origins: tuple[str, ...] = ()  # normalized (server/cors.py); "*" = any; () = no CORS
    sampling: SamplingDefaults = SamplingDefaults()  # --temp ... -n: server/defaults.py
    chat_template: str | None = None  # Jinja source replacing the model's (--chat-template)
    # llama-server's start-up control vectors: (file, scale), summed; applied to requests that
    # do not give `steering` (steering_service.request_steering)
    control_vectors: tuple[tuple[Path, float], ...] = ()
    control_vector_layers: tuple[int, int] | None = None  # llama.cpp numbering, inclusive
    webui: bool = True  # the playground page at / (server/webui_routes.py); --no-webui: off
    prefix_cache: bool = True  # reuse KV blocks of prompt prefixes (--no-prefix-cache: off)
    cache_type_k: str | None = None  # the KV cache's types (-ctk/-ctv); None: the engine's
    cache_type_v: str | None = None


@dataclass
class Model:
    """Everything loaded from the model files."""

    engine: Engine
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    name: str
    key: str  # BLAKE3 of the model file: these bytes (engine/identity.py)
    uuid: str  # the model, whatever its encoding: general.uuid or derived from the tensors
    fingerprint: str  # system_fingerprint: model identity and engine version
    created: int
    # the most text characters one token can stand for, when that bounds a text's token count
    # from below (server/prepare.py): None for a vocabulary without byte fallback, where a run
    # of unknown characters is one token
    max_token_chars: int | None = None
    default_steering: tuple[SteeringTerm, ...] = ()  # the start-up control vectors
    # structured outputs: the vocabulary as llguidance sees it, built on first use
    vocabulary: Vocabulary = field(init=False)

    def __post_init__(self) -> None:
        self.vocabulary = Vocabulary(self.tokenizer, self.engine.config.vocab_size)


def token_chars_bound(tokenizer: Tokenizer) -> int | None:
    """The longest piece in characters ("▁" stands for one space, a byte piece for at most one
    character), for a sentencepiece vocabulary with byte fallback: there every character of a
    text is covered by pieces. (Other vocabularies are tokenized off the loop, unbounded.)"""
    if not isinstance(tokenizer, SpmTokenizer):
        return None
    types = [tokenizer.token_type(i) for i in range(tokenizer.vocab_size)]
    if types.count(TokenType.BYTE) < 256:
        return None
    return max(1, *(len(tokenizer.piece(i)) for i in range(tokenizer.vocab_size)))


def load_model(config: ServerConfig) -> Model:
    """Load, hash and warm up the model (the first step compiles or loads the kernels)."""
    checkpoint = load_checkpoint(config.model_path)
    eng = Engine.from_checkpoint(checkpoint, config.dtype, config.load_progress,
                                 config.weight_cache, threads=config.threads,
                                 max_tokens=config.token_budget, kv_tokens=config.ctx_size,
                                 kv_sequences=config.parallel,
                                 prefix_cache=config.prefix_cache,
                                 cache_type_k=config.cache_type_k,
                                 cache_type_v=config.cache_type_v)
    eng.prefault()
    tokenizer = load_tokenizer(config.model_path, config.tokenizer_path, eng.config.vocab_size)
    key = model_key(config.model_path)  # NOTE: cached: a restart does not re-hash the file
    uuid = model_uuid(checkpoint)
    seq = eng.new_sequence()
    eng.step([SeqRequest(seq, [tokenizer.bos_id])])
    eng.release(seq)
    name = config.model_alias or config.model_path.name
    fingerprint = "fp_" + blake3.blake3(f"{key}:{__version__}:{eng.dtype}".encode()
                                        ).hexdigest()[:16]
    template = ChatTemplate.for_model(
        config.chat_template or checkpoint.metadata.get("tokenizer.chat_template"),
        tokenizer.piece(tokenizer.bos_id), tokenizer.piece(tokenizer.eos_id))
    return Model(eng, tokenizer, template, name, key, uuid, fingerprint, int(time.time()),
                 token_chars_bound(tokenizer), startup_steering(config, eng))


def startup_steering(config: ServerConfig, eng: Engine) -> tuple[SteeringTerm, ...]:
    """--control-vector files summed into one term per layer, added at every position as
    llama.cpp adds them (ControlVectorError naming the file if one is unusable)."""
    if not config.control_vectors:
        return ()
    c = eng.config
    directions = load_control_vectors(list(config.control_vectors), c.dim, c.n_layers,
                                      config.control_vector_layers)
    return tuple(SteeringTerm(layer, vec, 1.0, every_position=True)
                 for layer, vec in directions.items())


@dataclass
class ServerState:
    config: ServerConfig
    steering: SteeringStore
    metrics: Metrics = field(default_factory=Metrics)
    model: Model | None = None
    runner: Runner | None = None
    load_error: str | None = None
    pool: ThreadPoolExecutor | None = None

    @classmethod
    def create(cls, config: ServerConfig) -> ServerState:
        store: SteeringStore
        if config.steering_store is not None:
            try:
                store = RedisStore.from_url(config.steering_store, config.steering_max_bytes)
            except ValueError as e:
                raise ValueError(f"--steering-store {config.steering_store!r}: {e}") from None
        else:
            store = DirectoryStore(config.steering_dir or cache_root() / "steering",
                                   config.steering_max_bytes)
        pool = ThreadPoolExecutor(max(1, config.workers), thread_name_prefix="tiller-work")
        state = cls(config, store, pool=pool)
        state.metrics.watch_store(store)
        return state

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the worker pool: tokenizing, template rendering, JSON decoding and
        validation, vector math and file encoding take milliseconds to seconds, and on the
        event loop they would stall every other client (even /health)."""
        assert self.pool is not None
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> tuple[Model, Runner]:
        if self.model is None or self.runner is None:
            raise ApiError(503, self.load_error or "Loading model", "unavailable_error",
                           code="model_loading")
        return self.model, self.runner

    def serve(self, model: Model, runner: Runner) -> None:
        """The model is loaded and its runner started: requests may come."""
        self.model, self.runner = model, runner
        self.metrics.watch(runner)


STATE = web.AppKey("state", ServerState)
TOKENS = web.RequestKey("tokens", int)  # tokens generated for the request, for the log line
