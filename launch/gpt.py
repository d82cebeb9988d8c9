"""A small GPT-style byte-level language model and a corpus that ships with
Python (the English help topics of ``pydoc_data``, ~465 KB): no download.
Shared by launch/train.py, launch/ds_train.py and the benchmarks."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def corpus() -> torch.Tensor:
    """Bytes of Python's pydoc help topics (English prose and grammar)."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def split(data: torch.Tensor, frac: float = 0.9):
    n = int(len(data) * frac)
    return data[:n], data[n:]


def batch(data: torch.Tensor, batch_size: int, seq: int, gen: torch.Generator):
    ix = torch.randint(len(data) - seq - 1, (batch_size,), generator=gen)
    x = torch.stack([data[i:i + seq] for i in ix])
    y = torch.stack([data[i + 1:i + seq + 1] for i in ix])
    return x, y


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (u.view(b, t, self.heads, d // self.heads).transpose(1, 2) for u in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, dim: int = 128, layers: int = 4, heads: int = 4, seq: int = 128, vocab: int = 256):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x, y=None):
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        for blk in self.blocks:
            h = blk(h)
        logits = self.head(self.ln(h))
        if y is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def sized(n_params: float, seq: int = 128) -> GPT:
    """A GPT with about ``n_params`` parameters (12 d^2 per layer, 8 layers)."""
    layers = 8
    dim = max(64, math.ceil(math.sqrt(n_params / (12 * layers)) / 64) * 64)
    return GPT(dim=dim, layers=layers, heads=max(1, dim // 64), seq=seq)
