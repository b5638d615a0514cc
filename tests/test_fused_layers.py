"""Fused Triton layers against the torch reference layers (interpreter on CPU, natively on a GPU)."""

from __future__ import annotations

import pytest
import torch

from allmos.kernels import fused_layers as fused
from allmos.layers.norm import RMSNorm
from allmos.layers.rotary import RopeConfig, get_rope

# The CPU cases run the kernels through the Triton interpreter (CI); the cuda cases run them natively
# (`pytest -m gpu` on a GPU machine).
CASES = [("cpu", torch.float32),
         pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
         pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)]


def close(a, b, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("DEVICE,dtype", CASES)
@pytest.mark.parametrize("hidden", [64, 96, 1024])
def test_rms_norm_with_and_without_residual(DEVICE, dtype, hidden):
    norm = RMSNorm(hidden, eps=1e-6).to(DEVICE)
    norm.weight.data = torch.randn(hidden, device=DEVICE)
    norm = norm.to(dtype)
    x = torch.randn(7, hidden, device=DEVICE, dtype=dtype)
    r = torch.randn(7, hidden, device=DEVICE, dtype=dtype)
    close(fused.rms_norm(x, norm.weight, norm.eps), norm._norm(x), dtype)
    out, s = fused.rms_norm(x, norm.weight, norm.eps, r)
    close(s, x + r, dtype)
    close(out, norm._norm(x + r), dtype)


@pytest.mark.parametrize("DEVICE,dtype", CASES)
def test_silu_and_mul(DEVICE, dtype):
    x = torch.randn(5, 2 * 80, device=DEVICE, dtype=dtype)
    gate, up = x.chunk(2, dim=-1)
    close(fused.silu_and_mul(x), torch.nn.functional.silu(gate) * up, dtype)


@pytest.mark.parametrize("DEVICE,dtype", CASES)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (2, 2, 64), (16, 8, 128)])
def test_qk_norm_rope(DEVICE, dtype, qk_norm, heads, kv_heads, head_dim):
    rope = get_rope(RopeConfig(head_dim=head_dim, rotary_dim=head_dim, max_position=512, theta=10000.0,
                               scaling=None), device=DEVICE)
    tokens = 9
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=dtype)
    positions = torch.randint(0, 512, (tokens,), device=DEVICE)
    qn, kn = RMSNorm(head_dim).to(DEVICE), RMSNorm(head_dim).to(DEVICE)
    qn.weight.data, kn.weight.data = torch.randn(head_dim, device=DEVICE), torch.randn(head_dim, device=DEVICE)
    qn, kn = qn.to(dtype), kn.to(dtype)
    q_ref = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim)
    k_ref = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    if qk_norm:
        q_ref, k_ref = qn._norm(q_ref), kn._norm(k_ref)
    q_ref, k_ref = rope(positions, q_ref, k_ref)
    q, k = fused.qk_norm_rope(qkv, heads, kv_heads, head_dim, qn.weight if qk_norm else None,
                              kn.weight if qk_norm else None, 1e-6, rope.cos_cache, rope.sin_cache, positions)
    close(q, q_ref, dtype)
    close(k, k_ref, dtype)
