"""Client and AsyncClient: the same methods, blocking or awaitable, over one httpx client each.

Streaming is a separate method, never a flag: `complete`/`chat` return a whole response,
`stream_complete`/`stream_chat` return a Stream (AsyncStream) of chunks. The request is sent
by the call itself, so an error the server reports before streaming (bad parameter, context
length, auth, busy) is raised there, with the same exception as the non-streaming method; an
error event in the middle of a stream, or a stream cut short, is raised by the iteration.

Request bodies are built and responses read by the module functions below, shared by both
clients: the classes only move bytes.
"""

from __future__ import annotations

import json
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, overload

import httpx

from tiller_client.errors import (
    TillerError,
    connection_error,
    error_from_body,
    error_from_response,
    stream_cut_short,
)
from tiller_client.prometheus import parse_metrics
from tiller_client.sse import ServerSentEvent, aiter_events, iter_events
from tiller_client.types import (
    ChatChunk,
    ChatCompletion,
    Completion,
    CompletionChunk,
    Embeddings,
    Features,
    ModelInfo,
    SteeringVector,
    TokenPiece,
    Usage,
    _numpy,
)

__all__ = ["DEFAULT_BASE_URL", "AsyncClient", "AsyncStream", "Client", "Stream"]

__version__ = "0.1.0"
DEFAULT_BASE_URL = "http://127.0.0.1:8080"
# NOTE: generation can take minutes; the read timeout is per chunk read, not per request.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)

T = TypeVar("T")
Prompt = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]
Messages = Sequence[Mapping[str, Any]]
Stop = str | Sequence[str] | None
Timeout = float | httpx.Timeout | None
ChunkParser = Callable[[Mapping[str, Any], Mapping[str, Any]], T]
Steering = Sequence[Mapping[str, Any]] | None
# {"name", "vector": id or floats, "layer", "point"} each (see the server's README)
Readouts = Sequence[Mapping[str, Any]] | None


# request bodies -------------------------------------------------------------------------------


def _prompt(prompt: Prompt) -> str | list[Any]:
    if isinstance(prompt, str):
        return prompt
    return [p if isinstance(p, int | str) else list(p) for p in prompt]


def _sampling(temperature: float | None, top_p: float | None, top_k: int | None,
              min_p: float | None, stop: Stop, seed: int | None, n: int,
              frequency_penalty: float | None, presence_penalty: float | None,
              repetition_penalty: float | None) -> dict[str, Any]:
    """The sampling fields both endpoints share; None means 'the server's default'."""
    body = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
            "stop": stop if stop is None or isinstance(stop, str) else list(stop),
            "seed": seed, "n": n, "frequency_penalty": frequency_penalty,
            "presence_penalty": presence_penalty, "repetition_penalty": repetition_penalty}
    return {k: v for k, v in body.items() if v is not None}


