"""Gated activation: ``silu(gate) * up`` over a packed ``[gate | up]`` input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from allmos.kernels import fused_layers as fused  # None without Triton


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
        if fused is not None and x.is_cuda and x.dim() == 2:
            return fused.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)  # in place on silu's own output: the same product, one temporary fewer
