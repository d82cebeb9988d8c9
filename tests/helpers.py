"""Test helpers: feed identical gradients to several optimizers."""

import contextlib

import torch


@contextlib.contextmanager
def exact_sqrt():
    """The spec with a correctly rounded sqrt_ (through fp64), as the fused
    CPU backend computes it (torch's vectorized CPU sqrt is one ulp off in
    ~18 % of elements on AVX512, so the spec's own bits depend on the CPU)."""
    old = torch.Tensor.sqrt_
    torch.Tensor.sqrt_ = lambda self: self.copy_(self.double().sqrt())
    try:
        yield
    finally:
        torch.Tensor.sqrt_ = old


def clone_params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return lambda: [b.to(dtype).clone().requires_grad_() for b in base]


def random_grads(params, gen):
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype).clone()


def max_diff(xs, ys):
    return max((x.detach().double() - y.detach().double()).abs().max().item()
               for x, y in zip(xs, ys))


def snapshot(opt, params):
    """Deep copy of params and optimizer state, for 'nothing changed' checks."""
    state = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for i, p in enumerate(params) if p in opt.state}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [p.detach().clone() for p in params], state, groups


def assert_unchanged(before, after):
    (p0, s0, g0), (p1, s1, g1) = before, after
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)
    assert s0.keys() == s1.keys()
    for i in s0:
        assert s0[i].keys() == s1[i].keys()
        for k in s0[i]:
            v0, v1 = s0[i][k], s1[i][k]
            assert torch.equal(v0, v1) if torch.is_tensor(v0) else v0 == v1
    assert g0 == g1


def averaged_reference(cls, kw, init_params, targets, plan, *, clip=0.0):
    """A single-process run of ``cls`` on a fp32 copy of ``init_params``
    (the master), fed the average of every rank's gradient ``targets(step,
    world_size)[rank]`` and clipped like torch; ``plan`` = [(steps, world_size)]."""
    master = [p.detach().float().clone().requires_grad_() for p in init_params]
    ref = cls(master, **kw)
    if hasattr(ref, "train"):
        ref.train()
    for steps, world_size in plan:
        for step in steps:
            ts = targets(step, world_size)
            for i, p in enumerate(master):
                p.grad = sum(t[i] for t in ts) / world_size
            if clip:
                torch.nn.utils.clip_grad_norm_(master, clip)
            ref.step()
    return ref, master


def assert_refuses_foreign_state(opt, params, other_cls, name):
    """``opt.load_state_dict`` of a trained ``other_cls``'s state dict (same
    parameters) raises, naming both optimizers, with nothing changed."""
    import pytest

    copies = [p.detach().clone().requires_grad_() for p in params]
    other = other_cls(copies, lr=0.5)
    set_grads(copies, random_grads(copies, torch.Generator().manual_seed(3)))
    other.step()
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=rf"is not a {name} state dict .*it looks like "
                                         rf"torch.optim.{other_cls.__name__}\b"):
        opt.load_state_dict(other.state_dict())
    assert_unchanged(before, snapshot(opt, params))
    return copies
