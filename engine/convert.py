"""`tiller convert`: any model tiller reads (llama2.c, GGUF) -> a GGUF file as llama.cpp writes it.

Every architecture the engine loads (`llama`, `qwen2`, `qwen3`) is written as itself: a GGUF
source's `{arch}.*` keys (rope scaling, key/value lengths, ...) are copied with their types,
its tensors are written in its own order, the matrices in the requested type and the vectors
(norms, Qwen 2's q/k/v biases, Qwen 3's q/k norms, `rope_freqs.weight`) as F32, as llama.cpp's
converters write them. q/k rows are written as the file had them (engine/weights.py reorders
NEOX rows only in the engine's copy). A source the engine cannot load is refused by the loader's
CheckpointError, which names the file and the key.

Output, shown for the `llama` architecture (llama.cpp's convert_hf_to_gguf.py and llama-quantize):

    general.*    architecture, name, uuid, file_type (LlamaFileType), quantization_version, and
                 the source: general.source.uuid (gguf's Keys.General.SOURCE_UUID), plus three
                 keys of ours beside it: general.source.name, general.source.blake3 (the source
                 file's key, engine/identity.py) and general.source.format ("llama2c-v0", "gguf")
    {arch}.*     context_length, embedding_length, feed_forward_length, block_count,
                 attention.head_count(_kv), attention.layer_norm_rms_epsilon, rope.freq_base,
                 rope.dimension_count, vocab_size (the validated values); a GGUF source's
                 other {arch}.* keys as they are
    tokenizer.*  from a GGUF source (or a GGUF --tokenizer) as they are; from llama2.c's
                 tokenizer.bin: model "llama", tokens (spaces written as "▁", as sentencepiece
                 and llama.cpp's converters do), scores, token_type, bos/eos/unk ids,
                 add_bos_token true, add_eos_token false
    tensors      token_embd, [rope_freqs], output_norm, [output], blk.N.{attn_norm, attn_q,
                 attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}.weight
                 (qwen2: blk.N.attn_{q,k,v}.bias; qwen3: blk.N.attn_{q,k}_norm.weight);
                 vectors always F32

The output keeps the source's uuid (declared, or derived from its tensors): quantizing or
converting does not make another model, as the GGUF authorship-metadata discussion settled
(llama.cpp PRs #7499, #8565). A GGUF source's other keys are copied with their types, as
llama-quantize does; its general.source.url/repo_url/doi, if any, are left as they are.

Q8_0: a source already in Q8_0 (llama2.c v2/q80v1, GGUF Q8_0) keeps its int8 values, written
as blocks with the scales rounded to fp16 (exact for GGUF sources); float sources go through
gguf.quants.quantize, llama.cpp's reference quantizer. As in convert_hf_to_gguf.py, a matrix
whose rows are not a multiple of 32 cannot be Q8_0 and is written as F16 instead (logged).

The file is written next to OUT and renamed into place; tensors are converted one at a time in
slices of rows, so memory stays near one tensor of the output.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf import LlamaFileType

from .config import GROUP_SIZE, ModelConfig
from .dequant import Packed
from .gguf import ARCH_VECTORS, GLOBAL_TENSORS, LAYER_TENSORS, Q8_0_BLOCK, read_gguf
from .identity import model_key, model_uuid
from .llama2c import HEAD_VECTORS, NORMS, Checkpoint, is_llama2c_shaped
from .loader import is_gguf, load_checkpoint
from .quant import QTensor
from .tokenizer import SpmTokenizer, TokenizerError
from .weights import Progress

logger = logging.getLogger(__name__)

OUT_TYPES = {"f32": (LlamaFileType.ALL_F32, T.F32), "f16": (LlamaFileType.MOSTLY_F16, T.F16),
             "q8_0": (LlamaFileType.MOSTLY_Q8_0, T.Q8_0)}
SOURCE_NAME = "general.source.name"
SOURCE_BLAKE3 = "general.source.blake3"
SOURCE_FORMAT = "general.source.format"
# keys the converter writes itself: a GGUF source's values of these are replaced (and the
# hyperparameters of _hyperparameters, under the architecture's prefix)
OWNED = frozenset({
    "general.architecture", "general.alignment", "general.file_type",
    "general.quantization_version", "general.uuid", "general.source.uuid", SOURCE_NAME,
    SOURCE_BLAKE3, SOURCE_FORMAT})
_SLICE_BYTES = 64 << 20  # fp32 bytes converted at once
KV = dict[str, tuple[Any, V, V | None]]  # key -> (value, type, element type of an array)


@dataclass(frozen=True)
class Converted:
    path: Path
    uuid: str
    source_key: str
    file_type: LlamaFileType
    tensor_types: dict[str, T]  # GGUF name -> type written
    fallbacks: tuple[str, ...]  # Q8_0 asked, F16 written (rows not a multiple of 32)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], out_type: str,
            tokenizer: str | os.PathLike[str] | None = None, progress: Progress | None = None,
            cache: str | os.PathLike[str] | None = None) -> Converted:
    """Convert the model at `src` to a GGUF file at `dst` of `out_type` ("f32", "f16", "q8_0").

    `tokenizer` is the vocabulary of a llama2.c source (a tokenizer.bin or a GGUF; default
    tokenizer.bin beside `src`); a GGUF source brings its own. `cache` is the identity cache's
    directory (engine/identity.py). Raises CheckpointError / TokenizerError for unreadable
    inputs, ValueError for impossible requests, OSError for files.
    """
    if out_type not in OUT_TYPES:
        raise ValueError(f"unknown output type {out_type!r}: expected one of {list(OUT_TYPES)}")
    src, dst = Path(src), Path(dst)
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"{dst.parent}: no such directory for the output")
    file_type, ggml_type = OUT_TYPES[out_type]
    checkpoint = load_checkpoint(src)  # refuses what the engine cannot run, naming the key
    config = checkpoint.config
    hyper = _hyperparameters(config)
    if checkpoint.format == "gguf":
        if tokenizer is not None:
            raise ValueError(f"{src}: a GGUF model brings its own vocabulary (no --tokenizer)")
        copied = _gguf_kv(src, lambda key: key not in OWNED and key not in hyper)
        order = list(read_gguf(src).tensors)
    else:
        assert is_llama2c_shaped(config)  # what a llama2.c file can hold
        order = None
        copied = _vocab_kv(src, Path(tokenizer) if tokenizer else None, config.vocab_size)
    name = checkpoint.metadata.get("general.name") or src.stem
    uuid = model_uuid(checkpoint, cache)
    source_key = model_key(src, cache)
    fmt = "gguf" if checkpoint.format == "gguf" else f"llama2c-{checkpoint.format}"
    kv: KV = {"general.name": (name, V.STRING, None), "general.uuid": (uuid, V.STRING, None),
              "general.source.uuid": (uuid, V.STRING, None),
              SOURCE_NAME: (name, V.STRING, None), SOURCE_BLAKE3: (source_key, V.STRING, None),
              SOURCE_FORMAT: (fmt, V.STRING, None),
              "general.file_type": (int(file_type), V.UINT32, None),
              "general.quantization_version": (gguf.GGML_QUANT_VERSION, V.UINT32, None)}
    kv |= hyper | {k: v for k, v in copied.items() if k not in kv}
    plan = list(_plan(checkpoint, ggml_type, order))
    fallbacks = tuple(n for n, t, _ in plan if ggml_type == T.Q8_0 and t == T.F16)
    if fallbacks:
        logger.warning("%s: rows of %s are not a multiple of %d, so they cannot be Q8_0: "
                       "written as F16", src, ", ".join(fallbacks), Q8_0_BLOCK[0])
    _write(dst, config.arch, kv, plan, progress)
    return Converted(dst, uuid, source_key, file_type, {n: t for n, t, _ in plan}, fallbacks)


# -----------------------------------------------------------------------------------------------
# metadata


def _hyperparameters(c: ModelConfig) -> KV:
    u32 = {"context_length": c.max_seq_len, "embedding_length": c.dim,
           "feed_forward_length": c.hidden_dim, "block_count": c.n_layers,
           "attention.head_count": c.n_heads, "attention.head_count_kv": c.n_kv_heads,
           "rope.dimension_count": c.head_dim, "vocab_size": c.vocab_size}
    kv: KV = {f"{c.arch}.{k}": (v, V.UINT32, None) for k, v in u32.items()}
    kv[f"{c.arch}.attention.layer_norm_rms_epsilon"] = (c.norm_eps, V.FLOAT32, None)
    kv[f"{c.arch}.rope.freq_base"] = (c.rope_theta, V.FLOAT32, None)
    return kv


def _gguf_kv(path: Path, keep: Callable[[str], bool]) -> KV:
    """A GGUF file's metadata with each value's own GGUF type: our validated values, and the
    types from gguf.GGUFReader (read_gguf keeps Python values; llama.cpp checks key types)."""
    f = read_gguf(path)
    out: KV = {}
    for key, field in gguf.GGUFReader(path).fields.items():
        if key.startswith("GGUF.") or not keep(key):
            continue
        value, vtype = f.metadata[key], V(field.types[0])
        sub = V(field.types[-1]) if vtype == V.ARRAY else None
        if vtype == V.ARRAY:
            value = value.tolist() if isinstance(value, np.ndarray) else list(value)
            if not value:  # NOTE: GGUFWriter refuses empty arrays
                logger.info("%s: empty array %s not copied", path, key)
                continue
        out[key] = (value, vtype, sub)
    return out


def _vocab_kv(model: Path, tokenizer: Path | None, vocab_size: int) -> KV:
    """tokenizer.* keys for a llama2.c model, from a GGUF vocabulary or a tokenizer.bin."""
    if tokenizer is None:
        tokenizer = model.with_name("tokenizer.bin")
        if not tokenizer.exists():
            raise TokenizerError(f"{tokenizer}: no tokenizer file beside the model "
                                 "(pass --tokenizer)")
    if is_gguf(tokenizer):
        kv = _gguf_kv(tokenizer, lambda key: key.startswith("tokenizer."))
        n = len(kv.get("tokenizer.ggml.tokens", ((),))[0])
        if n != vocab_size:
            raise TokenizerError(f"{tokenizer}: {n} tokens, the model has {vocab_size}")
        return kv
    tok = SpmTokenizer.from_llama2c(tokenizer, vocab_size=vocab_size)  # validates the file
    n = tok.vocab_size
    return {"tokenizer.ggml.model": ("llama", V.STRING, None),
            "tokenizer.ggml.tokens": ([tok.piece(i) for i in range(n)], V.ARRAY, V.STRING),
            "tokenizer.ggml.scores": (_llama2c_scores(tokenizer, n), V.ARRAY, V.FLOAT32),
            "tokenizer.ggml.token_type": ([int(tok.token_type(i)) for i in range(n)], V.ARRAY,
                                          V.INT32),
            "tokenizer.ggml.bos_token_id": (tok.bos_id, V.UINT32, None),
            "tokenizer.ggml.eos_token_id": (tok.eos_id, V.UINT32, None),
            "tokenizer.ggml.unknown_token_id": (tok.unk_id, V.UINT32, None),
            "tokenizer.ggml.add_bos_token": (True, V.BOOL, None),
            "tokenizer.ggml.add_eos_token": (False, V.BOOL, None)}


def _llama2c_scores(path: Path, n: int) -> list[float]:
    """The first n scores of a tokenizer.bin that SpmTokenizer.from_llama2c has validated."""
    data = path.read_bytes()
    scores, offset = [], 4
    for _ in range(n):
        score, length = struct.unpack_from("<fi", data, offset)
        scores.append(score)
        offset += 8 + length
    return scores


# -----------------------------------------------------------------------------------------------
# tensors


Source = np.ndarray | QTensor | Packed


def _plan(ckpt: Checkpoint, ggml_type: T, order: list[str] | None
          ) -> Iterator[tuple[str, T, Source]]:
    """(GGUF name, type to write, source tensor) in `order` (a GGUF source's own), else in
    llama.cpp's: globals, then blocks. A GGUF source's matrices stay Packed (decoded when
    written, one at a time); vectors are float32 arrays and are written as F32."""
    c = ckpt.config
    ours_to_gguf = {ours: name for name, ours in GLOBAL_TENSORS.items()}
    tensors: dict[str, tuple[bool, Source]] = {}  # GGUF name -> (a vector?, tensor)
    for ours in ("token_embedding", "final_norm", "classifier"):
        if ours in ckpt.tensors:
            tensors[ours_to_gguf[ours]] = (ours in NORMS, ckpt.tensors[ours])
    if c.rope_factors:  # NOTE: only written where the source had the tensor (order says)
        tensors["rope_freqs.weight"] = (True, np.array(c.rope_factors, np.float32))
    parts = [(f"{part}.weight", ours) for part, ours in LAYER_TENSORS.items()]
    parts += list(ARCH_VECTORS.get(c.arch, {}).items())
    for layer in range(c.n_layers):
        for part, ours in parts:
            t = ckpt.tensors[ours]
            if isinstance(t, QTensor):
                t = QTensor(t.values[layer], t.scales[layer])
            else:
                t = t.layer(layer) if isinstance(t, Packed) else t[layer]
            tensors[f"blk.{layer}.{part}"] = (ours in NORMS or ours in HEAD_VECTORS, t)
    if order is None:
        order = [n for n in tensors if n != "rope_freqs.weight"]
    missing = set(order) ^ set(tensors)
    assert not missing - {"rope_freqs.weight"}, missing  # load_gguf checked the tensor names
    for name in order:
        vector, t = tensors[name]
        if vector:
            yield name, T.F32, t
        elif ggml_type == T.Q8_0 and t.shape[-1] % Q8_0_BLOCK[0]:
            yield name, T.F16, t
        else:
            yield name, ggml_type, t


def _nbytes(shape: tuple[int, ...], ggml_type: T) -> int:
    block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(shape)) // block * block_bytes


def _encode(name: str, source: Source, ggml_type: T) -> np.ndarray:
    """One tensor in its GGUF encoding: float32 / float16 values or uint8 Q8_0 blocks.
    A Packed Q8_0 source keeps its int8 values; other Packed types are decoded to float32."""
    t = source.materialize() if isinstance(source, Packed) else source
    rows = t.shape[0] if len(t.shape) > 1 else 1
    cols = t.shape[-1]
    step = max(1, _SLICE_BYTES // (4 * cols))
    if ggml_type == T.Q8_0:
        out = np.empty((rows, _nbytes((cols,), T.Q8_0)), np.uint8)
    else:
        out = np.empty((rows, cols), np.float32 if ggml_type == T.F32 else np.float16)
    for r in range(0, rows, step):
        part = (QTensor(t.values[r:r + step], t.scales[r:r + step]) if isinstance(t, QTensor)
                else np.asarray(t).reshape(rows, cols)[r:r + step])
        if ggml_type == T.Q8_0 and isinstance(part, QTensor):
            out[r:r + step] = _q8_0_blocks(part)
        else:
            a = part.dequantize() if isinstance(part, QTensor) else part
            with np.errstate(over="ignore"):  # NOTE: overflow to inf is checked below
                out[r:r + step] = gguf.quants.quantize(np.asarray(a, np.float32), ggml_type)
    if ggml_type != T.F32:
        check = out.view(np.float16) if ggml_type == T.F16 else \
            out.reshape(-1, Q8_0_BLOCK[1])[:, :2].copy().view(np.float16)
        if not np.isfinite(check).all():
            raise ValueError(f"{name}: values beyond float16's range (largest |x| "
                             f"{np.abs(_as_fp32(t)).max():.4g}): convert to f32")
    return out if len(t.shape) > 1 else out[0]


def _q8_0_blocks(q: QTensor) -> np.ndarray:
    """An engine QTensor (rows, cols) whose groups are GGUF's blocks of 32 -> (rows, blocks*34)
    uint8: each block its fp16 scale then its 32 int8 values, which are kept as they are."""
    assert Q8_0_BLOCK[0] == GROUP_SIZE
    rows, cols = q.values.shape
    n = cols // GROUP_SIZE
    blocks = np.empty((rows, n, Q8_0_BLOCK[1]), np.uint8)
    blocks[..., :2] = q.scales.astype(np.float16).view(np.uint8).reshape(rows, n, 2)
    blocks[..., 2:] = q.values.view(np.uint8).reshape(rows, n, GROUP_SIZE)
    return blocks.reshape(rows, -1)


def _as_fp32(t: np.ndarray | QTensor) -> np.ndarray:
    return t.dequantize() if isinstance(t, QTensor) else np.asarray(t)


# -----------------------------------------------------------------------------------------------
# the file


def _write(dst: Path, arch: str, kv: KV, plan: list[tuple[str, T, Source]],
           progress: Progress | None) -> None:
    """Header, then each tensor encoded as it is written (GGUFWriter's streaming API)."""
    tmp = dst.with_name(dst.name + ".tmp")
    w = gguf.GGUFWriter(tmp, arch)
    groups = ("general.", f"{arch}.", "tokenizer.")
    try:
        order = sorted(kv, key=lambda k: next((i for i, g in enumerate(groups)
                                               if k.startswith(g)), len(groups)))
        for key in order:
            w.add_key_value(key, *kv[key])
        for name, ggml_type, t in plan:
            shape = tuple(t.shape)
            if ggml_type == T.Q8_0:  # GGUFWriter takes quantized tensors by their byte shape
                w.add_tensor_info(name, (*shape[:-1], _nbytes(shape[-1:], T.Q8_0)),
                                  np.dtype(np.uint8), _nbytes(shape, T.Q8_0), raw_dtype=T.Q8_0)
            else:
                dtype = np.dtype(np.float32 if ggml_type == T.F32 else np.float16)
                w.add_tensor_info(name, shape, dtype, _nbytes(shape, ggml_type))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (name, ggml_type, t) in enumerate(plan):
            w.write_tensor_data(_encode(name, t, ggml_type))
            if progress is not None:
                progress(i + 1, len(plan), name)
        w.close()
        os.replace(tmp, dst)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
