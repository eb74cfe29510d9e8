"""GET /metrics: Prometheus text exposition of request, token, queue, batch and cache numbers."""

from __future__ import annotations

from collections import Counter

from aiohttp import web

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: object) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


class Metrics:
    """Counters kept by the HTTP layer, plus gauges read from the runner at scrape time."""

    def __init__(self) -> None:
        self.runner = None  # set once the model is loaded
        self.requests: Counter[tuple[str, int]] = Counter()
        self.request_seconds: Counter[str] = Counter()

    def count_request(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] += 1
        self.request_seconds[route] += seconds

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]):
            lines.append(f"# HELP tiller_{name} {help_text}")
            lines.append(f"# TYPE tiller_{name} {kind}")
            lines.extend(f"tiller_{name}{labels} {value:g}" for labels, value in samples)
            # (histogram and summary samples pass their suffix as the start of `labels`)

        metric("requests_total", "counter", "HTTP requests by route and status.",
               [(_labels(route=r, status=s), n) for (r, s), n in sorted(self.requests.items())])
        metric("request_seconds_total", "counter", "Time spent serving requests, by route.",
               [(_labels(route=r), t) for r, t in sorted(self.request_seconds.items())])
        runner = self.runner
        if runner is None:
            metric("model_ready", "gauge", "1 once the model is loaded.", [("", 0)])
            return "\n".join(lines) + "\n"
        metric("model_ready", "gauge", "1 once the model is loaded.", [("", 1)])
        stats = runner.stats
        snap = runner.snapshot()
        metric("prompt_tokens_total", "counter", "Prompt tokens computed.",
               [("", stats.prompt_tokens)])
        metric("generated_tokens_total", "counter", "Tokens sampled.",
               [("", stats.generated_tokens)])
        metric("queue_depth", "gauge", "Requests waiting for a slot.", [("", snap["waiting"])])
        metric("running_sequences", "gauge", "Sequences in the running batch.",
               [("", len(snap["running"]))])
        metric("kv_blocks_used", "gauge", "KV-cache blocks holding sequences.",
               [("", snap["kv_blocks_used"])])
        metric("kv_blocks_total", "gauge", "KV-cache blocks in the pool.",
               [("", snap["kv_blocks_total"])])
        metric("kv_cache_usage_ratio", "gauge", "Used fraction of the KV cache.",
               [("", snap["kv_blocks_used"] / max(snap["kv_blocks_total"], 1))])
        sizes = stats.batch_sizes.copy()
        buckets, total = [], 0
        for le in BATCH_BUCKETS:
            total = sum(n for size, n in sizes.items() if size <= le)
            buckets.append((_labels(le=le), total))
        count = sum(sizes.values())
        buckets.append((_labels(le="+Inf"), count))
        metric("batch_size", "histogram", "Sequences per engine step.",
               [*[("_bucket" + lab, v) for lab, v in buckets],
                ("_sum", sum(size * n for size, n in sizes.items())), ("_count", count)])
        metric("step_seconds", "summary", "Engine step latency.",
               [("_sum", stats.step_seconds), ("_count", stats.steps)])
        metric("last_step_seconds", "gauge", "Latency of the latest engine step.",
               [("", stats.last_step_seconds)])
        return "\n".join(lines) + "\n"

    async def handler(self, request: web.Request) -> web.Response:
        return web.Response(text=self.render(), content_type="text/plain",
                            headers={"X-Prometheus-Format": "0.0.4"})
