"""tiller's HTTP server (aiohttp) over the engine's batched step."""
