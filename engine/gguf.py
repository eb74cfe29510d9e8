"""GGUF files (versions 2 and 3): Llama, Qwen 2 and Qwen 3 models and their vocabularies.

Layout (little-endian; llama.cpp's ggml/src/gguf.cpp and docs/gguf.md):

    "GGUF", uint32 version, uint64 tensor_count, uint64 kv_count
    kv_count x     string key, uint32 value type, value
                   (string = uint64 length + UTF-8 bytes; array = uint32 type, uint64 n, n values)
    tensor_count x string name, uint32 n_dims, n_dims x uint64 ne, uint32 ggml type,
                   uint64 offset (from the start of the data section, a multiple of the alignment)
    zero padding to `general.alignment` (default 32), then the data section.

ne[0] is the length of a row, so a tensor with ne = (cols, rows) is the numpy array (rows, cols):
the [out, in] layout of llama2.c and PyTorch, which is what the engine wants.

Architectures (`general.architecture`, keys `{arch}.*`): `llama` (also Mistral-style files and
Llama 3 / 3.1: `rope_freqs.weight` or a llama3 `rope.scaling.type`), `qwen2` (q/k/v biases)
and `qwen3` (per-head RMSNorm of q and k before RoPE; heads of `attention.key_length`, which
may differ from dim / n_heads). Anything else they do not share is refused naming the key.

RoPE: llama.cpp's `llama` architecture rotates adjacent pairs (x[2i], x[2i+1]) ("NORM" rope),
which is llama2.c's convention and ours. Hugging Face checkpoints rotate halves (x[i],
x[i + head_dim/2]); convert_hf_to_gguf.py permutes their q and k rows into the pairwise order
(`LlamaModel.permute`), so llama GGUF q/k weights are used as they are (tests/test_gguf.py
checks a Hugging Face-style model through that permutation). qwen2 and qwen3 files are not
permuted: llama.cpp rotates them by halves (LLAMA_ROPE_TYPE_NEOX); engine/weights.py permutes
their q/k rows at load instead, so one rope kernel serves every architecture.

NOTE: the header is parsed here rather than with gguf.GGUFReader. On a file whose array length
lies, GGUFReader loops once per claimed element, growing a list (a uint8 array claiming 2**24
elements at the end of a file did not finish in two minutes); and it takes about 3 s to read a
32000-token vocabulary (several numpy views per string; 0.1 s here). The gguf package supplies
the type tables, writes files, and reads ours back in the tests as an independent check.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .bpe import BpeTokenizer
from .config import ARCHITECTURES, ModelConfig, llama3_rope_factors
from .dequant import TYPES, Packed, row_bytes, row_problem
from .llama2c import HEAD_VECTORS, LIMITS, NORMS, Checkpoint, CheckpointError, tensor_shapes
from .tokenizer import SpmTokenizer, Tokenizer, TokenizerError

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 63  # GGML_MAX_NAME less its NUL
T = GGMLQuantizationType
SUPPORTED_TYPES = TYPES  # engine/dequant.py decodes them
Q8_0_BLOCK = GGML_QUANT_SIZES[T.Q8_0]  # (32 values, 2-byte fp16 scale + 32 int8)

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
# smallest encodings, so that a count can be checked against the bytes left before any loop
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

# GGUF tensor names -> ours (engine/llama2c.py)
GLOBAL_TENSORS = {"token_embd.weight": "token_embedding", "output_norm.weight": "final_norm",
                  "output.weight": "classifier"}
LAYER_TENSORS = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
                 "attn_output": "wo", "ffn_norm": "ffn_norm", "ffn_gate": "w1", "ffn_up": "w3",
                 "ffn_down": "w2"}
# per-layer vectors beyond Llama's: Qwen 2's q/k/v biases, Qwen 3's per-head q/k RMSNorms
ARCH_VECTORS = {
    "qwen2": {"attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv"},
    "qwen3": {"attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm"},
}
# llama.cpp's llama_model_rope_type: LLAMA_ROPE_TYPE_NEOX (rotate halves) for these
NEOX_ROPE = ("qwen2", "qwen3")
# small metadata a Checkpoint carries along (the rest of the header is not kept)
KEPT_METADATA = ("general.architecture", "general.name", "general.uuid", "general.file_type",
                 "tokenizer.chat_template", "tokenizer.ggml.model",
                 "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token")


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # numpy order: ne reversed
    type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile(NamedTuple):
    """A validated GGUF header over a memory map of the file.

    Metadata values are Python ints, floats, bools and strs; numeric arrays are numpy arrays;
    string arrays are lists of raw bytes (vocabularies are decoded by the Tokenizer).
    Every tensor lies inside the file, aligned, without overlapping another.
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data: np.ndarray  # uint8 memmap of the whole file


