"""A model of zero_sf at scale, from zero_sf's own layout code (issue #24 §4).

For Llama-3 8B and 70B (built on the meta device from ``transformers``
configs: shapes, no weights), the real ``zero_sf.layout.build_layout`` lays
out a bf16 model with the usual decay / no-decay groups at N = 8 ... 16,384
ranks, flat (one shard group of N) and hierarchical (shard groups of 8, one
node), with the old fixed default bucket (2**24 elements) and the current
one (``default_bucket_numel``).  Per rank it reports the bytes of every
role, the padding, the buckets, the bytes each collective moves, the
smallest message, and an alpha-beta prediction of exposed communication per
step with and without ``overlap_param_gather``, against the compute time of
a step at a stated MFU.

The memory side is validated against real ``ZeroOptimizer``s built at
N = 8 ... 1,024 in one process with torch's fake process group
(``--validate``): ``memory_bytes()`` after a step must equal the model's
bytes for the same layout, role by role.

Link figures (assumptions, stated with their sources; predictions, not
measurements -- no multi-node machine was used):

* NVLink 4 (H100 SXM): 450 GB/s per direction per GPU (NVIDIA H100
  datasheet: 900 GB/s bidirectional); we assume 80 % of it, 360 GB/s.
* InfiniBand NDR: 400 Gb/s = 50 GB/s per GPU per direction (one ConnectX-7
  per GPU, as in DGX H100); we assume 80 %, 40 GB/s.
* Latency per ring step: 2 us within a node, 6 us across nodes (the order
  of nccl-tests' small-message times on such systems), plus 10 us of launch
  per collective.
* Compute: 989 TFLOP/s bf16 dense per H100 (datasheet) at 40 % MFU;
  6 * params * tokens FLOPs per step, 16,384 tokens per rank per step.

Collectives are modelled as rings: a reduce-scatter or all-gather over P
ranks costs 10 us + (P-1) * alpha + (P-1)/P * M / beta for M bytes of
bucket; an all-reduce twice the transfer.  A flat ring over more than 8
ranks runs at the InfiniBand figures (its slowest hop).

    python benchmarks/scale_model.py [--validate] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from zero_sf.layout import build_layout, default_bucket_numel  # noqa: E402

WORLD_SIZES = [8, 64, 512, 4096, 16384]
NODE = 8  # GPUs per node: the hierarchical shard group
LINKS = {"nvlink": dict(beta=360e9, alpha=2e-6), "ib": dict(beta=40e9, alpha=6e-6)}
LAUNCH = 10e-6
PEAK, MFU, TOKENS = 989e12, 0.40, 16384
HBM = 80e9  # H100 SXM: 80 GB

LLAMA3 = {  # meta-llama/Meta-Llama-3-{8B,70B} config.json
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
}


def llama(name: str, device="meta", **override):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**{**LLAMA3.get(name, {}), **override}, tie_word_embeddings=False)
    with torch.device(device):
        return LlamaForCausalLM(config)


def groups_of(model):
    """The usual decay / no-decay param groups, as users build them."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def layout(groups, shard_size: int, bucket_numel: int, align: int = 128):
    """ZeroOptimizer's layout call (``_trainable_by_group``) on these groups."""
    index, spec = 0, []
    for g in groups:
        members = []
        for p in g["params"]:
            members.append((index, p.numel(), p.dtype))
            index += 1
        spec.append(members)
    return build_layout(spec, world_size=shard_size, bucket_numel=bucket_numel, align=align)


def _size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def memory(buffers, *, states: int = 2, stage: int = 2) -> dict:
    """Bytes per rank by role, as ``ZeroOptimizer.memory_bytes()`` reports
    them after a step: the model's flat buffers (padded), the gradient
    shard (stage 2) or full gradient (stage 1), the fp32 master of every
    low-precision buffer, and ``states`` fp32 tensors per shard element."""
    shard = lambda b: b.shard_numel  # noqa: E731
    return {
        "params": sum(b.numel * _size(b.dtype) for b in buffers),
        "grads": sum((shard(b) if stage == 2 else b.numel) * _size(b.dtype) for b in buffers),
        "master": sum(shard(b) * 4 for b in buffers if b.dtype != torch.float32),
        "optimizer_state": sum(states * shard(b) * 4 for b in buffers),
        "host_staging": 0,
    }


