"""Steering vectors kept on disk, named by what made them.

A vector's id is a BLAKE3 hash of the model's key and the canonical JSON of the request that
built it, so the same request gives the same id -- and the same vector -- on every replica, and
building it twice just finds it. Files are `<id>.npz` (arrays plus a JSON `meta` string; no
pickle) in one directory, written atomically; the directory's total size is bounded.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import numpy as np

ID_PREFIX = "sv-"


class StoreFull(RuntimeError):
    """Adding the vector would take the store past its size bound."""


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

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SteeringVector:
        meta = json.loads(str(arrays["meta"]))
        vec = cls(id=meta["id"], kind=meta["kind"], model_key=meta["model_key"],
                  dim=int(meta["dim"]), request=meta["request"], created=int(meta["created"]))
        if vec.kind == "actadd":
            vec.rows = np.asarray(arrays["rows"], np.float32)
            vec.source_layer = int(meta["layers"][0])
        else:
            vec.directions = {int(k.split(".", 1)[1]): np.asarray(v, np.float32)
                              for k, v in arrays.items() if k.startswith("direction.")}
        return vec


class SteeringStore:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._vectors: dict[str, SteeringVector] = {}
        for path in sorted(self.directory.glob(f"{ID_PREFIX}*.npz")):
            try:
                with np.load(path, allow_pickle=False) as data:
                    vec = SteeringVector.from_arrays(dict(data))
            except (OSError, ValueError, KeyError) as e:  # a damaged file costs only itself
                import logging

                logging.getLogger(__name__).warning("skipping %s: %s", path, e)
                continue
            self._vectors[vec.id] = vec

    @property
    def used_bytes(self) -> int:
        return sum(v.nbytes for v in self._vectors.values())

    def get(self, vector_id: str) -> SteeringVector | None:
        return self._vectors.get(vector_id)

    def list(self, model_key: str | None = None) -> list[SteeringVector]:
        return sorted((v for v in self._vectors.values()
                       if model_key is None or v.model_key == model_key),
                      key=lambda v: (v.created, v.id))

    def put(self, vec: SteeringVector) -> SteeringVector:
        """Store (idempotent: an id already there is returned as it is)."""
        with self._lock:
            if vec.id in self._vectors:
                return self._vectors[vec.id]
            if self.used_bytes + vec.nbytes > self.max_bytes:
                raise StoreFull(f"the steering store holds {self.used_bytes} of "
                                f"{self.max_bytes} bytes; this vector needs {vec.nbytes} more "
                                "(delete vectors, or raise --steering-max-mb)")
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **vec.arrays())  # type: ignore[arg-type]
                os.replace(tmp, self.directory / f"{vec.id}.npz")
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._vectors[vec.id] = vec
            return vec

    def delete(self, vector_id: str) -> bool:
        with self._lock:
            if self._vectors.pop(vector_id, None) is None:
                return False
            (self.directory / f"{vector_id}.npz").unlink(missing_ok=True)
            return True
