"""server/mailbox.py: work posted from another thread reaches the event loop, in order, without
the posting thread giving up the GIL (which is why it exists: call_soon_threadsafe's socket
write lets the event loop run before the engine thread can start its next step)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from tiller.server import mailbox as mailbox_module
from tiller.server.mailbox import Mailbox


async def test_posts_from_a_thread_arrive_in_order() -> None:
    loop = asyncio.get_running_loop()
    mailbox = Mailbox(loop)
    got: list[int] = []
    done = asyncio.Event()

    def poster() -> None:
        for i in range(5000):
            mailbox.post(lambda i=i: got.append(i))
        mailbox.post(done.set)

    thread = threading.Thread(target=poster)
    thread.start()
    await asyncio.wait_for(done.wait(), 10)
    thread.join()
    assert got == list(range(5000))
    mailbox.close()


async def test_no_wake_up_is_lost_when_a_post_races_a_drain(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """A post landing while the loop drains (made likely by a pause in the drain's pipe read,
    where the GIL is free) is still run: a drain that cleared its flag before reading the pipe
    would swallow such a post's wake-up byte yet leave its flag set, and every later post
    would then wait forever."""
    real_read = os.read

    def slow_read(fd: int, n: int) -> bytes:
        time.sleep(0.0005)  # the poster runs meanwhile
        return real_read(fd, n)

    loop = asyncio.get_running_loop()
    mailbox = Mailbox(loop)
    monkeypatch.setattr(mailbox_module, "os", SimpleNamespace(read=slow_read))
    got: list[int] = []
    total = 3000

    def poster() -> None:
        for i in range(total):
            mailbox.post(lambda i=i: got.append(i))
            time.sleep(0.00005)

    thread = threading.Thread(target=poster)
    thread.start()
    deadline = time.monotonic() + 30
    while (len(got) < total or thread.is_alive()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    thread.join()
    assert got == list(range(total))
    monkeypatch.undo()
    mailbox.close()


async def test_a_post_after_a_drain_wakes_the_loop_again() -> None:
    # the wake-up flag is cleared when the loop drains: every later post must wake it anew
    loop = asyncio.get_running_loop()
    mailbox = Mailbox(loop)
    for _ in range(50):
        arrived = asyncio.Event()
        threading.Thread(target=mailbox.post, args=(arrived.set,)).start()
        await asyncio.wait_for(arrived.wait(), 5)  # fails (times out) if a wake-up is lost
    mailbox.close()


async def test_post_keeps_the_gil() -> None:
    """The event loop, woken by a post's write, cannot run the posted work before `post` has
    returned: the posting thread kept the GIL. With os.write or socket.send (what
    call_soon_threadsafe uses) in its place, the woken loop takes the GIL during the write and
    has often run the work by the time `post` returns."""
    loop = asyncio.get_running_loop()
    mailbox = Mailbox(loop)
    got: list[int] = []
    early = []

    def poster() -> None:
        for i in range(300):
            mailbox.post(lambda i=i: got.append(i))
            early.append(len(got) > i)  # already run on the loop, during the post
            while len(got) <= i:  # let the loop run it before the next post
                time.sleep(0.0002)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # no forced switch in the middle of a post
    try:
        await asyncio.wait_for(asyncio.to_thread(poster), 30)
    finally:
        sys.setswitchinterval(interval)
    assert got == list(range(300))
    assert not any(early), f"the loop ran the work during {sum(early)} of {len(early)} posts"
    mailbox.close()


async def test_close_drops_later_posts_and_closes_the_pipe() -> None:
    loop = asyncio.get_running_loop()
    mailbox = Mailbox(loop)
    read_fd = mailbox._read_fd
    got: list[int] = []
    mailbox.close()
    mailbox.post(lambda: got.append(1))
    await asyncio.sleep(0.05)
    assert got == []
    with pytest.raises(OSError):
        os.fstat(read_fd)
