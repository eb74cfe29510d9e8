"""The weight cache: the engine's repacked weights kept in one file, memory-mapped on later loads.

Building `Weights` from a quantized file decodes and requantizes every tensor (seconds for a 1B
model); the cache keeps the result, so a second start of the same file maps it instead. One file
per (model bytes, dtype, layout) under `<cache root>/weights/`, named

    <BLAKE3 key of the model file>-<dtype>-<layout tag>.weights

where the layout tag changes with LAYOUT_VERSION (this module's and engine/weights.py's), the
SIMD/packing constants, the Weights fields and the source of the modules that decide the
packing, so that a file from another packing is never read as this one (it is simply not found,
and ages out below).

File: MAGIC (8 bytes), the header's length (uint64, little-endian), the header as JSON (the
layout tag, the model config, and per Weights field its dtype, shape, offset and byte count, or
the field it is the same array as), then each array's raw C-order bytes at a 64-byte aligned
offset. Written to a temp file beside it and renamed (readers see a whole file or none).

Loading maps the file read-only and validates the header completely against the model's config
and dtype before any array is made (fields, dtypes, shapes, offsets and sizes within the file):
a file that fails is logged, removed and rebuilt by the caller, never given to a kernel. The
arrays are read-only views of the map; nothing writes weights (engine/weights.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import GROUP_SIZE, ModelConfig
from .identity import model_key
from .llama2c import Checkpoint
from .paths import cache_root
from .simd import F32_CHUNK, Q8_CHUNK, ROW_BLOCK
from .weights import LAYOUT_VERSION as WEIGHTS_LAYOUT_VERSION
from .weights import Progress, Weights, build_weights, padded

logger = logging.getLogger(__name__)

MAGIC = b"TLRWGT\x00\x01"
ALIGN = 64
LAYOUT_VERSION = 1  # NOTE: bump when the packing changes in a way the tag below cannot see
MAX_FILES = 4  # weight files kept; the least recently used go first
MIN_FILE_BYTES = 64 * 1024 * 1024  # smaller models build in well under a second: not cached
ENV = "TILLER_WEIGHT_CACHE"  # "0", "off", "no" or "false" disables the cache
SUFFIX = ".weights"
STALE_TMP_SECONDS = 3600  # a temp file this old lost its writer
MIN_FREE_BYTES = 1 << 30  # leave the disk at least this much after writing a cache file
_KINDS = "biuf"  # numpy dtype kinds an array may have: bool, int, uint, float (never objects)
# The modules whose code decides what build_weights produces, hashed into the layout tag.
_PACKING_SOURCES = ("weights.py", "quant.py", "dequant.py", "simd.py", "config.py")


class CacheFileError(ValueError):
    """A weight-cache file that cannot be used (the message says why)."""


@functools.cache
def layout_tag() -> str:
    """16 hex digits naming the packing: this file's and engine/weights.py's LAYOUT_VERSION, the
    chunk, group and row-block sizes, the Weights fields and the packing modules' source."""
    h = hashlib.sha256()
    h.update(json.dumps([LAYOUT_VERSION, WEIGHTS_LAYOUT_VERSION, Q8_CHUNK, F32_CHUNK, GROUP_SIZE,
                         ROW_BLOCK, ALIGN, list(Weights._fields)]).encode())
    here = Path(__file__).parent
    for name in _PACKING_SOURCES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()[:16]


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("0", "off", "no", "false")


def cache_dir() -> Path:
    return cache_root() / "weights"


def cache_path(key: str, dtype: str) -> Path:
    return cache_dir() / f"{key}-{dtype}-{layout_tag()}{SUFFIX}"


