"""Where the build puts things (shared by the scripts that train and those that only evaluate)."""

from pathlib import Path

NAME = "tiller-tiny"
HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"  # intermediate files, ignored by git (train/.gitignore)
OUT = HERE.parent / "tiller" / "models" / f"{NAME}.gguf"  # the model tiller ships
