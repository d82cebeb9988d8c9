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