def _config_json(config: ModelConfig) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def expected_shapes(config: ModelConfig, dtype: str) -> dict[str, tuple[int, ...]]:
    """The shape of every Weights field build_weights makes for `config` (engine/weights.py):
    Q8_0 matrices interleaved in ROW_BLOCK-row blocks, except an embedding of its own (row-major,
    only looked up); f32 matrices row-major."""
    c = config
    L, vocab = c.n_layers, c.vocab_size
    dim_pad, hidden_pad = padded(c.dim, dtype), padded(c.hidden_dim, dtype)
    q_pad = padded(c.q_dim, dtype)
    q8 = dtype == "q8_0"

    def matrix(*lead: int, rows: int, n_pad: int,
               row_major: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(values, scales) shapes of a (*lead, rows, n_pad) matrix."""
        if not q8:
            return (*lead, rows, n_pad), (*lead, rows, 0)
        if row_major:
            return (*lead, rows, n_pad), (*lead, rows, n_pad // GROUP_SIZE)
        blocks = -(-rows // ROW_BLOCK)
        return ((*lead, blocks, n_pad // 4, 4 * ROW_BLOCK),
                (*lead, blocks, n_pad // GROUP_SIZE, ROW_BLOCK))

    qkv = c.q_dim + 2 * c.kv_dim
    half = c.head_dim // 2
    classifier = matrix(rows=vocab, n_pad=dim_pad)
    embedding = classifier if c.shared_classifier else matrix(rows=vocab, n_pad=dim_pad,
                                                              row_major=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (values, scales) in (
            ("embedding", embedding), ("classifier", classifier),
            ("wqkv", matrix(L, rows=qkv, n_pad=dim_pad)),
            ("wo", matrix(L, rows=c.dim, n_pad=q_pad)),
            ("w13", matrix(L, rows=2 * c.hidden_dim, n_pad=dim_pad)),
            ("w2", matrix(L, rows=c.dim, n_pad=hidden_pad))):
        shapes[name], shapes[name + "_scales"] = values, scales
    shapes |= {
        "attn_norm": (L, c.dim), "ffn_norm": (L, c.dim), "final_norm": (c.dim,),
        "rope_cos": (c.max_seq_len, half), "rope_sin": (c.max_seq_len, half),
        "bqkv": (L, qkv if c.arch == "qwen2" else 0),
        "q_norm": (L, c.head_dim if c.arch == "qwen3" else 0),
        "k_norm": (L, c.head_dim if c.arch == "qwen3" else 0),
    }
    return {name: shapes[name] for name in Weights._fields}


def expected_dtypes(config: ModelConfig, dtype: str) -> dict[str, str]:
    """The dtype of every Weights field of expected_shapes (engine/weights.py)."""
    matrix = "uint8" if dtype == "q8_0" else "float32"
    return {name: matrix if name in ("embedding", "wqkv", "wo", "w13", "w2", "classifier")
            else "float32" for name in expected_shapes(config, dtype)}


# -----------------------------------------------------------------------------------------------
# writing


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _header(weights: Weights, config: ModelConfig, dtype: str) -> dict[str, Any]:
    """The header, with offsets relative to the start of the data (the first aligned byte after
    the header); an array that is another field's (a shared embedding) is stored once."""
    fields: list[dict[str, Any]] = []
    offset = 0
    stored: dict[int, str] = {}  # id of an array written -> its field
    for name, array in zip(Weights._fields, weights, strict=True):
        if id(array) in stored:
            fields.append({"name": name, "same_as": stored[id(array)]})
            continue
        stored[id(array)] = name
        fields.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape),
                       "offset": offset, "nbytes": array.nbytes})
        offset = _align(offset + array.nbytes)
    return {"layout": layout_tag(), "dtype": dtype, "config": _config_json(config),
            "fields": fields, "data_bytes": offset}


def save(path: Path, weights: Weights, config: ModelConfig, dtype: str) -> None:
    """Write `weights` to `path` atomically (temp file in the same folder, then rename)."""
    header = _header(weights, config, dtype)
    blob = json.dumps(header, separators=(",", ":")).encode()
    data_start = _align(len(MAGIC) + 8 + len(blob))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(blob)) + blob)
            f.write(b"\0" * (data_start - f.tell()))
            for spec, array in zip(header["fields"], weights, strict=True):
                if "same_as" in spec:
                    continue
                if array.nbytes:
                    f.seek(data_start + spec["offset"])
                    f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            f.truncate(data_start + header["data_bytes"])
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -----------------------------------------------------------------------------------------------
# reading


