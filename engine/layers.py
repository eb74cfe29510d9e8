"""Layer numbering, tiller's one convention for steering, capture and readouts.

The residual stream has n_layers + 1 *layers*: layer l is the stream entering transformer block
l (l = 0..n_layers-1), and layer n_layers is the stream after the last block, before the final
norm. A *block* b (0..n_layers-1) is a transformer block; its `resid_pre` capture is layer b and
its `resid_post` capture is layer b + 1. Negative numbers count from the end: layer -1 is
n_layers, block -1 is n_layers - 1. (llama.cpp's control-vector `direction.N` is added to the
output of block N, tiller layer N + 1: engine/cvec.py cites the source.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .engine import EngineError
from .forward import CAPTURE_POINTS

_RESID_PRE = CAPTURE_POINTS.index("resid_pre")
_RESID_POST = CAPTURE_POINTS.index("resid_post")


def normalize_layer(layer: int, n_layers: int, what: str = "layer") -> int:
    """A stream layer in 0..n_layers; negatives count from the end (-1: after the last block)."""
    if not -(n_layers + 1) <= layer <= n_layers:
        raise EngineError(f"{what} {layer} outside 0..{n_layers} (or -{n_layers + 1}..-1)")
    return layer + n_layers + 1 if layer < 0 else layer


def normalize_block(block: int, n_layers: int, what: str = "block") -> int:
    """A block index in 0..n_layers-1; negatives count from the end (-1: the last block)."""
    if not -n_layers <= block < n_layers:
        raise EngineError(f"{what} {block} outside 0..{n_layers - 1} (or -{n_layers}..-1)")
    return block % n_layers


def capture_blocks(layers: Sequence[int], n_layers: int) -> list[int]:
    """The blocks whose capture holds the streams at `layers` (layer n_layers: the last block's
    output)."""
    return sorted({min(layer, n_layers - 1) for layer in layers})


def stream_at(captures: np.ndarray, blocks: Sequence[int], layer: int, n_layers: int
              ) -> np.ndarray:
    """The residual stream at `layer` (T, dim), from captures (points, len(blocks), T, dim)."""
    if layer == n_layers:
        return captures[_RESID_POST, list(blocks).index(n_layers - 1)]
    return captures[_RESID_PRE, list(blocks).index(layer)]
