"""Train the model on the encoded corpus (PyTorch, CPU) and measure held-out perplexity.

Batches are windows of the token stream that start at a document's BOS, as generation always
does (position 0 is BOS); a window runs on into the following documents. Everything is seeded:
the same seed, steps and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from model import ModelArgs, Transformer
from tokenizer import BOS_ID


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1200
    batch: int = 8
    seq_len: int = 512
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 1234


def lr_at(step: int, c: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    t = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * t))


def batches(stream: np.ndarray, c: TrainConfig, rng: np.random.Generator,
            mask: np.ndarray | None = None):
    """Yield (inputs, targets), each (batch, seq_len) int64, windows starting at BOS. With a
    mask (bool per stream token), targets the mask leaves out are -100 (no loss)."""
    starts = np.flatnonzero(stream[:len(stream) - c.seq_len - 1] == BOS_ID)
    while True:
        picks = starts[rng.integers(0, len(starts), c.batch)]
        w = np.stack([stream[s:s + c.seq_len + 1] for s in picks]).astype(np.int64)
        y = w[:, 1:]
        if mask is not None:
            keep = np.stack([mask[s + 1:s + c.seq_len + 1] for s in picks])
            y = np.where(keep, y, -100)
        yield torch.from_numpy(w[:, :-1]), torch.from_numpy(np.ascontiguousarray(y))


@torch.no_grad()
def heldout_nll(model: Transformer, stream: np.ndarray, seq_len: int) -> float:
    """Mean next-token negative log-likelihood over the held-out stream, in consecutive
    windows of seq_len (each predicts seq_len tokens)."""
    model.eval()
    total, count = 0.0, 0
    n = (len(stream) - 1) // seq_len
    for i in range(0, n, 16):
        w = np.stack([stream[j * seq_len:(j + 1) * seq_len + 1] for j in range(i, min(n, i + 16))])
        w = torch.from_numpy(w.astype(np.int64))
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


# the chat stage: chat documents only, from the pretrained weights, at a lower rate
CHAT_STAGE = TrainConfig(steps=200, lr=1e-3, min_lr=1e-4, warmup=20, seed=4321)
# the second chat stage: from the first one's weights, loss on assistant tokens only (and on plain
# stories, mixed in so that stories hold), replies whose stories set the mood in their first
# sentence
CHAT2_STAGE = TrainConfig(steps=350, lr=1e-3, min_lr=1e-4, warmup=20, seed=5678)


def train(train_ids: np.ndarray, heldout_ids: np.ndarray, args: ModelArgs, c: TrainConfig,
          log_every: int = 100, init: Transformer | None = None,
          mask: np.ndarray | None = None) -> tuple[Transformer, dict]:
    """Train a new model, or continue training `init` (its args win over `args`). With a mask
    (bool per token of train_ids), only the tokens it keeps are predicted with a loss."""
    torch.manual_seed(c.seed)
    model = Transformer(args) if init is None else init.train()
    args = model.a
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=c.lr, betas=(0.9, 0.95), fused=False)
    data = batches(train_ids, c, np.random.default_rng(c.seed), mask)
    print(f"model: {model.n_params() / 1e6:.2f}M parameters, {c.steps} steps of "
          f"{c.batch}x{c.seq_len} tokens ({c.steps * c.batch * c.seq_len / 1e6:.1f}M)", flush=True)
    start = time.perf_counter()
    for step in range(c.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, c)
        x, y = next(data)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == c.steps - 1:
            dt = time.perf_counter() - start
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step, c):.2e}  "
                  f"{(step + 1) * c.batch * c.seq_len / dt:,.0f} tok/s  {dt:.0f}s", flush=True)
    nll = heldout_nll(model, heldout_ids, args.max_seq_len)
    stats = {"heldout_nll": nll, "heldout_ppl": math.exp(nll),
             "train_seconds": time.perf_counter() - start, "params": model.n_params()}
    print(f"held-out: nll {nll:.4f}, perplexity {math.exp(nll):.3f}", flush=True)
    return model, stats


def save(model: Transformer, stats: dict, c: TrainConfig, path: Path, tokenizer: bytes) -> None:
    """The weights with what they need: the SentencePiece model (serialized) that made the ids."""
    torch.save({"args": model.a.to_dict(), "train": c.__dict__, "stats": stats,
                "model": model.state_dict(), "tokenizer": tokenizer}, path)


def load(path: Path) -> tuple[Transformer, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = Transformer(ModelArgs(**ckpt["args"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--build", type=Path, default=Path(__file__).parent / "build")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch", type=int, default=TrainConfig.batch)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    c = TrainConfig(steps=a.steps, batch=a.batch)
    model, stats = train(np.load(a.build / "train.npy"), np.load(a.build / "heldout.npy"),
                         ModelArgs(), c)
    save(model, stats, c, a.build / "model.pt", (a.build / "tokenizer.model").read_bytes())
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
