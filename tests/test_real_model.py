"""The real stories260K model: golden tokens, Q8_0 against fp32, and every file format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiller.engine.engine import Engine, SeqRequest
from tiller.engine.generate import generate
from tiller.engine.llama2c import FORMATS, load_llama2c, write_llama2c
from tiller.engine.sampling import SamplingParams
from tiller.engine.tokenizer import SpmTokenizer, Tokenizer
from tiller.engine.weights import build_weights

from tests.reference import load_v0_legacy, reference_forward

# The first 200 greedy tokens after "<s>Once upon a time", derived once with tests/reference.py
# (plain numpy, fp32) and pinned; they decode to llama2.c's documented temperature-0 story.
GOLDEN_PROMPT = [1, 403, 407, 261, 378]
GOLDEN = [
    432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419,
    292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352, 266, 268,
    388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270, 333, 415, 426,
    13, 438, 310, 439, 419, 357, 336, 432, 313, 438, 310, 432, 278, 316, 439, 419, 298, 414, 267,
    265, 282, 295, 433, 426, 436, 317, 286, 296, 418, 269, 279, 292, 416, 439, 413, 409, 416, 327,
    263, 415, 294, 267, 400, 426, 338, 336, 432, 313, 442, 391, 267, 337, 335, 364, 420, 268, 388,
    432, 398, 359, 280, 303, 439, 413, 272, 417, 264, 312, 426, 436, 13, 438, 310, 286, 296, 418,
    269, 279, 292, 416, 439, 413, 409, 416, 327, 263, 415, 294, 267, 400, 426, 338, 336, 432, 313,
    442, 439, 423, 262, 304, 420, 422, 432, 317, 426, 359, 279, 292, 416, 439, 413, 409, 416, 327,
    263, 415, 294, 267, 400, 426, 436, 13, 438, 310, 279, 292, 416, 439, 413, 391, 267, 281, 421,
    427, 311, 357, 432, 384, 358, 336, 432, 313, 442,
]

STORY = (
    "Once upon a time, there was a little boy named Tim. Tim liked to play with his red ball in "
    "the garden. One day, the ball rolled away and went under a big tree. Tim was sad. He asked "
    "his friend, a small bird, to help him. The bird flew down and pushed the ball out with its "
    "beak. Tim was very happy. He said, \"Thank you, bird!\" They played together all day. When "
    "the sun went down, Tim went home and told his mom about his new friend. His mom smiled and "
    "gave him a big hug. The next day, Tim and the bird played again in the park. They ran and "
    "jumped and laughed. Tim learned that friends help each other. The bird learned that too. "
    "From that day on, they were best friends and played together every day."
)


@pytest.fixture(scope="module")
def model_path(shared_models: Path) -> Path:
    return shared_models / "stories260K.bin"


@pytest.fixture(scope="module")
def tokenizer(shared_models: Path) -> Tokenizer:
    return SpmTokenizer.from_llama2c(shared_models / "tok512.bin", vocab_size=512)


def greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    return list(generate(engine, prompt, SamplingParams(temperature=0), n))


def test_golden_tokens_fp32(model_path, tokenizer):
    engine = Engine.load(model_path, dtype="f32")
    out = greedy(engine, GOLDEN_PROMPT, 200)
    assert out == GOLDEN
    assert tokenizer.decode(GOLDEN_PROMPT + out).startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
        "park.")


def test_golden_prompt_is_what_the_tokenizer_gives(tokenizer):
    assert tokenizer.encode("Once upon a time") == GOLDEN_PROMPT


def test_q8_greedy_starts_like_fp32(model_path):
    # quantization eventually changes a near-tie; the story's opening must survive it
    out = greedy(Engine.load(model_path, dtype="q8_0"), GOLDEN_PROMPT, 40)
    assert out == GOLDEN[:40]


def test_q8_top1_agrees_with_fp32_teacher_forced(model_path, tokenizer):
    toks = tokenizer.encode(STORY)
    assert len(toks) >= 150
    config, weights = load_v0_legacy(model_path)  # the reference's own loader
    ref = reference_forward(weights, config, toks, capture=False)["logits"]
    got = Engine.load(model_path, dtype="q8_0").forward_all(toks).logits
    agreement = (got.argmax(-1) == ref.argmax(-1)).mean()
    assert agreement >= 0.95, agreement


def test_fp32_matches_reference_on_real_text(model_path, tokenizer):
    toks = tokenizer.encode(STORY)
    config, weights = load_v0_legacy(model_path)
    ref = reference_forward(weights, config, toks, capture=False)["logits"]
    got = Engine.load(model_path, dtype="f32").forward_all(toks).logits
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_to_the_same_logits(fmt, model_path, tmp_path):
    original = load_llama2c(model_path)
    path = write_llama2c(tmp_path / f"model-{fmt}.bin", original.config, original.tensors, fmt)
    loaded = load_llama2c(path)
    assert loaded.format == fmt and loaded.config == original.config
    toks = GOLDEN_PROMPT + GOLDEN[:30]
    for dtype in ("f32", "q8_0"):
        got = Engine(loaded.config, build_weights(loaded.config, loaded.tensors, dtype))
        logits = got.forward_all(toks).logits
        if fmt in ("v0", "v1"):  # fp32 files: the same numbers, so the same bits
            want = Engine(original.config, build_weights(original.config, original.tensors, dtype))
            assert np.array_equal(logits, want.forward_all(toks).logits)
        else:  # int8 files: the fp32 reference on the file's dequantized weights
            deq = {k: (v.dequantize() if hasattr(v, "dequantize") else np.asarray(v))
                   for k, v in loaded.tensors.items()}
            ref = reference_forward(deq, loaded.config, toks, capture=False)["logits"]
            tol = 1e-4 if dtype == "f32" else 0.05
            np.testing.assert_allclose(logits, ref, atol=tol * np.abs(ref).max(), rtol=0)
            assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_generation_is_reproducible_with_a_seed_alone_or_batched(model_path):
    engine = Engine.load(model_path, dtype="q8_0")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    first = greedy_or_sample(engine, params)
    assert greedy_or_sample(engine, params) == first
    # the same request with a busy neighbour in every step
    from tiller.engine.sampling import Sampler

    sampler = Sampler(params, GOLDEN_PROMPT)
    seq, other = engine.new_sequence(), engine.new_sequence()
    res = engine.step([SeqRequest(seq, GOLDEN_PROMPT), SeqRequest(other, [1, 500, 17])])
    out = []
    for _ in range(len(first)):
        tok = sampler.sample(res[0].logits)
        sampler.accept(tok)
        out.append(tok)
        busy = SeqRequest(other, [int(res[1].logits.argmax())])
        res = engine.step([SeqRequest(seq, [tok]), busy])
    assert out == first
    assert greedy_or_sample(engine, SamplingParams(temperature=1.0, top_p=0.9, seed=43)) != first


def greedy_or_sample(engine: Engine, params: SamplingParams) -> list[int]:
    return list(generate(engine, GOLDEN_PROMPT, params, 60))
