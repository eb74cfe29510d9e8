"""The peer: llama.cpp at a pinned commit, built once and shared by every bench script.

    python bench/peer.py            # build if missing, print the binaries and the AMX check

`llama_cpp()` returns the paths of llama-cli, llama-bench, llama-quantize, llama-server and
llama-simple under `$TILLER_PEER_DIR/llama.cpp/build/bin` (default `bench/.peer`, ignored by
git), building them only when one is missing. The source is the commit's tree taken with `git
archive` from a local git directory (`$TILLER_LLAMACPP_GIT`, else the mirror the session's
`fetch` tool writes, else a clone of GitHub); the vocabulary GGUF test files are left out (some
are absent from mirrors, and the build does not need them). A lock file serialises concurrent
builds from several worktrees: the second caller waits, then finds the binaries.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

COMMIT = "c392e50"
TARGETS = ("llama-cli", "llama-bench", "llama-quantize", "llama-server", "llama-simple")
ROOT = Path(__file__).resolve().parent.parent
MIRROR = Path("/work/.mirror/ggerganov+llama.cpp/repo")
UPSTREAM = "https://github.com/ggerganov/llama.cpp"


def peer_dir() -> Path:
    """`$TILLER_PEER_DIR`, else bench/.peer beside this script."""
    return Path(os.environ.get("TILLER_PEER_DIR") or ROOT / "bench" / ".peer")


def _binaries(home: Path) -> dict[str, Path]:
    return {name: home / "build" / "bin" / name for name in TARGETS}


def _git_dir(scratch: Path) -> Path:
    given = os.environ.get("TILLER_LLAMACPP_GIT")
    if given:
        return Path(given)
    if MIRROR.is_dir():
        return MIRROR
    clone = scratch / "llama.cpp.git"
    subprocess.run(["git", "clone", "--bare", "--filter=blob:none", UPSTREAM, str(clone)],
                   check=True)
    return clone


def _checkout(home: Path) -> None:
    """The commit's tree into `home/` (no .git), without the vocabulary GGUF files."""
    with tempfile.TemporaryDirectory(dir=home.parent) as scratch:
        git = _git_dir(Path(scratch))
        archive = subprocess.run(
            ["git", f"--git-dir={git}", "archive", "--format=tar", COMMIT, "--", ".",
             ":(exclude)models/*.gguf"], check=True, capture_output=True).stdout
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-x", "-C", str(home)], input=archive, check=True)
    (home / "COMMIT").write_text(COMMIT + "\n")


def _build(home: Path) -> None:
    if not (home / "CMakeLists.txt").is_file():
        _checkout(home)
    subprocess.run(["cmake", "-B", "build", "-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF"], cwd=home, check=True)
    subprocess.run(["cmake", "--build", "build", "-j2", "--target", *TARGETS], cwd=home,
                   check=True)


def llama_cpp() -> dict[str, Path]:
    """Paths of the peer's binaries by name, building llama.cpp at COMMIT if any is missing."""
    home = peer_dir() / "llama.cpp"
    bins = _binaries(home)
    if all(p.is_file() for p in bins.values()):
        return bins
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent / "llama.cpp.lock", "w") as lock:
        # NOTE: blocks while another worktree builds; then the binaries are there.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(p.is_file() for p in bins.values()):
            _build(home)
    missing = [str(p) for p in bins.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"llama.cpp build did not produce {missing}")
    return bins


def model_buffer_lines(log: str) -> list[str]:
    """The lines of a llama.cpp load log that say which buffer type holds the weights."""
    return [line.strip() for line in log.splitlines()
            if re.search(r"model buffer size", line)]


def amx_check(model: Path) -> tuple[bool, list[str]]:
    """Load `model` with llama-cli for one token; (whether its log names an AMX model buffer,
    the buffer lines). AMX needs a CPU with AMX-INT8 (Intel Sapphire Rapids and later): ggml
    compiles its AMX backend only under __AMX_INT8__, which -march=native sets only there."""
    cli = llama_cpp()["llama-cli"]
    run = subprocess.run([str(cli), "-m", str(model), "-n", "1", "-p", "hi", "--no-warmup",
                          "-no-cnv", "-t", "2"], capture_output=True, text=True, timeout=600)
    lines = model_buffer_lines(run.stderr + run.stdout)
    return any("AMX" in line for line in lines), lines


def cpu_has_amx() -> bool:
    flags = Path("/proc/cpuinfo").read_text()
    return "amx_int8" in flags


def main() -> None:
    bins = llama_cpp()
    for name, path in bins.items():
        print(f"{name}: {path}")
    if len(sys.argv) > 1:
        amx, lines = amx_check(Path(sys.argv[1]))
        print("\n".join(lines))
        print(f"AMX model buffer: {'yes' if amx else 'NO'} "
              f"(CPU amx_int8: {'yes' if cpu_has_amx() else 'no'})")


if __name__ == "__main__":
    main()
