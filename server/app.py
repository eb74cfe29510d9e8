"""The composition root: create_app() wires state, middlewares, routes and the engine's life.

The model loads on a worker thread after the server starts listening, so /health can say 503
until it is ready; the engine loop (server/runner.py) is started and stopped with the app.
Nothing imports this module but the CLI and the tests.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from ..engine.cvec import ControlVectorError
from ..engine.kvcache import KV_BLOCK
from . import (
    cors,
    features_routes,
    info_routes,
    llama_routes,
    openai_routes,
    steering_routes,
    webui_routes,
)
from .http import auth_middleware, errors_middleware, log_middleware
from .runner import Runner
from .state import STATE, Model, ServerConfig, ServerState, load_model

log = logging.getLogger("tiller.server")

__all__ = ["STATE", "Model", "ServerConfig", "create_app", "load_model"]


def _start_runner(state: ServerState, model: Model) -> None:
    config = state.config
    runner = Runner(model.engine, max_running=config.parallel, token_budget=config.token_budget,
                    max_waiting=config.max_waiting)
    runner.start(asyncio.get_running_loop())
    state.serve(model, runner)


def _engine_ctx(on_load_error: Callable[[str], None] | None
                ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        """Load the model on a worker thread, then run the engine loop until the app stops."""
        state = app[STATE]
        loop = asyncio.get_running_loop()

        async def load() -> None:
            path = str(state.config.model_path)
            try:
                model = await loop.run_in_executor(None, load_model, state.config)
            except Exception as e:
                if isinstance(e, ControlVectorError):  # --control-vector: names its file
                    state.load_error = f"control vector failed to load: {e}"
                else:
                    message = str(e) if path in str(e) else f"{path}: {e}"
                    state.load_error = f"model failed to load: {message}"
                log.error("%s", state.load_error)
                if on_load_error is not None:
                    on_load_error(state.load_error)
                return
            _start_runner(state, model)
            # NOTE: what loading left (numba's and llvmlite's compiled objects, the tokenizer:
            # ~160,000 tracked objects for a stories110M GGUF) is kept for good; frozen, a full
            # collection no longer walks it, which took 55-90 ms here, stalling whichever step
            # or stream it landed in
            gc.collect()
            gc.freeze()
            cache = model.engine.cache
            log.info("model %s ready (%s, key %s); KV cache %d tokens, keys %s, values %s, "
                     "%.0f MiB", model.name, model.engine.dtype, model.key[:16],
                     cache.n_blocks * KV_BLOCK, cache.type_k, cache.type_v,
                     (cache.k.nbytes + cache.v.nbytes) / 2**20)

        task = asyncio.create_task(load())
        yield
        task.cancel()
        if state.runner is not None:
            await loop.run_in_executor(None, state.runner.stop)

    return engine_ctx


def create_app(config: ServerConfig, *, model: Model | None = None,
               on_load_error: Callable[[str], None] | None = None) -> web.Application:
    """The application; `model` skips loading (tests pass one already loaded).

    on_load_error(message) is called on the event loop if the model fails to load (the CLI
    stops serving); without it the server stays up and answers 503 with the message.
    """
    # NOTE: a preflight is answered inside the access log and before authentication
    middlewares = [log_middleware, *cors.middlewares(config.cors_origins), errors_middleware,
                   auth_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    cors.install(app, config.cors_origins)
    state = ServerState.create(config)
    app[STATE] = state
    if model is None:
        app.cleanup_ctx.append(_engine_ctx(on_load_error))
    else:
        async def given_model(app: web.Application) -> AsyncIterator[None]:
            _start_runner(state, model)
            yield
            assert state.runner is not None
            await asyncio.get_running_loop().run_in_executor(None, state.runner.stop)

        app.cleanup_ctx.append(given_model)
    for routes in (info_routes, openai_routes, llama_routes, steering_routes, features_routes):
        routes.add_routes(app.router)
    if config.webui:  # --no-webui: the API alone
        webui_routes.add_routes(app.router)

    async def worker_pool(app: web.Application) -> AsyncIterator[None]:
        # NOTE: pool threads doing pure-Python work (tokenizing) hold the GIL for a switch
        # interval at a time, and every I/O step of the event loop waits for it: at Python's
        # default 5 ms a /health round trip took ~170 ms behind a long tokenize, at 1 ms ~20 ms
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, 0.001))
        yield
        sys.setswitchinterval(interval)
        state.close()  # after the engine: its cleanup runs first (cleanup_ctx unwinds in reverse)

    app.cleanup_ctx.insert(0, worker_pool)
    return app
