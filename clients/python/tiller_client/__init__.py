"""tiller_client: a typed client for tiller's OpenAI- and llama.cpp-compatible HTTP API.

    from tiller_client import Client

    with Client("http://127.0.0.1:8080") as client:
        print(client.complete("Once upon a time", max_tokens=32, temperature=0).text)
        for chunk in client.stream_chat([{"role": "user", "content": "Hi"}]):
            print(chunk.content, end="", flush=True)
"""

from tiller_client.client import (
    DEFAULT_BASE_URL,
    AsyncClient,
    AsyncStream,
    Client,
    Stream,
    __version__,
)
from tiller_client.errors import (
    AuthenticationError,
    BadRequestError,
    ConnectionError,
    ContextLengthError,
    NotFoundError,
    ServerBusyError,
    TillerError,
)
from tiller_client.prometheus import parse_metrics
from tiller_client.sse import ServerSentEvent, SSEDecoder
from tiller_client.types import (
    ChatChoice,
    ChatChunk,
    ChatCompletion,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    Embeddings,
    Features,
    ModelInfo,
    Readings,
    SteeringVector,
    TokenLogprob,
    TokenPiece,
    TopLogprob,
    Usage,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatChoice",
    "ChatChunk",
    "ChatCompletion",
    "ChatMessage",
    "Client",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "ConnectionError",
    "ContextLengthError",
    "Embeddings",
    "Features",
    "ModelInfo",
    "Readings",
    "SteeringVector",
    "NotFoundError",
    "SSEDecoder",
    "ServerBusyError",
    "ServerSentEvent",
    "Stream",
    "TillerError",
    "TokenLogprob",
    "TokenPiece",
    "TopLogprob",
    "Usage",
    "__version__",
    "parse_metrics",
]
