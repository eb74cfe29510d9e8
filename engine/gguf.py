"""GGUF files (versions 2 and 3): Llama-architecture models and their SentencePiece vocabulary.

Layout (little-endian; llama.cpp's ggml/src/gguf.cpp and docs/gguf.md):

    "GGUF", uint32 version, uint64 tensor_count, uint64 kv_count
    kv_count x     string key, uint32 value type, value
                   (string = uint64 length + UTF-8 bytes; array = uint32 type, uint64 n, n values)
    tensor_count x string name, uint32 n_dims, n_dims x uint64 ne, uint32 ggml type,
                   uint64 offset (from the start of the data section, a multiple of the alignment)
    zero padding to `general.alignment` (default 32), then the data section.

ne[0] is the length of a row, so a tensor with ne = (cols, rows) is the numpy array (rows, cols):
the [out, in] layout of llama2.c and PyTorch, which is what the engine wants.

RoPE: llama.cpp's `llama` architecture rotates adjacent pairs (x[2i], x[2i+1]) ("NORM" rope),
which is llama2.c's convention and ours. Hugging Face checkpoints rotate halves (x[i],
x[i + head_dim/2]); convert_hf_to_gguf.py permutes their q and k rows into the pairwise order
(`LlamaModel.permute`), so GGUF q/k weights are used as they are (tests/test_gguf.py checks a
Hugging Face-style model through that permutation).

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
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .bpe import BpeTokenizer
from .config import ModelConfig
from .llama2c import LIMITS, NORMS, Checkpoint, CheckpointError, tensor_shapes
from .quant import QTensor
from .tokenizer import SpmTokenizer, Tokenizer, TokenizerError

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 63  # GGML_MAX_NAME less its NUL
T = GGMLQuantizationType
SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0)
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
            raise cur.fail(f"tensor {t.name} (at offset {t.offset}) overlaps tensor {last}")
        end, last = t.offset + t.nbytes, t.name
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
    if ne[0] % block:
        raise cur.fail(f"tensor {name} has rows of {ne[0]} values, not a multiple of the "
                       f"{ggml_type.name} block of {block}")
    nbytes = math.prod(ne) // block * block_bytes
    if offset % alignment:
        raise cur.fail(f"tensor {name} has offset {offset}, not a multiple of the alignment "
                       f"{alignment}")
    start = data_start + offset
    if start + nbytes > size:
        raise cur.fail(f"tensor {name} ({ggml_type.name}, shape {shape}, {nbytes} bytes at "
                       f"offset {start}) runs past the end of the {size}-byte file")
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


def _check_llama(f: GGUFFile) -> None:
    arch = _meta(f, "general.architecture", (str,))
    if arch != "llama":
        raise CheckpointError(f"{f.path}: architecture {arch!r} is not supported (only 'llama')")
    experts = _meta(f, "llama.expert_count", (int,), 0)
    if experts > 0:
        raise CheckpointError(f"{f.path}: a mixture-of-experts model ({experts} experts) is not "
                              "supported")
    scaling = _meta(f, "llama.rope.scaling.type", (str,), "none")
    factor = _meta(f, "llama.rope.scaling.factor", (float, int), 1.0)
    linear = _meta(f, "llama.rope.scale_linear", (float, int), 1.0)  # the legacy key
    if scaling != "none" and factor != 1.0 or linear != 1.0:
        raise CheckpointError(f"{f.path}: RoPE scaling ({scaling!r}, factor "
                              f"{factor if linear == 1.0 else linear}) is not supported")


def _config(f: GGUFFile, vocab_size: int, shared: bool) -> ModelConfig:
    def key(name: str, limit: str, default: Any = ...) -> int:
        return _meta_int(f, f"llama.{name}", default, LIMITS[limit])

    n_heads = key("attention.head_count", "n_heads")
    params: dict[str, Any] = dict(
        dim=key("embedding_length", "dim"), hidden_dim=key("feed_forward_length", "hidden_dim"),
        n_layers=key("block_count", "n_layers"), n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv", "n_kv_heads", n_heads),
        vocab_size=vocab_size, max_seq_len=key("context_length", "max_seq_len"),
        shared_classifier=shared,
        norm_eps=_meta_float(f, "llama.attention.layer_norm_rms_epsilon"),
        rope_theta=_meta_float(f, "llama.rope.freq_base", 10000.0))
    try:
        config = ModelConfig(**params)
    except ValueError as e:
        raise CheckpointError(f"{f.path}: {e}") from e
    for name in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        value = _meta_int(f, f"llama.{name}", config.head_dim)
        if value != config.head_dim:
            raise CheckpointError(f"{f.path}: llama.{name} is {value}, but only "
                                  f"head_dim = {config.dim} / {n_heads} = {config.head_dim} "
                                  "is supported")
    return config


def _vocab_size(f: GGUFFile) -> int:
    """From the token list, the token_embd rows and llama.vocab_size, which must all agree."""
    sizes = {}
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None:
        sizes["tokenizer.ggml.tokens"] = len(tokens)
    if "token_embd.weight" in f.tensors:
        sizes["token_embd.weight rows"] = f.tensors["token_embd.weight"].shape[0]
    if "llama.vocab_size" in f.metadata:
        sizes["llama.vocab_size"] = _meta_int(f, "llama.vocab_size")
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
    return out


def _check_tensors(f: GGUFFile,
                   expected: dict[str, tuple[str, int | None, tuple[int, ...]]]) -> None:
    missing = [n for n in expected if n not in f.tensors]
    if missing:
        raise CheckpointError(f"{f.path}: missing tensor{'s' * (len(missing) > 1)} "
                              + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    extra = [n for n in f.tensors if n not in expected]
    if extra:
        hint = (" (rope_freqs holds Llama 3.1-style RoPE scaling, which is not supported)"
                if "rope_freqs.weight" in extra else
                " (biases are not part of the Llama architecture we run)"
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


def _read_tensor(f: GGUFFile, t: TensorInfo) -> np.ndarray | QTensor:
    """One tensor: fp32 (a read-only view of the file for F32), or a QTensor for Q8_0."""
    raw = f.data[t.offset:t.offset + t.nbytes]
    if t.type == T.F32:
        return raw.view("<f4").reshape(t.shape)
    if t.type == T.F16:
        return raw.view("<f2").astype(np.float32).reshape(t.shape)
    if t.type == T.BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
    assert t.type == T.Q8_0
    block, block_bytes = Q8_0_BLOCK
    blocks = raw.reshape(-1, block_bytes)
    scales = np.ascontiguousarray(blocks[:, :2]).view("<f2").astype(np.float32)
    if not np.isfinite(scales).all():
        raise CheckpointError(f"{f.path}: tensor {t.name} has non-finite Q8_0 scales")
    values = np.ascontiguousarray(blocks[:, 2:]).view(np.int8)
    return QTensor(values.reshape(t.shape), scales.reshape(*t.shape[:-1], t.shape[-1] // block))


def _as_fp32(t: np.ndarray | QTensor) -> np.ndarray:
    return t.dequantize() if isinstance(t, QTensor) else t


def _stack(f: GGUFFile, infos: list[TensorInfo], name: str) -> np.ndarray | QTensor:
    """One tensor per layer -> (layers, ...): a QTensor when every layer is Q8_0, else fp32."""
    shape = (len(infos), *infos[0].shape)
    if name not in NORMS and all(t.type == T.Q8_0 for t in infos):
        values = np.empty(shape, np.int8)
        scales = np.empty((*shape[:-1], shape[-1] // Q8_0_BLOCK[0]), np.float32)
        for layer, t in enumerate(infos):
            q = _read_tensor(f, t)
            assert isinstance(q, QTensor)  # every layer is Q8_0
            values[layer], scales[layer] = q.values, q.scales
        return QTensor(values, scales)
    if name not in NORMS and any(t.type == T.Q8_0 for t in infos):
        logger.info("%s: %s mixes Q8_0 and float layers: dequantized to fp32", f.path, name)
    out = np.empty(shape, np.float32)
    for layer, t in enumerate(infos):
        out[layer] = _as_fp32(_read_tensor(f, t))
    return out


def load_gguf(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a GGUF Llama model (format "gguf").

    Matrices stored as Q8_0 become QTensors with the same int8 values and their fp16 scales as
    float32 (GGUF's blocks of 32 along a row are the engine's groups); F32, F16 and BF16
    tensors become fp32 arrays. Norms are always fp32. Checkpoint.metadata keeps the keys in
    KEPT_METADATA that the file has. Everything is validated before any tensor is read;
    problems raise CheckpointError naming the file.
    """
    f = read_gguf(path)
    _check_llama(f)
    if not f.tensors:
        raise CheckpointError(f"{f.path}: the file has no tensors (a vocabulary-only GGUF?)")
    shared = "output.weight" not in f.tensors
    config = _config(f, _vocab_size(f), shared)
    expected = _expected(config)
    _check_tensors(f, expected)
    by_name: dict[str, list[TensorInfo]] = {}
    for gguf_name, (ours, _, _) in expected.items():  # layers in order: blk.0 first
        by_name.setdefault(ours, []).append(f.tensors[gguf_name])
    tensors: dict[str, np.ndarray | QTensor] = {}
    for ours, infos in by_name.items():
        if ours in LAYER_TENSORS.values():
            tensors[ours] = _stack(f, infos, ours)
        else:
            t = _read_tensor(f, infos[0])
            tensors[ours] = _as_fp32(t) if ours in NORMS else t
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