def _ring(p: int, nbytes: float, link: dict, factor: float = 1.0) -> float:
    if p <= 1:
        return 0.0
    return LAUNCH + (p - 1) * link["alpha"] + factor * (p - 1) / p * nbytes / link["beta"]


def comm(buffers, n: int, shard_size: int, grad_bytes: int = 2) -> dict:
    """Bytes sent per rank per step and predicted seconds per collective kind."""
    replicas = n // shard_size
    intra = shard_size <= NODE
    link = LINKS["nvlink"] if intra else LINKS["ib"]
    buckets = [(b.numel, _size(buf.dtype)) for buf in buffers for b in buf.buckets]
    rs = [_ring(shard_size, m * grad_bytes, link) for m, _ in buckets]
    ag = [_ring(shard_size, m * s, link) for m, s in buckets]
    ar = [_ring(replicas, m / shard_size * grad_bytes, LINKS["ib"], 2.0) for m, _ in buckets]
    sent_rs = sum((shard_size - 1) / shard_size * m * grad_bytes for m, _ in buckets)
    sent_ag = sum((shard_size - 1) / shard_size * m * s for m, s in buckets)
    sent_ar = sum(2 * (replicas - 1) / replicas * m / shard_size * grad_bytes
                  for m, _ in buckets) if replicas > 1 else 0.0
    return {
        "bytes_reduce_scatter": sent_rs, "bytes_all_gather": sent_ag,
        "bytes_replica_all_reduce": sent_ar,
        "bytes_cross_node": (sent_rs + sent_ag if not intra else 0.0) + sent_ar,
        "bytes_intra_node": sent_rs + sent_ag if intra else 0.0,
        "t_reduce_scatter": sum(rs), "t_all_gather": sum(ag), "t_all_reduce": sum(ar),
        "t_first_gather": ag[0], "t_last_reduce": rs[-1] + ar[-1],
    }


def exposed(c: dict, compute: float) -> dict:
    """Exposed communication per step.  Stage 2 always overlaps the
    reduce-scatters (and replica all-reduces) with backward (2/3 of the
    compute), except the last bucket's; without overlap the all-gather is
    all exposed, with it only the first bucket's and what does not fit in
    the forward (1/3)."""
    back = max(0.0, c["t_reduce_scatter"] + c["t_all_reduce"] - 2 / 3 * compute)
    without = c["t_all_gather"] + max(back, c["t_last_reduce"])
    with_overlap = (c["t_first_gather"] + max(0.0, c["t_all_gather"] - compute / 3)
                    + max(back, c["t_last_reduce"]))
    return {"exposed_s_without_overlap": without, "exposed_s_with_overlap": with_overlap}


def rows_for(name: str) -> list[dict]:
    model = llama(name)
    groups = groups_of(model.bfloat16())
    params = sum(p.numel() for p in model.parameters())
    compute = 6 * params * TOKENS / (PEAK * MFU)
    rows = []
    for n in WORLD_SIZES:
        for kind, shard_size in (("flat", n), ("hierarchical", min(NODE, n))):
            for bucket_rule in ("fixed 2**24", "default_bucket_numel"):
                # ZeroOptimizer's default: from the data-parallel size N
                bucket = 1 << 24 if bucket_rule == "fixed 2**24" else default_bucket_numel(n)
                buffers = layout(groups, shard_size, bucket)
                mem = memory(buffers)
                shard = sum(b.shard_numel for b in buffers)
                chunks = [b.chunk for buf in buffers for b in buf.buckets]
                c = comm(buffers, n, shard_size)
                row = dict(model=name, n_params=params, world_size=n, layout=kind,
                           shard_size=shard_size, bucket_rule=bucket_rule, bucket_numel=bucket,
                           align=128, buckets=len(chunks),
                           padding_pct_of_shard=100 * (shard - params / shard_size) / shard,
                           smallest_message_bytes=min(chunks) * 2,
                           largest_message_bytes=max(chunks) * 2,
                           bytes_per_state=shard * 4, memory_bytes=mem,
                           bytes_per_rank=sum(mem.values()),
                           bytes_per_param=sum(mem.values()) / params,
                           compute_s=compute, **c, **exposed(c, compute))
                row["fits_80gb"] = sum(mem.values()) < HBM
                rows.append(row)
    del model
    gc.collect()
    return rows


