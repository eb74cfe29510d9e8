"""A real `redis-server` (Debian's) on a free loopback port with its own directory, for tests.

    redis = start_redis(tmp_path, appendonly=True)   # returns once it answers PING
    redis.url                                         # redis://127.0.0.1:<port>/0
    redis.kill(); redis = start_redis(tmp_path, port=redis.port, appendonly=True)  # restart

`require_redis()` skips a test when redis-server is not installed (.ci/run installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.live_server import free_port


def find_redis() -> str | None:
    return shutil.which("redis-server", path=os.pathsep.join([os.environ.get("PATH", ""),
                                                               "/usr/bin", "/usr/sbin"]))


def require_redis() -> str:
    binary = find_redis()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run "
                    "installs it)")
    return binary


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    port: int
    directory: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """SIGKILL, as a crash: only what AOF already holds survives."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_redis(directory: Path, *, port: int | None = None,
                appendonly: bool = False) -> RedisServer:
    """redis-server on 127.0.0.1 with its files in `directory`; no RDB snapshots. appendonly:
    AOF with fsync on every write, so a SIGKILL loses nothing the client was told of."""
    binary = require_redis()
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
           "--save", "", "--daemonize", "no", "--logfile", str(directory / "redis.log"),
           "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        if _pong(port):
            return RedisServer(port, directory, proc)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log = directory / "redis.log"
    raise RuntimeError(f"redis-server did not start on port {port}:\n"
                       f"{log.read_text(errors='replace')[-2000:] if log.exists() else ''}")
