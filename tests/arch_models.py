"""Small random-weight GGUF models of each architecture, written with the gguf package the way
llama.cpp's convert_hf_to_gguf.py writes real ones (metadata keys, tensor names, F32 norms and
biases, a real vocabulary); the same Spec gives the same bytes, which is what lets the
llama.cpp fixtures (tests/fixtures/llamacpp/, bench/llamacpp_fixtures.py) be regenerated here
and checked by hash instead of committed.

Weights come from tests/reference.py's random_weights (numpy's PCG64 stream, stable across
numpy versions), stored as the file holds them: llama q/k rows in the pairwise RoPE order
(llama.cpp NORM), qwen2/qwen3 rows in Hugging Face's halves order (llama.cpp NEOX).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from tiller.engine.config import ModelConfig, llama3_rope_factors
from tiller.engine.engine import Engine, SeqRequest

import tests.reference as reference

LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
               "attn_output": "wo", "ffn_norm": "ffn_norm", "ffn_gate": "w1", "ffn_up": "w3",
               "ffn_down": "w2"}
VECTORS = {"bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
           "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight"}
# Llama 3.1's rope_scaling (config.json), applied to a short original context so that the
# factors change the tokens of a 64-step test (with 8192 they would only matter far away)
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_context_length": 32}


@dataclass(frozen=True)
class Spec:
    """What a test model is; the file is a function of it."""

    name: str
    arch: str  # general.architecture
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # attention.key_length (qwen3's may differ from dim / n_heads)
    context: int
    tied: bool  # no output.weight: the classifier is token_embd
    vocab: str  # "spm" (SentencePiece, Llama 2 style) or "bpe" (byte-level, Qwen 2 style)
    seed: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    llama3_rope: bool = False  # rope_freqs.weight from LLAMA3_SCALING, as convert writes it

    def config(self) -> ModelConfig:
        factors = (llama3_rope_factors(self.head_dim, self.rope_theta,
                                       LLAMA3_SCALING["factor"],
                                       LLAMA3_SCALING["low_freq_factor"],
                                       LLAMA3_SCALING["high_freq_factor"],
                                       int(LLAMA3_SCALING["original_context_length"]))
                   if self.llama3_rope else ())
        return ModelConfig(
            self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads,
            VOCAB_SIZE, self.context, shared_classifier=self.tied, norm_eps=self.norm_eps,
            rope_theta=self.rope_theta, arch=self.arch,
            head_size=0 if self.head_dim * self.n_heads == self.dim else self.head_dim,
            rope_neox=self.arch != "llama", rope_factors=factors)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


VOCAB_SIZE = 512
SPECS = {
    # Llama 3.1-style: GQA, theta 500000, rope_freqs, untied output (Mistral-style files are
    # the same architecture without rope_freqs)
    "llama3": Spec("llama3", "llama", 256, 512, 2, 4, 2, 64, 128, False, "spm", 1,
                   rope_theta=500000.0, llama3_rope=True),
    # Qwen 2 / 2.5: q/k/v biases, tied output (as the 0.5B), NEOX rope, theta 1e6
    "qwen2": Spec("qwen2", "qwen2", 256, 512, 2, 4, 2, 64, 128, True, "bpe", 2,
                  rope_theta=1000000.0, norm_eps=1e-6),
    # Qwen 3: per-head q/k norms; 4 heads of 128 on a 256-wide stream (q is 512 wide, as
    # Qwen3-0.6B's 16 x 128 on 1024), untied output
    "qwen3": Spec("qwen3", "qwen3", 256, 512, 2, 4, 2, 128, 128, False, "bpe", 3,
                  rope_theta=1000000.0, norm_eps=1e-6),
}


def weights(spec: Spec) -> dict[str, np.ndarray]:
    """The model's float32 tensors in tests/reference.py's names, in the file's row order.

    A tied model's embedding is scaled down: at N(0, 1) the token's own row dominates the
    stream, and greedy decoding repeats one token, which would test little."""
    ws = reference.random_weights(spec.config(), spec.seed, shared_classifier=spec.tied)
    if spec.tied:
        ws["token_embedding"] = ws["token_embedding"] * np.float32(0.1)
    return ws


# -----------------------------------------------------------------------------------------------
# vocabularies


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def _spm_vocab(w: gguf.GGUFWriter) -> None:
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"\u2581w{i}" for i in range(VOCAB_SIZE - len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * (VOCAB_SIZE - 259)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(VOCAB_SIZE - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)


def bpe_vocabulary(specials: list[str]) -> tuple[list[str], list[str]]:
    """A VOCAB_SIZE byte-level BPE vocabulary: the 256 byte tokens, then the results of its
    merges (pairs of letters) in merge order, then `specials`; and the merges."""
    chars = _byte_chars()
    letters = "etaoinshrdlucmfwypvbgk"
    merges = [f"{a} {b}" for a in letters for b in letters][:VOCAB_SIZE - 256 - len(specials)]
    return chars + [m.replace(" ", "") for m in merges] + specials, merges


def _bpe_vocab(w: gguf.GGUFWriter) -> None:
    tokens, merges = bpe_vocabulary(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3] * 3)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)


# -----------------------------------------------------------------------------------------------
# the file


def gguf_tensors(spec: Spec, ws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """reference names -> GGUF names (one tensor per layer), in convert_hf_to_gguf.py's order."""
    out = {"token_embd.weight": ws["token_embedding"]}
    if spec.llama3_rope:
        out["rope_freqs.weight"] = np.array(spec.config().rope_factors, np.float32)
    out["output_norm.weight"] = ws["final_norm"]
    if "classifier" in ws:
        out["output.weight"] = ws["classifier"]
    for layer in range(spec.n_layers):
        for part, ours in LAYER_NAMES.items():
            out[f"blk.{layer}.{part}.weight"] = ws[ours][layer]
        for ours, part in VECTORS.items():
            if ours in ws:
                out[f"blk.{layer}.{part}"] = ws[ours][layer]
    return out


