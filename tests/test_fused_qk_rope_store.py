"""The fused q/k-norm + RoPE + K/V store kernel against the torch reference layers and the reference store.

CPU cases run through the Triton interpreter (CI); ``@pytest.mark.gpu`` cases run natively on larger
shapes in float32 and bfloat16. Caches start as NaN: a slot the kernel must not touch stays NaN, every
slot it must write holds the reference value.
"""

from __future__ import annotations

import os

import pytest
import torch

from allmos.attention.torch_ref import store_kv_cache_ref
from allmos.kernels import fused_layers
from allmos.kernels.fused_qk_rope_store import qk_norm_rope_store
from allmos.layers.norm import RMSNorm
from allmos.layers.rotary import RopeConfig, get_rope

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="CPU tensors run Triton kernels only under TRITON_INTERPRET=1")
CASES = [pytest.param("cpu", torch.float32, marks=needs_interpreter),
         pytest.param("cpu", torch.float16, marks=needs_interpreter),
         pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
         pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def run_case(device, dtype, heads, kv_heads, head_dim, tokens, block_size, qk_norm, seed):
    gen = torch.Generator().manual_seed(seed)
    rope = get_rope(RopeConfig(head_dim=head_dim, rotary_dim=head_dim, max_position=4096, theta=10000.0,
                               scaling=None), device=device)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device=device, dtype=dtype)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
    q_norm, k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
    q_norm.weight.data, k_norm.weight.data = torch.randn(head_dim, generator=gen), torch.randn(head_dim, generator=gen)
    q_norm, k_norm = q_norm.to(device=device, dtype=dtype), k_norm.to(device=device, dtype=dtype)
    num_blocks = tokens // block_size + 3
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = k_cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(device)
    slots[:: 5] = -1  # padded rows: nothing stored
    q = qk_norm_rope_store(qkv, heads, kv_heads, head_dim, q_norm.weight if qk_norm else None,
                           k_norm.weight if qk_norm else None, 1e-6, rope.cos_cache, rope.sin_cache, positions,
                           k_cache, v_cache, slots)

    # the torch reference layers: per-head RMSNorm, the rotary module, the reference store
    q_ref = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim)
    k_ref = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    v_ref = qkv[:, (heads + kv_heads) * head_dim:].reshape(tokens, kv_heads, head_dim)
    if qk_norm:
        q_ref, k_ref = q_norm._norm(q_ref), k_norm._norm(k_ref)
    q_ref, k_ref = rope(positions, q_ref, k_ref)
    k_expected = torch.full_like(k_cache, float("nan"))
    v_expected = torch.full_like(v_cache, float("nan"))
    store_kv_cache_ref(k_ref, v_ref, k_expected, v_expected, slots)

    tol = dict(atol=TOL[dtype], rtol=TOL[dtype], equal_nan=True)
    torch.testing.assert_close(q.float(), q_ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k_cache.float(), k_expected.float(), **tol)
    assert torch.equal(v_cache.isnan(), v_expected.isnan())  # v is copied: exactly
    assert torch.equal(v_cache.nan_to_num(), v_expected.nan_to_num())
    return qkv, positions, q_norm, k_norm, rope, q, k_cache, slots


@pytest.mark.parametrize("DEVICE,dtype", CASES)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (2, 2, 64), (16, 8, 128)])
@pytest.mark.parametrize("tokens", [3, 21])  # both head tilings (head_block_for)
def test_matches_reference(DEVICE, dtype, qk_norm, heads, kv_heads, head_dim, tokens):
    run_case(DEVICE, dtype, heads, kv_heads, head_dim, tokens, 16, qk_norm, seed=tokens + head_dim)


@pytest.mark.parametrize("DEVICE,dtype", CASES[:2] + CASES[3:])
def test_bitwise_equal_to_unfused_kernels(DEVICE, dtype):
    """Same rounding as ``fused_layers.qk_norm_rope`` followed by the store: q and k bit for bit."""
    heads, kv_heads, head_dim = 4, 2, 64
    qkv, positions, q_norm, k_norm, rope, q, k_cache, slots = run_case(DEVICE, dtype, heads, kv_heads, head_dim,
                                                                       9, 16, True, seed=3)
    q_old, k_old = fused_layers.qk_norm_rope(qkv, heads, kv_heads, head_dim, q_norm.weight, k_norm.weight, 1e-6,
                                             rope.cos_cache, rope.sin_cache, positions)
    assert torch.equal(q, q_old)
    keep = slots >= 0
    flat = k_cache.view(-1, kv_heads, head_dim)
    assert torch.equal(flat[slots[keep]], k_old[keep])


@needs_interpreter
def test_bad_arguments_raise_value_error():
    rope = get_rope(RopeConfig(head_dim=32, rotary_dim=32, max_position=64, theta=10000.0, scaling=None))
    qkv = torch.randn(3, 8 * 32)
    cache = torch.zeros(2, 16, 2, 32)
    args = (None, None, 1e-6, rope.cos_cache, rope.sin_cache, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="qkv must be"):
        qk_norm_rope_store(qkv, 4, 3, 32, *args, cache, cache.clone(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="slot_mapping"):
        qk_norm_rope_store(qkv, 4, 2, 32, *args, cache, cache.clone(), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="k_cache heads"):
        qk_norm_rope_store(qkv, 4, 2, 32, *args, cache[:, :, :1].contiguous(), cache[:, :, :1].contiguous(),
                           torch.zeros(3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_model_shapes_on_gpu(dtype, block_size, tokens):
    run_case("cuda", dtype, 16, 8, 128, tokens, block_size, True, seed=tokens)
