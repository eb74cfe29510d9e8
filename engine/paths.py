"""Where tiller keeps its caches: one root for compiled kernels, model keys and steering vectors.

`$TILLER_CACHE_DIR` if set, else `$XDG_CACHE_HOME/tiller`, else `~/.cache/tiller`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("TILLER_CACHE_DIR"):
        return Path(os.environ["TILLER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiller"
