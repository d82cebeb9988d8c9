"""zero_sf.functional: the torch dispatch (chunked for large tensors) is the
spec, bit for bit; bad backends are refused."""

import pytest
import torch

from zero_sf import functional as F
from zero_sf import spec


@pytest.mark.parametrize("n", [70_000, 200_003])
@pytest.mark.parametrize("low", [None, torch.bfloat16])
def test_torch_path_is_the_spec_bitwise(n, low):
    gen = torch.Generator().manual_seed(0)
    y, z, v = torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.rand(n, generator=gen)
    g = torch.randn(n, generator=gen).to(low or torch.float32)
    out = torch.empty(n, dtype=low) if low else None
    kw = dict(lr=1e-2, ck=0.2, y_coef=-8e-3, beta2=0.999, bias_correction2=0.3, eps=1e-8,
              weight_decay=0.1, grad_scale=0.5)
    refs = [t.clone() for t in (y, z, v)]
    F.sf_adamw([y], [g], [z], [v], y_outs=[out] if low else None, backend="torch", **kw)
    spec.sf_adamw_update(*refs[:1], g, *refs[1:], **kw)
    for a, b in zip((y, z, v), refs):
        assert torch.equal(a, b)
    if low:
        assert torch.equal(out, y.to(low))
    p, sq, buf, gavg = (torch.randn(n, generator=gen) for _ in range(4))
    sq = sq.abs() + gavg**2
    refs = [t.clone() for t in (p, sq, buf, gavg)]
    kw = dict(lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=0.9, centered=True,
              bias_correction2=0.2)
    F.rmsprop([p], [g], [sq], momentum_buffers=[buf], grad_avgs=[gavg], backend="torch", **kw)
    spec.rmsprop_update(refs[0], g, refs[1], momentum_buffer=refs[2], grad_avg=refs[3], **kw)
    for a, b in zip((p, sq, buf, gavg), refs):
        assert torch.equal(a, b)
    x, x_ref = y.clone(), y.clone()
    F.sf_interpolate([x], [z], weight=-0.111, backend="torch")
    spec.sf_interpolate(x_ref, z, weight=-0.111)
    assert torch.equal(x, x_ref)


def test_invalid_backend():
    with pytest.raises(ValueError, match="Invalid backend: 'cuda'"):
        F.resolve_backend("cuda", [torch.zeros(1)])
