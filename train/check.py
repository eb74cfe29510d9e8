"""Prove the export right with tiller itself: its tokenizer (read from the GGUF) gives the
sentencepiece ids on every held-out document, as plain text (whole, one dummy prefix) and as a
rendered chat (special tokens parsed, as the server tokenizes a chat: the ids the chat stages
trained on), and its f32 engine gives the torch model's logits on held-out token sequences."""

from __future__ import annotations

import numpy as np
import sentencepiece as spm
import torch
from corpus import IM_START
from model import Transformer
from tiller_api import Engine, load_tokenizer
from tokenizer import encode_fragments


def check_tokenizer(gguf_path: str, sp: spm.SentencePieceProcessor, docs: list[str]) -> int:
    """Raise AssertionError at the first document encoded differently; return how many agree."""
    tok = load_tokenizer(gguf_path)
    for i, d in enumerate(docs):
        ours, theirs = tok.encode(d, bos=False), sp.encode(d)
        assert ours == theirs, f"document {i}: tiller {ours[:20]}... != sentencepiece {theirs[:20]}"
        assert tok.decode(ours) == d, f"document {i} does not decode to itself"
    return len(docs)


def check_chat_tokenizer(gguf_path: str, sp: spm.SentencePieceProcessor, docs: list[str]) -> int:
    """tiller's tokenizer with special tokens parsed (as the server's chat route tokenizes the
    rendered ChatML) = sentencepiece on each fragment between the markers (encode_fragments),
    on every document; raise AssertionError at the first that differs; return how many of them
    are chats (have a marker: the others are plain text, encoded whole either way)."""
    tok = load_tokenizer(gguf_path)
    chats = 0
    for i, d in enumerate(docs):
        ours, theirs = tok.encode(d, bos=False, special=True), encode_fragments(sp, d)
        assert ours == theirs, (f"document {i}: tiller (special) {ours[:20]}... != "
                                f"sentencepiece by fragments {theirs[:20]}")
        chats += IM_START in d
    return chats


@torch.no_grad()
def check_logits(gguf_path: str, model: Transformer, sequences: list[list[int]],
                 tolerance: float = 2e-3) -> float:
    """Max |torch - tiller f32| over every position of every sequence; raise above tolerance."""
    engine = Engine.load(gguf_path, dtype="f32", kv_sequences=1, threads=1)
    worst = 0.0
    for ids in sequences:
        ref = model(torch.tensor([ids]))[0].numpy()
        got = engine.forward_all(ids).logits
        worst = max(worst, float(np.abs(ref - got).max()))
    assert worst <= tolerance, f"torch and tiller logits differ by {worst:.2e} (> {tolerance})"
    return worst
