"""The OpenAPI document, derived from the routes the application registered.

Each handler declares its operation with `@operation(summary, request=..., response=...)`;
`build_spec(app)` walks the router, so a route exists in the document exactly when it is
served. Schemas come from the pydantic models in protocol.py -- the same models the handlers
validate with (in strict mode), so the document is as strict as the server. Every status a
handler can answer is listed (tests/test_schemathesis.py holds the server to it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from . import protocol as p

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Operation:
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    public: bool = False  # callable without an API key (server/http.py auth_middleware)
    query: type[BaseModel] | None = None  # query parameters, validated with this model
    binary: bool = False  # 200 may also be application/octet-stream (a file download)
    upload: bool = False  # the body is a file (application/octet-stream), not JSON
    stores: bool = False  # may store a steering vector: 507 when the store is full
    stream: bool = False  # `stream: true` answers with server-sent events


def operation(summary: str, request: type[BaseModel] | None = None,
              response: type[BaseModel] | None = None, *, public: bool = False,
              query: type[BaseModel] | None = None, binary: bool = False,
              upload: bool = False, stores: bool = False, stream: bool = False
              ) -> Callable[[F], F]:
    """Declare a handler's place in the OpenAPI document."""
    def mark(handler: F) -> F:
        handler.__openapi__ = Operation(summary, request, response, public, query,  # type: ignore[attr-defined]
                                        binary, upload, stores, stream)
        return handler
    return mark


def _steered(model: type[BaseModel] | None) -> bool:
    """A request with a `steering` field: it may name an unknown vector (404) and store the
    vector of an inline ActAdd entry (507)."""
    return model is not None and "steering" in model.model_fields


def _operations(app: web.Application) -> list[tuple[str, str, Operation]]:
    seen: set[tuple[int, str]] = set()
    out = []
    for route in app.router.routes():
        op = getattr(route.handler, "__openapi__", None)
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if op is None or path is None or route.method == "HEAD":
            continue
        key = (id(route.handler), route.method)
        if key in seen:  # aliases (/chat/completions beside /v1/chat/completions) once
            continue
        seen.add(key)
        out.append((route.method.lower(), path, op))
    return out


def build_spec(app: web.Application) -> dict:
    ops = _operations(app)
    models = {m for _, _, op in ops for m in (op.request, op.response, op.query)
              if m is not None}
    models |= {p.ChatCompletionChunk, p.ErrorResponse}
    mode: Literal["validation"] = "validation"
    keyed = [(m, mode) for m in sorted(models, key=lambda m: m.__name__)]
    refs, schema = models_json_schema(keyed, ref_template="#/components/schemas/{model}")
    error = {"description": "Error", "content": {"application/json": {
        "schema": refs[(p.ErrorResponse, "validation")]}}}
    paths: dict[str, dict] = {}
    binary = {"application/octet-stream": {"schema": {"type": "string",
                                                      "contentMediaType":
                                                      "application/octet-stream"}}}
    for method, path, op in ops:
        spec: dict = {"summary": op.summary, "responses": {
            "200": {"description": "OK"}, "400": error, "503": error}}
        responses = spec["responses"]
        if not op.public:
            spec["security"] = [{"bearer": []}]
            responses["401"] = error
        params = re.findall(r"{(\w+)}", path)
        parameters = [{"name": name, "in": "path", "required": True,
                       "schema": {"type": "string"}} for name in params]
        if params or _steered(op.request):
            responses["404"] = error
        if op.stores or _steered(op.request):
            responses["507"] = error
        if op.query is not None:
            query = schema.get("$defs", {})[op.query.__name__]
            parameters += [{"name": name, "in": "query", "required": False, "schema": field}
                           for name, field in query["properties"].items()]
        if parameters:
            spec["parameters"] = parameters
        if op.request is not None or op.upload:
            media = ({"application/json": {"schema": refs[(op.request, "validation")]}}
                     if op.request is not None else binary)
            spec["requestBody"] = {"required": True, "content": media}
            responses["413"] = error
        if op.response is not None:
            responses["200"]["content"] = {"application/json": {
                "schema": refs[(op.response, "validation")]}}
            if op.binary:
                responses["200"]["content"].update(binary)
            if op.stream:
                responses["200"]["content"]["text/event-stream"] = {"schema": {
                    "type": "object", "required": ["data"], "properties": {"data": {
                        "type": "string", "description": "a JSON chunk, or [DONE] at the end"}}}}
        paths.setdefault(path, {})[method] = spec
    return {"openapi": "3.1.0",
            "info": {"title": "tiller", "version": __version__,
                     "description": "Text generation with per-request steering."},
            "paths": paths,
            "components": {"schemas": schema.get("$defs", {}),
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
