"""The Prometheus text exposition format, read into {"name{labels}": value}."""

from __future__ import annotations

import re

__all__ = ["parse_metrics"]

# name, optional label set (quoted values may hold "}", "," and escaped quotes), value,
# optional timestamp
_SAMPLE = re.compile(r"""
    ([A-Za-z_:][A-Za-z0-9_:]*
     (?:\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?)
    [ \t]+(\S+)(?:[ \t]+-?\d+)?
""", re.VERBOSE)


def parse_metrics(text: str) -> dict[str, float]:
    """Samples keyed by name and labels exactly as written, e.g.
    `tiller_requests_total{route="/health",status="200"}`; HELP/TYPE comments are skipped,
    timestamps dropped, +Inf/-Inf/NaN read as floats. A malformed line is a ValueError."""
    samples: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.fullmatch(line)
        if match is None:
            raise ValueError(f"metrics: not a sample line: {line!r}")
        try:
            samples[match[1]] = float(match[2])
        except ValueError:
            raise ValueError(f"metrics: bad value {match[2]!r} in {line!r}") from None
    return samples
