"""zero_sf.storage: what the storage keys of a param group mean."""

from __future__ import annotations

import pytest
import torch

from zero_sf.storage import (KEEP_ON_LOAD, STORAGE_KEYS, Storage, check_compression,
                             compression_defaults, remainder_bits, state_dtype_for,
                             state_dtype_name)


def test_the_default_state_dtype_rule():
    for dtype, want in [(torch.float32, torch.float32), (torch.float64, torch.float64),
                        (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]:
        assert state_dtype_for(torch.zeros(1, dtype=dtype)) == want
        assert state_dtype_for(torch.zeros(1, dtype=dtype), {"state_dtype": None}) == want
    assert state_dtype_for(torch.zeros(1), {"state_dtype": "bfloat16"}) == torch.bfloat16


@pytest.mark.parametrize("value, name", [(None, None), (torch.float32, "float32"),
                                         ("bf16", "bfloat16"), (torch.bfloat16, "bfloat16")])
def test_state_dtype_names(value, name):
    assert state_dtype_name(value) == name


@pytest.mark.parametrize("bad", [torch.float16, "int8", 3])
def test_bad_state_dtypes_are_named(bad):
    with pytest.raises(ValueError, match="Invalid state_dtype value"):
        state_dtype_name(bad)


def test_storage_of_a_group():
    group = compression_defaults(torch.bfloat16, "stochastic", "remainder", 7)
    check_compression(group)
    s = Storage.of(group)
    assert s.keeps_remainder and s.sr(12) == (7, 12)
    assert s.dtype_for(torch.zeros(1, dtype=torch.bfloat16)) == torch.bfloat16
    nearest = Storage.of({**group, "state_rounding": "nearest"})
    assert nearest.sr(12) is None
    plain = Storage.of(compression_defaults(None, "stochastic", None, 0))
    assert not plain.keeps_remainder and plain.sr(3) is None  # fp32 state is never rounded
    assert plain.dtype_for(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32


@pytest.mark.parametrize("key, value, match", [
    ("state_rounding", "up", "Invalid state_rounding value"),
    ("master_weights", "fp16", "Invalid master_weights value"),
    ("seed", -1, "Invalid seed value"), ("seed", True, "Invalid seed value")])
def test_bad_groups_are_refused(key, value, match):
    group = compression_defaults(None, "stochastic", None, 0)
    group[key] = value
    with pytest.raises(ValueError, match=match):
        check_compression(group)


def test_remainder_bits_accept_int16_and_its_bf16_view():
    bits = torch.tensor([-32768, -1, 0, 1, 32767], dtype=torch.int16)
    assert remainder_bits(bits) is bits
    assert torch.equal(remainder_bits(bits.view(torch.bfloat16)), bits)
    with pytest.raises(ValueError, match="Invalid remainder dtype"):
        remainder_bits(bits.float())


def test_a_sharded_load_keeps_how_state_is_stored_and_the_backend():
    assert set(STORAGE_KEYS) <= set(KEEP_ON_LOAD) and "backend" in KEEP_ON_LOAD


# ---------------------------------------------------------- Store / Stores
# One object carries a call's storage through spec, dispatch and the fused
# backends (issue #22); the keywords of earlier releases still work.

def _sf_inputs(seed, n=70_001):  # > the torch path's 64K chunk: the store is narrowed
    from zero_sf.storage import split_master

    g = torch.Generator().manual_seed(seed)
    y, rem = split_master(torch.randn(n, generator=g))
    return [y, torch.randn(n, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16(),
            (torch.rand(n, generator=g) * 1e-2).bfloat16(), rem,
            torch.empty(n, dtype=torch.bfloat16)]


SF_KW = dict(lr=1e-2, ck=0.2, y_coef=-8e-3, beta2=0.999, bias_correction2=0.3, eps=1e-8,
             weight_decay=0.1)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_store_and_the_old_keywords_give_the_same_bits(backend):
    from zero_sf import dispatch
    from zero_sf.storage import Stores

    a, b = _sf_inputs(0), _sf_inputs(0)
    y, g, z, v, rem, out = a
    dispatch.sf_adamw([y], [g], [z], [v], backend=backend, **SF_KW,
                      store=Stores(outs=[out], remainders=[rem], sr=(3, 4), index_bases=[5]))
    dispatch.sf_interpolate([y], [z], weight=0.3, backend=backend,
                            store=Stores(outs=[out], remainders=[rem]))
    y, g, z, v, rem, out = b
    dispatch.sf_adamw([y], [g], [z], [v], backend=backend, **SF_KW, y_outs=[out],
                      remainders=[rem], sr=(3, 4), index_bases=[5])
    dispatch.sf_interpolate([y], [z], weight=0.3, backend=backend, p_outs=[out],
                            remainders=[rem])
    for s, t in zip(a, b):
        assert torch.equal(s.view(torch.int16), t.view(torch.int16))
    assert not torch.equal(a[0], _sf_inputs(0)[0])  # the step did move y


def test_the_spec_sees_a_store_and_the_chunked_torch_path_narrows_it():
    """The torch path of dispatch cuts 70,001 elements into 64K chunks, each
    with the store of its elements (remainder, out, index base); one spec
    call on the whole tensor gives the same bits."""
    from zero_sf import dispatch, spec
    from zero_sf.storage import Store, Stores

    a, b = _sf_inputs(1), _sf_inputs(1)
    y, g, z, v, rem, out = a
    dispatch.sf_adamw([y], [g], [z], [v], backend="torch", **SF_KW,
                      store=Stores(outs=[out], remainders=[rem], sr=(3, 4), index_bases=[2**32 - 9]))
    y, g, z, v, rem, out = b
    spec.sf_adamw_update(y, g, z, v, **SF_KW,
                         store=Store(out=out, remainder=rem, sr=(3, 4), index_base=2**32 - 9))
    for s, t in zip(a, b):
        assert torch.equal(s.view(torch.int16), t.view(torch.int16))


def test_the_math_takes_no_storage_keywords():
    """The seam: the update rules take a Store, not remainder/sr/index_base."""
    import inspect

    from zero_sf import spec

    for fn in (spec.sf_adamw_update, spec.rmsprop_update, spec.sf_interpolate):
        names = set(inspect.signature(fn).parameters)
        assert "store" in names
        assert not names & {"remainder", "sr", "index_base", "y_out", "param_out", "p_out"}


def test_misused_stores_are_refused_before_anything_is_written():
    from zero_sf import dispatch
    from zero_sf.storage import Stores

    y, g, z, v, rem, out = _sf_inputs(2, n=8)
    before = [t.clone() for t in (y, z, v, rem)]
    with pytest.raises(TypeError, match="not both"):
        dispatch.sf_adamw([y], [g], [z], [v], **SF_KW, store=Stores(), remainders=[rem])
    with pytest.raises(TypeError, match="unexpected keyword argument 'remainder'"):
        dispatch.sf_adamw([y], [g], [z], [v], **SF_KW, remainder=rem)
    with pytest.raises(TypeError, match="unexpected keyword argument 'y_outs'"):
        dispatch.rmsprop([y], [g], [v], lr=1e-2, alpha=0.9, eps=1e-8, y_outs=[out])
    with pytest.raises(ValueError, match="Stores.remainders has 2 entries for 1 tensors"):
        dispatch.sf_adamw([y], [g], [z], [v], **SF_KW, store=Stores(remainders=[rem, rem]))
    with pytest.raises(ValueError, match="needs index_bases"):
        dispatch.sf_adamw([y], [g], [z], [v], **SF_KW, store=Stores(sr=(0, 1)))
    with pytest.raises(ValueError, match="sr=.* does not apply"):
        dispatch.sf_interpolate([y], [z], weight=0.5, store=Stores(sr=(0, 1), index_bases=[0]))
    for s, t in zip(before, (y, z, v, rem)):
        assert torch.equal(s, t)
