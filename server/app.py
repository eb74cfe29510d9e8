"""The aiohttp application: create_app(), middlewares (auth, errors, logging), small routes.

The model loads on a worker thread after the server starts listening, so /health can say 503
until it is ready; the engine loop (server/runner.py) is started and stopped with the app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3
from aiohttp import web
from pydantic import ValidationError

import engine
from engine.engine import Engine
from engine.identity import model_key, model_uuid
from engine.loader import load_checkpoint, load_tokenizer
from engine.tokenizer import Tokenizer
from server.chat import ChatTemplate
from server.errors import ApiError, error_response
from server.generation import GenerationError
from server.metrics import Metrics
from server.runner import QueueFull, Runner
from server.steering_store import SteeringStore

log = logging.getLogger("tiller.server")

PUBLIC_PATHS = frozenset({"/health", "/v1/models", "/models"})


@dataclass
class ServerConfig:
    model_path: Path
    tokenizer_path: Path | None = None  # None: the GGUF's vocabulary or tokenizer.bin beside
    dtype: str = "q8_0"
    threads: int | None = None
    parallel: int = 4  # sequences running at once
    ctx_size: int | None = None  # KV cache tokens shared by all sequences
    max_waiting: int = 64  # queued requests beyond the running ones; more is a 503
    token_budget: int = 256  # tokens per engine step (decode tokens plus prompt chunks)
    api_keys: tuple[str, ...] = ()
    model_alias: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    steering_dir: Path | None = None  # default: ~/.cache/tiller/steering
    steering_max_bytes: int = 256 * 1024 * 1024


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


@dataclass
class ServerState:
    config: ServerConfig
    metrics: Metrics = field(default_factory=Metrics)
    model: Model | None = None
    runner: Runner | None = None
    load_error: str | None = None
    steering: SteeringStore | None = None

    def ready(self) -> tuple[Model, Runner]:
        if self.model is None or self.runner is None:
            raise ApiError(503, self.load_error or "Loading model", "unavailable_error",
                           code="model_loading")
        return self.model, self.runner


STATE = web.AppKey("state", ServerState)
TOKENS = web.RequestKey("tokens", int)  # tokens generated for the request, for the log line


def default_steering_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "tiller" / "steering"


def load_model(config: ServerConfig) -> Model:
    """Load, hash and warm up the model (the first step compiles or loads the kernels)."""
    checkpoint = load_checkpoint(config.model_path)
    eng = Engine.from_checkpoint(checkpoint, config.dtype, threads=config.threads,
                                 max_tokens=config.token_budget, kv_tokens=config.ctx_size,
                                 kv_sequences=config.parallel)
    tokenizer = load_tokenizer(config.model_path, config.tokenizer_path, eng.config.vocab_size)
    key = model_key(config.model_path)  # NOTE: cached: a restart does not re-hash the file
    uuid = model_uuid(checkpoint)
    seq = eng.new_sequence()
    eng.step([engine.engine.SeqRequest(seq, [tokenizer.bos_id])])
    eng.release(seq)
    name = config.model_alias or config.model_path.name
    fingerprint = "fp_" + blake3.blake3(f"{key}:{engine.__version__}:{eng.dtype}".encode()
                                        ).hexdigest()[:16]
    template = ChatTemplate.for_model(checkpoint.metadata.get("tokenizer.chat_template"),
                                      tokenizer.piece(tokenizer.bos_id),
                                      tokenizer.piece(tokenizer.eos_id))
    return Model(eng, tokenizer, template, name, key, uuid, fingerprint, int(time.time()))


# middlewares --------------------------------------------------------------------------------


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every failure becomes an OpenAI-shaped JSON error; the mapping lives here only."""
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except ValidationError as e:
        first = e.errors()[0]
        path = [str(p) for p in first["loc"] if not _is_type_tag(p)]
        param = path[0] if path else None
        message = first["msg"].removeprefix("Value error, ")
        if path and not message.startswith(path[0]):
            message = f"{'.'.join(path)}: {message}"
        return error_response(ApiError(400, message, param=param))
    except QueueFull as e:
        response = error_response(ApiError(503, f"server busy: {e}", "unavailable_error",
                                           code="server_busy"))
        response.headers["Retry-After"] = "1"
        return response
    except GenerationError as e:
        return error_response(ApiError(500, str(e), "server_error"))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = {401: "authentication_error", 404: "not_found_error"}.get(e.status,
                                                                         "invalid_request_error")
        return error_response(ApiError(e.status, e.reason, kind), headers=e.headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal server error", "server_error"))


def _is_type_tag(part: object) -> bool:
    """pydantic names the union member in an error's location ('str', 'list[int]'): drop it."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict")
                                      or "[" in part or "-" in part)


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    keys = request.app[STATE].config.api_keys
    if keys and request.path not in PUBLIC_PATHS:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        token = token or request.headers.get("X-Api-Key", "")
        if token not in keys:
            raise ApiError(401, "invalid or missing API key", "authentication_error",
                           code="invalid_api_key")
    return await handler(request)


@web.middleware
async def log_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # client closed the connection (nginx's convention)
        raise
    finally:
        ms = (time.perf_counter() - start) * 1000
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "unmatched"
        tokens = request.get(TOKENS, "")
        request.app[STATE].metrics.count_request(path, status, ms / 1000)
        log.info("%s %s %d %s %.1fms", request.method, request.path, status,
                 f"tokens={tokens}" if tokens != "" else "-", ms)


# small routes ---------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.model is None:
        raise ApiError(503, state.load_error or "Loading model", "unavailable_error",
                       code="model_loading")
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data = []
    if state.model is not None:
        m = state.model
        c = m.engine.config
        data.append({"id": m.name, "object": "model", "created": m.created,
                     "owned_by": "tiller",
                     "meta": {"key": m.key, "uuid": m.uuid, "n_ctx_train": c.max_seq_len,
                              "n_embd": c.dim, "n_layer": c.n_layers, "n_vocab": c.vocab_size,
                              "dtype": m.engine.dtype}})
    return web.json_response({"object": "list", "data": data})


async def read_json(request: web.Request) -> dict:
    try:
        body = await request.json(loads=json.loads)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} at position {e.pos}") from e
    except UnicodeDecodeError as e:
        raise ApiError(400, "request body is not valid UTF-8") from e
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


# the application ------------------------------------------------------------------------------


async def _engine_ctx(app: web.Application):
    """Load the model on a worker thread, then run the engine loop until the app stops."""
    state = app[STATE]
    loop = asyncio.get_running_loop()

    async def load() -> None:
        try:
            model = await loop.run_in_executor(None, load_model, state.config)
        except Exception as e:
            state.load_error = f"model failed to load: {e}"
            log.error("%s", state.load_error)
            return
        runner = Runner(model.engine, max_running=state.config.parallel,
                        token_budget=state.config.token_budget,
                        max_waiting=state.config.max_waiting)
        runner.start(loop)
        state.model, state.runner = model, runner
        state.metrics.runner = runner
        log.info("model %s ready (%s, key %s)", model.name, model.engine.dtype, model.key[:16])

    task = asyncio.create_task(load())
    yield
    task.cancel()
    if state.runner is not None:
        await loop.run_in_executor(None, state.runner.stop)


def create_app(config: ServerConfig, *, model: Model | None = None) -> web.Application:
    """The application; `model` skips loading (tests pass one already loaded)."""
    from server import features_routes, llama_routes, openai_routes, steering_routes
    from server.openapi import openapi_handler

    app = web.Application(middlewares=[log_middleware, errors_middleware, auth_middleware],
                          client_max_size=config.max_body_bytes)
    state = ServerState(config)
    state.steering = SteeringStore(config.steering_dir or default_steering_dir(),
                                   config.steering_max_bytes)
    app[STATE] = state
    if model is None:
        app.cleanup_ctx.append(_engine_ctx)
    else:
        async def given_model(app: web.Application):
            runner = Runner(model.engine, max_running=config.parallel,
                            token_budget=config.token_budget, max_waiting=config.max_waiting)
            runner.start(asyncio.get_running_loop())
            state.model, state.runner = model, runner
            state.metrics.runner = runner
            yield
            await asyncio.get_running_loop().run_in_executor(None, runner.stop)

        app.cleanup_ctx.append(given_model)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/v1/models", models)
    r.add_get("/models", models)
    r.add_get("/metrics", state.metrics.handler)
    r.add_get("/openapi.json", openapi_handler)
    openai_routes.add_routes(r)
    llama_routes.add_routes(r)
    steering_routes.add_routes(r)
    features_routes.add_routes(r)
    return app
