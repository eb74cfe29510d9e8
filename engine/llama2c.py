"""llama2.c checkpoints (.bin): read and write every layout llama2.c's export.py has produced.

All layouts are little-endian; weights are row-major [out, in] like PyTorch's nn.Linear and
stacked over layers (one block per tensor kind, layer 0 first).

  v0     legacy run.c file: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
         max_seq_len), a negative vocab_size meaning "classifier stored separately"; then fp32
         token_embedding, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, final_norm,
         freq_cis_real (seq_len, head_dim/2), freq_cis_imag (same), [classifier].
  v1     export.py version1_export: 256-byte header (uint32 magic "ak42", int32 version 1, the 7
         int32, uint8 shared_classifier, zero padding); then fp32 attn_norm, ffn_norm,
         final_norm, token_embedding, wq, wk, wv, wo, w1, w2, w3, [classifier].
  v2     export.py version2_export: header as v1 with version 2 and an int32 group_size right
         after the flag byte (offset 37, unaligned); fp32 norms as v1; then for each matrix of
         each layer in the order token_embedding, wq.., wk.., wv.., wo.., w1.., w2.., w3..,
         [classifier]: its int8 values, then its fp32 scales (Q8_0 over the flattened matrix).
  q80v1  the first grouped-int8 export (llama2.c PR #312/#322, briefly called "version 1" before
         it was renumbered 2): header as v2 but version 1; fp32 norms; then the int8 values of
         all matrices in the v2 order, then all their scales in the same order. It shares magic
         and version with v1, so the two are told apart by the file size each layout implies.

NOTE: the short-lived export.py that wrote version 2 with the q80v1 body (all values, then all
scales) made files of exactly a v2 file's size. Read as v2, some of their "scales" are int8 bytes
taken for floats and come out negative or non-finite: every scale is checked, so such a file is
refused rather than read as garbage (runq.c would read it as garbage).
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .config import GROUP_SIZE, ModelConfig, rope_tables
from .quant import QTensor, n_groups, quantize_q8_0

if TYPE_CHECKING:
    from .dequant import Packed

logger = logging.getLogger(__name__)

MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
GGUF_MAGIC = b"GGUF"
HEADER_BYTES = 256  # v1, v2 and q80v1 pad their header to this
V0_HEADER = struct.Struct("<7i")
V1_HEADER = struct.Struct("<Ii7iB")  # magic, version, params, shared_classifier
QUANT_HEADER = struct.Struct("<Ii7iBi")  # ... + group_size
FORMATS = ("v0", "v1", "v2", "q80v1")
QUANTIZED_FORMATS = ("v2", "q80v1")
PARAMS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
# NOTE: several times the largest public Llama shapes, yet small enough that a lying header is
# refused before any size derived from it is trusted.
LIMITS = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1 << 10, "n_heads": 1 << 10,
          "n_kv_heads": 1 << 10, "vocab_size": 1 << 22, "max_seq_len": 1 << 22}
EXPORT_GROUP_SIZE = 64  # export.py's default Q8_0 group size


class CheckpointError(ValueError):
    """A file that is not a readable llama2.c checkpoint; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    format: str  # one of FORMATS, or "gguf" (engine/gguf.py)
    # float32 arrays and QTensors; a GGUF's matrices are Packed views of the file (decoded when
    # the engine's weights are built)
    tensors: Mapping[str, np.ndarray | QTensor | Packed] = field(repr=False)
    path: Path
    file_group_size: int | None = None  # Q8_0 group size stored in the file (v2, q80v1)
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)  # GGUF keys kept


