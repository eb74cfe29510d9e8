"""The streaming write path: prebuilt SSE frames are byte for byte what json.dumps writes, and a
burst of events that is already there goes out in one write, flushed before any wait."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tiller.server.generation import merged
from tiller.server.http import FrameTemplate

TEXTS = ["", "a", " Once", 'quote " and \\ backslash', "line\nbreak\ttab\r", "\x00\x1f\x7f",
         "é ü 中文 🙂", "\u2028\u2029", "</script>", "\ufffd"]


def reference(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n".encode()


@pytest.mark.parametrize("text", TEXTS)
def test_frame_matches_json_dumps(text: str) -> None:
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": 'm "x" é',
            "system_fingerprint": "fp"}

    def chunk(value: str) -> dict:
        return {**head, "choices": [{"index": 2, "text": value, "logprobs": None,
                                     "finish_reason": None}]}

    assert FrameTemplate(chunk(FrameTemplate.SLOT)).frame(text) == reference(chunk(text))

    def delta(value: str) -> dict:
        return {**head, "choices": [{"index": 0, "delta": {"content": value}, "logprobs": None,
                                     "finish_reason": None}]}

    assert FrameTemplate(delta(FrameTemplate.SLOT)).frame(text) == reference(delta(text))


def test_template_needs_one_slot() -> None:
    with pytest.raises(ValueError, match="exactly once"):
        FrameTemplate({"text": "no slot"})
    with pytest.raises(ValueError, match="exactly once"):
        FrameTemplate({"a": FrameTemplate.SLOT, "b": FrameTemplate.SLOT})


class FakeGeneration:
    """What merged() uses of a Generation, fed from a queue the test fills."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def ready(self) -> bool:
        return not self.queue.empty()

    async def events(self) -> Any:
        while (item := await self.queue.get()) is not None:
            yield item

    def cancel(self) -> None:
        pass


class RecordingSSE:
    """Records what would be written, and when: each flush is one write."""

    started = True

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.writes: list[list[str]] = []

    def send_frame(self, frame: str) -> None:
        self.frames.append(frame)

    async def flush(self) -> None:
        if self.frames:
            self.writes.append(self.frames)
            self.frames = []


@pytest.mark.parametrize("choices", [1, 2])
def test_burst_is_one_write_and_flushed_before_waiting(choices: int) -> None:
    async def run() -> list[list[str]]:
        gens = [FakeGeneration() for _ in range(choices)]
        sse = RecordingSSE()
        for g in gens:  # a burst: three tokens each, there before the consumer starts
            for t in "abc":
                g.queue.put_nowait(t)

        async def consume() -> None:
            async for i, item in merged(gens, sse):  # type: ignore[arg-type]
                sse.send_frame(f"{i}{item}")

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)  # the consumer has taken the burst and waits
        # everything taken so far was written before waiting: nothing is held back
        assert sse.frames == [] and sum(map(len, sse.writes)) == 3 * choices
        for g in gens:
            g.queue.put_nowait("d")
        await asyncio.sleep(0.05)
        for g in gens:
            g.queue.put_nowait(None)
        await task
        await sse.flush()
        return sse.writes

    writes = asyncio.run(run())
    assert sorted(f for w in writes for f in w) == sorted(
        f"{i}{t}" for i in range(choices) for t in "abcd")
    assert len(writes[0]) == 3 * choices  # the burst in one write, not one per token
    assert len(writes) == 2  # then the later tokens, together
