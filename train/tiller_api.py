"""tiller's engine and chat template, imported in one place: train/ uses tiller only through here.

NOTE: the engine is the package `tiller.engine` (folder engine/); before the "Package:" commit
it was the top-level `engine`. If it moves again, only these lines change.
"""

from tiller.engine.engine import Engine, SeqRequest
from tiller.engine.generate import generate
from tiller.engine.loader import load_checkpoint, load_tokenizer
from tiller.engine.sampling import Sampler, SamplingParams
from tiller.engine.tokenizer import Tokenizer
from tiller.server.chat import ChatTemplate

__all__ = ["ChatTemplate", "Engine", "Sampler", "SamplingParams", "SeqRequest", "Tokenizer",
           "generate", "load_checkpoint", "load_tokenizer"]
