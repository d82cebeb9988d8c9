"""The models, data, losses and param groups users train with, built the
same on every rank from a seed.

Real architectures from tiny ``transformers`` configs (GPT-2 with tied
embeddings, Llama with RMSNorm and grouped-query attention, a BERT encoder
with a 2-row token-type embedding) and a synthetic model with the awkward
shapes: a parameter with fewer rows than ranks, odd sizes, a 1-element
parameter, a ``channels_last`` conv, a frozen parameter and a buffer.
Every loss depends on the weights (cross-entropy, squared error), so a
wrong weight on any rank changes the next gradient.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, SEQ, BATCH = 48, 8, 2
MODELS = ("gpt2", "llama", "bert", "awkward")
DTYPES = ("fp32", "bf16", "bf16+fp32norms")
GROUPINGS = ("one", "decay", "per_layer_lr")


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


class Awkward(nn.Module):
    """Synthetic, with every shape that has broken a sharded optimizer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1, 5)              # 1 row: empty shards at 2+ ranks
        self.inp = nn.Linear(7, 5)                 # odd sizes: parameters straddle ranks
        self.scale = nn.Parameter(torch.ones(1))   # 1 element
        self.conv = nn.Conv2d(2, 3, 2)
        self.conv.weight.data = self.conv.weight.data.to(memory_format=torch.channels_last)
        self.norm = nn.LayerNorm(5)
        self.frozen = nn.Linear(5, 5)              # requires_grad=False at construction
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(5 + 3 * 2 * 4, 3)
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, 5))

    def forward(self, x, img):
        h = torch.tanh(self.inp(x) * self.scale + self.emb.weight[0] + self.shift)
        h = self.frozen(self.norm(h))
        c = torch.tanh(self.conv(img)).flatten(1)
        return self.head(torch.cat([h, c], dim=1))


def build(name: str, seed: int) -> nn.Module:
    """The model in fp32, its weights a function of ``seed`` only."""
    torch.manual_seed(seed)
    if name == "awkward":
        return Awkward()
    transformers = _quiet_transformers()
    common = dict(vocab_size=VOCAB, attn_implementation="eager")
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=SEQ,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      tie_word_embeddings=True, **common)
        return transformers.GPT2LMHeadModel(cfg)
    if name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=SEQ, **common)
        return transformers.LlamaForCausalLM(cfg)
    if name == "bert":
        cfg = transformers.BertConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=SEQ,
                                      type_vocab_size=2, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, num_labels=3, **common)
        return transformers.BertForSequenceClassification(cfg)
    raise ValueError(f"unknown model {name!r}")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _fp32_in_and_back(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _back_to_bf16(module, args, out):
    return out.to(torch.bfloat16)


def to_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """fp32, bf16, or bf16 with fp32 norms (their inputs cast up and their
    outputs back down, as fused mixed-precision norms do)."""
    if dtype == "fp32":
        return model
    model.bfloat16()
    if dtype == "bf16+fp32norms":
        for m in model.modules():
            if _is_norm(m):
                m.float()
                m.register_forward_pre_hook(_fp32_in_and_back)
                m.register_forward_hook(_back_to_bf16)
    return model


def batch(name: str, seed: int, step: int, micro: int, rank: int) -> dict:
    """One micro-batch; a function of its coordinates only (``rank`` is -1
    when every rank sees the same data)."""
    g = torch.Generator().manual_seed(((seed * 1009 + step) * 31 + micro) * 17 + rank + 1)
    if name == "awkward":
        return dict(x=torch.randn(BATCH, 7, generator=g), img=torch.randn(BATCH, 2, 3, 5, generator=g),
                    y=torch.randn(BATCH, 3, generator=g))
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if name == "bert":
        return dict(input_ids=ids, token_type_ids=torch.randint(0, 2, (BATCH, SEQ), generator=g),
                    labels=torch.randint(0, 3, (BATCH,), generator=g))
    return dict(input_ids=ids, labels=ids)


def loss(name: str, model: nn.Module, data: dict) -> torch.Tensor:
    if name == "awkward":
        dtype = model.inp.weight.dtype
        out = model(data["x"].to(dtype), data["img"].to(model.conv.weight.dtype))
        return (out.float() - data["y"]).square().mean()
    return model(**data).loss.float()


def param_groups(model: nn.Module, grouping: str, *, lr: float, weight_decay: float,
                 trainable_only: bool = True):
    """``one``: every parameter (frozen ones included, as ``model.parameters()``);
    ``decay``: the Hugging Face Trainer's decay / no-decay split; ``per_layer_lr``:
    one group per top-level child with its own learning rate."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    if grouping == "one":
        return [{"params": [p for _, p in model.named_parameters()],
                 "param_names": [n for n, _ in model.named_parameters()],
                 "lr": lr, "weight_decay": weight_decay}]
    if grouping == "decay":
        from transformers import Trainer

        decay = set(Trainer.get_decay_parameter_names(None, model))
        groups = []
        for wd, keep in ((weight_decay, True), (0.0, False)):
            members = [(n, p) for n, p in named if (n in decay) == keep]
            groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members],
                           "weight_decay": wd, "lr": lr})
        return [g for g in groups if g["params"]]
    if grouping == "per_layer_lr":
        by_child: dict[str, list] = {}
        for n, p in named:  # transformer.h / model.layers / bert.encoder / head ...
            by_child.setdefault(".".join(n.split(".")[:2]), []).append((n, p))
        return [{"params": [p for _, p in ms], "param_names": [n for n, _ in ms],
                 "lr": lr * (0.5 + 0.25 * i), "weight_decay": weight_decay}
                for i, ms in enumerate(by_child.values())]
    raise ValueError(f"unknown grouping {grouping!r}")
