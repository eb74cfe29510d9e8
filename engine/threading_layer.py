"""numba's threading layer: TBB, whose parallel loops balance their work by stealing.

numba prefers TBB when `libtbb.so.12` loads, but pip installs the `tbb` wheel's library in
`<venv>/lib`, off the dynamic loader's path (conda puts it on an rpath), so numba falls back to
OpenMP. OpenMP splits each parallel loop statically, one share per thread: when another
process, or the server's own event loop, takes a core, every parallel region of a step waits
for the preempted thread's share. Measured under load in one run, stories110M-shaped decode at
batch 1 on 2 threads: OpenMP 8-14 ms median a step with a p90 up to 385 ms, TBB 5.3-6 ms with a
p90 of 6-9 ms. Preloading the library by its path lets numba find it.

The layer changes no result: every parallel loop writes disjoint outputs, each computed in a
fixed order by whichever thread runs it (tests/test_threading_layer.py checks the bits).
NUMBA_THREADING_LAYER still chooses, when set.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
from pathlib import Path

TBB_LIBRARY = "libtbb.so.12"  # the soname numba's tbbpool extension links against


def tbb_library() -> Path | None:
    """The path of the installed `tbb` distribution's library, if there is one."""
    try:
        dist = importlib.metadata.distribution("tbb")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == TBB_LIBRARY:
            path = Path(str(dist.locate_file(file))).resolve()
            return path if path.is_file() else None
    return None


def preload_tbb() -> bool:
    """Load the `tbb` wheel's library globally, so numba's TBB layer finds it; False when there
    is none or it does not load (numba then uses OpenMP, or its work queue)."""
    path = tbb_library()
    if path is None:
        return False
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return True
