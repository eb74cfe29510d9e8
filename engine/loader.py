"""Open a model file of any supported format, told apart by its first bytes."""

from __future__ import annotations

import os
from pathlib import Path

from .gguf import MAGIC as GGUF_MAGIC
from .gguf import gguf_tokenizer, load_gguf, read_gguf
from .llama2c import Checkpoint, load_llama2c
from .tokenizer import SpmTokenizer, Tokenizer, TokenizerError


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """A GGUF file (magic "GGUF") or else a llama2.c checkpoint; CheckpointError if broken."""
    return load_gguf(path) if is_gguf(path) else load_llama2c(path)


def is_gguf(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def load_tokenizer(model_path: str | os.PathLike[str], tokenizer_path: str | os.PathLike[str]
                   | None = None, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer for a model: `tokenizer_path` if given (a llama2.c tokenizer.bin or a GGUF),
    else the GGUF model's own vocabulary, else llama2.c's tokenizer.bin beside the model file."""
    if tokenizer_path is None:
        if is_gguf(model_path):
            return gguf_tokenizer(read_gguf(model_path))
        tokenizer_path = Path(model_path).with_name("tokenizer.bin")
        if not tokenizer_path.exists():
            raise TokenizerError(f"{tokenizer_path}: no tokenizer file beside the model "
                                 "(pass --tokenizer)")
    if is_gguf(tokenizer_path):
        return gguf_tokenizer(read_gguf(tokenizer_path))
    return SpmTokenizer.from_llama2c(tokenizer_path, vocab_size=vocab_size)
