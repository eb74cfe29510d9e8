"""tiller's inference engine: llama-architecture models on the CPU with numba Q8_0 kernels."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .. import __version__
from .paths import cache_root
from .threading_layer import preload_tbb


def _numba_cache_dir() -> None:
    """Keep numba's on-disk cache in a folder named after the engine's source.

    numba revalidates a cached function against its own file only, so after an edit to
    kernels.py a cached forward_step would still call the old kernels. Hashing every module of
    the package into the cache path makes any edit start from a clean cache.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    import numba

    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    base = cache_root() / "numba"
    cache_dir = str(base / f"{__version__}-{digest.hexdigest()[:16]}")
    numba.config.CACHE_DIR = cache_dir  # type: ignore[attr-defined]  # numba stubs lack it


_numba_cache_dir()
preload_tbb()
