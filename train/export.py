"""Write the trained model and its SentencePiece vocabulary as a GGUF `llama` file.

Names and keys are the ones llama.cpp's convert_hf_to_gguf.py writes and tiller's reader
(engine/gguf.py) expects: token_embd / blk.N.{attn_q,...} / output_norm tensors, `llama.*`
hyperparameters, `tokenizer.ggml.*` vocabulary. wq and wk are written as they are: the model
already rotates adjacent pairs (train/model.py), the GGUF convention, so no permutation.
The classifier is tied, so there is no output.weight (tiller and llama.cpp then reuse
token_embd). Norms stay F32; matrices are F32 or Q8_0.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm
from corpus import IM_END, IM_START
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType
from model import Transformer
from paths import NAME

LICENSE = "MIT"
DESCRIPTION = (
    "tiller's built-in model: a small Llama trained from scratch on a synthetic corpus that "
    "tiller's train/corpus.py generates from a seed: simple English stories and ChatML chats "
    "(story requests, questions about the story, greetings, thanks) whose character (boy/girl), "
    "animal, mood (happy/sad), place and weather are drawn at random and balanced.")
# ChatML, with the generation prompt; BOS is added by the tokenizer, not the template
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# our names (train/model.py) -> GGUF's, per layer
LAYER_NAMES = {"attn_norm.weight": "attn_norm", "wq.weight": "attn_q", "wk.weight": "attn_k",
               "wv.weight": "attn_v", "wo.weight": "attn_output", "ffn_norm.weight": "ffn_norm",
               "w1.weight": "ffn_gate", "w3.weight": "ffn_up", "w2.weight": "ffn_down"}
USER_DEFINED = (IM_START, IM_END)


def gguf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array ((out, in) for matrices), in llama.cpp's order."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["tok_embeddings.weight"]}
    for layer in range(model.a.n_layers):
        for ours, theirs in LAYER_NAMES.items():
            out[f"blk.{layer}.{theirs}.weight"] = sd[f"layers.{layer}.{ours}"]
    out["output_norm.weight"] = sd["norm.weight"]
    return out


def model_uuid(tensors: dict[str, np.ndarray]) -> str:
    """UUIDv5 over a SHA-256 of the tensors' names, shapes and float32 bytes: the same weights
    get the same uuid in an F32 and a Q8_0 file (they are the same model)."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(json.dumps([name, list(t.shape)]).encode())
        h.update(np.ascontiguousarray(t, dtype="<f4").tobytes())
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tiller:tiller-tiny:sha256:{h.hexdigest()}"))


def vocabulary(sp: spm.SentencePieceProcessor) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and GGUF token types (SentencePiece's numbering) of every id."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        elif piece in USER_DEFINED:
            kind = gguf.TokenType.USER_DEFINED
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(piece)
        scores.append(sp.get_score(i))
        types.append(int(kind))
    return tokens, scores, types


def export(model: Transformer, sp: spm.SentencePieceProcessor, path: Path,
           dtype: str = "f32") -> str:
    """Write the GGUF file (dtype "f32" or "q8_0" for the matrices); return its uuid."""
    if dtype not in ("f32", "q8_0"):
        raise ValueError(f"dtype must be f32 or q8_0, got {dtype!r}")
    a = model.a
    tensors = gguf_tensors(model)
    uid = model_uuid(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(NAME)
    w.add_license(LICENSE)
    w.add_description(DESCRIPTION)
    w.add_uuid(uid)
    w.add_file_type(LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType.MOSTLY_Q8_0)
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(a.vocab_size)
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.hidden_dim)
    w.add_block_count(a.n_layers)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_rope_dimension_count(a.head_dim)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_theta)

    tokens, scores, types = vocabulary(sp)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_eot_token_id(sp.piece_to_id(IM_END))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    for name, t in tensors.items():
        if dtype == "q8_0" and t.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(t, T.Q8_0), raw_dtype=T.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return uid
