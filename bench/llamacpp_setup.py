"""Build llama-cpp-python 0.3.36 (llama.cpp from source) into the peer folder, once.

    python bench/llamacpp_setup.py          # ~10+ min on this machine; a no-op when built

The venv lives in `$TILLER_PEER_DIR/llcpp-venv` (default `bench/.peer`, ignored by git). It is
never a tiller dependency: bench/llamacpp_fixtures.py runs its llama.cpp half in that venv's
python as a subprocess (bench/llamacpp_run.py). An exclusive lock file beside the venv keeps two
worktrees from building it at the same time; the second waits and then finds it built.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"
ROOT = Path(__file__).resolve().parent.parent


def peer_dir() -> Path:
    return Path(os.environ.get("TILLER_PEER_DIR", str(ROOT / "bench" / ".peer")))


def venv_python() -> Path:
    return peer_dir() / "llcpp-venv" / "bin" / "python"


def installed() -> bool:
    py = venv_python()
    if not py.exists():
        return False
    probe = f"import llama_cpp, sys; sys.exit(llama_cpp.__version__ != {VERSION!r})"
    return subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0


def build() -> Path:
    """The venv's python, building llama-cpp-python first if no venv has it."""
    peer_dir().mkdir(parents=True, exist_ok=True)
    with open(peer_dir() / "llcpp-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # NOTE: another worktree may be building right now
        if not installed():
            venv = peer_dir() / "llcpp-venv"
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            # GGML_NATIVE: the build machine is the machine the fixtures are made on
            env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON", CMAKE_BUILD_PARALLEL_LEVEL="2")
            subprocess.run(
                [str(venv_python()), "-m", "pip", "install", "-v", "--no-cache-dir",
                 f"llama-cpp-python=={VERSION}", "numpy", "gguf"],
                check=True, env=env)
    return venv_python()


if __name__ == "__main__":
    print(build())
