"""Projections through the small-batch Triton GEMV (``allmos.kernels.gemv``) where start-up timing chose it.

A linear module runs the GEMV when its ``gemv_table`` (a ``GemvTable``, set at start-up on CUDA by
``DecoderForCausalLM.enable_decode_kernels``; None everywhere else) has a Triton choice for the call's
number of rows; otherwise ``F.linear``, the reference path. ``norm_then_linear`` also fuses the RMSNorm
before a projection and the SiLU-and-multiply after it when the table says so. Each path computes the
same values as the module sequence it replaces, up to float32 summation order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from allmos.kernels import gemv as gemv_kernels  # None without Triton

if TYPE_CHECKING:
    from allmos.kernels.gemv_tuning import GemvChoice
    from allmos.layers.activation import SiluAndMul
    from allmos.layers.norm import RMSNorm


def gemv_choice(linear: nn.Module, x: torch.Tensor) -> GemvChoice | None:
    """The tuned choice for this call (None: no table, or the batch is above the tuned sizes)."""
    table = getattr(linear, "gemv_table", None)
    if table is None or gemv_kernels is None or x.dim() != 2 or x.stride(-1) != 1:
        return None
    return table.lookup(x.shape[0])


def project(linear: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, linear.weight, bias)``, through the Triton GEMV where the table chose it."""
    choice = gemv_choice(linear, x)
    if choice is None or choice.config is None:
        return F.linear(x, linear.weight, bias)
    return gemv_kernels.gemv(x, linear.weight, bias, choice.config)


def norm_then_linear(
    norm: RMSNorm,
    linear: nn.Module,
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor | None,  # [num_tokens, hidden]
    act: SiluAndMul | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(linear(norm(s))), s)`` with ``s = x + residual`` (``s = x`` without a residual), as
    ``norm(x, residual)`` then ``linear`` then ``act`` compute it. One kernel where the table fuses the
    norm; the activation joins the GEMV whenever the GEMV runs."""
    choice = gemv_choice(linear, x)
    if choice is not None and choice.config is not None and choice.fuse_norm:
        return gemv_kernels.rms_norm_gemv(x, residual, norm.weight, norm.eps, linear.weight, linear.bias,
                                          choice.config, silu_mul=act is not None)
    if residual is None:
        h, residual = norm(x), x
    else:
        h, residual = norm(x, residual)
    if choice is not None and choice.config is not None:
        return gemv_kernels.gemv(h, linear.weight, linear.bias, choice.config, silu_mul=act is not None), residual
    y = linear(h)
    return (y if act is None else act(y)), residual
