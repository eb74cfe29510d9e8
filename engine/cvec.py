"""llama.cpp control-vector GGUF files (`--control-vector`, repeng's `export_gguf`): read and write.

The file: `general.architecture = "controlvector"`, `controlvector.model_hint` (string: the model
architecture, "llama"), `controlvector.layer_count` (an integer: the number of direction
tensors; repeng writes uint32, llama.cpp's cvector-generator int32), and one 1-D F32 tensor of
n_embd values per steered layer, named `direction.N`.

Where llama.cpp adds `direction.N` (read in ggml-org/llama.cpp):
- common/common.cpp, `common_control_vector_load_one`: N is `std::stoi` of what follows the
  first '.' of a tensor named `direction.*`; N < 0 or unparsable rejects the file, and so does
  N = 0 ("invalid (zero) direction tensor layer index"); tensors must be F32 and 1-D, all of the
  same length. `strength x direction.N` is summed into a flat buffer at offset n_embd x (N - 1)
  ("layer 1 at [0]"; tensors naming the same N are summed). `common_control_vector_load` sums
  the buffers of several files, each with its own strength.
- src/llama-adapter.cpp, `llama_adapter_cvec::apply`: `tensors[il]` for il = 1..n_layer-1 is
  filled from offset n_embd x (il - 1), and `tensors[0]` is always null ("there's never a tensor
  for layer 0"). The two "- 1"s cancel: `tensors[il]` holds `direction.il`. `tensor_for(il)`
  returns it only for layer_start <= il <= layer_end (`--control-vector-layer-range`, inclusive;
  `common_init_from_params` defaults them to 1 and n_layer).
- src/models/llama.cpp (the graph; `build_cvec` in src/llama-graph.cpp calls `apply_to`): in the
  loop over blocks il = 0..n_layer-1, `cur = ggml_add(ctx0, cur, ffn_inp)` (the feed-forward
  residual add), then `cur = build_cvec(cur, il)`, then `cb(cur, "l_out", il)` and
  `inpL = cur`, the input of block il + 1. So `direction.N` is added to the OUTPUT of block N.

In tiller's numbering (engine/steering.py: layer l is the stream entering block l, l = n_layers
after the last block, before the final norm) the output of block N is layer N + 1:

    llama.cpp direction.N, N = 1..n_layers-1   <->   tiller layer N + 1 = 2..n_layers

Tiller layer 0 (the embeddings entering block 0) has no llama.cpp equivalent, and tiller layer 1
(the output of block 0) would be `direction.0`, which llama.cpp refuses: neither can be written.
`direction.N` for N >= n_layers names a block the model does not have (llama.cpp ignores it
silently); reading one is an error here. A llama.cpp layer range START..END is tiller layers
START+1..END+1.

repeng (vgel/repeng, repeng/extract.py and repeng/control.py): its layer L is a decoder-block
index (`model.model.layers[L]`). `read_representations` trains direction L on
`out.hidden_states[L + 1]` (`hidden_idx = layer + 1`; Hugging Face's hidden_states[0] is the
embedding output, so [L + 1] is the output of block L); `ControlModule` adds it to the output of
block L; `export_gguf` writes it as `direction.L` with no offset, and llama.cpp adds that to the
output of block L too. So a repeng vector is trained, applied by repeng, applied by llama.cpp,
and applied here (tiller layer L + 1) at one and the same point. Its default layers,
`range(-1, -num_hidden_layers, -1)`, normalise to 1..n_layers-1: never L = 0. (One caveat that
is repeng's: for L = n_layers-1, transformers' Llama returns the last hidden state after the
final norm, so that direction was trained on the normed stream but is added before the norm.)

NOTE: llama.cpp's own cvector-generator (tools/cvector-generator) is off by one against this:
it collects the `l_out` tensors of blocks 0..n_layer-2 and names the vector from block il's
output `direction.{il+1}` (`ggml_format_name(ctrl_out, "direction.%zu", il+1)` in mean.hpp and
pca.hpp), which llama.cpp then adds to the output of block il+1. This module maps by where
llama.cpp *applies* a direction, so a generator file steers the same point here as in
llama.cpp; it was trained one layer earlier. Tiller's own vectors (steering.build_control at
layer l reads the stream at layer l) are written as `direction.{l-1}` and so, like repeng's,
are applied where they were measured.

Stricter than llama.cpp on purpose: the architecture, model_hint and layer_count keys must be
present (llama.cpp reads none of them), only names `direction.<decimal digits>` are accepted,
and every vector must be finite and as wide as the model.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from .gguf import _meta, read_gguf
from .llama2c import CheckpointError

logger = logging.getLogger(__name__)

ARCH = "controlvector"
KEY_ARCH = "general.architecture"
KEY_HINT = f"{ARCH}.model_hint"
KEY_COUNT = f"{ARCH}.layer_count"
RESERVED_KEYS = (KEY_ARCH, KEY_HINT, KEY_COUNT, "general.alignment")
_NAME = re.compile(r"direction\.([0-9]+)")


class ControlVectorError(CheckpointError):
    """A control-vector file or ControlVector that cannot be used; the message says why."""


@dataclass
class ControlVector:
    """One (dim,) float32 direction per tiller layer (2..n_layers for a llama.cpp file).

    `metadata` holds the file's other string, integer, float and boolean keys.
    """

    directions: dict[int, np.ndarray]
    model_hint: str = "llama"
    metadata: dict[str, Any] = field(default_factory=dict)


def from_llama_cpp(n: int) -> int:
    """llama.cpp's `direction.n` (added to the output of block n) -> tiller layer n + 1."""
    return n + 1


