"""The embedded steering store: one `<id>.npz` file per vector in a directory of one server.

Durable: a vector is written to a temporary file that is fsynced, renamed over its name, and
the directory fsynced too, so after a crash or power loss a vector the client was told about is
there, whole. Temporary files left by a crash are removed when the store opens (the directory
belongs to one server). A damaged file (0 bytes, truncated, bad meta, wrong shapes, non-finite
values: steering_store.decode) is skipped and reported -- logged with its name and counted for
/metrics -- so one bad file never stops the server from starting; writing the same vector
again replaces it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

from .steering_store import (
    ID_PREFIX,
    DamagedEntry,
    SteeringVector,
    StoreFull,
    decode,
    encode,
    full_message,
)

log = logging.getLogger(__name__)
TMP_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable (POSIX: the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryStore:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._vectors: dict[str, SteeringVector] = {}
        self._damaged: set[str] = set()  # file names
        for path in self.directory.glob(f"*{TMP_SUFFIX}"):
            log.warning("steering store: removing %s, left by an interrupted write", path)
            path.unlink(missing_ok=True)
        for path in sorted(self.directory.glob(f"{ID_PREFIX}*.npz")):
            try:
                vec = decode(path.read_bytes(), path.stem)
            except (OSError, DamagedEntry) as e:  # a damaged file costs only itself
                log.error("steering store: skipping damaged entry %s: %s", path, e)
                self._damaged.add(path.name)
                continue
            self._vectors[vec.id] = vec

    def __str__(self) -> str:
        return str(self.directory)

    @property
    def used_bytes(self) -> int:
        return sum(v.nbytes for v in self._vectors.values())

    @property
    def damaged_entries(self) -> int:
        return len(self._damaged)

    def get(self, vector_id: str) -> SteeringVector | None:
        return self._vectors.get(vector_id)

    def list(self, model_key: str | None = None) -> list[SteeringVector]:
        return sorted((v for v in self._vectors.values()
                       if model_key is None or v.model_key == model_key),
                      key=lambda v: (v.created, v.id))

    def put(self, vec: SteeringVector) -> SteeringVector:
        with self._lock:
            if vec.id in self._vectors:
                return self._vectors[vec.id]
            if self.used_bytes + vec.nbytes > self.max_bytes:
                raise StoreFull(full_message(self.used_bytes, self.max_bytes, vec.nbytes))
            data = encode(vec)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{vec.id}.",
                                       suffix=TMP_SUFFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # the bytes are on disk before the name points at them
                os.replace(tmp, self.directory / f"{vec.id}.npz")
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            fsync_dir(self.directory)  # ... and the name is, before the client hears of it
            self._damaged.discard(f"{vec.id}.npz")  # a damaged file of this id is replaced
            self._vectors[vec.id] = vec
            return vec

    def delete(self, vector_id: str) -> bool:
        with self._lock:
            if self._vectors.pop(vector_id, None) is None:
                return False
            (self.directory / f"{vector_id}.npz").unlink(missing_ok=True)
            fsync_dir(self.directory)  # a deleted vector stays deleted after a crash
            return True
