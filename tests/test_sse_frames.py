"""The streaming write path: prebuilt SSE frames are byte for byte what json.dumps writes, and a
burst of events that is already there goes out in one write, flushed before any wait."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from tiller.engine.loader import load_tokenizer
from tiller.engine.sampling import SamplingParams
from tiller.server.generation import Generation, Piece, merged
from tiller.server.http import FrameTemplate
from tiller.server.runner import Finished, FinishReason, GenerationRequest, Handle, TokenEvent

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


@pytest.mark.parametrize("text", TEXTS)
def test_llama_frame_with_three_slots(text: str) -> None:
    """llama.cpp's /completion chunk: text, token id and count change per token."""
    def chunk(content: object, token: object, n: object) -> dict:
        return {"content": content, "tokens": [token], "stop": False, "id_slot": 3,
                "tokens_predicted": n, "tokens_evaluated": 12}

    slot = FrameTemplate.SLOT
    template = FrameTemplate(chunk(slot, slot, slot), slots=3)
    assert template.frame(text, 31999, 7) == reference(chunk(text, 31999, 7))
    with pytest.raises(TypeError, match="bool"):
        template.frame(text, True, 7)
    with pytest.raises(ValueError):
        template.frame(text, 1)


def test_template_slot_count() -> None:
    with pytest.raises(ValueError, match="0 times, not 1"):
        FrameTemplate({"text": "no slot"})
    with pytest.raises(ValueError, match="2 times, not 1"):
        FrameTemplate({"a": FrameTemplate.SLOT, "b": FrameTemplate.SLOT})


BUILTIN = Path(__file__).resolve().parents[1] / "tiller" / "models" / "tiller-tiny.gguf"


class FakeRunner:
    """What a Generation uses of the Runner; the test plays the engine thread by putting
    events on the handle's queue."""

    def __init__(self) -> None:
        self.finished: list[str] = []

    def submit(self, request: GenerationRequest, after: Handle | None = None) -> Handle:
        return Handle("r0", asyncio.Queue(), seed=0)

    def cancel(self, request_id: str) -> None:
        pass

    def finish(self, request_id: str) -> None:
        self.finished.append(request_id)


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


def _finished() -> Finished:
    return Finished(FinishReason.LENGTH, 3, 5, 0.0, 0.0, 0)


@pytest.mark.parametrize("choices", [1, 2])
def test_burst_is_one_write_and_nothing_waits(choices: int) -> None:
    """Tokens already queued when the handler runs go out in one write; whatever was queued
    is written before the handler waits for the engine thread, also when the event it read
    last was one it skips (a token sampled after a stop string)."""
    tokenizer = load_tokenizer(BUILTIN)
    ids = tokenizer.encode("the dog ran to the park", bos=False)
    assert [tokenizer.piece_bytes(t) for t in ids] == [
        b" the", b" dog", b" ran", b" to", b" the", b" park"]

    async def run() -> tuple[list[list[str]], list[str]]:
        runner = FakeRunner()
        request = GenerationRequest(ids[:1], SamplingParams(temperature=0.0), 8)
        gens = [Generation(runner, tokenizer, request, ("park",))  # type: ignore[arg-type]
                for _ in range(choices)]
        sse = RecordingSSE()
        for g in gens:  # a burst: three tokens, there before the handler runs
            for t in ids[1:4]:
                g.handle.queue.put_nowait(TokenEvent(t))

        async def handler() -> None:
            async for i, event in merged(gens, sse):  # type: ignore[arg-type]
                if isinstance(event, Piece) and event.text:
                    sse.send_frame(f"{i}:{event.text}")

        task = asyncio.create_task(handler())
        await asyncio.sleep(0.05)  # the handler took the burst and waits
        assert sse.frames == [] and sum(map(len, sse.writes)) == 3 * choices
        assert len(sse.writes[0]) == 3 * choices  # one write, not one per token
        # the stop string completes; the next token was sampled before the runner heard of it
        for g in gens:
            for t in ids[4:]:
                g.handle.queue.put_nowait(TokenEvent(t))
            g.handle.queue.put_nowait(TokenEvent(ids[1]))
        await asyncio.sleep(0.05)  # the handler waits for Finished: nothing may wait with it
        assert sse.frames == []
        for g in gens:
            g.handle.queue.put_nowait(_finished())
        await task
        return sse.writes, runner.finished

    writes, finished = asyncio.run(run())
    # the text after the first token, cut before the stop string, from each choice's frames
    expected = " dog ran to the "
    for i in range(choices):
        assert "".join(f.split(":", 1)[1] for w in writes for f in w
                       if f.startswith(f"{i}:")) == expected
    assert finished == ["r0"] * choices  # the stop string ended each request