def to_llama_cpp(layer: int) -> int:
    """Tiller layer -> the N of llama.cpp's `direction.N`: layer - 1."""
    return layer - 1


# -----------------------------------------------------------------------------------------------
# reading


def read_control_vector(path: str | os.PathLike[str], dim: int, n_layers: int) -> ControlVector:
    """Read a llama.cpp control-vector GGUF for a model of width `dim` with `n_layers` blocks.

    Directions come back keyed by tiller layer (direction.N -> N + 1), as float32 copies.
    Raises ControlVectorError naming the file (and the tensor) for anything unusable.
    """
    path = Path(path)
    try:
        f = read_gguf(path)
        arch = _meta(f, KEY_ARCH, (str,))
        if arch != ARCH:
            raise ControlVectorError(f"{path}: architecture {arch!r} is not a control vector "
                                     f"(expected {ARCH!r})")
        hint = _meta(f, KEY_HINT, (str,))
        count = _meta(f, KEY_COUNT, (int,))
    except ControlVectorError:
        raise
    except CheckpointError as e:
        raise ControlVectorError(str(e)) from None
    if not f.tensors:
        raise ControlVectorError(f"{path}: no direction tensors (llama.cpp refuses such a file)")
    if count != len(f.tensors):
        logger.warning("%s: %s is %d but the file has %d direction tensors", path, KEY_COUNT,
                       count, len(f.tensors))

    directions: dict[int, np.ndarray] = {}
    names: dict[int, list[str]] = {}  # tiller layer -> the tensors summed into it
    for t in f.tensors.values():
        def fail(what: str, name: str = t.name) -> ControlVectorError:
            return ControlVectorError(f"{path}: tensor {name}: {what}")

        m = _NAME.fullmatch(t.name)
        if m is None:
            raise fail("not a direction tensor (expected names direction.N)")
        n = int(m.group(1))
        if n == 0:
            raise fail("direction.0 is invalid: llama.cpp numbers directions from 1 (the output "
                       "of block 1) and rejects 0")
        if n >= n_layers:
            raise fail(f"direction.{n} is the output of block {n}, but the model has "
                       f"{n_layers} blocks (directions 1..{n_layers - 1}): a vector for a "
                       "deeper model?")
        if t.type != GGMLQuantizationType.F32:
            raise fail(f"type {t.type.name}, expected F32 (as llama.cpp requires)")
        # NOTE: ggml_n_dims ignores trailing ne of 1, so llama.cpp takes (1, n_embd) as 1-D too
        if t.shape[-1] != dim or math.prod(t.shape) != dim:
            raise fail(f"shape {t.shape}, expected ({dim},): this model's width is {dim}")
        vec = np.array(f.data[t.offset:t.offset + t.nbytes].view("<f4"), dtype=np.float32)
        if not np.isfinite(vec).all():
            raise fail("has NaN or infinite values")
        layer = from_llama_cpp(n)
        names.setdefault(layer, []).append(t.name)
        if layer in directions:  # e.g. direction.5 and direction.05: llama.cpp sums them
            with np.errstate(over="ignore"):  # an overflow is refused below, by name
                directions[layer] = directions[layer] + vec
        else:
            directions[layer] = vec
    for layer, vec in directions.items():
        # NOTE: finite tensors can sum to inf (two names for one layer, each near float32's
        # max): such a direction would turn every steered stream into inf and NaN.
        if not np.isfinite(vec).all():
            raise ControlVectorError(f"{path}: tensors {', '.join(names[layer])} (tiller layer "
                                     f"{layer}) sum to NaN or infinite values")
    metadata = {k: v for k, v in f.metadata.items()
                if k not in RESERVED_KEYS and type(v) in (str, int, float, bool)}
    return ControlVector(dict(sorted(directions.items())), hint, metadata)


