"""``overlap_param_gather=True`` (zero_sf/sharding/prefetch.py): the same bits
as the synchronous all-gather over training, eval/train, checkpoints and
``model.state_dict()`` mid-run; the gathers really in flight while the
previous module runs; and the ways users can misuse it."""

import os
import warnings

import pytest
import torch
import torch.nn as nn

import zero_sf
from launch.gpt import GPT, batch, corpus
from tests.distributed import spawn


def _gpt():
    """The demo GPT in bf16 with fp32 norms (autocast runs it)."""
    torch.manual_seed(0)
    model = GPT(dim=32, layers=2, heads=2, seq=16)
    model.bfloat16()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.float()
    return model


def _groups(model):
    return [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]


def _loss(model, data, rank, step, mb):
    x, y = batch(data, 4, 16, torch.Generator().manual_seed(1000 * step + 10 * rank + mb))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x, y)


def _run(rank, world_size, stage, overlap, path):
    """6 steps of 2 micro-batches; eval at step 2 with model.state_dict()
    read right after the step; a save at step 3 loaded into a fresh pair
    at step 4. Returns per-step losses and what was read."""
    data = corpus()

    def build():
        model = _gpt()
        kw = dict(overlap_param_gather=True, model=model) if overlap else {}
        opt = zero_sf.ZeroOptimizer(_groups(model), stage=stage, bucket_numel=3000, align=4,
                                    lr=3e-3, warmup_steps=2, **kw)
        opt.train()
        return model, opt

    model, opt = build()
    losses, read = [], {}
    for step in range(6):
        for mb in range(2):
            loss = _loss(model, data, rank, step, mb)
            loss.backward()
            losses.append(loss.item())
        opt.step()
        if step == 2:  # the gathers are pending here (overlap): state_dict waits
            read["state_dict"] = {k: v.clone() for k, v in model.state_dict().items()}
            opt.eval()
            with torch.no_grad():
                read["eval_loss"] = _loss(model, data, rank, 99, 0).item()
            opt.train()
        if step == 3:
            zero_sf.save(path, model, opt)
            model, opt = build()
            zero_sf.load(path, model, opt)
    opt.finish_param_gather()
    read["final"] = [p.detach().clone() for p in model.parameters()]
    return losses, read


def _same_bits(rank, world_size, root):
    for stage in (1, 2):
        runs = [_run(rank, world_size, stage, overlap, os.path.join(root, f"{stage}{overlap}"))
                for overlap in (False, True)]
        (la, ra), (lb, rb) = runs
        assert la == lb, (stage, la, lb)
        assert ra["eval_loss"] == rb["eval_loss"]
        for k, v in ra["state_dict"].items():
            assert torch.equal(v, rb["state_dict"][k]), (stage, k)
        for a, b in zip(ra["final"], rb["final"]):
            assert torch.equal(a, b), stage


@pytest.mark.parametrize("world_size", [2, 3])
def test_overlapped_gather_gives_the_same_bits(world_size, tmp_path):
    spawn(_same_bits, world_size, str(tmp_path))


# ---------------------------------------------------------- the overlap
class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _in_flight(rank, world_size):
    model = _Chain()
    # one bucket per layer (64*64 + 64 elements)
    opt = zero_sf.ZeroOptimizer(model.parameters(), bucket_numel=64 * 65, align=4, lr=1e-3,
                                overlap_param_gather=True, model=model)
    assert len(opt.buffers[0].buckets) == 4
    opt.train()
    x = torch.randn(8, 64)
    model(x).pow(2).sum().backward()  # records the forward order
    opt.step()
    times = {}
    for i, layer in enumerate(model.layers):  # after the optimizer's own pre-hook
        layer.register_forward_pre_hook(
            lambda m, a, i=i: times.__setitem__(("start", i), __import__("time").perf_counter()))
        layer.register_forward_hook(
            lambda m, a, o, i=i: times.__setitem__(("end", i), __import__("time").perf_counter()))
    model(x).pow(2).sum().backward()
    events = {(verb, bk): t for verb, (_, bk), t in opt.weights.timeline}
    for b in range(3):
        # bucket b+1 launched before module b's forward, waited for after it
        assert events[("launch", b + 1)] < times[("start", b)], (b, events, times)
        assert events[("wait", b + 1)] > times[("end", b)], (b, events, times)
    opt.step()


def test_next_bucket_is_in_flight_while_a_module_runs():
    spawn(_in_flight, 2)


# ------------------------------------------------------------- misuse
def _misuse(rank, world_size):
    model = _Chain()
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError, match="needs model="):
        zero_sf.ZeroOptimizer(model.parameters(), overlap_param_gather=True)
    with pytest.raises(ValueError, match="only used with overlap_param_gather=True"):
        zero_sf.ZeroOptimizer(model.parameters(), model=model)
    extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not a parameter of any module"):
        zero_sf.ZeroOptimizer(list(model.parameters()) + [extra], overlap_param_gather=True,
                              model=model)
    assert ptrs == [p.data_ptr() for p in model.parameters()]  # nothing rebound

    # A write between step() and the forward would be overwritten: raises.
    opt = zero_sf.ZeroOptimizer(model.parameters(), bucket_numel=64 * 65, align=4, lr=1e-3,
                                overlap_param_gather=True, model=model)
    opt.train()
    x = torch.randn(8, 64)
    model(x).sum().backward()
    opt.step()
    with torch.no_grad():
        model.layers[3].weight.fill_(0.5)
    with pytest.raises(RuntimeError, match="finish_param_gather"):
        model(x)
    # ... and after finish_param_gather() the write is kept, as without overlap
    model(x).sum().backward()
    opt.step()
    with torch.no_grad():
        opt.finish_param_gather()
        model.layers[3].weight.fill_(0.5)
    model(x).sum().backward()  # the next step starts from the written weights
    assert torch.all(model.layers[3].weight == 0.5)
    opt.step()


def test_overlap_misuse_raises():
    spawn(_misuse, 2)


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.flip = False

    def forward(self, x):
        first, second = (self.b, self.a) if self.flip else (self.a, self.b)
        return second(torch.tanh(first(x)))


def _orders(rank, world_size):
    """Ranks whose forwards touch the buckets in different orders, and a
    forward order that changes later: a warning, and the same bits."""
    runs = []
    for overlap in (False, True):
        model = _Branches()
        kw = dict(overlap_param_gather=True, model=model) if overlap else {}
        opt = zero_sf.ZeroOptimizer(model.parameters(), bucket_numel=72, align=2, lr=1e-2,
                                    **kw)
        opt.train()
        model.flip = rank == 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(4):
                if step == 2:
                    model.flip = not model.flip
                x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step + 10 * rank))
                model(x).pow(2).sum().backward()
                opt.step()
        messages = [str(w.message) for w in caught if "overlap_param_gather" in str(w.message)]
        if overlap:
            assert any("different orders" in m for m in messages), messages
        else:
            assert not messages
        opt.finish_param_gather()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)

    model = _Branches()
    opt = zero_sf.ZeroOptimizer(model.parameters(), bucket_numel=72, align=2, lr=1e-2,
                                overlap_param_gather=True, model=model)
    opt.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            model.flip = step == 2
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
    assert [str(w.message) for w in caught if "another order" in str(w.message)]


def test_forward_orders_that_differ_warn_and_stay_correct():
    spawn(_orders, 2)
