"""`tiller serve` as a subprocess on a free port, for tests that talk to a real server.

    url, server = start_server(tmp_path, "--api-key", "k")   # returns once /health is 200
    ...
    server.stop()   # SIGTERM; asserts a clean exit (code 0), with the log in the message

Use it in a module-scoped fixture (the first start may compile the numba kernels) and ask for
the `shared_models` fixture too, so the test skips when the model files are absent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the same directory as conftest.SHARED_MODELS: beside the checkout, never inside it
MODELS = ROOT.parent / "shared" / "models"
MODEL = MODELS / "stories260K.bin"
TOKENIZER = MODELS / "tok512.bin"
START_TIMEOUT = 120.0  # a cold numba cache compiles every kernel first


class ServerProcess(subprocess.Popen[bytes]):
    """A running `tiller serve`: a Popen that knows its URL and log file."""

    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, wait, and assert the server shut down cleanly (exit code 0)."""
        if self.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.wait()
                raise AssertionError(f"tiller serve ignored SIGTERM for {timeout} s; log:\n"
                                     f"{self.log()[-4000:]}") from None
        assert self.returncode == 0, (f"tiller serve exited with {self.returncode}; log:\n"
                                      f"{self.log()[-4000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):  # refused while starting, 503 while loading
        return False


def start_server(tmp_path: Path, *extra_args: str, model: Path = MODEL,
                 tokenizer: Path = TOKENIZER, timeout: float = START_TIMEOUT,
                 env: dict[str, str] | None = None) -> tuple[str, ServerProcess]:
    """Start `tiller serve --model ... --tokenizer ... --port <free> *extra_args`, logging to
    tmp_path, and wait until GET /health is 200. Returns (base URL, process); the caller stops
    it with process.stop(). A server that dies or does not come up in time is an error."""
    for attempt in range(3):  # the free port may be taken before the server binds it
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = tmp_path / f"tiller-serve-{port}.log"
        with log_path.open("wb") as log:
            process = ServerProcess(
                [sys.executable, "-m", "tiller", "serve", "--model", str(model),
                 "--tokenizer", str(tokenizer), "--port", str(port),
                 "--steering-dir", str(tmp_path / "steering"), *extra_args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        process.url, process.log_path = url, log_path
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if healthy(url):
                return url, process
            time.sleep(0.2)
        if process.poll() is None:
            process.kill()
            process.wait()
            raise RuntimeError(f"tiller serve not healthy after {timeout} s; log:\n"
                               f"{process.log()[-4000:]}")
        if "address already in use" not in process.log().lower() or attempt == 2:
            raise RuntimeError(f"tiller serve exited with {process.returncode}; log:\n"
                               f"{process.log()[-4000:]}")
    raise AssertionError("unreachable")