def load_control_vectors(files: list[tuple[Path, float]], dim: int, n_layers: int,
                         layer_range: tuple[int, int] | None = None) -> dict[int, np.ndarray]:
    """llama-server's `--control-vector[-scaled]` and `--control-vector-layer-range`, as
    common_control_vector_load sums them: scale x direction, summed over files per tiller layer,
    kept for llama.cpp layers START..END inclusive (tiller layers START+1..END+1; llama.cpp's
    default range is 1..n_layer, every layer a file can name). Errors name the file."""
    total: dict[int, np.ndarray] = {}
    for path, scale in files:
        cv = read_control_vector(path, dim, n_layers)
        for layer, vec in cv.directions.items():
            total[layer] = total.get(layer, np.zeros(dim, np.float32)) + np.float32(scale) * vec
    if layer_range is not None:
        low, high = (from_llama_cpp(n) for n in layer_range)
        total = {k: v for k, v in total.items() if low <= k <= high}
    for layer, vec in total.items():
        if not np.isfinite(vec).all():
            raise ControlVectorError(f"{', '.join(str(p) for p, _ in files)}: the scaled sum "
                                     f"at tiller layer {layer} is not finite")
    return dict(sorted(total.items()))


# -----------------------------------------------------------------------------------------------
# writing


def _check_for_writing(cv: ControlVector, n_layers: int) -> dict[int, np.ndarray]:
    if not cv.directions:
        raise ControlVectorError("a control vector needs at least one direction "
                                 "(llama.cpp refuses a file without any)")
    if not isinstance(cv.model_hint, str):
        raise ControlVectorError(f"model_hint must be a string, got {cv.model_hint!r}")
    out: dict[int, np.ndarray] = {}
    width = None
    for layer, vec in sorted(cv.directions.items()):
        if type(layer) is not int:
            raise ControlVectorError(f"layer {layer!r} is not an integer")
        if layer == 0:
            raise ControlVectorError(
                "tiller layer 0 (the stream entering block 0) has no llama.cpp equivalent: "
                "llama.cpp adds direction.N to the output of block N")
        if layer == 1:
            raise ControlVectorError(
                "tiller layer 1 (the output of block 0) would be direction.0, which llama.cpp "
                "rejects (it never steers block 0's output); use layers 2.."
                f"{n_layers}")
        if not 2 <= layer <= n_layers:
            raise ControlVectorError(f"layer {layer} outside 2..{n_layers} (the layers a "
                                     f"llama.cpp control vector can steer in a {n_layers}-block "
                                     "model)")
        arr = np.asarray(vec)
        if arr.ndim != 1 or arr.shape[0] == 0 or arr.dtype.kind not in "fiu":
            raise ControlVectorError(f"layer {layer}: direction must be a non-empty 1-D numeric "
                                     f"array, got shape {arr.shape} ({arr.dtype})")
        if width is not None and arr.shape[0] != width:
            raise ControlVectorError(f"layer {layer}: direction has {arr.shape[0]} values, "
                                     f"the others {width}")
        width = arr.shape[0]
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ControlVectorError(f"layer {layer}: direction has NaN or infinite values")
        out[layer] = arr
    for key, value in cv.metadata.items():
        if key in RESERVED_KEYS:
            raise ControlVectorError(f"metadata key {key} is written by the exporter itself")
        if type(value) not in (str, int, float, bool):
            raise ControlVectorError(f"metadata {key}: only strings, integers, floats and "
                                     f"booleans can be written, got {type(value).__name__}")
        if type(value) is int and not -2**63 <= value < 2**63:
            raise ControlVectorError(f"metadata {key}={value} does not fit in an int64")
    return out


def write_control_vector(path: str | os.PathLike[str], cv: ControlVector, n_layers: int) -> None:
    """Write `cv` as a llama.cpp control-vector GGUF (tiller layer l -> direction.{l-1}).

    Written as repeng's export_gguf does, with gguf.GGUFWriter, into a temporary file that
    replaces `path` only when complete. Integers are stored as int64, floats as float64.
    """
    directions = _check_for_writing(cv, n_layers)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = GGUFWriter(tmp, ARCH)
    try:
        writer.add_string(KEY_HINT, cv.model_hint)
        writer.add_uint32(KEY_COUNT, len(directions))
        for key, value in cv.metadata.items():
            if type(value) is str:
                writer.add_string(key, value)
            elif type(value) is bool:
                writer.add_bool(key, value)
            elif type(value) is int:
                writer.add_int64(key, value)
            else:
                writer.add_float64(key, value)
        for layer, vec in directions.items():
            writer.add_tensor(f"direction.{to_llama_cpp(layer)}", vec)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)
