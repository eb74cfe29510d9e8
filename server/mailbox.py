"""Handing work from the engine thread to the event loop without giving up the GIL.

`loop.call_soon_threadsafe` wakes the event loop by writing to its self-pipe with
`socket.send`, which releases the GIL for the system call. The event loop thread, woken by that
very write, takes the GIL first and runs its ready callbacks -- formatting and writing the step's
tokens -- while the engine thread waits to get the GIL back before it can start the next step:
0.36 ms of each 7-8 ms step at N = 1 (median, bench/bench_server.py's load). A Mailbox's `post`
writes its wake-up byte with libc's `write` called through `ctypes.PyDLL`, which keeps the GIL,
so the engine thread goes straight on into the next step, and the event loop does its work while
that step runs (numba, GIL released).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
from collections import deque
from collections.abc import Callable

# NOTE: PyDLL, unlike CDLL, holds the GIL through its calls
_libc = ctypes.PyDLL(ctypes.util.find_library("c"), use_errno=True)
_write = _libc.write
_write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
_write.restype = ctypes.c_ssize_t


class Mailbox:
    """Callables for the event loop, posted from other threads and called there in the order
    they were posted. Create and close it on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._pending: deque[Callable[[], None]] = deque()
        self._signalled = False  # a wake-up byte is on its way that the loop has not drained
        self._closed = False
        loop.add_reader(self._read_fd, self._drain)

    def post(self, callback: Callable[[], None]) -> None:
        """From any thread: `callback()` runs on the event loop soon (dropped once closed)."""
        if self._closed:
            return
        self._pending.append(callback)
        if not self._signalled:
            self._signalled = True
            # a full pipe (EAGAIN) already holds a wake-up byte: nothing is lost
            _write(self._write_fd, b"\0", 1)

    def _drain(self) -> None:
        """On the event loop: every callback posted so far."""
        # NOTE: the pipe is read first, then the flag cleared, then the queue emptied. A post
        # after the clear writes a new byte (whose wake-up may find nothing: harmless), one
        # before it is in the queue. Clearing before the read would let the read swallow the
        # byte of a post made in between, with its flag still set: no later post would write
        # one, and the loop would never wake for them.
        with contextlib.suppress(BlockingIOError):
            os.read(self._read_fd, 4096)
        self._signalled = False
        pending = self._pending
        while pending:
            pending.popleft()()

    def close(self) -> None:
        """From any thread, once nothing posts any more: stop listening and close the pipe
        (on the event loop, or at once if the loop has closed)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.call_soon_threadsafe(self._close_fds, True)
        except RuntimeError:  # the loop has closed: nothing listens on the pipe any more
            self._close_fds(False)

    def _close_fds(self, listening: bool) -> None:
        if listening:
            self._loop.remove_reader(self._read_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)
