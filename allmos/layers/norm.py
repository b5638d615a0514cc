"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from allmos.kernels import fused_layers as fused  # None without Triton


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> [..., hidden]
        """``weight * (xf * rsqrt(mean(xf^2) + eps)).to(x.dtype)`` with ``xf = x`` in float32, as transformers
        computes it. In-place steps on a float32 copy of ``x`` (never ``x`` itself): the same values with fewer
        temporaries, which costs less than the arithmetic on a decode step's rows."""
        xf = x.to(torch.float32, copy=True)
        inv_rms = xf.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()  # [..., 1]
        return self.weight * xf.mul_(inv_rms).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``, or with ``residual``: ``s = x + residual`` and returns ``(norm(s), s)``.

        On CUDA a 2-D input goes through one fused Triton kernel (same rounding as below)."""
        if fused is not None and x.is_cuda and x.dim() == 2 and x.stride(-1) == 1:
            return fused.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
