"""GET /openapi.json: the API description, generated from the pydantic models in protocol.py."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

import engine
from server import protocol as p

# (method, path, summary, request model, response model)
ROUTES: list[tuple[str, str, str, type[BaseModel] | None, type[BaseModel] | None]] = [
    ("post", "/v1/completions", "OpenAI text completion (stream: server-sent events)",
     p.CompletionRequest, p.CompletionResponse),
    ("post", "/v1/chat/completions", "OpenAI chat completion (stream: server-sent events of "
     "ChatCompletionChunk)", p.ChatCompletionRequest, p.ChatCompletionResponse),
    ("post", "/completion", "llama.cpp completion", p.LlamaCompletionRequest,
     p.LlamaCompletionResponse),
    ("post", "/tokenize", "llama.cpp tokenize", p.TokenizeRequest, None),
    ("post", "/detokenize", "llama.cpp detokenize", p.DetokenizeRequest, None),
    ("post", "/v1/features", "Hidden states of chosen layers, points and positions (json, npz "
     "or safetensors)", p.FeaturesRequest, p.FeaturesResponse),
    ("post", "/v1/embeddings", "OpenAI embeddings (plus pooling, normalize, layer, steering)",
     p.EmbeddingsRequest, p.EmbeddingsResponse),
    ("post", "/embedding", "llama.cpp embeddings", p.LlamaEmbeddingRequest, None),
    ("post", "/v1/steering", "Build a steering vector (actadd, mean, pca)",
     p.SteeringCreateRequest, p.SteeringVectorInfo),
    ("get", "/v1/steering", "Stored steering vectors", None, None),
    ("get", "/v1/steering/{id}", "Describe (json) or download (npy, gguf) a vector", None,
     p.SteeringVectorInfo),
    ("post", "/v1/steering/import", "Import a llama.cpp control-vector GGUF (request body)",
     None, p.SteeringVectorInfo),
    ("delete", "/v1/steering/{id}", "Delete a vector", None, None),
    ("get", "/v1/models", "The loaded model", None, p.ModelList),
    ("get", "/health", "200 once the model is loaded, 503 before", None, None),
    ("get", "/props", "llama.cpp server properties", None, None),
    ("get", "/slots", "llama.cpp slot states", None, None),
    ("get", "/metrics", "Prometheus metrics (text)", None, None),
]


def build_spec() -> dict:
    models = {m for _, _, _, req, resp in ROUTES for m in (req, resp) if m is not None}
    models |= {p.ChatCompletionChunk, p.ErrorResponse}
    keyed = [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)]
    refs, schema = models_json_schema(keyed, ref_template="#/components/schemas/{model}")
    error = {"description": "Error", "content": {"application/json": {
        "schema": refs[(p.ErrorResponse, "validation")]}}}
    paths: dict[str, dict] = {}
    for method, path, summary, req, resp in ROUTES:
        op: dict = {"summary": summary, "responses": {
            "200": {"description": "OK"}, "400": error, "401": error, "503": error}}
        if req is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": refs[(req, "validation")]}}}
        if resp is not None:
            op["responses"]["200"]["content"] = {"application/json": {
                "schema": refs[(resp, "validation")]}}
        paths.setdefault(path, {})[method] = op
    return {"openapi": "3.1.0",
            "info": {"title": "tiller", "version": engine.__version__,
                     "description": "Text generation with per-request steering."},
            "paths": paths, "components": {"schemas": schema.get("$defs", {}),
                                           "securitySchemes": {"bearer": {
                                               "type": "http", "scheme": "bearer"}}}}


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(build_spec())
