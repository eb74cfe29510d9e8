"""Model identity: a key (BLAKE3 of the file's bytes) and a uuid (the model, whatever its encoding).

    key   BLAKE3 of the model file, memory-mapped and hashed on all cores. Different bytes,
          different key: a Q8_0 file and its f32 original have different keys. Cached on disk
          by (absolute path, size, mtime_ns, inode), so a restart with an unchanged file does
          not read it again.
    uuid  `general.uuid` when a GGUF file declares one (`tiller convert` writes the source's, as
          llama.cpp's authorship-metadata discussion settled: a quantized file is the same
          model). Otherwise a UUIDv5 in TENSOR_NAMESPACE whose name is the BLAKE3 of the
          checkpoint's tensors in a canonical form (see tensor_digest): the same model read from
          llama2.c v0, v1 or an F32/F16/BF16 GGUF of the same values gets the same uuid.

The cache is one small JSON file, `keys.json`, in `$TILLER_CACHE_DIR`, else
`$XDG_CACHE_HOME/tiller`, else `~/.cache/tiller`. It is rewritten atomically (temp file and
rename); a missing, unreadable or corrupt cache is ignored and a cache that cannot be written is
logged, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from .config import GROUP_SIZE
from .dequant import Packed
from .llama2c import Checkpoint
from .paths import cache_root
from .quant import QTensor

logger = logging.getLogger(__name__)

# NOTE: uuid5(NAMESPACE_URL, "tiller:model-tensors:blake3:v1"), fixed here so that the uuids of
# derived identities never change (tests/test_identity.py checks the derivation). A version
# bump of tensor_digest's canonical form must get a new namespace.
TENSOR_NAMESPACE = uuid.UUID("19480bbd-c5e6-55d0-897e-49e930eebe9e")
TENSOR_NAMESPACE_NAME = "tiller:model-tensors:blake3:v1"
CACHE_FILE = "keys.json"
CACHE_VERSION = 1
MAX_CACHE_ENTRIES = 512  # oldest written entries are dropped beyond this, and deleted files


# -----------------------------------------------------------------------------------------------
# the key


def hash_file(path: str | os.PathLike[str]) -> str:
    """BLAKE3 hex digest of a file: memory-mapped, hashed on all cores (no cache)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(os.fspath(path))
    return hasher.hexdigest()


def model_key(path: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None) -> str:
    """BLAKE3 of the file's bytes, from the cache in `cache` (default cache_root()) when the file
    is unchanged (same absolute path, size, mtime_ns and inode), else hashed and cached."""
    return _cached(path, "blake3", lambda: hash_file(path), cache)


# -----------------------------------------------------------------------------------------------
# the uuid


def tensor_digest(checkpoint: Checkpoint) -> str:
    """BLAKE3 hex digest of a checkpoint's tensors in canonical form.

    Tensors in sorted order of their names (engine/llama2c.py's, stacked over layers); for each,
    one line `name dtype shape\\n` then its little-endian bytes: float32 values, or for a Q8_0
    QTensor `name q8_0 shape\\n`, the int8 values, then the float32 scales of its groups of 32.
    Tensors are hashed as loaded, not dequantized: a Q8_0 file and its float original differ.
    """
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for name in sorted(checkpoint.tensors):
        t = checkpoint.tensors[name]
        if isinstance(t, Packed):
            _hash_packed(hasher, name, t)
            continue
        parts: tuple[tuple[str, np.ndarray, str], ...]
        if isinstance(t, QTensor):
            parts = (("q8_0", t.values, "i1"), ("scales", t.scales, "<f4"))
        else:
            parts = (("f32", t, "<f4"),)
        for i, (kind, a, dtype) in enumerate(parts):
            a = np.ascontiguousarray(a, dtype=dtype)
            label = name if i == 0 else f"{name}.{kind}"
            hasher.update(f"{label} {kind} {'x'.join(map(str, a.shape))}\n".encode())
            hasher.update(memoryview(a).cast("B"))  # type: ignore[arg-type]
    return hasher.hexdigest()


