"""train/tokenizer.py: the chat stages learn the ids tiller's server makes of a rendered chat.

The server tokenizes a chat with special tokens parsed (server/prepare.py chat_prompt), as
llama.cpp does: each text fragment between the ChatML markers is encoded on its own, with its
own SentencePiece dummy prefix. encode_fragments must give exactly those ids -- checked here
against tiller's SentencePiece tokenizer (itself checked against sentencepiece and llama.cpp
elsewhere) on a vocabulary trained the way the build trains it, and against the independent
fact that every fragment after a marker starts with "▁" -- and assistant_mask must still find
the assistant turns in them (checked against the turns cut out of the text with a regex).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from tiller.engine.tokenizer import SpmTokenizer, TokenType

from train.corpus import IM_END, IM_START, generate
from train.tokenizer import (
    BOS_ID,
    EOS_ID,
    assistant_mask,
    encode_docs,
    encode_fragments,
    train_tokenizer,
)

MARKERS = (IM_START, IM_END)


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> spm.SentencePieceProcessor:
    # as train/build.py trains it, on fewer documents (a smaller vocabulary: fewer merges)
    return train_tokenizer(generate(1, 2000), 512, Path(tmp_path_factory.mktemp("sp")) / "t.model")


@pytest.fixture(scope="module")
def tiller_tok(sp) -> SpmTokenizer:
    """tiller's tokenizer over the same vocabulary, typed as train/export.py writes it."""
    def kind(i: int) -> TokenType:
        if sp.is_unknown(i):
            return TokenType.UNKNOWN
        if sp.is_control(i):
            return TokenType.CONTROL
        if sp.is_byte(i):
            return TokenType.BYTE
        return TokenType.USER_DEFINED if sp.id_to_piece(i) in MARKERS else TokenType.NORMAL
    n = sp.get_piece_size()
    return SpmTokenizer([sp.id_to_piece(i).encode() for i in range(n)],
                        [sp.get_score(i) for i in range(n)], [int(kind(i)) for i in range(n)],
                        bos_id=sp.bos_id(), eos_id=sp.eos_id(), unk_id=sp.unk_id())


def test_fragments_are_the_servers_chat_ids(sp, tiller_tok):
    docs = generate(2, 300)  # held-out seed: chats and plain stories
    chats = [d for d in docs if IM_START in d]
    assert 100 < len(chats) < 200
    for d in docs:
        ids = encode_fragments(sp, d)
        assert ids == tiller_tok.encode(d, bos=False, special=True), d
    for d in docs:
        if IM_START not in d:  # a plain story: sentencepiece's whole-text ids, nothing new
            assert encode_fragments(sp, d) == sp.encode(d)
    # and a chat's ids are not the whole-text ones: every fragment after a marker starts with
    # the dummy prefix (the piece "▁" alone or a "▁word" piece), where the whole text has none
    marker_ids = {sp.piece_to_id(m) for m in MARKERS}
    for d in chats:
        ids = encode_fragments(sp, d)
        after = [sp.id_to_piece(ids[k + 1]) for k in range(len(ids) - 1)
                 if ids[k] in marker_ids and ids[k + 1] not in marker_ids]
        assert after and all(p.startswith("▁") for p in after), after
        assert ids != sp.encode(d)


def test_encode_docs_by_fragments_is_one_stream(sp):
    docs = generate(2, 50)
    stream = encode_docs(sp, docs, fragments=True)
    assert stream.dtype == np.uint16
    starts = np.flatnonzero(stream == BOS_ID).tolist()
    ends = np.flatnonzero(stream == EOS_ID).tolist()
    assert len(starts) == len(ends) == len(docs)
    for d, a, b in zip(docs, starts, ends, strict=True):
        assert stream[a + 1:b].tolist() == encode_fragments(sp, d)


def _learned(sp, stream: np.ndarray, mask: np.ndarray, a: int, b: int) -> list[str]:
    """The texts of the runs of masked tokens in stream[a:b]."""
    runs, run = [], []
    for t, keep in zip(stream[a:b].tolist(), mask[a:b].tolist(), strict=True):
        if keep:
            run.append(t)
        elif run:
            runs.append(sp.decode(run))
            run = []
    return runs + ([sp.decode(run)] if run else [])


@pytest.mark.parametrize("fragments", [True, False])
def test_assistant_mask_learns_the_assistant_turns_only(sp, fragments):
    # the second chat stage's kind of documents: replies, plain stories, mood-free stories
    docs = generate(5, 200, chat_share=0.75, mood_opening=True, neutral_share=1 / 3)
    stream = encode_docs(sp, docs, fragments=fragments)
    mask = assistant_mask(sp, stream)
    starts = np.flatnonzero(stream == BOS_ID).tolist() + [len(stream)]
    turn = re.compile(re.escape(IM_START) + r"(\w+)\n(.*?" + re.escape(IM_END) + ")", re.S)
    n_chats = 0
    for d, a, b in zip(docs, starts[:-1], starts[1:], strict=True):
        if IM_START not in d:  # a plain story is learned whole (its BOS's prediction aside)
            assert mask[a:b].all()
            continue
        n_chats += 1
        replies = [text for role, text in turn.findall(d) if role == "assistant"]
        assert replies and len(turn.findall(d)) > len(replies)  # user turns are left out
        assert _learned(sp, stream, mask, a, b) == replies, d
    assert n_chats > 100
