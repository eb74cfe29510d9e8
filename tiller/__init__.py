"""tiller: a CPU text-generation server for steering and reading out language models.

The import package has three parts, importing one way: `tiller.cli` (the `tiller` command)
over `tiller.server` (HTTP over a continuous-batching scheduler) over `tiller.engine` (the
numba inference engine). The repository keeps them in the top-level folders `tiller/`,
`server/` and `engine/` (pyproject.toml maps the folders into this package).
"""

from pathlib import Path

__version__ = "0.1.0"

# tiller's own small model, trained by train/build.py on a corpus it generates, shipped as package
# data: what `tiller serve` and `tiller generate` run when no --model is given
BUILTIN_MODEL = Path(__file__).parent / "models" / "tiller-tiny.gguf"