def write(path: Path, spec: Spec, types: dict[str, T] | None = None,
          vocab: Callable[[gguf.GGUFWriter], None] | None = None) -> Path:
    """The model as a GGUF file: F32, or each 2-D tensor in `types[name]` (quantized with
    gguf.quants, llama.cpp's reference quantizers for the types it implements); `vocab`
    writes the tokenizer keys instead of the spec's vocabulary."""
    w = gguf.GGUFWriter(path, spec.arch)
    w.add_name(f"tiller test {spec.name}")
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.hidden_dim)
    w.add_block_count(spec.n_layers)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_vocab_size(VOCAB_SIZE)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    (vocab or (_spm_vocab if spec.vocab == "spm" else _bpe_vocab))(w)
    for name, a in gguf_tensors(spec, weights(spec)).items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        ttype = (types or {}).get(name, T.F32)
        if ttype == T.F32:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, ttype), raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tensor_hashes(path: Path) -> dict[str, list[str]]:
    """GGUF name -> [type name, sha256 of its data] (read with the gguf package)."""
    reader = gguf.GGUFReader(path)
    return {t.name: [T(t.tensor_type).name, hashlib.sha256(t.data.tobytes()).hexdigest()]
            for t in reader.tensors}


def prompt(spec: Spec, n: int = 12) -> list[int]:
    """A fixed prompt of ordinary tokens (no specials): BOS-free ids from the spec's seed."""
    rng = np.random.default_rng(1000 + spec.seed)
    lo, hi = (259, VOCAB_SIZE) if spec.vocab == "spm" else (0, VOCAB_SIZE - 3)
    return [int(t) for t in rng.integers(lo, hi, n)]


# -----------------------------------------------------------------------------------------------
# comparing with llama.cpp's runs (tests/test_llamacpp_fixtures.py, bench/arch_table.py)


def greedy(engine: Engine, prompt: list[int], steps: int) -> list[int]:
    """`steps` argmax tokens after `prompt` (one prefill step, then one token a step)."""
    seq = engine.new_sequence()
    logits = engine.step([SeqRequest(seq, prompt)])[0].logits
    out: list[int] = []
    for step in range(steps):
        out.append(int(np.argmax(logits)))
        if step + 1 < steps:
            logits = engine.step([SeqRequest(seq, [out[-1]])])[0].logits
    engine.release(seq)
    return out


def agreeing(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy runs share from the start."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def logit_difference(engine: Engine, request: dict[str, Any], run: dict[str, Any]
                     ) -> tuple[float, float]:
    """max |tiller - llama.cpp| over the top logits a fixture recorded, and the largest of
    them; tiller reads llama.cpp's tokens, so a late divergence cannot hide a difference."""
    prompt, tokens = request["prompt"], run["tokens"]
    rows = engine.forward_all(prompt + tokens[:-1]).logits
    diff, scale = 0.0, 0.0
    for step, kept in run["logits"].items():
        got = rows[len(prompt) - 1 + int(step)][kept["ids"]]
        want = np.array(kept["logits"], np.float32)
        diff = max(diff, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    return diff, scale
