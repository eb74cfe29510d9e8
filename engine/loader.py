"""Open a model file of any supported format, told apart by its first bytes."""

from __future__ import annotations

import os
from pathlib import Path

from engine.gguf import MAGIC as GGUF_MAGIC
from engine.gguf import load_gguf
from engine.llama2c import Checkpoint, load_llama2c


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """A GGUF file (magic "GGUF") or else a llama2.c checkpoint; CheckpointError if broken."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    return load_gguf(path) if magic == GGUF_MAGIC else load_llama2c(path)
