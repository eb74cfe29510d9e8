"""Model-key hashing throughput: BLAKE3 of a 1 GB file, as the server computes it and b3sum-style.

Writes a file of random bytes to a temporary directory (deleted afterwards) and hashes it:

- **mmap, all threads**: `blake3(max_threads=AUTO).update_mmap(path)`, what engine/identity.py
  does for a model key;
- **mmap, 1 thread**: `blake3().update_mmap(path)`;
- **read 1 MiB chunks, 1 thread**: `blake3().update(chunk)` over `readinto` a 1 MiB buffer, how a
  single-threaded `b3sum --num-threads 1`-style loop reads a file;
- **cached key**: `model_key(path)` once the identity cache has the file (a restart).

Each is the best of `--repeats` runs with the file in the page cache (it was just written), so
these are hashing speeds, not disk speeds. GB is 10^9 bytes.

    python bench/bench_hash.py [--size-mb 1000] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
from tiller.engine.identity import model_key

CHUNK = 1 << 20


def write_random(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for start in range(0, size, 64 << 20):
            f.write(rng.bytes(min(64 << 20, size - start)))


def mmap_all_threads(path: Path) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(path)
    return h.hexdigest()


def mmap_one_thread(path: Path) -> str:
    h = blake3.blake3()
    h.update_mmap(path)
    return h.hexdigest()


def chunks_one_thread(path: Path) -> str:
    h = blake3.blake3()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def best(fn: Callable[[], str], repeats: int) -> tuple[float, str]:
    times, digest = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        digest = fn()
        times.append(time.perf_counter() - start)
    return min(times), digest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=1000, help="file size in MB (10^6 bytes)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, help="where to write the file (default: $TMPDIR)")
    args = p.parse_args()
    size = args.size_mb * 10**6
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "model.bin"
        start = time.perf_counter()
        write_random(path, size)
        print(f"{size / 1e9:.2f} GB file written in {time.perf_counter() - start:.1f} s; "
              f"{os.cpu_count()} CPUs")
        results = {}
        for name, fn in (("mmap, all threads", mmap_all_threads),
                         ("mmap, 1 thread", mmap_one_thread),
                         ("read 1 MiB chunks, 1 thread", chunks_one_thread)):
            seconds, digest = best(lambda fn=fn: fn(path), args.repeats)
            results[name] = digest
            print(f"  {name:<30} {seconds * 1e3:8.1f} ms  {size / seconds / 1e9:6.2f} GB/s")
        assert len(set(results.values())) == 1, "the three ways disagree"
        cache = Path(tmp) / "cache"
        start = time.perf_counter()
        model_key(path, cache)
        first = time.perf_counter() - start
        seconds, _ = best(lambda: model_key(path, cache), args.repeats)
        print(f"  {'model_key, first (hash+cache)':<30} {first * 1e3:8.1f} ms")
        print(f"  {'model_key, cached (a restart)':<30} {seconds * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
