"""The directory store (server/steering_dir.py) and the stored form (steering_store.decode):
durable writes, orphans cleaned at start, and damaged entries skipped and reported."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from tiller.server.steering_dir import DirectoryStore
from tiller.server.steering_store import (
    DamagedEntry,
    SteeringVector,
    StoreFull,
    decode,
    encode,
    vector_id,
)

DIM = 8
KEY = "k" * 64


def control(tag: str, layers=(2, 3), dim: int = DIM, key: str = KEY) -> SteeringVector:
    rng = np.random.default_rng(len(tag))
    return SteeringVector(vector_id(key, {"tag": tag}), "control", key, dim, {"tag": tag},
                          directions={layer: rng.standard_normal(dim).astype(np.float32)
                                      for layer in layers})


def actadd(tag: str, positions: int = 3) -> SteeringVector:
    rows = np.random.default_rng(1).standard_normal((positions, DIM)).astype(np.float32)
    return SteeringVector(vector_id(KEY, {"tag": tag}), "actadd", KEY, DIM, {"tag": tag},
                          rows=rows, source_layer=1)


def _savez(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _with_meta(vec: SteeringVector, **changes) -> dict[str, np.ndarray]:
    arrays = vec.arrays()
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(json.dumps({**meta, **changes}))
    return arrays


def damaged_bytes(kind: str, vec: SteeringVector) -> bytes:
    """The stored bytes of `vec` (a control vector with layers 2 and 3), damaged as `kind`."""
    good = encode(vec)
    if kind == "empty":
        return b""
    if kind == "truncated":
        return good[:len(good) // 2]
    if kind == "meta_not_object":
        return _savez({**vec.arrays(), "meta": np.array(json.dumps(["not", "an", "object"]))})
    if kind == "no_layers":
        arrays = _with_meta(vec, layers=[])
        return _savez({k: v for k, v in arrays.items() if not k.startswith("direction.")})
    if kind == "wrong_shape":
        return _savez({**vec.arrays(), "direction.2": np.ones(vec.dim + 1, np.float32)})
    if kind == "not_finite":
        return _savez({**vec.arrays(), "direction.3": np.full(vec.dim, np.inf, np.float32)})
    raise AssertionError(kind)


DAMAGE = {  # kind -> what decode says
    "empty": "empty (0 bytes)",
    "truncated": "not a readable .npz",
    "meta_not_object": "meta is not a JSON object but list",
    "no_layers": "not a non-empty list of integers",
    "wrong_shape": "direction.2 has shape",
    "not_finite": "direction.3 has NaN or infinite values",
}


def test_encode_decode_round_trip():
    for vec in (control("a"), actadd("b")):
        back = decode(encode(vec), vec.id)
        assert back.describe() == vec.describe()
        if vec.rows is not None:
            np.testing.assert_array_equal(back.rows, vec.rows)
        for layer, d in vec.directions.items():
            np.testing.assert_array_equal(back.directions[layer], d)


@pytest.mark.parametrize("kind", DAMAGE)
def test_decode_names_the_damage(kind):
    vec = control("victim")
    with pytest.raises(DamagedEntry) as e:
        decode(damaged_bytes(kind, vec), vec.id)
    assert DAMAGE[kind] in str(e.value)
    if kind == "wrong_shape":
        assert f"({DIM + 1},), expected ({DIM},)" in str(e.value)


def test_decode_refuses_a_file_under_another_name():
    vec = control("a")
    with pytest.raises(DamagedEntry, match="not sv-"):
        decode(encode(vec), "sv-" + "0" * 32)


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_entry_is_skipped_and_reported(tmp_path, caplog, kind):
    good, victim = control("good"), control("victim")
    DirectoryStore(tmp_path, 1 << 20).put(good)
    (tmp_path / f"{victim.id}.npz").write_bytes(damaged_bytes(kind, victim))
    with caplog.at_level(logging.ERROR, "tiller.server.steering_dir"):
        store = DirectoryStore(tmp_path, 1 << 20)  # opens: one bad file stops nothing
    assert store.damaged_entries == 1
    assert [v.id for v in store.list()] == [good.id] and store.get(victim.id) is None
    np.testing.assert_array_equal(store.get(good.id).directions[2], good.directions[2])
    message = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{victim.id}.npz" in message and DAMAGE[kind] in message
    # writing the vector again replaces the damaged file, and the report clears
    store.put(victim)
    assert store.damaged_entries == 0
    assert DirectoryStore(tmp_path, 1 << 20).get(victim.id) is not None


def test_orphan_temporary_files_are_removed_at_start(tmp_path):
    vec = control("a")
    DirectoryStore(tmp_path, 1 << 20).put(vec)
    orphan = tmp_path / f".{vec.id}.abc123.tmp"
    orphan.write_bytes(encode(vec)[:10])  # a write cut short by a crash
    other = tmp_path / "notes.txt"
    other.write_text("not ours")
    store = DirectoryStore(tmp_path, 1 << 20)
    assert not orphan.exists() and other.exists()
    assert store.get(vec.id) is not None and store.damaged_entries == 0


def test_put_fsyncs_the_file_before_the_rename_and_then_the_directory(tmp_path, monkeypatch):
    store = DirectoryStore(tmp_path, 1 << 20)
    vec = control("a")
    target = tmp_path / f"{vec.id}.npz"
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.put(vec)
    # the data reached the disk while the name did not yet point at it; then the rename did
    assert synced == [("file", False), ("dir", True)]
    assert target.read_bytes() == encode(vec)
    synced.clear()
    assert store.delete(vec.id) and not target.exists()
    assert synced == [("dir", False)]  # a delete is durable too


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    store = DirectoryStore(tmp_path, 1 << 20)

    def replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    vec = control("a")
    with pytest.raises(OSError, match="No space"):
        store.put(vec)
    assert list(tmp_path.iterdir()) == [] and store.get(vec.id) is None


def test_size_bound_and_idempotent_put(tmp_path):
    a, b = control("a"), control("b")
    store = DirectoryStore(tmp_path, a.nbytes + b.nbytes // 2)
    stored = store.put(a)
    again = SteeringVector(a.id, a.kind, a.model_key, a.dim, a.request, created=a.created + 5,
                           directions=a.directions)
    assert store.put(again) is stored and store.used_bytes == a.nbytes
    with pytest.raises(StoreFull, match=f"holds {a.nbytes} of"):
        store.put(b)
    assert store.get(b.id) is None and not (tmp_path / f"{b.id}.npz").exists()
    assert store.delete(a.id) and not store.delete(a.id)
    store.put(b)
    assert [v.id for v in DirectoryStore(tmp_path, 1 << 20).list()] == [b.id]


def test_directory_files_are_the_encoded_bytes(tmp_path: Path):
    vec = actadd("x")
    DirectoryStore(tmp_path, 1 << 20).put(vec)
    assert (tmp_path / f"{vec.id}.npz").read_bytes() == encode(vec)