# ------------------------------------------------------------- validation
VALIDATE_SNIPPET = r"""
import json, sys, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
sys.path.insert(0, {root!r})
import zero_sf
from benchmarks.scale_model import groups_of, layout, llama, memory
from zero_sf.layout import default_bucket_numel
out = []
for n in {sizes!r}:
    dist.init_process_group("fake", store=FakeStore(), rank=n - 1, world_size=n)
    torch.manual_seed(0)
    model = llama("tiny", device="cpu", hidden_size=64, intermediate_size=160,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=1000).bfloat16()
    for m in model.modules():
        if "RMSNorm" in type(m).__name__:
            m.float()  # fp32 norms, as users keep them
    opt = zero_sf.ZeroOptimizer(groups_of(model), lr=1e-3)
    opt.train()
    x = torch.randint(0, 1000, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    got = opt.memory_bytes()
    want = memory(layout(groups_of(model), n, default_bucket_numel(n)))
    out.append(dict(world_size=n, measured=got, model=want))
    dist.destroy_process_group()
print("RESULT" + json.dumps(out))
"""


def validate(sizes=(8, 64, 512, 1024)) -> list[dict]:
    """Real ZeroOptimizers at these world sizes (fake process group, rank
    N-1: the last chunk), in a fresh process; their memory_bytes() against
    :func:`memory` of the same layout."""
    code = VALIDATE_SNIPPET.format(root=os.path.dirname(HERE), sizes=list(sizes))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"validation process failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = WORLD_SIZES
    for kind, style in (("flat", "o-"), ("hierarchical", "s-")):
        ys = [next(r["bytes_per_param"] for r in rows if r["model"] == "llama3-8b"
                   and r["world_size"] == n and r["layout"] == kind
                   and r["bucket_rule"] == "default_bucket_numel") for n in ns]
        ax.plot(ns, ys, style, label=f"zero_sf stage 2, {kind} (layout model)")
    ax.plot(ns, [6 + 12 / n for n in ns], "--", label="Megatron dist. optimizer, 6 + 12/N")
    ax.plot(ns, [18] * len(ns), ":", label="DDP + Adam, bf16 + fp32 grads (18)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("data-parallel ranks N")
    ax.set_ylabel("bytes per parameter per rank")
    ax.set_title("Llama-3 8B, bf16 model, fp32 master and state")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--validate", action="store_true",
                    help="also build real ZeroOptimizers on a fake process group")
    args = ap.parse_args()
    rows = rows_for("llama3-8b") + rows_for("llama3-70b")
    result = {"benchmark": "scale_model", "assumptions": dict(
        links=LINKS, launch_s=LAUNCH, peak_flops=PEAK, mfu=MFU, tokens_per_rank=TOKENS,
        node=NODE, hbm_bytes=HBM), "torch": torch.__version__, "rows": rows}
    if args.validate:
        result["validation"] = validate()
        for v in result["validation"]:
            ok = v["measured"] == v["model"]
            print(f"fake pg N={v['world_size']:>5}: memory_bytes() "
                  f"{'==' if ok else '!='} layout model {v['model']}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale_model.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, os.path.join(args.out, "scale_model.png"))
    print(f"{'model':>10} {'N':>6} {'layout':>12} {'bucket':>20} {'nbkt':>5} {'pad%':>6} "
          f"{'min msg':>9} {'GB/rank':>8} {'B/param':>7} {'x-node GB':>9} "
          f"{'exp ms':>7} {'exp ms ov':>9} {'compute ms':>10}")
    for r in rows:
        print(f"{r['model']:>10} {r['world_size']:>6} {r['layout']:>12} {r['bucket_rule']:>20} "
              f"{r['buckets']:>5} {r['padding_pct_of_shard']:>6.2f} "
              f"{r['smallest_message_bytes']:>9} "
              f"{r['bytes_per_rank'] / 1e9:>8.1f} "
              f"{r['bytes_per_param']:>7.2f} {r['bytes_cross_node'] / 1e9:>9.2f} "
              f"{1e3 * r['exposed_s_without_overlap']:>7.1f} "
              f"{1e3 * r['exposed_s_with_overlap']:>9.1f} {1e3 * r['compute_s']:>10.0f}")
    print(f"wrote {os.path.join(args.out, 'scale_model.json')} and scale_model.png")


if __name__ == "__main__":
    main()
