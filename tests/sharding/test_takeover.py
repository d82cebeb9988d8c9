"""A second ZeroOptimizer built on the same parameters (after unfreezing, as
the frozen-parameter error tells users to do, or to change hyperparameters
the layout fixes) takes them over: the first one's hooks leave the model,
and stepping the first one raises instead of corrupting the second."""

import copy

import pytest
import torch
import torch.nn as nn

import zero_sf


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("overlap", [False, True])
def test_a_new_optimizer_on_the_same_model_takes_it_over(stage, overlap):
    def build(model):
        kw = dict(overlap_param_gather=True, model=model) if overlap else {}
        opt = zero_sf.ZeroOptimizer(model.parameters(), stage=stage, lr=1e-2, **kw)
        opt.train()
        return opt

    model = _model()
    first = build(model)
    _train(model, first, 2, seed=1)
    first.finish_param_gather()
    fresh = copy.deepcopy(model)  # the reference: a new optimizer on a copy
    second = build(model)
    ref = build(fresh)
    _train(model, second, 3, seed=2)
    _train(fresh, ref, 3, seed=2)
    second.finish_param_gather(), ref.finish_param_gather()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="taken over by a newer ZeroOptimizer"):
        first.step()
    with pytest.raises(RuntimeError, match="taken over by a newer ZeroOptimizer"):
        first.eval()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
