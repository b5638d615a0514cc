"""The torch layers' in-place arithmetic against the out-of-place formulas they stand for, bit for bit:
RMSNorm against transformers' LlamaRMSNorm, SiLU-and-multiply against ``silu(gate) * up``. The inputs must
come back untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from allmos.layers.activation import SiluAndMul
from allmos.layers.norm import RMSNorm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (16, 576), (3, 5, 64)], ids=["decode-row", "rows", "heads"])
def test_rms_norm_bitwise_like_transformers(dtype, shape):
    g = torch.Generator().manual_seed(0)
    hidden = shape[-1]
    ours, theirs = RMSNorm(hidden, eps=1e-5), LlamaRMSNorm(hidden, eps=1e-5)
    weight = torch.randn(hidden, generator=g)
    ours.weight.data, theirs.weight.data = weight.clone(), weight.clone()
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = (torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 8).to(dtype)
    residual = torch.randn(*shape, generator=g).to(dtype)
    x_before, residual_before = x.clone(), residual.clone()
    assert torch.equal(ours(x), theirs(x))
    normed, summed = ours(x, residual)
    assert torch.equal(summed, x + residual) and torch.equal(normed, theirs(x + residual))
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)
    if len(shape) == 3:  # a strided view, as the q/k norm gets from a fused q/k/v output
        view = torch.randn(shape[0], 2 * shape[1], hidden, generator=g).to(dtype)[:, 1::2]
        assert torch.equal(ours(view), theirs(view))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_bitwise(dtype):
    x = torch.randn(5, 2 * 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    before = x.clone()
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(SiluAndMul()(x), F.silu(gate) * up)
    assert torch.equal(x, before)
