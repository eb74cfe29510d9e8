"""Train the SentencePiece BPE vocabulary on the corpus, and encode the corpus into token ids.

The trainer is told the Llama normalizer spec that tiller's Tokenizer reproduces (identity
normalization, a dummy "▁" prefix, whitespace kept as it is) and byte fallback, so that every
text encodes to the same ids in sentencepiece and in tiller. The ChatML markers are
user-defined symbols: always single tokens, matched in text before BPE.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import sentencepiece as spm

try:
    from corpus import IM_END, IM_START
except ModuleNotFoundError:  # imported as train.tokenizer (tests), not from train/ (build)
    from .corpus import IM_END, IM_START

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_MARKER = re.compile(f"({re.escape(IM_START)}|{re.escape(IM_END)})")


def train_tokenizer(docs: list[str], vocab_size: int, out: Path) -> spm.SentencePieceProcessor:
    """Write out (a .model file) and return the processor. Deterministic for the same docs."""
    # NOTE: the trainer reads sentences; give it lines (a newline becomes the byte <0x0A>).
    lines = [line for d in docs for line in d.split("\n") if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        user_defined_symbols=[IM_START, IM_END], normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        num_threads=1, minloglevel=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def encode_fragments(sp: spm.SentencePieceProcessor, doc: str) -> list[int]:
    """A document's ids as tiller's server and llama.cpp make them of a rendered chat (special
    tokens parsed): the ChatML markers are tokens, and each text fragment between them is
    encoded on its own, so each gets sentencepiece's dummy prefix "▁" (llama.cpp's
    llama_tokenize_internal, SPM: `if (add_space_prefix && is_prev_special) text = ' ' +
    text`). "<|im_start|>assistant\n" is then the marker, "▁as", "s", "ist", "ant", "\n".
    A document without markers encodes as sentencepiece encodes it whole."""
    ids: list[int] = []
    for part in _MARKER.split(doc):
        if part in (IM_START, IM_END):
            ids.append(sp.piece_to_id(part))
        elif part:  # (sentencepiece adds no prefix to an empty text either)
            ids.extend(sp.encode(part))
    return ids


def encode_docs(sp: spm.SentencePieceProcessor, docs: list[str],
                fragments: bool = False) -> np.ndarray:
    """All documents as one stream: BOS, the text's ids, EOS, for each (uint16). Each document
    is encoded whole (sentencepiece: one dummy prefix, at its start), or with `fragments` as
    the server encodes a chat (encode_fragments)."""
    ids: list[int] = []
    encoded = [encode_fragments(sp, d) for d in docs] if fragments else sp.encode(docs)
    for piece_ids in encoded:
        ids.append(BOS_ID)
        ids.extend(piece_ids)
        ids.append(EOS_ID)
    return np.array(ids, dtype=np.uint16)


def assistant_mask(sp: spm.SentencePieceProcessor, stream: np.ndarray) -> np.ndarray:
    """Which tokens of an encoded stream a chat stage learns to predict (bool, per token): in a
    ChatML document, the assistant turns' content and their closing <|im_end|> only (not the
    user's or system's turns, nor the markers and role names that the template writes); plain
    stories (documents without <|im_start|>) are all learned. Either encoding (encode_docs, whole
    or by fragments) works: the role name is what the role line's tokens decode to, one piece
    ("assistant") or several ("▁as", "s", "ist", "ant")."""
    start, end, newline = (sp.piece_to_id(p) for p in (IM_START, IM_END, "<0x0A>"))
    mask = np.ones(len(stream), dtype=bool)
    bos = np.flatnonzero(stream == BOS_ID).tolist() + [len(stream)]
    for a, b in zip(bos[:-1], bos[1:], strict=True):
        doc = stream[a:b].tolist()
        if start not in doc:
            continue
        mask[a:b] = False
        i = 0
        while i < len(doc):
            if doc[i] != start:
                i += 1
                continue
            j = doc.index(newline, i) if newline in doc[i:] else len(doc)  # end of the role line
            k = doc.index(end, j) if end in doc[j:] else len(doc) - 1  # the turn's <|im_end|>
            if sp.decode(doc[i + 1:j]).strip() == "assistant":
                mask[a + j + 1:a + k + 1] = True
            i = k + 1
    return mask
