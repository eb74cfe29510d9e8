"""The servers a benchmark starts: `tiller serve` and llama.cpp's `llama-server`, each a child
process on a free port in its own session, polled on /health until ready and stopped with
SIGTERM (then SIGKILL after a timeout), whatever happened in between."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

STOP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server child process: started here, stopped with SIGTERM (`stop`, or the context)."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.cmd = cmd
        self._log = log_path.open("wb")
        # NOTE: its own session, so a ^C here reaches only this process, which then stops the
        # server with SIGTERM like any supervisor would
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=os.environ | {"PYTHONUNBUFFERED": "1"},
                                     start_new_session=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def log_lines(self, needle: str) -> list[str]:
        return [line.strip() for line in self.log_path.read_text(errors="replace").splitlines()
                if needle in line]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (all its threads) so far."""
        return _cpu_seconds(Path(f"/proc/{self.proc.pid}/stat"))

    def main_thread_cpu_seconds(self) -> float:
        """CPU time of the process's first thread so far: tiller's event loop (its engine,
        numba and worker threads are others). CPU time, so other processes' load does not
        inflate it as it does wall time."""
        return _cpu_seconds(Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/stat"))


    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait; the exit code (None if it had to be killed). Idempotent."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    return self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    return None
            return self.proc.returncode
        finally:
            self._log.close()


def _cpu_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tiller_server(model: Path, tokenizer: Path | None, *, parallel: int, threads: int,
                  dtype: str, log_path: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "tiller", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--parallel", str(parallel), "--dtype", dtype,
           "--threads", str(threads), "--no-webui"]
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    return Server("tiller", cmd, port, log_path)


def llama_server(binary: Path, model: Path, *, parallel: int, threads: int, ctx_per_slot: int,
                 log_path: Path) -> Server:
    """llama-server with `parallel` slots of `ctx_per_slot` tokens each (its -c is the total,
    split evenly between the slots), continuous batching, the same threads for decode and
    prompt batches, and its default prompt cache (cache_prompt is on unless a request says no).
    """
    if not binary.is_file():
        raise FileNotFoundError(f"{binary}: no llama-server (build it: python bench/peer.py, "
                                "or set TILLER_PEER_DIR to a folder holding llama.cpp/build)")
    port = free_port()
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(parallel), "-c", str(parallel * ctx_per_slot), "--cont-batching",
           "-t", str(threads), "-tb", str(threads), "--metrics", "--no-webui"]
    return Server("llama-server", cmd, port, log_path)


async def wait_ready(session: aiohttp.ClientSession, server: Server, timeout: float) -> float:
    """Poll /health until it answers 200; seconds waited. A server that exits or is not
    ready in time is an error with the tail of its log."""
    start = time.perf_counter()
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            async with session.get(f"{server.url}/health") as resp:
                if resp.status == 200:
                    return time.perf_counter() - start
        except aiohttp.ClientError:
            pass
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"{server.name} {server.url}/health not ready after "
                               f"{timeout:.0f} s:\n{server.log_tail()}")
        await asyncio.sleep(0.5)
