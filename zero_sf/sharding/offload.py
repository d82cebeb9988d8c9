"""ZeRO-Offload for :class:`~zero_sf.ZeroOptimizer` (``offload="cpu"``): the
fp32 master, ``z`` and ``exp_avg_sq`` of this rank's shard live in host
memory and the update runs on the CPU (the fused CPU backend).

This module only moves bytes.  Per bucket chunk it keeps two host staging
buffers: the gradient shard (device -> host before the step) and the
updated ``y`` in the model's dtype (host -> device after the step or a
train/eval switch, before the all-gather).  Host buffers are pinned when a
CUDA device is present, and the copies are issued ``non_blocking`` and
waited for once per direction, so a bucket's copy overlaps the next bucket's
issue.  On a CPU-only machine the copies are plain host copies and the
numbers are those of the non-offloaded optimizer, bit for bit (tested); the
GPU overlap is unmeasured until a GPU run.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["HostStaging", "host_empty"]


def host_empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty CPU tensor shaped like ``like``; pinned when CUDA is in use."""
    pin = like.is_cuda and torch.cuda.is_available()
    return torch.empty(like.shape, dtype=dtype or like.dtype, device="cpu", pin_memory=pin)


class HostStaging:
    """Host copies of the gradient chunks and of the model's parameter chunks."""

    def __init__(self, grad_chunks: list[list[Tensor]], param_chunks: list[list[Tensor]]) -> None:
        self.device_grads = grad_chunks
        self.device_params = param_chunks
        self.grads = [[host_empty(g) for g in chunks] for chunks in grad_chunks]
        self.outs = [[host_empty(p) for p in chunks] for chunks in param_chunks]

    @staticmethod
    @torch.no_grad()
    def _copy(dst_lists: list[list[Tensor]], src_lists: list[list[Tensor]]) -> None:
        """Issue every copy non-blocking, then wait once (on CUDA)."""
        cuda = False
        for dsts, srcs in zip(dst_lists, src_lists):
            for dst, src in zip(dsts, srcs):
                dst.copy_(src, non_blocking=True)
                cuda = cuda or dst.is_cuda or src.is_cuda
        if cuda:
            torch.cuda.current_stream().synchronize()

    def grads_to_host(self) -> None:
        """This rank's (reduced) gradient chunks into host memory."""
        self._copy(self.grads, self.device_grads)

    def outs_to_device(self) -> None:
        """The updated y (model dtype) into this rank's chunks of the model."""
        self._copy(self.device_params, self.outs)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for chunks in self.grads + self.outs for t in chunks)