def _hash_packed(hasher: Any, name: str, t: Packed) -> None:
    """What tensor_digest hashes for t.materialize(), decoded a layer at a time so that a GGUF
    model is never held in float32."""
    layers = [t.layer(i) for i in range(len(t.parts))] if t.stacked else [t]
    kinds = (("q8_0", t.shape), ("scales", (*t.shape[:-1], t.shape[-1] // GROUP_SIZE))) \
        if t.is_q8_0 else (("f32", t.shape),)
    for i, (kind, shape) in enumerate(kinds):
        label = name if i == 0 else f"{name}.{kind}"
        hasher.update(f"{label} {kind} {'x'.join(map(str, shape))}\n".encode())
        for layer in layers:
            if t.is_q8_0:
                q = layer.materialize()
                assert isinstance(q, QTensor)
                a = q.values if kind == "q8_0" else q.scales
            else:  # NOTE: a stack mixing Q8_0 and other types is float32 throughout
                a = layer.dequantize()
            hasher.update(memoryview(np.ascontiguousarray(a)).cast("B"))  # type: ignore[arg-type]


def derived_uuid(checkpoint: Checkpoint) -> str:
    """The uuid of a checkpoint's tensors: UUIDv5(TENSOR_NAMESPACE, tensor_digest)."""
    return str(uuid.uuid5(TENSOR_NAMESPACE, tensor_digest(checkpoint)))


def declared_uuid(checkpoint: Checkpoint) -> str | None:
    """`general.uuid` of a GGUF checkpoint in canonical form, or None if absent or malformed."""
    value = checkpoint.metadata.get("general.uuid")
    if value is None:
        return None
    try:
        return str(uuid.UUID(value)) if isinstance(value, str) else None
    except ValueError:
        return None


def model_uuid(checkpoint: Checkpoint, cache: str | os.PathLike[str] | None = None) -> str:
    """`general.uuid` if the file declares a valid one, else derived_uuid (cached like the key).

    A malformed `general.uuid` is logged and replaced by the derived uuid.
    """
    declared = declared_uuid(checkpoint)
    if declared is not None:
        return declared
    if "general.uuid" in checkpoint.metadata:
        logger.warning("%s: general.uuid %r is not a UUID: using the uuid derived from the "
                       "tensors", checkpoint.path, checkpoint.metadata["general.uuid"])
    return _cached(checkpoint.path, "tensor_uuid", lambda: derived_uuid(checkpoint), cache)


# -----------------------------------------------------------------------------------------------
# the cache


def _stamp(path: str) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _cached(path: str | os.PathLike[str], field: str, compute: Any,
            cache: str | os.PathLike[str] | None) -> str:
    """`field` of the file's cache entry if the file is unchanged, else compute() and store it."""
    real = os.path.realpath(path)
    cache_path = Path(cache if cache is not None else cache_root()) / CACHE_FILE
    before = _stamp(real)
    entry = _read_cache(cache_path).get(real)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in before.items()) \
            and isinstance(entry.get(field), str):
        return entry[field]
    value = compute()
    if _stamp(real) != before:  # NOTE: changed while we read it: the value may be of neither
        logger.warning("%s changed while it was being hashed: not caching its %s", real, field)
        return value
    _update_cache(cache_path, real, before, field, value)
    return value


def _read_cache(cache_path: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache_path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("%s: ignoring an unreadable identity cache (%s)", cache_path, e)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION \
            or not isinstance(data.get("files"), dict):
        logger.warning("%s: ignoring an identity cache of an unknown layout", cache_path)
        return {}
    return data["files"]


def _update_cache(cache_path: Path, real: str, stamp: dict[str, int], field: str,
                  value: str) -> None:
    """Merge one value into the cache file, rewritten atomically; failures are only logged."""
    files = _read_cache(cache_path)  # re-read: another process may have added entries
    entry = files.pop(real, None)
    if not (isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items())):
        entry = dict(stamp)
    entry[field] = value
    files = {p: e for p, e in files.items() if os.path.exists(p)}  # deleted files go
    files[real] = entry  # last written goes last: the oldest are dropped first
    for old in list(files)[:-MAX_CACHE_ENTRIES]:
        del files[old]
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=CACHE_FILE, suffix=".tmp", dir=cache_path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": CACHE_VERSION, "files": files}, f, indent=1)
            os.replace(tmp, cache_path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        logger.warning("%s: could not write the identity cache (%s)", cache_path, e)