def _parse_header(buf: mmap.mmap, config: ModelConfig, dtype: str
                  ) -> tuple[dict[str, Any], int]:
    """The header checked against the model and the file's size; (header, data start)."""
    size = len(buf)
    if size < len(MAGIC) + 8 or buf[:len(MAGIC)] != MAGIC:
        raise CacheFileError("not a tiller weight-cache file (bad magic)")
    (n,) = struct.unpack_from("<Q", buf, len(MAGIC))
    if n > size - len(MAGIC) - 8:
        raise CacheFileError(f"header of {n} bytes runs past the end of the file ({size} bytes)")
    try:
        header = json.loads(bytes(buf[len(MAGIC) + 8:len(MAGIC) + 8 + n]))
    except (UnicodeDecodeError, ValueError) as e:
        raise CacheFileError(f"unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise CacheFileError("header is not a JSON object")
    for key, want in (("layout", layout_tag()), ("dtype", dtype),
                      ("config", _config_json(config))):
        if header.get(key) != want:
            raise CacheFileError(f"header {key} {header.get(key)!r} is not the model's {want!r}")
    data_start = _align(len(MAGIC) + 8 + n)
    fields = header.get("fields")
    if not isinstance(fields, list) or [f.get("name") if isinstance(f, dict) else None
                                        for f in fields] != list(Weights._fields):
        raise CacheFileError(f"header fields are not {list(Weights._fields)}")
    shapes = expected_shapes(config, dtype)
    dtypes = expected_dtypes(config, dtype)
    end = data_start
    for i, spec in enumerate(fields):
        name = spec["name"]
        if "same_as" in spec:
            if spec["same_as"] not in Weights._fields[:i] or "same_as" in \
                    fields[Weights._fields.index(spec["same_as"])]:
                raise CacheFileError(f"{name}: same_as {spec['same_as']!r} is not an earlier "
                                     "stored field")
            continue
        dt, shape, offset, nbytes = (spec.get(k) for k in ("dtype", "shape", "offset", "nbytes"))
        if not (isinstance(dt, str) and dt.isidentifier()):
            raise CacheFileError(f"{name}: bad dtype {dt!r}")
        try:
            np_dtype = np.dtype(dt)
        except TypeError:
            raise CacheFileError(f"{name}: unknown dtype {dt!r}") from None
        if np_dtype.kind not in _KINDS or np_dtype.name != dt:
            raise CacheFileError(f"{name}: dtype {dt!r} is not a plain number type")
        if name in dtypes and dt != dtypes[name]:
            raise CacheFileError(f"{name}: dtype {dt} is not the model's {dtypes[name]}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CacheFileError(f"{name}: bad shape {shape!r}")
        if name in shapes and tuple(shape) != shapes[name]:
            raise CacheFileError(f"{name}: shape {tuple(shape)} is not the model's "
                                 f"{shapes[name]}")
        want = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        if not (isinstance(offset, int) and isinstance(nbytes, int)) or nbytes != want \
                or offset < 0 or offset % ALIGN:
            raise CacheFileError(f"{name}: offset {offset!r} / size {nbytes!r} do not fit "
                                 f"shape {shape} of {dt}")
        if offset < end - data_start:
            raise CacheFileError(f"{name}: overlaps the field before it")
        end = data_start + offset + nbytes
        if end > size:
            raise CacheFileError(f"{name}: bytes {data_start + offset}..{end} run past the end "
                                 f"of the file ({size} bytes): truncated")
    return header, data_start


def load(path: Path, config: ModelConfig, dtype: str) -> Weights:
    """The Weights stored at `path`, as read-only views of a read-only map of it
    (CacheFileError if the file does not hold this model's weights in this layout;
    OSError if it cannot be read)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise CacheFileError("empty file")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    header, data_start = _parse_header(buf, config, dtype)
    # NOTE: start reading the whole file now, in the background (as llama.cpp's mmap prefetch
    # does): when the page cache has dropped it, the first step would otherwise fault the
    # weights in a few pages at a time -- seconds, where one sequential read takes a fraction
    with contextlib.suppress(OSError, AttributeError):
        buf.madvise(mmap.MADV_WILLNEED)
    arrays: dict[str, np.ndarray] = {}
    for spec in header["fields"]:
        name = spec["name"]
        if "same_as" in spec:
            arrays[name] = arrays[spec["same_as"]]
            continue
        dt, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:  # the scales of an f32 matrix: (..., 0)
            array = np.zeros(shape, dt)
        else:  # NOTE: the map stays open as long as any array views it (numpy holds the buffer)
            array = np.frombuffer(buf, dt, count, data_start + spec["offset"]).reshape(shape)
        array.setflags(write=False)
        arrays[name] = array
    return Weights(**arrays)


def touch(path: Path) -> None:
    """Mark a file used now (the eviction order)."""
    # NOTE: a read-only cache still works; only its eviction order goes stale
    with contextlib.suppress(OSError):
        os.utime(path)


def evict(keep: Path, max_files: int | None = None) -> None:
    """Delete the least recently used weight files beyond `max_files` (never `keep`), and
    temp files left for an hour by writers that died."""
    folder = keep.parent
    try:
        now = time.time()
        for tmp in folder.glob(f"*{SUFFIX}.*.tmp"):
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                tmp.unlink(missing_ok=True)
        files = [p for p in folder.iterdir() if p.name.endswith(SUFFIX) and p != keep]
        files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[(max_files or MAX_FILES) - 1:]:
            logger.info("weight cache: removing %s (least recently used)", old.name)
            old.unlink(missing_ok=True)
    except OSError as e:
        logger.warning("weight cache: could not clean %s (%s)", folder, e)


# -----------------------------------------------------------------------------------------------
# the load path


def load_or_build(checkpoint: Checkpoint, dtype: str, progress: Progress | None = None, *,
                  use_cache: bool = True, min_bytes: int | None = None) -> Weights:
    """The checkpoint's Weights: mapped from the cache when a valid file is there, else built
    (build_weights) and, for files of at least `min_bytes` (default MIN_FILE_BYTES), written to
    the cache for next time.

    Caching is off with use_cache=False or $TILLER_WEIGHT_CACHE=0. A broken cache file is
    logged, removed and rebuilt; a cache that cannot be written is logged; neither is fatal."""
    if min_bytes is None:
        min_bytes = MIN_FILE_BYTES
    if not (use_cache and enabled()) or os.path.getsize(checkpoint.path) < min_bytes:
        return build_weights(checkpoint.config, checkpoint.tensors, dtype, progress)
    path = cache_path(model_key(checkpoint.path), dtype)
    if path.exists():
        try:
            weights = load(path, checkpoint.config, dtype)
            touch(path)
            logger.info("weights mapped from the cache %s", path)
            return weights
        except CacheFileError as e:
            logger.warning("%s: ignoring a broken weight-cache file (%s): removing and "
                           "rebuilding it", path, e)
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                logger.warning("%s: could not remove it (%s)", path, err)
        except OSError as e:
            logger.warning("%s: cannot read the weight-cache file (%s): building the weights",
                           path, e)
    weights = build_weights(checkpoint.config, checkpoint.tensors, dtype, progress)
    nbytes = sum(a.nbytes for a in {id(a): a for a in weights}.values())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < nbytes + MIN_FREE_BYTES:
            logger.warning("weight cache: %.1f GB free in %s, %.1f GB needed: not caching",
                           free / 1e9, path.parent, nbytes / 1e9)
            return weights
        save(path, weights, checkpoint.config, dtype)
        logger.info("weights cached in %s (%.2f GB)", path, nbytes / 1e9)
        evict(path)
    except OSError as e:
        logger.warning("weight cache: could not write %s (%s)", path, e)
    return weights
