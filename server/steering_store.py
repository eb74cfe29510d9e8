"""Steering vectors, named by what made them, and the interface of the stores that keep them.

A vector's id is a BLAKE3 hash of the model's key and the canonical JSON of the request that
built it, so the same request gives the same id -- and the same vector -- on every replica, and
building it twice just finds it. A stored vector is the bytes of an `.npz` (arrays plus a JSON
`meta` string; no pickle): `encode` writes them and `decode` reads them back, refusing anything
damaged. Two stores keep those bytes: a directory (steering_dir.py, the embedded default) and a
Redis server shared by replicas (steering_redis.py); both bound their total size the same way.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3
import numpy as np

ID_PREFIX = "sv-"
KINDS = ("actadd", "control")


class StoreFull(RuntimeError):
    """Adding the vector would take the store past its size bound."""


class StoreUnavailable(RuntimeError):
    """The store cannot be reached (Redis down): requests needing it get a 503."""


class DamagedEntry(ValueError):
    """Stored bytes that are not a usable vector; the message says what is wrong."""


def canonical(request: dict[str, Any]) -> str:
    return json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def vector_id(model_key: str, request: dict[str, Any]) -> str:
    digest = blake3.blake3(f"{model_key}\n{canonical(request)}".encode()).hexdigest()
    return ID_PREFIX + digest[:32]


@dataclass
class SteeringVector:
    """kind "actadd": rows (P, dim) read at `source_layer`; kind "control": one (dim,) direction
    per layer. Layers are tiller's (engine/steering.py)."""

    id: str
    kind: str
    model_key: str
    dim: int
    request: dict[str, Any]
    created: int = field(default_factory=lambda: int(time.time()))
    rows: np.ndarray | None = None
    source_layer: int | None = None
    directions: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        if self.kind == "control":
            return sorted(self.directions)
        assert self.source_layer is not None  # an "actadd" vector always has one
        return [self.source_layer]

    @property
    def nbytes(self) -> int:
        if self.rows is not None:
            return self.rows.nbytes
        return sum(v.nbytes for v in self.directions.values())

    def describe(self) -> dict[str, Any]:
        shape = list(self.rows.shape) if self.rows is not None else [len(self.directions),
                                                                      self.dim]
        return {"id": self.id, "object": "steering.vector", "kind": self.kind,
                "model_key": self.model_key, "dim": self.dim, "layers": self.layers,
                "shape": shape, "created": self.created, "request": self.request,
                "bytes": self.nbytes}

    def arrays(self) -> dict[str, np.ndarray]:
        meta = {k: v for k, v in self.describe().items() if k not in ("shape", "bytes")}
        out = {"meta": np.array(json.dumps(meta))}
        if self.rows is not None:
            out["rows"] = self.rows
        for layer, vec in self.directions.items():
            out[f"direction.{layer}"] = vec
        return out


def encode(vec: SteeringVector) -> bytes:
    """The stored form of a vector: an uncompressed .npz, the same bytes in every store."""
    buf = io.BytesIO()
    np.savez(buf, **vec.arrays())  # type: ignore[arg-type]
    return buf.getvalue()


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise DamagedEntry(what)


def _float_array(value: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    _check(value.dtype.kind == "f", f"{name} is {value.dtype}, not floating point")
    _check(value.shape == shape, f"{name} has shape {value.shape}, expected {shape}")
    array = np.asarray(value, np.float32)
    _check(bool(np.isfinite(array).all()), f"{name} has NaN or infinite values")
    return array


def decode(data: bytes, expected_id: str) -> SteeringVector:
    """Stored bytes back as the vector `expected_id`, every field and array checked: a 0-byte
    or truncated file, meta that is not a JSON object, an empty layer list, a wrong shape or a
    non-finite value is a DamagedEntry, never a vector that fails later inside a step."""
    _check(len(data) > 0, "empty (0 bytes)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DamagedEntry(f"not a readable .npz ({type(e).__name__}: {e})") from None
    _check("meta" in arrays and arrays["meta"].shape == () and arrays["meta"].dtype.kind == "U",
           "no meta string")
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as e:
        raise DamagedEntry(f"meta is not JSON ({e})") from None
    _check(isinstance(meta, dict), f"meta is not a JSON object but {type(meta).__name__}")
    _check(meta.get("id") == expected_id, f"meta names {meta.get('id')!r}, not {expected_id}")
    _check(meta.get("kind") in KINDS, f"meta kind {meta.get('kind')!r} is not one of {KINDS}")
    for key, kind in (("model_key", str), ("dim", int), ("created", int), ("request", dict),
                      ("layers", list)):
        _check(type(meta.get(key)) is kind, f"meta {key} is not a {kind.__name__}")
    layers, dim = meta["layers"], meta["dim"]
    _check(dim > 0, f"meta dim {dim} is not positive")
    _check(bool(layers) and all(type(x) is int for x in layers),
           f"meta layers {layers!r} is not a non-empty list of integers")
    vec = SteeringVector(id=expected_id, kind=meta["kind"], model_key=meta["model_key"],
                         dim=dim, request=meta["request"], created=meta["created"])
    if vec.kind == "actadd":
        _check(len(layers) == 1, f"an actadd vector has one source layer, meta says {layers}")
        rows = arrays.get("rows")
        _check(rows is not None and rows.ndim == 2 and rows.shape[0] > 0,
               "rows missing or not a non-empty (positions, dim) array")
        assert rows is not None
        vec.rows = _float_array(rows, "rows", (rows.shape[0], dim))
        vec.source_layer = layers[0]
        return vec
    found = {name: value for name, value in arrays.items() if name.startswith("direction.")}
    _check(all(name.split(".", 1)[1].lstrip("-").isdigit() for name in found),
           f"direction arrays with non-integer layers: {sorted(found)}")
    directions = {int(name.split(".", 1)[1]): _float_array(value, name, (dim,))
                  for name, value in found.items()}
    _check(sorted(directions) == sorted(layers),
           f"directions for layers {sorted(directions)}, meta says {layers}")
    vec.directions = dict(sorted(directions.items()))
    return vec


def full_message(used: int, max_bytes: int, needed: int) -> str:
    return (f"the steering store holds {used} of {max_bytes} bytes; this vector needs "
            f"{needed} more (delete vectors, or raise --steering-max-mb)")


class SteeringStore(Protocol):
    """What the server needs of a store. Sizes count the vectors' float32 arrays (`nbytes`), so
    the bound means the same in every store. Any method may raise StoreUnavailable."""

    max_bytes: int

    @property
    def used_bytes(self) -> int: ...

    @property
    def damaged_entries(self) -> int:
        """Entries found damaged (skipped, logged with their name) since the store opened."""
        ...

    def get(self, vector_id: str) -> SteeringVector | None: ...

    def list(self, model_key: str | None = None) -> list[SteeringVector]:
        """The vectors (of one model), oldest first."""
        ...

    def put(self, vec: SteeringVector) -> SteeringVector:
        """Store it, or raise StoreFull. Idempotent: an id already stored is returned as it is
        (ids are content addresses, so the vector is the same)."""
        ...

    def delete(self, vector_id: str) -> bool:
        """Remove it; False when it was not there."""
        ...