# -----------------------------------------------------------------------------------------------
# the header


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure names the file."""

    def __init__(self, path: Path, buf: memoryview) -> None:
        self.path, self.buf, self.pos = path, buf, 0

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> int:
        if n > self.left():
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                            f"the file has {self.left()} left")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.need(struct.calcsize(fmt), what))[0]

    def count(self, n: int, min_bytes: int, what: str) -> int:
        if n * min_bytes > self.left():
            raise self.fail(f"{what} is {n}, more than the {self.left()} bytes left in the file "
                            "can hold (truncated or corrupt)")
        return n

    def raw_string(self, what: str) -> bytes:
        n = self.scalar("<Q", f"length of {what}")
        if n > self.left():
            raise self.fail(f"truncated or corrupt: {what} claims {n} bytes at offset "
                            f"{self.pos}, the file has {self.left()} left")
        start = self.need(n, what)
        return bytes(self.buf[start:start + n])

    def string(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason})") from None

    def value_type(self, what: str) -> GGUFValueType:
        t = self.scalar("<I", f"type of {what}")
        try:
            return GGUFValueType(t)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {t}") from None

    def value(self, vtype: GGUFValueType, what: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.FLOAT32:
            # NOTE: read as the shortest decimal that rounds to the stored float32 (1e-05, not
            # 9.99999974738e-06): what the converter was given, and np.float32 of it is exact.
            return float(str(np.float32(self.scalar("<f", what))))
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        # an array
        itype = self.value_type(f"elements of {what}")
        n = self.scalar("<Q", f"length of {what}")
        if itype == GGUFValueType.ARRAY:
            raise self.fail(f"{what} is an array of arrays, which GGUF readers do not support")
        if itype == GGUFValueType.STRING:
            self.count(n, 8, f"length of string array {what}")
            return [self.raw_string(f"element {i} of {what}") for i in range(n)]
        dtype = np.dtype(_SCALARS[itype])
        self.count(n, dtype.itemsize, f"length of array {what}")
        start = self.need(n * dtype.itemsize, what)
        return np.frombuffer(self.buf, dtype, n, start).copy()


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and validate a GGUF header (any architecture); tensors are not read.

    Raises CheckpointError naming the file for anything malformed: bad magic or version,
    truncation, counts or lengths the file cannot hold, unknown value or tensor types,
    duplicate keys or tensors, tensors that are misaligned, overlap or run past the end.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 4:
        raise CheckpointError(f"{path}: file is {size} bytes, too short for a GGUF header")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(path, memoryview(data))  # type: ignore[arg-type]
    magic = bytes(cur.buf[:4])
    if magic != MAGIC:
        raise cur.fail(f"not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in VERSIONS:
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise cur.fail(f"GGUF version {version} is not supported (only 2 and 3){hint}")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    cur.count(n_kv, _MIN_KV_BYTES, "metadata count")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.value_type(f"metadata {key}"), f"metadata {key}")

    cur.count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor count")
    infos = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        if name in seen:
            raise cur.fail(f"tensor {name!r} appears twice")
        seen.add(name)
        if len(name.encode()) > MAX_NAME:
            raise cur.fail(f"tensor {i} has a name of {len(name.encode())} bytes "
                           f"(at most {MAX_NAME}): {name[:80]!r}")
        n_dims = cur.scalar("<I", f"dimension count of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        ne = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.need(8 * n_dims, f"shape of {name}"))
        raw_type = cur.scalar("<I", f"type of tensor {name}")
        offset = cur.scalar("<Q", f"offset of tensor {name}")
        infos.append((name, ne, raw_type, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment is {alignment!r}, expected a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, ne, raw_type, offset in infos:
        tensors[name] = _tensor_info(cur, name, ne, raw_type, offset, alignment, data_start, size)
    end, last = data_start, None
    for t in sorted(tensors.values(), key=lambda t: t.offset):
        if t.offset < end:
            assert last is not None  # the first tensor starts at or after data_start
            raise cur.fail(f"tensor {last.name} ({last.type.name}, shape {last.shape}, "
                           f"{last.nbytes} bytes at offset {last.offset}) overlaps tensor "
                           f"{t.name} at offset {t.offset} (its data is shorter than its type "
                           "and shape need, or the offsets are wrong)")
        end, last = t.offset + t.nbytes, t
    return GGUFFile(path, version, metadata, tensors, data)


def _tensor_info(cur: _Cursor, name: str, ne: tuple[int, ...], raw_type: int, offset: int,
                 alignment: int, data_start: int, size: int) -> TensorInfo:
    try:
        ggml_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise cur.fail(f"tensor {name} has unknown type {raw_type}") from None
    if ggml_type not in GGML_QUANT_SIZES:
        raise cur.fail(f"tensor {name} has type {ggml_type.name}, whose size is unknown")
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    shape = tuple(reversed(ne))
    if 0 in ne:
        raise cur.fail(f"tensor {name} has an empty dimension: shape {shape}")
    problem = row_problem(ggml_type, ne[0])
    if problem is not None:
        raise cur.fail(f"tensor {name} has {problem}")
    nbytes = math.prod(ne) // block * block_bytes
    if offset % alignment:
        raise cur.fail(f"tensor {name} has offset {offset}, not a multiple of the alignment "
                       f"{alignment}")
    start = data_start + offset
    if start + nbytes > size:
        raise cur.fail(f"tensor {name} ({ggml_type.name}, shape {shape}, {nbytes} bytes at "
                       f"offset {start}) runs past the end of the {size}-byte file "
                       "(truncated, or a size that does not match its type and shape)")
    return TensorInfo(name, shape, ggml_type, start, nbytes)


# -----------------------------------------------------------------------------------------------
# metadata


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
          list: "an array of strings", np.ndarray: "a numeric array"}


def _meta(f: GGUFFile, key: str, kinds: tuple[type, ...], default: Any = ...) -> Any:
    """Metadata value of one of `kinds` (int accepts every integer type); `default` if absent."""
    if key not in f.metadata:
        if default is ...:
            raise CheckpointError(f"{f.path}: metadata key {key} is missing")
        return default
    value = f.metadata[key]
    if type(value) not in kinds:
        got = _KINDS.get(type(value), type(value).__name__)
        got += "" if isinstance(value, list | np.ndarray) else f" ({value!r:.40})"
        raise CheckpointError(f"{f.path}: metadata {key} is {got}, expected "
                              + " or ".join(_KINDS[k] for k in kinds))
    return value


def _meta_int(f: GGUFFile, key: str, default: Any = ..., limit: int | None = None) -> int:
    value = _meta(f, key, (int,), default)
    if limit is not None and not 0 < value <= limit:
        raise CheckpointError(f"{f.path}: metadata {key}={value}: must be in 1..{limit}")
    return value


def _meta_float(f: GGUFFile, key: str, default: Any = ...) -> float:
    value = float(_meta(f, key, (float, int), default))
    if not (math.isfinite(value) and value > 0):
        raise CheckpointError(f"{f.path}: metadata {key}={value}: must be positive and finite")
    return value


def _meta_layers(f: GGUFFile, key: str, default: Any, limit: int) -> int:
    """An integer that llama.cpp allows per layer (an array): accepted when all layers agree."""
    value = f.metadata.get(key)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu" or value.size == 0:
            raise CheckpointError(f"{f.path}: metadata {key} is an array of {value.dtype}, "
                                  "expected integers")
        if (value != value[0]).any():
            raise CheckpointError(f"{f.path}: metadata {key} differs between layers "
                                  f"({sorted(set(value.tolist()))}), which is not supported")
        value = int(value[0])
        if not 0 < value <= limit:
            raise CheckpointError(f"{f.path}: metadata {key}={value}: must be in 1..{limit}")
        return value
    return _meta_int(f, key, default, limit)


def _check_arch(f: GGUFFile) -> str:
    """general.architecture, if supported, after refusing what none of them runs."""
    arch = _meta(f, "general.architecture", (str,))
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{f.path}: general.architecture {arch!r} is not supported "
                              f"(only {', '.join(map(repr, ARCHITECTURES))})")
    experts = _meta(f, f"{arch}.expert_count", (int,), 0)
    if experts > 0:
        raise CheckpointError(f"{f.path}: {arch}.expert_count is {experts}: a mixture-of-experts "
                              "model is not supported")
    return arch


def _rope(f: GGUFFile, arch: str, head_dim: int, theta: float) -> dict[str, Any]:
    """RoPE scaling as ModelConfig fields: rope_factors (rope_freqs.weight, else computed from
    a llama3 scaling type) and rope_scale (linear scaling, llama.cpp's 1 / factor)."""
    key = f"{arch}.rope.scaling.type"
    scaling = _meta(f, key, (str,), "none")
    if scaling not in ("none", "linear", "llama3"):
        raise CheckpointError(f"{f.path}: metadata {key}={scaling!r}: only none, linear and "
                              "llama3 RoPE scaling are supported")
    factor = _meta_float(f, f"{arch}.rope.scaling.factor",
                         _meta_float(f, f"{arch}.rope.scale_linear", 1.0))
    out: dict[str, Any] = {}
    if "rope_freqs.weight" in f.tensors:
        # NOTE: llama.cpp uses the tensor whatever the metadata says (convert_hf_to_gguf.py
        # writes it for Llama 3.1 and no scaling type), so the tensor wins here too.
        info = f.tensors["rope_freqs.weight"]
        if arch != "llama":
            raise CheckpointError(f"{f.path}: tensor rope_freqs.weight: {arch} models have no "
                                  "RoPE frequency factors")
        if info.shape != (head_dim // 2,) or info.type not in (T.F32, T.F16):
            raise CheckpointError(f"{f.path}: tensor rope_freqs.weight has shape {info.shape} "
                                  f"and type {info.type.name}, RoPE needs ({head_dim // 2},) "
                                  "F32 or F16")
        dtype = np.float32 if info.type == T.F32 else np.float16
        factors = np.frombuffer(f.data, dtype, head_dim // 2, info.offset).astype(np.float32)
        if not (np.isfinite(factors).all() and (factors > 0).all()):
            raise CheckpointError(f"{f.path}: tensor rope_freqs.weight has values that are not "
                                  "positive and finite")
        out["rope_factors"] = tuple(factors.tolist())
    elif scaling == "llama3":
        out["rope_factors"] = llama3_rope_factors(
            head_dim, theta, factor,
            _meta_float(f, f"{arch}.rope.scaling.low_freq_factor", 1.0),
            _meta_float(f, f"{arch}.rope.scaling.high_freq_factor", 4.0),
            _meta_int(f, f"{arch}.rope.scaling.original_context_length", 8192))
    if scaling != "llama3" and factor != 1.0:
        out["rope_scale"] = 1.0 / factor
    return out


def _config(f: GGUFFile, arch: str, vocab_size: int, shared: bool) -> ModelConfig:
    def key(name: str, limit: str, default: Any = ...) -> int:
        return _meta_layers(f, f"{arch}.{name}", default, LIMITS[limit])

    dim = key("embedding_length", "dim")
    n_heads = key("attention.head_count", "n_heads")
    head_dim = dim // n_heads
    head_size = 0  # NOTE: dim / n_heads unless the file says otherwise (Qwen 3)
    if f"{arch}.attention.key_length" in f.metadata:
        head_dim = _meta_int(f, f"{arch}.attention.key_length", ..., LIMITS["dim"])
        head_size = 0 if head_dim * n_heads == dim else head_dim
    for name in ("rope.dimension_count", "attention.value_length"):
        value = _meta_int(f, f"{arch}.{name}", head_dim)
        if value != head_dim:
            raise CheckpointError(f"{f.path}: metadata {arch}.{name} is {value}, but only "
                                  f"{head_dim} (the key length of a head) is supported"
                                  + (" (partial RoPE)" if name.startswith("rope") else ""))
    max_seq_len = key("context_length", "max_seq_len")
    window = _meta_int(f, f"{arch}.attention.sliding_window", 0)
    if 0 < window < max_seq_len:
        raise CheckpointError(f"{f.path}: metadata {arch}.attention.sliding_window is {window}: "
                              "sliding-window attention is not supported")
    theta = _meta_float(f, f"{arch}.rope.freq_base", 10000.0)
    params: dict[str, Any] = dict(
        dim=dim, hidden_dim=key("feed_forward_length", "hidden_dim"),
        n_layers=key("block_count", "n_layers"), n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv", "n_kv_heads", n_heads),
        vocab_size=vocab_size, max_seq_len=max_seq_len, shared_classifier=shared,
        norm_eps=_meta_float(f, f"{arch}.attention.layer_norm_rms_epsilon"), rope_theta=theta,
        arch=arch, head_size=head_size,
        rope_neox=arch in NEOX_ROPE, **_rope(f, arch, head_dim, theta))
    try:
        return ModelConfig(**params)
    except ValueError as e:
        raise CheckpointError(f"{f.path}: {e}") from e


def _vocab_size(f: GGUFFile) -> int:
    """From the token list, the token_embd rows and llama.vocab_size, which must all agree."""
    sizes = {}
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None:
        sizes["tokenizer.ggml.tokens"] = len(tokens)
    if "token_embd.weight" in f.tensors:
        sizes["token_embd.weight rows"] = f.tensors["token_embd.weight"].shape[0]
    key = f"{f.metadata['general.architecture']}.vocab_size"
    if key in f.metadata:
        sizes[key] = _meta_int(f, key)
    if not sizes:
        raise CheckpointError(f"{f.path}: no vocabulary size (no token list, no token_embd)")
    if len(set(sizes.values())) > 1:
        raise CheckpointError(f"{f.path}: vocabulary sizes disagree: "
                              + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return _checked(f, "vocabulary size", next(iter(sizes.values())), LIMITS["vocab_size"])


def _checked(f: GGUFFile, what: str, value: int, limit: int) -> int:
    if not 0 < value <= limit:
        raise CheckpointError(f"{f.path}: {what} {value} is not in 1..{limit}")
    return value


# -----------------------------------------------------------------------------------------------
# tensors


def _expected(config: ModelConfig) -> dict[str, tuple[str, int | None, tuple[int, ...]]]:
    """GGUF name -> (our name, layer or None, shape) of every tensor the model needs."""
    shapes = tensor_shapes(config)
    out: dict[str, tuple[str, int | None, tuple[int, ...]]] = {}
    for gguf_name, ours in GLOBAL_TENSORS.items():
        if ours in shapes:
            out[gguf_name] = (ours, None, shapes[ours])
    for layer in range(config.n_layers):
        for part, ours in LAYER_TENSORS.items():
            out[f"blk.{layer}.{part}.weight"] = (ours, layer, shapes[ours][1:])
        for part, ours in ARCH_VECTORS.get(config.arch, {}).items():
            out[f"blk.{layer}.{part}"] = (ours, layer, shapes[ours][1:])
    return out


def _check_tensors(f: GGUFFile, config: ModelConfig,
                   expected: dict[str, tuple[str, int | None, tuple[int, ...]]]) -> None:
    missing = [n for n in expected if n not in f.tensors]
    if missing:
        raise CheckpointError(f"{f.path}: missing tensor{'s' * (len(missing) > 1)} "
                              + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    extra = [n for n in f.tensors if n not in expected]
    if extra:
        hint = (f" (biases are not part of the {config.arch} architecture)"
                if any(n.endswith(".bias") for n in extra) else "")
        raise CheckpointError(f"{f.path}: unexpected tensor{'s' * (len(extra) > 1)} "
                              + ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "") + hint)
    for name, (_, _, shape) in expected.items():
        t = f.tensors[name]
        if t.type not in SUPPORTED_TYPES:
            raise CheckpointError(f"{f.path}: tensor {name} has type {t.type.name}; supported: "
                                  + ", ".join(s.name for s in SUPPORTED_TYPES))
        if t.shape != shape:
            raise CheckpointError(f"{f.path}: tensor {name} has shape {t.shape}, the "
                                  f"hyperparameters need {shape} (GGUF ne {shape[::-1]})")
        problem = row_problem(t.type, shape[-1])
        # NOTE: read_gguf checked this for every tensor; the kernels rely on it, so once more
        if problem is not None or t.nbytes != math.prod(shape[:-1]) * row_bytes(t.type,
                                                                                shape[-1]):
            raise CheckpointError(f"{f.path}: tensor {name} ({t.type.name}, shape {shape}): "
                                  f"{problem or f'{t.nbytes} bytes do not match its type'}")


def _packed(f: GGUFFile, infos: list[TensorInfo], stacked: bool) -> Packed:
    """Matrices (one per layer when stacked) as views of the file, decoded later. A 1-D tensor
    is one row."""
    n = infos[0].shape[-1]
    rows = math.prod(infos[0].shape[:-1])

    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{f.path}: {what}")

    # NOTE: plain ndarray views: numba's dispatcher is slow on np.memmap instances (about 0.1 s
    # a call, which added 15 s to a 1B model's load)
    parts = tuple(np.asarray(f.data[t.offset:t.offset + t.nbytes]).reshape(
        rows, row_bytes(t.type, n)) for t in infos)
    return Packed(tuple(t.name for t in infos), tuple(t.type for t in infos), parts, n,
                  stacked, fail)


def _norm(f: GGUFFile, infos: list[TensorInfo], stacked: bool) -> np.ndarray:
    """Norm weights, (dim,) or stacked (layers, dim), as float32 (small: read at once)."""
    out = _packed(f, infos, stacked=True).dequantize()  # (layers, 1, dim)
    return out.reshape(len(infos), -1) if stacked else out.reshape(-1)


def load_gguf(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a GGUF model of ARCHITECTURES (format "gguf").

    Norms are read as float32 arrays. Matrices stay in the file as `Packed` views (any type in
    SUPPORTED_TYPES, each layer its own): engine/weights.py decodes them straight into the
    engine's arrays a layer at a time, Packed.materialize gives the float32 array (or, for
    Q8_0, the QTensor of the file's int8 values and scales). Checkpoint.metadata keeps the keys
    in KEPT_METADATA that the file has. Everything is validated before any tensor is read;
    problems raise CheckpointError naming the file.
    """
    f = read_gguf(path)
    arch = _check_arch(f)
    if not f.tensors:
        raise CheckpointError(f"{f.path}: the file has no tensors (a vocabulary-only GGUF?)")
    shared = "output.weight" not in f.tensors
    config = _config(f, arch, _vocab_size(f), shared)
    expected = _expected(config)
    if "rope_freqs.weight" in f.tensors:  # read into config.rope_factors; checked as a tensor
        expected["rope_freqs.weight"] = ("rope_freqs", None, (config.head_dim // 2,))
    _check_tensors(f, config, expected)
    by_name: dict[str, list[TensorInfo]] = {}
    stacked: set[str] = set()
    for gguf_name, (ours, layer, _) in expected.items():  # layers in order: blk.0 first
        by_name.setdefault(ours, []).append(f.tensors[gguf_name])
        if layer is not None:
            stacked.add(ours)
    by_name.pop("rope_freqs", None)  # in config.rope_factors
    tensors: dict[str, np.ndarray | Packed] = {}
    for ours, infos in by_name.items():
        if ours in NORMS or ours in HEAD_VECTORS:
            tensors[ours] = _norm(f, infos, stacked=ours in stacked)
        else:
            tensors[ours] = _packed(f, infos, stacked=ours in stacked)
    counts = Counter(f.tensors[name].type.name for name in expected)
    logger.info("%s: tensors %s", f.path, ", ".join(f"{n} {t}" for t, n in counts.most_common()))
    metadata = {k: f.metadata[k] for k in KEPT_METADATA if k in f.metadata}
    return Checkpoint(config, "gguf", tensors, f.path, metadata=metadata)


# -----------------------------------------------------------------------------------------------
# the vocabulary


def gguf_tokenizer(f: GGUFFile) -> Tokenizer:
    """The vocabulary in a parsed GGUF header: SentencePiece ("llama") or byte-level BPE
    ("gpt2") -> Tokenizer."""
    source = str(f.path)

    def fail(what: str) -> TokenizerError:
        return TokenizerError(f"{source}: {what}")

    def get(key: str, kinds: tuple[type, ...], default: Any) -> Any:
        try:
            return _meta(f, key, kinds, default)
        except CheckpointError as e:
            raise TokenizerError(str(e)) from None

    model = get("tokenizer.ggml.model", (str,), None)
    if model is None:
        raise fail("no tokenizer in the file (no tokenizer.ggml.model)")
    if model not in ("llama", "gpt2"):
        raise fail(f"tokenizer.ggml.model {model!r} is not supported (only 'llama', "
                   "SentencePiece BPE, and 'gpt2', byte-level BPE)")
    tokens = get("tokenizer.ggml.tokens", (list,), None)
    if tokens is None:
        raise fail("no token list (tokenizer.ggml.tokens)")
    n = len(tokens)
    add_bos = get("tokenizer.ggml.add_bos_token", (bool,), None)
    if model == "gpt2":
        return _bpe_tokenizer(f, tokens, add_bos, get)
    scores = get("tokenizer.ggml.scores", (np.ndarray,), None)
    types = get("tokenizer.ggml.token_type", (np.ndarray,), None)
    for key, arr, kind in (("scores", scores, "f"), ("token_type", types, "iu")):
        if arr is not None and (arr.dtype.kind not in kind or len(arr) != n):
            raise fail(f"tokenizer.ggml.{key} has {len(arr)} {arr.dtype} values for {n} tokens")
    for key in ("add_space_prefix", "remove_extra_whitespaces"):
        value = get(f"tokenizer.ggml.{key}", (bool,), key == "add_space_prefix")
        if value != (key == "add_space_prefix"):
            raise fail(f"tokenizer.ggml.{key}={value} is not supported (Llama vocabularies "
                       f"use {key == 'add_space_prefix'})")
    ids = {name: get(f"tokenizer.ggml.{key}", (int,), default) for name, key, default in
           (("bos_id", "bos_token_id", 1), ("eos_id", "eos_token_id", 2),
            ("unk_id", "unknown_token_id", 0), ("eot_id", "eot_token_id", None))}
    return SpmTokenizer(tokens, scores.tolist() if scores is not None else [0.0] * n,
                        types.tolist() if types is not None else None, source=source,
                        add_bos=True if add_bos is None else add_bos, **ids)


def _bpe_tokenizer(f: GGUFFile, tokens: list[bytes], add_bos: bool | None,
                   get: Any) -> BpeTokenizer:
    """A byte-level BPE vocabulary ("gpt2"): tokens, merges, types, pre-tokenizer, specials."""
    source = str(f.path)
    pre = get("tokenizer.ggml.pre", (str,), None)
    if pre is None:
        # NOTE: llama.cpp does the same, and warns as loudly: files converted before
        # pre-tokenizers were recorded (e.g. llama.cpp's own GPT-NeoX test vocabulary).
        logger.warning("%s: no tokenizer.ggml.pre: using llama.cpp's 'default' pre-tokenizer; "
                       "tokenization may differ from the model's own (reconvert the model)",
                       source)
        pre = "default"
    merges = get("tokenizer.ggml.merges", (list,), None)
    if merges is None:
        raise TokenizerError(f"{source}: no merges (tokenizer.ggml.merges), which a byte-level "
                             "BPE vocabulary needs")
    types = get("tokenizer.ggml.token_type", (np.ndarray,), None)
    if types is not None and types.dtype.kind not in "iu":
        raise TokenizerError(f"{source}: tokenizer.ggml.token_type is {types.dtype}, expected "
                             "integers")
    # llama.cpp's defaults for BPE vocabularies when the file names no BOS/EOS (token 11).
    ids = {name: get(f"tokenizer.ggml.{key}", (int,), default) for name, key, default in
           (("bos_id", "bos_token_id", 11), ("eos_id", "eos_token_id", 11),
            ("unk_id", "unknown_token_id", None), ("eot_id", "eot_token_id", None))}
    return BpeTokenizer(tokens, merges, types.tolist() if types is not None else None, pre,
                        add_bos=add_bos, source=source, **ids)


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer stored in a GGUF file (a model, or a vocabulary-only file).

    A malformed file raises CheckpointError; a vocabulary we cannot use, TokenizerError.
    """
    return gguf_tokenizer(read_gguf(path))
