"""zero_sf.sharding.offload.HostStaging: host copies shaped like the device
chunks, filled by grads_to_host and copied back by outs_to_device, and the
bytes they hold counted from the tensors.  (Offloaded training equals
training without offload: tests/sharding/test_zero.py and the scenarios.)"""

from __future__ import annotations

import torch

from zero_sf.sharding.offload import HostStaging, host_empty


def test_host_empty_is_a_cpu_tensor_like_its_model():
    like = torch.zeros(3, 5, dtype=torch.bfloat16)
    t = host_empty(like)
    assert t.device.type == "cpu" and t.shape == like.shape and t.dtype == torch.bfloat16
    assert host_empty(like, torch.float32).dtype == torch.float32
    assert not t.is_pinned()  # pinned only when the model lives on a CUDA device


def test_staging_round_trip_and_bytes():
    grads = [[torch.randn(8, dtype=torch.bfloat16), torch.randn(3, dtype=torch.bfloat16)],
             [torch.randn(5)]]
    params = [[torch.zeros(8, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16)],
              [torch.zeros(5)]]
    staging = HostStaging(grads, params)
    staging.grads_to_host()
    for host, dev in zip(sum(staging.grads, []), sum(grads, [])):
        assert torch.equal(host, dev) and host.data_ptr() != dev.data_ptr()
    for host in sum(staging.outs, []):
        host.fill_(1.5)
    staging.outs_to_device()
    assert all(torch.equal(p, torch.full_like(p, 1.5)) for p in sum(params, []))
    # (8 + 3) bf16 + 5 fp32, for the gradients and again for the outputs
    assert staging.nbytes() == 2 * ((8 + 3) * 2 + 5 * 4)
