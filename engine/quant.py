"""Q8_0 quantization: symmetric int8 in [-127, 127] per group of GROUP_SIZE values along a row.

Convention (the kernels' activation quantizer follows it exactly):
    amax  = max |x| over the group
    scale = amax / 127                  (float32; 0 for an all-zero group)
    q     = rint(x * (127 / amax))      (round half to even; 0 for an all-zero group)
The last group of a row holds the remaining `n % GROUP_SIZE` values when the row length is not
a multiple of the group size, so groups never span rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import GROUP_SIZE


def n_groups(n: int, group_size: int = GROUP_SIZE) -> int:
    return -(-n // group_size)


@dataclass(frozen=True)
class QTensor:
    """A Q8_0 tensor: int8 `values` (..., n) and float32 `scales` (..., n_groups(n))."""

    values: np.ndarray
    scales: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def dequantize(self) -> np.ndarray:
        return dequantize_q8_0(self.values, self.scales)


def quantize_q8_0(x: np.ndarray, group_size: int = GROUP_SIZE) -> QTensor:
    """float (..., n) -> QTensor with groups of `group_size` along the last axis."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    ng = n_groups(n, group_size)
    pad = ng * group_size - n
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x
    g = xp.reshape(*x.shape[:-1], ng, group_size)
    amax = np.abs(g).max(axis=-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.clip(np.rint(g * inv[..., None]), -127, 127).astype(np.int8)
    scales = (amax / np.float32(127.0)).astype(np.float32)
    return QTensor(np.ascontiguousarray(q.reshape(*x.shape[:-1], ng * group_size)[..., :n]),
                   scales)


def dequantize_q8_0(values: np.ndarray, scales: np.ndarray,
                    group_size: int = GROUP_SIZE) -> np.ndarray:
    """QTensor parts -> float32 array of the same shape as `values`."""
    n = values.shape[-1]
    expanded = np.repeat(scales, group_size, axis=-1)[..., :n]
    return values.astype(np.float32) * expanded