def _completion_body(prompt: Prompt, max_tokens: int | None, logprobs: int | None, echo: bool,
                     sampling: dict[str, Any], extra_body: Mapping[str, Any] | None,
                     stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": _prompt(prompt), "max_tokens": max_tokens, **sampling}
    if logprobs is not None:
        body["logprobs"] = logprobs
    if echo:
        body["echo"] = True
    return _finish_body(body, extra_body, stream)


def _chat_body(messages: Messages, max_tokens: int | None, logprobs: bool,
               top_logprobs: int | None, chat_template_kwargs: Mapping[str, Any] | None,
               sampling: dict[str, Any], extra_body: Mapping[str, Any] | None,
               stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [dict(m) for m in messages], **sampling}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if logprobs:
        body["logprobs"] = True
    if top_logprobs is not None:
        body["top_logprobs"] = top_logprobs
    if chat_template_kwargs is not None:
        body["chat_template_kwargs"] = dict(chat_template_kwargs)
    return _finish_body(body, extra_body, stream)


def _features_body(input: str | Sequence[int], layers: Sequence[int] | None,
                   points: str | Sequence[str] | None, positions: str | Sequence[int],
                   steering: Steering, extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    _numpy()  # before the request: the answer is numpy arrays
    body: dict[str, Any] = {"input": _prompt(input), "format": "npz",
                            "positions": positions if isinstance(positions, str)
                            else list(positions)}
    if layers is not None:
        body["layers"] = list(layers)
    if points is not None:
        body["points"] = [points] if isinstance(points, str) else list(points)
    if steering:
        body["steering"] = [dict(e) for e in steering]
    body.update(extra_body or {})
    return body


def _embed_body(input: Prompt, pooling: str | None, normalize: bool | None, layer: int | None,
                steering: Steering, model: str | None,
                extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    # NOTE: base64 float32 is a quarter of the JSON numbers' size and decodes exactly
    body: dict[str, Any] = {"input": _prompt(input), "encoding_format": "base64"}
    for name, value in (("pooling", pooling), ("normalize", normalize), ("layer", layer),
                        ("model", model)):
        if value is not None:
            body[name] = value
    if steering:
        body["steering"] = [dict(e) for e in steering]
    body.update(extra_body or {})
    return body


def _finish_body(body: dict[str, Any], extra_body: Mapping[str, Any] | None,
                 stream: bool) -> dict[str, Any]:
    body.update(extra_body or {})
    if stream:  # usage arrives in a last chunk without choices; Stream.usage keeps it
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


# responses ------------------------------------------------------------------------------------


def _parse(path: str, response: httpx.Response, build: Callable[[Any], T]) -> T:
    """Build the result from a successful response; anything unexpected is a TillerError."""
    try:
        return build(response.json())
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TillerError(f"unexpected response from {path}: {type(e).__name__}: {e}",
                          status=response.status_code, type="invalid_response") from e


def _features(path: str, response: httpx.Response) -> Features:
    try:
        return Features.from_npz(response.content)
    except (KeyError, TypeError, ValueError, OSError) as e:  # not an .npz of the right arrays
        raise TillerError(f"unexpected response from {path}: {type(e).__name__}: {e}",
                          status=response.status_code, type="invalid_response") from e


def _tokens(data: Mapping[str, Any]) -> list[int] | list[TokenPiece]:
    tokens = data["tokens"]
    if tokens and isinstance(tokens[0], Mapping):
        return [TokenPiece.from_json(t) for t in tokens]
    return [int(t) for t in tokens]


def _models(data: Mapping[str, Any]) -> list[ModelInfo]:
    return [ModelInfo.from_json(m) for m in data["data"]]


class _ChunkReader(Generic[T]):
    """Turns a stream's events into chunks: one per choice in each event, usage kept aside."""

    def __init__(self, parse: ChunkParser[T]) -> None:
        self.parse = parse
        self.usage: Usage | None = None
        self.done = False

    def read(self, event: ServerSentEvent) -> list[T]:
        if self.done:
            return []
        if event.data.strip() == "[DONE]":
            self.done = True
            return []
        try:
            data = json.loads(event.data)
        except ValueError as e:
            raise TillerError(f"stream: an event is not JSON: {event.data[:200]!r}",
                              type="invalid_response") from e
        if not isinstance(data, Mapping):
            raise TillerError(f"stream: an event is not a JSON object: {event.data[:200]!r}",
                              type="invalid_response")
        if "error" in data or event.event == "error":
            raise error_from_body(data)
        try:
            if data.get("usage"):
                self.usage = Usage.from_json(data["usage"])
            return [self.parse(data, choice) for choice in data.get("choices") or []]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TillerError(f"stream: unexpected event {event.data[:200]!r}: {e}",
                              type="invalid_response") from e


class Stream(Generic[T]):
    """The chunks of a streamed response, as they arrive. Iterate it once; close it (or use
    `with`) to stop early and free the connection. `usage` is set once the stream is done."""

    def __init__(self, response: httpx.Response, parse: ChunkParser[T]) -> None:
        self.response = response
        self._reader = _ChunkReader(parse)
        self._chunks = self._iterate()

    @property
    def usage(self) -> Usage | None:
        return self._reader.usage

    def _iterate(self) -> Generator[T, None, None]:
        url = self.response.request.url
        try:
            for event in iter_events(self.response.iter_bytes()):
                yield from self._reader.read(event)
                if self._reader.done:
                    return
            raise stream_cut_short(url)
        except httpx.TransportError as e:
            raise connection_error(e, url) from e
        finally:
            self.response.close()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self.response.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(Generic[T]):
    """Stream's asynchronous twin: `async for chunk in stream`, `await stream.close()`."""

    def __init__(self, response: httpx.Response, parse: ChunkParser[T]) -> None:
        self.response = response
        self._reader = _ChunkReader(parse)
        self._chunks = self._iterate()

    @property
    def usage(self) -> Usage | None:
        return self._reader.usage

    async def _iterate(self) -> AsyncGenerator[T, None]:
        url = self.response.request.url
        try:
            async for event in aiter_events(self.response.aiter_bytes()):
                for chunk in self._reader.read(event):
                    yield chunk
                if self._reader.done:
                    return
            raise stream_cut_short(url)
        except httpx.TransportError as e:
            raise connection_error(e, url) from e
        finally:
            await self.response.aclose()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self._chunks.__anext__()

    async def close(self) -> None:
        await self._chunks.aclose()
        await self.response.aclose()

    aclose = close  # the name contextlib.aclosing() and async generators use

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# the clients ----------------------------------------------------------------------------------


def _headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    out = {"User-Agent": f"tiller-client/{__version__}", "Accept": "application/json"}
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    out.update(headers or {})
    return out


class _Base:
    def __init__(self, base_url: str, api_key: str | None, timeout: Timeout) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"


class Client(_Base):
    """A blocking client for a tiller server (or any server speaking the same API).

    `api_key` is sent as a bearer token; `timeout` is seconds (or an httpx.Timeout) for
    connecting and for each read; `http_client` replaces the internal httpx.Client (and is then
    not closed by close()), e.g. for a custom transport.
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout: Timeout = DEFAULT_TIMEOUT, *, headers: Mapping[str, str] | None = None,
                 http_client: httpx.Client | None = None) -> None:
        super().__init__(base_url, api_key, timeout)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)
        self._headers = _headers(api_key, headers)
        self.steering = SteeringAPI(self)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # transport

    def _send(self, method: str, path: str, body: Any = None, *,
              stream: bool = False, content: bytes | None = None) -> httpx.Response:
        request = self._http.build_request(method, self.base_url + path, json=body,
                                           content=content, headers=self._headers)
        try:
            response = self._http.send(request, stream=stream)
            if response.is_error:
                response.read()
        except httpx.TransportError as e:
            raise connection_error(e, request.url) from e
        if response.is_error:
            response.close()
            raise error_from_response(response)
        return response

    def _get(self, path: str, build: Callable[[Any], T]) -> T:
        return _parse(path, self._send("GET", path), build)

    def _post(self, path: str, body: Any, build: Callable[[Any], T]) -> T:
        return _parse(path, self._send("POST", path, body), build)

    # the API

    def complete(self, prompt: Prompt, *, max_tokens: int | None = 16,
                 temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, min_p: float | None = None, stop: Stop = None,
                 seed: int | None = None, n: int = 1, logprobs: int | None = None,
                 echo: bool = False, frequency_penalty: float | None = None,
                 presence_penalty: float | None = None, repetition_penalty: float | None = None,
                 steering: Steering = None, readouts: Readouts = None,
                 readout_prompt: bool = False,
                 hidden_states: Mapping[str, Any] | None = None,
                 extra_body: Mapping[str, Any] | None = None) -> Completion:
        """POST /v1/completions. `prompt` is text or token ids (or a list of either: one choice
        per prompt and n); max_tokens=None generates until EOS or the context is full; sampling
        fields left None take the server's defaults (temperature 1); `extra_body` adds fields."""
        extra_body = _with_readings(_with_steering(extra_body, steering), readouts,
                                    readout_prompt, hidden_states)
        body = _completion_body(prompt, max_tokens, logprobs, echo, _sampling(
            temperature, top_p, top_k, min_p, stop, seed, n, frequency_penalty,
            presence_penalty, repetition_penalty), extra_body, stream=False)
        return self._post("/v1/completions", body, Completion.from_json)

    def stream_complete(self, prompt: Prompt, *, max_tokens: int | None = 16,
                        temperature: float | None = None, top_p: float | None = None,
                        top_k: int | None = None, min_p: float | None = None, stop: Stop = None,
                        seed: int | None = None, n: int = 1, logprobs: int | None = None,
                        echo: bool = False, frequency_penalty: float | None = None,
                        presence_penalty: float | None = None,
                        repetition_penalty: float | None = None,
                        steering: Steering = None, readouts: Readouts = None,
                        readout_prompt: bool = False,
                        hidden_states: Mapping[str, Any] | None = None,
                        extra_body: Mapping[str, Any] | None = None) -> Stream[CompletionChunk]:
        """complete(), streamed: CompletionChunks whose texts concatenate (per index) to the
        choice's text."""
        extra_body = _with_readings(_with_steering(extra_body, steering), readouts,
                                    readout_prompt, hidden_states)
        body = _completion_body(prompt, max_tokens, logprobs, echo, _sampling(
            temperature, top_p, top_k, min_p, stop, seed, n, frequency_penalty,
            presence_penalty, repetition_penalty), extra_body, stream=True)
        return Stream(self._send("POST", "/v1/completions", body, stream=True),
                      CompletionChunk.from_json)

    def chat(self, messages: Messages, *, max_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, min_p: float | None = None, stop: Stop = None,
             seed: int | None = None, n: int = 1, logprobs: bool = False,
             top_logprobs: int | None = None, frequency_penalty: float | None = None,
             presence_penalty: float | None = None, repetition_penalty: float | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None,
             steering: Steering = None, readouts: Readouts = None,
             readout_prompt: bool = False,
             hidden_states: Mapping[str, Any] | None = None,
             extra_body: Mapping[str, Any] | None = None) -> ChatCompletion:
        """POST /v1/chat/completions. `messages` are {"role", "content"} mappings;
        max_tokens=None generates until EOS or the context is full."""
        extra_body = _with_readings(_with_steering(extra_body, steering), readouts,
                                    readout_prompt, hidden_states)
        body = _chat_body(messages, max_tokens, logprobs, top_logprobs, chat_template_kwargs,
                          _sampling(temperature, top_p, top_k, min_p, stop, seed, n,
                                    frequency_penalty, presence_penalty, repetition_penalty),
                          extra_body, stream=False)
        return self._post("/v1/chat/completions", body, ChatCompletion.from_json)

    def stream_chat(self, messages: Messages, *, max_tokens: int | None = None,
                    temperature: float | None = None, top_p: float | None = None,
                    top_k: int | None = None, min_p: float | None = None, stop: Stop = None,
                    seed: int | None = None, n: int = 1, logprobs: bool = False,
                    top_logprobs: int | None = None, frequency_penalty: float | None = None,
                    presence_penalty: float | None = None,
                    repetition_penalty: float | None = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None,
                    steering: Steering = None, readouts: Readouts = None,
                    readout_prompt: bool = False,
                    hidden_states: Mapping[str, Any] | None = None,
                    extra_body: Mapping[str, Any] | None = None) -> Stream[ChatChunk]:
        """chat(), streamed: ChatChunks whose contents concatenate (per index) to the message."""
        extra_body = _with_readings(_with_steering(extra_body, steering), readouts,
                                    readout_prompt, hidden_states)
        body = _chat_body(messages, max_tokens, logprobs, top_logprobs, chat_template_kwargs,
                          _sampling(temperature, top_p, top_k, min_p, stop, seed, n,
                                    frequency_penalty, presence_penalty, repetition_penalty),
                          extra_body, stream=True)
        return Stream(self._send("POST", "/v1/chat/completions", body, stream=True),
                      ChatChunk.from_json)

    def features(self, input: str | Sequence[int], *, layers: Sequence[int] | None = None,
                 points: str | Sequence[str] | None = None,
                 positions: str | Sequence[int] = "all", steering: Steering = None,
                 extra_body: Mapping[str, Any] | None = None) -> Features:
        """POST /v1/features: hidden states as numpy arrays (needs numpy).

        `input` is text (the server adds BOS) or token ids; `layers` are block indices
        (negative from the end; default all); `points` any of "resid_pre", "attn_out",
        "mlp_out", "resid_post" (default "resid_post"); `positions` "all", "last" or token
        indices; `steering` entries as for generation. `result[point]` is float32
        (layers, positions, dim)."""
        body = _features_body(input, layers, points, positions, steering, extra_body)
        return _features("/v1/features", self._send("POST", "/v1/features", body))

    def embed(self, input: Prompt, *, pooling: str | None = None, normalize: bool | None = None,
              layer: int | None = None, steering: Steering = None, model: str | None = None,
              extra_body: Mapping[str, Any] | None = None) -> Embeddings:
        """POST /v1/embeddings: one vector per input (a text, texts, token ids or lists of
        them). Server defaults: mean pooling ("last", "first"), L2-normalized, the final hidden
        state after the model's final norm (`layer`: a block's output instead)."""
        body = _embed_body(input, pooling, normalize, layer, steering, model, extra_body)
        return self._post("/v1/embeddings", body, Embeddings.from_json)

    @overload
    def tokenize(self, text: str, add_special: bool = ...,
                 with_pieces: Literal[False] = ...) -> list[int]: ...
    @overload
    def tokenize(self, text: str, add_special: bool,
                 with_pieces: Literal[True]) -> list[TokenPiece]: ...
    @overload
    def tokenize(self, text: str, add_special: bool = ..., *,
                 with_pieces: Literal[True]) -> list[TokenPiece]: ...
    @overload
    def tokenize(self, text: str, add_special: bool = ...,
                 with_pieces: bool = ...) -> list[int] | list[TokenPiece]: ...

    def tokenize(self, text: str, add_special: bool = False,
                 with_pieces: bool = False) -> list[int] | list[TokenPiece]:
        """POST /tokenize: token ids (add_special: with BOS), or TokenPieces with their text."""
        return self._post("/tokenize", {"content": text, "add_special": add_special,
                                        "with_pieces": with_pieces}, _tokens)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """POST /detokenize: the text of token ids."""
        return self._post("/detokenize", {"tokens": list(tokens)}, lambda d: str(d["content"]))

    def models(self) -> list[ModelInfo]:
        """GET /v1/models."""
        return self._get("/v1/models", _models)

    def metrics(self) -> dict[str, float]:
        """GET /metrics, as {"name{labels}": value} (see parse_metrics)."""
        return parse_metrics(self._send("GET", "/metrics").text)

    def health(self) -> bool:
        """GET /health: True when the model is loaded and serving, False for any error status
        (503 while loading); raises ConnectionError when the server cannot be reached."""
        try:
            self._send("GET", "/health")
        except TillerError as e:
            if e.status is None:
                raise
            return False
        return True


class AsyncClient(_Base):
    """Client's asynchronous twin: the same methods, to be awaited; the stream methods return
    an AsyncStream once the response has started (`async for chunk in await c.stream_chat(...)`).
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout: Timeout = DEFAULT_TIMEOUT, *, headers: Mapping[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key, timeout)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._headers = _headers(api_key, headers)
        self.steering = AsyncSteeringAPI(self)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # transport

    async def _send(self, method: str, path: str, body: Any = None, *,
                    stream: bool = False, content: bytes | None = None) -> httpx.Response:
        request = self._http.build_request(method, self.base_url + path, json=body,
                                           content=content, headers=self._headers)
        try:
            response = await self._http.send(request, stream=stream)
            if response.is_error:
                await response.aread()
        except httpx.TransportError as e:
            raise connection_error(e, request.url) from e
        if response.is_error:
            await response.aclose()
            raise error_from_response(response)
        return response

    async def _get(self, path: str, build: Callable[[Any], T]) -> T:
        return _parse(path, await self._send("GET", path), build)

    async def _post(self, path: str, body: Any, build: Callable[[Any], T]) -> T:
        return _parse(path, await self._send("POST", path, body), build)

    # the API (documented on Client)

    async def complete(self, prompt: Prompt, *, max_tokens: int | None = 16,
                       temperature: float | None = None, top_p: float | None = None,
                       top_k: int | None = None, min_p: float | None = None, stop: Stop = None,
                       seed: int | None = None, n: int = 1, logprobs: int | None = None,
                       echo: bool = False, frequency_penalty: float | None = None,
                       presence_penalty: float | None = None,
                       repetition_penalty: float | None = None,
                       steering: Steering = None, readouts: Readouts = None,
                       readout_prompt: bool = False,
                       hidden_states: Mapping[str, Any] | None = None,
                       extra_body: Mapping[str, Any] | None = None) -> Completion:
        extra_body = _with_readings(_with_steering(extra_body, steering), readouts,
                                    readout_prompt, hidden_states)
        body = _completion_body(prompt, max_tokens, logprobs, echo, _sampling(
            temperature, top_p, top_k, min_p, stop, seed, n, frequency_penalty,
            presence_penalty, repetition_penalty), extra_body, stream=False)
        return await self._post("/v1/completions", body, Completion.from_json)

    async def stream_complete(self, prompt: Prompt, *, max_tokens: int | None = 16,
                              temperature: float | None = None, top_p: float | None = None,
                              top_k: int | None = None, min_p: float | None = None,
                              stop: Stop = None, seed: int | None = None, n: int = 1,
                              logprobs: int | None = None, echo: bool = False,
                              frequency_penalty: float | None = None,
                              presence_penalty: float | None = None,
                              repetition_penalty: float | None = None,
                              steering: Steering = None, readouts: Readouts = None,
                              readout_prompt: bool = False,
                              hidden_states: Mapping[str, Any] | None = None,
                              extra_body: Mapping[str, Any] | None = None
                              ) -> AsyncStream[CompletionChunk]:
        extra_body = _with_readings(_with_steering(extra_body, steering), readouts,
                                    readout_prompt, hidden_states)
        body = _completion_body(prompt, max_tokens, logprobs, echo, _sampling(
            temperature, top_p, top_k, min_p, stop, seed, n, frequency_penalty,
            presence_penalty, repetition_penalty), extra_body, stream=True)
        return AsyncStream(await self._send("POST", "/v1/completions", body, stream=True),
                           CompletionChunk.from_json)

    async def chat(self, messages: Messages, *, max_tokens: int | None = None,
                   temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, min_p: float | None = None, stop: Stop = None,
                   seed: int | None = None, n: int = 1, logprobs: bool = False,
                   top_logprobs: int | None = None, frequency_penalty: float | None = None,
                   presence_penalty: float | None = None,
                   repetition_penalty: float | None = None,
                   chat_template_kwargs: Mapping[str, Any] | None = None,
                   steering: Steering = None, readouts: Readouts = None,
                   readout_prompt: bool = False,
                   hidden_states: Mapping[str, Any] | None = None,
                   extra_body: Mapping[str, Any] | None = None) -> ChatCompletion:
        extra_body = _with_readings(_with_steering(extra_body, steering), readouts,
                                    readout_prompt, hidden_states)
        body = _chat_body(messages, max_tokens, logprobs, top_logprobs, chat_template_kwargs,
                          _sampling(temperature, top_p, top_k, min_p, stop, seed, n,
                                    frequency_penalty, presence_penalty, repetition_penalty),
                          extra_body, stream=False)
        return await self._post("/v1/chat/completions", body, ChatCompletion.from_json)

    async def stream_chat(self, messages: Messages, *, max_tokens: int | None = None,
                          temperature: float | None = None, top_p: float | None = None,
                          top_k: int | None = None, min_p: float | None = None,
                          stop: Stop = None, seed: int | None = None, n: int = 1,
                          logprobs: bool = False, top_logprobs: int | None = None,
                          frequency_penalty: float | None = None,
                          presence_penalty: float | None = None,
                          repetition_penalty: float | None = None,
                          chat_template_kwargs: Mapping[str, Any] | None = None,
                          steering: Steering = None, readouts: Readouts = None,
                          readout_prompt: bool = False,
                          hidden_states: Mapping[str, Any] | None = None,
                          extra_body: Mapping[str, Any] | None = None) -> AsyncStream[ChatChunk]:
        extra_body = _with_readings(_with_steering(extra_body, steering), readouts,
                                    readout_prompt, hidden_states)
        body = _chat_body(messages, max_tokens, logprobs, top_logprobs, chat_template_kwargs,
                          _sampling(temperature, top_p, top_k, min_p, stop, seed, n,
                                    frequency_penalty, presence_penalty, repetition_penalty),
                          extra_body, stream=True)
        return AsyncStream(await self._send("POST", "/v1/chat/completions", body, stream=True),
                           ChatChunk.from_json)

    async def features(self, input: str | Sequence[int], *,
                       layers: Sequence[int] | None = None,
                       points: str | Sequence[str] | None = None,
                       positions: str | Sequence[int] = "all", steering: Steering = None,
                       extra_body: Mapping[str, Any] | None = None) -> Features:
        body = _features_body(input, layers, points, positions, steering, extra_body)
        return _features("/v1/features", await self._send("POST", "/v1/features", body))

    async def embed(self, input: Prompt, *, pooling: str | None = None,
                    normalize: bool | None = None, layer: int | None = None,
                    steering: Steering = None, model: str | None = None,
                    extra_body: Mapping[str, Any] | None = None) -> Embeddings:
        body = _embed_body(input, pooling, normalize, layer, steering, model, extra_body)
        return await self._post("/v1/embeddings", body, Embeddings.from_json)

    @overload
    async def tokenize(self, text: str, add_special: bool = ...,
                       with_pieces: Literal[False] = ...) -> list[int]: ...
    @overload
    async def tokenize(self, text: str, add_special: bool,
                       with_pieces: Literal[True]) -> list[TokenPiece]: ...
    @overload
    async def tokenize(self, text: str, add_special: bool = ..., *,
                       with_pieces: Literal[True]) -> list[TokenPiece]: ...
    @overload
    async def tokenize(self, text: str, add_special: bool = ...,
                       with_pieces: bool = ...) -> list[int] | list[TokenPiece]: ...

    async def tokenize(self, text: str, add_special: bool = False,
                       with_pieces: bool = False) -> list[int] | list[TokenPiece]:
        return await self._post("/tokenize", {"content": text, "add_special": add_special,
                                              "with_pieces": with_pieces}, _tokens)

    async def detokenize(self, tokens: Sequence[int]) -> str:
        return await self._post("/detokenize", {"tokens": list(tokens)},
                                lambda d: str(d["content"]))

    async def models(self) -> list[ModelInfo]:
        return await self._get("/v1/models", _models)

    async def metrics(self) -> dict[str, float]:
        return parse_metrics((await self._send("GET", "/metrics")).text)

    async def health(self) -> bool:
        try:
            await self._send("GET", "/health")
        except TillerError as e:
            if e.status is None:
                raise
            return False
        return True


# steering ---------------------------------------------------------------------------------------


def _with_steering(extra_body: Mapping[str, Any] | None, steering: Steering
                   ) -> Mapping[str, Any] | None:
    """Steering entries ride in the body like any other field."""
    if not steering:
        return extra_body
    return {**(extra_body or {}), "steering": list(steering)}


def _with_readings(extra_body: Mapping[str, Any] | None, readouts: Readouts,
                   readout_prompt: bool, hidden_states: Mapping[str, Any] | None
                   ) -> Mapping[str, Any] | None:
    """Readouts (per generated token, and with readout_prompt per prompt token) and hidden
    states ({"layers", "points", "positions"}) ride in the body too; the choices' `readings`
    hold what comes back."""
    extra: dict[str, Any] = {}
    if readouts:
        extra["readouts"] = [dict(r) for r in readouts]
    if readout_prompt:
        extra["readout_prompt"] = True
    if hidden_states is not None:
        extra["hidden_states"] = dict(hidden_states)
    return {**(extra_body or {}), **extra} if extra else extra_body


def _steering_body(method: str, add: str | None, sub: str | None, layer: int | None,
                   positive: Sequence[str] | None, negative: Sequence[str] | None,
                   layers: Sequence[int] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"method": method}
    for key, value in (("add", add), ("sub", sub), ("layer", layer)):
        if value is not None:
            body[key] = value
    for key, seq in (("positive", positive), ("negative", negative), ("layers", layers)):
        if seq is not None:
            body[key] = list(seq)
    return body


def _vectors(data: Any) -> list[SteeringVector]:
    return [SteeringVector.from_json(v) for v in data["data"]]


class SteeringAPI:
    """client.steering: build, list, describe, download, import and delete steering vectors."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, method: str = "actadd", *, add: str | None = None, sub: str | None = None,
               layer: int | None = None, positive: Sequence[str] | None = None,
               negative: Sequence[str] | None = None,
               layers: Sequence[int] | None = None) -> SteeringVector:
        """ActAdd (`add`, `sub`, `layer` to read at) or a control vector ("mean" | "pca" from
        `positive`/`negative` prompt pairs at `layers`). The same request gives the same id."""
        body = _steering_body(method, add, sub, layer, positive, negative, layers)
        return self._client._post("/v1/steering", body, SteeringVector.from_json)

    def list(self) -> list[SteeringVector]:
        return self._client._get("/v1/steering", _vectors)

    def get(self, vector_id: str) -> SteeringVector:
        return self._client._get(f"/v1/steering/{vector_id}", SteeringVector.from_json)

    def download(self, vector_id: str, format: str = "npy") -> bytes:
        """The vector as .npy bytes, or for control vectors llama.cpp's GGUF ("gguf")."""
        return self._client._send("GET", f"/v1/steering/{vector_id}?format={format}").content

    def import_gguf(self, data: bytes) -> SteeringVector:
        """Store a llama.cpp / repeng control-vector GGUF file's bytes."""
        response = self._client._send("POST", "/v1/steering/import", content=data)
        return _parse("/v1/steering/import", response, SteeringVector.from_json)

    def delete(self, vector_id: str) -> None:
        self._client._send("DELETE", f"/v1/steering/{vector_id}")


class AsyncSteeringAPI:
    """AsyncClient.steering: the same as SteeringAPI, as coroutines."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(self, method: str = "actadd", *, add: str | None = None,
                     sub: str | None = None, layer: int | None = None,
                     positive: Sequence[str] | None = None,
                     negative: Sequence[str] | None = None,
                     layers: Sequence[int] | None = None) -> SteeringVector:
        body = _steering_body(method, add, sub, layer, positive, negative, layers)
        return await self._client._post("/v1/steering", body, SteeringVector.from_json)

    async def list(self) -> list[SteeringVector]:
        return await self._client._get("/v1/steering", _vectors)

    async def get(self, vector_id: str) -> SteeringVector:
        return await self._client._get(f"/v1/steering/{vector_id}", SteeringVector.from_json)

    async def download(self, vector_id: str, format: str = "npy") -> bytes:
        response = await self._client._send("GET", f"/v1/steering/{vector_id}?format={format}")
        return response.content

    async def import_gguf(self, data: bytes) -> SteeringVector:
        response = await self._client._send("POST", "/v1/steering/import", content=data)
        return _parse("/v1/steering/import", response, SteeringVector.from_json)

    async def delete(self, vector_id: str) -> None:
        await self._client._send("DELETE", f"/v1/steering/{vector_id}")