# -----------------------------------------------------------------------------------------------
# layouts


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint holds (the classifier only when unshared)."""
    c = config
    L, D, H, V, KV, Q = c.n_layers, c.dim, c.hidden_dim, c.vocab_size, c.kv_dim, c.q_dim
    shapes = {
        "token_embedding": (V, D),
        "attn_norm": (L, D),
        "wq": (L, Q, D),
        "wk": (L, KV, D),
        "wv": (L, KV, D),
        "wo": (L, D, Q),
        "ffn_norm": (L, D),
        "w1": (L, H, D),
        "w2": (L, D, H),
        "w3": (L, H, D),
        "final_norm": (D,),
    }
    if not c.shared_classifier:
        shapes["classifier"] = (V, D)
    if c.arch == "qwen2":
        shapes |= {"bq": (L, Q), "bk": (L, KV), "bv": (L, KV)}
    if c.arch == "qwen3":
        shapes |= {"q_norm": (L, c.head_dim), "k_norm": (L, c.head_dim)}
    return shapes


NORMS = ("attn_norm", "ffn_norm", "final_norm")
# per-layer vectors of the qwen2 (q/k/v biases) and qwen3 (per-head q/k norms) architectures
HEAD_VECTORS = ("bq", "bk", "bv", "q_norm", "k_norm")
# export.py's order of the matrices (v1 fp32, v2/q80v1 quantized), classifier last if unshared
MATRICES = ("token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "classifier")
V0_ORDER = ("token_embedding", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3",
            "final_norm", "freq_cis_real", "freq_cis_imag", "classifier")


def _fp32_layout(config: ModelConfig, fmt: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every fp32 block of a v0 or v1 file, in file order."""
    shapes = tensor_shapes(config)
    shapes["freq_cis_real"] = shapes["freq_cis_imag"] = (config.max_seq_len, config.head_dim // 2)
    order = V0_ORDER if fmt == "v0" else NORMS + MATRICES
    return [(name, shapes[name]) for name in order if name in shapes]


def _matrices(config: ModelConfig) -> list[tuple[str, int, int, int]]:
    """(name, layers, rows, cols) of each quantized matrix kind, in file order."""
    out = []
    for name, shape in tensor_shapes(config).items():
        if name in MATRICES:
            layers, rows, cols = shape if len(shape) == 3 else (1, *shape)
            out.append((name, layers, rows, cols))
    return sorted(out, key=lambda m: MATRICES.index(m[0]))


def _fp32_size(config: ModelConfig, fmt: str) -> int:
    header = V0_HEADER.size if fmt == "v0" else HEADER_BYTES
    return header + 4 * sum(math.prod(shape) for _, shape in _fp32_layout(config, fmt))


def _group_problem(config: ModelConfig, group_size: int) -> str | None:
    """Why Q8_0 groups of `group_size` over each flattened matrix can't work, or None."""
    if group_size <= 0:
        return f"group_size={group_size}: must be positive"
    for name, _, rows, cols in _matrices(config):
        if (rows * cols) % group_size:
            return (f"group_size={group_size} does not divide the {rows * cols} values of "
                    f"one {name} matrix ({rows}x{cols})")
    return None


def _quant_size(config: ModelConfig, group_size: int) -> int:
    norms = sum(math.prod(tensor_shapes(config)[n]) for n in NORMS)
    values = sum(layers * rows * cols for _, layers, rows, cols in _matrices(config))
    return HEADER_BYTES + 4 * norms + values + 4 * (values // group_size)


# -----------------------------------------------------------------------------------------------
# reading


def _parse_header(path: Path, size: int) -> tuple[str, dict[str, int], bool, int]:
    """-> (version tag "v0" | "v1" | "v2", params, shared_classifier, raw group_size field)."""
    if size == 0:
        raise CheckpointError(f"{path}: file is empty")
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:4] == GGUF_MAGIC:
        raise CheckpointError(f"{path}: this is a GGUF file, not a llama2.c checkpoint")
    has_magic = len(head) >= 4 and struct.unpack_from("<I", head)[0] == MAGIC
    if not has_magic:
        if size < V0_HEADER.size:
            raise CheckpointError(f"{path}: file is {size} bytes, shorter than the "
                                  f"{V0_HEADER.size}-byte header of a legacy v0 checkpoint")
        params = dict(zip(PARAMS, V0_HEADER.unpack_from(head), strict=True))
        _check_params(path, params, legacy=True)
        # NOTE: the legacy format's only flag is the sign of vocab_size
        shared = params["vocab_size"] > 0
        params["vocab_size"] = abs(params["vocab_size"])
        return "v0", params, shared, 0
    if size < HEADER_BYTES:
        raise CheckpointError(f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte "
                              "header of a versioned ('ak42') llama2.c checkpoint")
    _, version, *values, flag, group_size = QUANT_HEADER.unpack_from(head)
    if version not in (1, 2):
        raise CheckpointError(f"{path}: unsupported llama2.c checkpoint version {version} "
                              "(known: 1, 2)")
    params = dict(zip(PARAMS, values, strict=True))
    _check_params(path, params)
    if flag not in (0, 1):
        raise CheckpointError(f"{path}: header's shared_classifier flag is {flag}, "
                              "expected 0 or 1")
    return f"v{version}", params, bool(flag), group_size


def _check_params(path: Path, p: dict[str, int], legacy: bool = False) -> None:
    for name in PARAMS:
        value = p[name]
        # a legacy v0 vocab_size is negative when the classifier is stored separately
        size = abs(value) if legacy and name == "vocab_size" else value
        if size <= 0:
            raise CheckpointError(f"{path}: header says {name}={value}: must be "
                                  + ("nonzero" if legacy and name == "vocab_size" else "positive"))
        if size > LIMITS[name]:
            hint = (" (the file has no 'ak42' magic, so this was read as a legacy v0 header: "
                    "is it a llama2.c checkpoint?)" if legacy else "")
            raise CheckpointError(f"{path}: header says {name}={value}: larger than the sane "
                                  f"limit {LIMITS[name]}{hint}")
    dim, n_heads, n_kv_heads = p["dim"], p["n_heads"], p["n_kv_heads"]
    if dim % n_heads:
        raise CheckpointError(f"{path}: header says dim={dim} n_heads={n_heads}: "
                              "n_heads must divide dim")
    if n_heads % n_kv_heads:
        raise CheckpointError(f"{path}: header says n_heads={n_heads} n_kv_heads={n_kv_heads}: "
                              "n_kv_heads must divide n_heads")
    if (dim // n_heads) % 2:
        raise CheckpointError(f"{path}: header says dim={dim} n_heads={n_heads}: head_dim "
                              f"{dim // n_heads} must be even for RoPE")


def _pick_layout(path: Path, version: str, config: ModelConfig, group_size: int,
                 size: int) -> tuple[str, int | None]:
    """Check the file size against what the header implies -> (format, file group size)."""
    if version == "v0":
        need = _fp32_size(config, "v0")
        if size != need:
            raise CheckpointError(f"{path}: file is {size} bytes but a v0 checkpoint with this "
                                  f"header needs {need} bytes")
        return "v0", None
    if version == "v2":
        problem = _group_problem(config, group_size)
        if problem:
            raise CheckpointError(f"{path}: header says {problem}")
        need = _quant_size(config, group_size)
        if size != need:
            raise CheckpointError(f"{path}: file is {size} bytes but a v2 checkpoint with this "
                                  f"header needs {need} bytes")
        return "v2", group_size
    # version 1: fp32 (padding where q80v1 keeps its group size) or the original Q8_0 layout
    need_v1 = _fp32_size(config, "v1")
    if size == need_v1:
        return "v1", None
    problem = _group_problem(config, group_size)
    if problem is None:
        need_q = _quant_size(config, group_size)
        if size == need_q:
            return "q80v1", group_size
        needs = (f"{need_v1} bytes (fp32 layout) or {need_q} bytes (original Q8_0 layout with "
                 f"group_size={group_size})")
    else:
        needs = f"{need_v1} bytes (fp32 layout; the original Q8_0 layout is ruled out: {problem})"
    raise CheckpointError(f"{path}: file is {size} bytes but a version-1 checkpoint with this "
                          f"header needs {needs}")


def _view(buf: np.ndarray, dtype: str, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)


def _stack(buf: np.ndarray, dtype: str, offsets: list[int],
           shape: tuple[int, ...]) -> np.ndarray:
    """Blocks of `shape` at `offsets` -> one (len(offsets), *shape) array, a view when adjacent."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if all(o == offsets[0] + i * nbytes for i, o in enumerate(offsets)):
        return _view(buf, dtype, offsets[0], (len(offsets), *shape))
    out = np.empty((len(offsets), *shape), dtype=dtype)
    for i, o in enumerate(offsets):
        out[i] = _view(buf, dtype, o, shape)
    return out


def _to_engine_q8(values: np.ndarray, scales: np.ndarray, group_size: int) -> tuple[QTensor, bool]:
    """File Q8_0 (layers, rows, cols) int8 + (layers, rows*cols/group_size) scales over the
    flattened matrix -> engine QTensor (per-row groups of GROUP_SIZE); True if converted exactly.
    """
    layers, rows, cols = values.shape
    if cols % group_size == 0 and group_size % GROUP_SIZE == 0:
        # each file group lies inside one row and covers whole engine groups: keep the int8
        s = scales.reshape(layers, rows, cols // group_size)
        if group_size != GROUP_SIZE:
            s = np.repeat(s, group_size // GROUP_SIZE, axis=-1)
        return QTensor(values, s.astype(np.float32, copy=False)), True
    out_v = np.empty((layers, rows, cols), dtype=np.int8)
    out_s = np.empty((layers, rows, n_groups(cols)), dtype=np.float32)
    for layer in range(layers):  # one layer at a time bounds the fp32 temporary
        deq = values[layer].reshape(-1, group_size).astype(np.float32) * scales[layer][:, None]
        q = quantize_q8_0(deq.reshape(rows, cols))
        out_v[layer], out_s[layer] = q.values, q.scales
    return QTensor(out_v, out_s), False


def _read_fp32(buf: np.ndarray, config: ModelConfig,
               fmt: str) -> dict[str, np.ndarray | QTensor]:
    tensors: dict[str, np.ndarray | QTensor] = {}
    offset = V0_HEADER.size if fmt == "v0" else HEADER_BYTES
    for name, shape in _fp32_layout(config, fmt):
        if not name.startswith("freq_cis"):  # run.c skips them too; we compute RoPE ourselves
            tensors[name] = _view(buf, "<f4", offset, shape)
        offset += 4 * math.prod(shape)
    return tensors


def _read_quantized(path: Path, buf: np.ndarray, config: ModelConfig, fmt: str,
                    group_size: int) -> dict[str, np.ndarray | QTensor]:
    shapes = tensor_shapes(config)
    tensors: dict[str, np.ndarray | QTensor] = {}
    offset = HEADER_BYTES
    for name in NORMS:
        tensors[name] = _view(buf, "<f4", offset, shapes[name])
        offset += 4 * math.prod(shapes[name])
    matrices = _matrices(config)
    # byte offsets of each layer's values and scales
    q_offsets: dict[str, list[int]] = {}
    s_offsets: dict[str, list[int]] = {}
    if fmt == "v2":  # values then scales, matrix by matrix
        for name, layers, rows, cols in matrices:
            n = rows * cols
            q_offsets[name] = [offset + i * (n + 4 * n // group_size) for i in range(layers)]
            s_offsets[name] = [o + n for o in q_offsets[name]]
            offset += layers * (n + 4 * n // group_size)
    else:  # q80v1: all values, then all scales
        scale_offset = offset + sum(layers * r * c for _, layers, r, c in matrices)
        for name, layers, rows, cols in matrices:
            n = rows * cols
            q_offsets[name] = [offset + i * n for i in range(layers)]
            s_offsets[name] = [scale_offset + i * 4 * n // group_size for i in range(layers)]
            offset += layers * n
            scale_offset += layers * 4 * n // group_size
    requantized = []
    for name, _, rows, cols in matrices:
        values = _stack(buf, "i1", q_offsets[name], (rows, cols))
        scales = _stack(buf, "<f4", s_offsets[name], (rows * cols // group_size,))
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise CheckpointError(
                f"{path}: {name} has negative or non-finite Q8_0 scales, so the file is corrupt"
                + (" (or it is from the short-lived export.py that wrote version 2 with all "
                   "scales at the end, a layout we do not read)" if fmt == "v2" else ""))
        qt, exact = _to_engine_q8(values, scales, group_size)
        if not exact:
            requantized.append(f"{name} ({cols} per row)")
        if len(shapes[name]) == 2:  # token_embedding, classifier: no layer axis
            qt = QTensor(qt.values[0], qt.scales[0])
        tensors[name] = qt
    if requantized:
        logger.warning("%s: file's Q8_0 groups of %d do not map onto per-row groups of %d for %s:"
                       " dequantized and requantized them (adds rounding error)",
                       path, group_size, GROUP_SIZE, ", ".join(requantized))
    return tensors


def load_llama2c(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a llama2.c checkpoint of any layout (see the module docstring).

    fp32 tensors are read-only views into a memory map of the file; Q8_0 matrices become
    QTensors in the engine's convention. Raises CheckpointError for anything malformed.
    """
    path = Path(path)
    size = path.stat().st_size
    version, params, shared, group_size = _parse_header(path, size)
    try:
        p = params
        config = ModelConfig(dim=p["dim"], hidden_dim=p["hidden_dim"], n_layers=p["n_layers"],
                             n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"],
                             vocab_size=p["vocab_size"], max_seq_len=p["max_seq_len"],
                             shared_classifier=shared)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    fmt, file_group_size = _pick_layout(path, version, config, group_size, size)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    if fmt in QUANTIZED_FORMATS:
        assert file_group_size is not None
        tensors = _read_quantized(path, buf, config, fmt, file_group_size)
    else:
        tensors = _read_fp32(buf, config, fmt)
    return Checkpoint(config, fmt, tensors, path, file_group_size)


# -----------------------------------------------------------------------------------------------
# writing


def export_group_size(dim: int, group_size: int = EXPORT_GROUP_SIZE) -> int:
    """export.py's group size: halved until it divides dim."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    while dim % group_size:
        group_size //= 2
    return group_size


def quantize_export(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """export.py's quantize_q80: Q8_0 over the flattened tensor -> (int8 (n,), fp32 (n/gs,)).

    Follows it to the bit: scale = amax / 127 in fp32, q = round_half_even(w / scale). An
    all-zero group (0/0 in export.py) is written as zeros with scale 0.
    """
    w = np.asarray(w, dtype=np.float32).reshape(-1, group_size)
    scale = np.abs(w).max(axis=1) / np.float32(127.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(w / scale[:, None])
    q = np.clip(np.nan_to_num(q, nan=0.0), -127, 127).astype(np.int8)
    return q.reshape(-1), scale.astype(np.float32)


def _checked_tensors(config: ModelConfig,
                     tensors: dict[str, np.ndarray | QTensor]) -> dict[str, np.ndarray]:
    shapes = tensor_shapes(config)
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise ValueError(f"tensors do not match the config: missing {missing}, unexpected {extra}"
                         + (" (classifier given but config.shared_classifier is True)"
                            if "classifier" in extra else ""))
    out = {}
    for name, shape in shapes.items():
        t = tensors[name]
        a = t.dequantize() if isinstance(t, QTensor) else np.asarray(t)
        if a.shape != shape:
            raise ValueError(f"tensor {name} has shape {a.shape}, config needs {shape}")
        out[name] = np.ascontiguousarray(a, dtype="<f4")
    return out


def is_llama2c_shaped(config: ModelConfig) -> bool:
    """True when a llama2.c file (or the llama GGUF `tiller convert` writes) can hold the model:
    Llama with heads of dim / n_heads, pairwise RoPE, no scaling."""
    return (config.arch == "llama" and config.head_dim * config.n_heads == config.dim
            and not config.rope_neox and not config.rope_factors and config.rope_scale == 1.0)


def _write_fp32(f: BinaryIO, a: np.ndarray) -> None:
    f.write(memoryview(np.ascontiguousarray(a, dtype="<f4")).cast("B"))  # type: ignore[arg-type]


def write_llama2c(path: str | os.PathLike[str], config: ModelConfig,
                  tensors: dict[str, np.ndarray | QTensor], format: str,
                  group_size: int = EXPORT_GROUP_SIZE) -> Path:
    """Write a checkpoint byte for byte as llama2.c's export.py would (see the module docstring).

    `tensors` are fp32 arrays named and shaped as tensor_shapes(config) (QTensors are
    dequantized first). For v2 and q80v1, `group_size` is halved until it divides dim, as
    export.py does. The file is written next to `path` and renamed into place.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown llama2.c format {format!r}, expected one of {FORMATS}")
    if not is_llama2c_shaped(config):
        raise ValueError(f"a llama2.c file holds only the plain Llama architecture, not {config}")
    ts = _checked_tensors(config, tensors)
    path = Path(path)
    gs = export_group_size(config.dim, group_size) if format in QUANTIZED_FORMATS else 0
    if gs and gs != group_size:
        logger.info("group size reduced from %d to %d to divide dim=%d", group_size, gs,
                    config.dim)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            _write_body(f, config, ts, format, gs)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def _write_body(f: BinaryIO, config: ModelConfig, ts: dict[str, np.ndarray], format: str,
                gs: int) -> None:
    params = [getattr(config, name) for name in PARAMS]
    shared = config.shared_classifier
    if format == "v0":
        # NOTE: the legacy format's only flag is the sign of vocab_size
        params[PARAMS.index("vocab_size")] *= 1 if shared else -1
        f.write(V0_HEADER.pack(*params))
        cos, sin = rope_tables(config, torch_float32=True)
        ts = ts | {"freq_cis_real": cos, "freq_cis_imag": sin}
        for name, _ in _fp32_layout(config, "v0"):
            _write_fp32(f, ts[name])
        return
    if format == "v1":
        f.write(V1_HEADER.pack(MAGIC, 1, *params, int(shared)).ljust(HEADER_BYTES, b"\0"))
        for name, _ in _fp32_layout(config, "v1"):
            _write_fp32(f, ts[name])
        return
    version = 2 if format == "v2" else 1
    f.write(QUANT_HEADER.pack(MAGIC, version, *params, int(shared), gs)
            .ljust(HEADER_BYTES, b"\0"))
    for name in NORMS:
        _write_fp32(f, ts[name])
    scales = []
    for name, layers, rows, cols in _matrices(config):
        for w in ts[name].reshape(layers, rows, cols):
            q, s = quantize_export(w, gs)
            f.write(memoryview(q).cast("B"))  # type: ignore[arg-type]
            if format == "v2":
                _write_fp32(f, s)
            else:  # q80v1 keeps every scale for the end of the file
                scales.append(s)
    for s in scales:
        _write_fp32(f, s)


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A random model shaped like a fresh init: matrices ~ N(0, 0.02), norms ~ 1 + N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in tensor_shapes(config).items():
        x = rng.standard_normal(shape, dtype=np.float32)
        tensors[name] = np.float32(1.0) + np.float32(0.1) * x if name in NORMS \
            else np.float32(0.02) * x
    return tensors
