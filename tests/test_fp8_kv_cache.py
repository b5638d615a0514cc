"""The fp8 KV cache (``kv_cache_dtype="fp8"``): the option, the sizing, the torch reference's rounding, and
every Triton kernel that writes or reads the cache against the torch path on the same fp8 cache.

CPU cases run the kernels through the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest.py
without CUDA); ``@pytest.mark.gpu`` cases run them natively on realistic shapes. Caches start as NaN (fp8's
NaN bit pattern) so a kernel that writes a slot it must not touch, or reads one it must not read, fails.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from allmos.attention.metadata import AttentionMetadata
from allmos.attention.torch_backend import TorchAttentionBackend
from allmos.attention.torch_ref import (
    FP8_E4M3_MAX,
    FP8_KV_DTYPE,
    dequantize_kv,
    paged_attention_ref,
    quantize_kv,
    store_kv_cache_ref,
)
from allmos.config import EngineConfig
from allmos.engine.kv_cache import KVCacheSpec, cpu_num_blocks, gpu_num_blocks

F8 = FP8_KV_DTYPE
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                       reason="CPU tensors run Triton kernels only under TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAD_BLOCK_ID = 2**30  # block-table padding: reading it would fault


def scales(k: float, v: float, device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([k], dtype=torch.float32, device=device),
            torch.tensor([v], dtype=torch.float32, device=device))


def nan_cache(shape, device: str = DEVICE) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=device).to(F8)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def wide_values(shape, gen: torch.Generator) -> torch.Tensor:
    """Normal values spread over 1e-4 .. 1e3 in magnitude: subnormal fp8, normal, and saturating ones."""
    return torch.randn(shape, generator=gen) * torch.exp(torch.empty(shape).uniform_(-9, 7, generator=gen))


# ---------------------------------------------------------------- the option and the sizing

@pytest.mark.parametrize("name", ["fp8", "fp8_e4m3"])
def test_kv_cache_dtype_fp8_resolves_to_e4m3(name):
    cfg = EngineConfig.from_kwargs(None, kv_cache_dtype=name, device="cpu")
    assert cfg.resolved_kv_cache_dtype(torch.bfloat16) == F8
    assert EngineConfig.from_kwargs(None, device="cpu").resolved_kv_cache_dtype(torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("bad", ["fp8_e5m2", "int8", "bfloat16", "FP8", "", None, 8, torch.float8_e4m3fn])
def test_bad_kv_cache_dtype_is_a_value_error_naming_the_field(bad):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig.from_kwargs(None, kv_cache_dtype=bad, device="cpu")


def test_fp8_cache_holds_twice_the_tokens_of_bf16_in_the_same_memory():
    bf16 = KVCacheSpec(num_layers=28, num_kv_heads=8, head_dim=128, block_size=256, dtype=torch.bfloat16)
    fp8 = KVCacheSpec(num_layers=28, num_kv_heads=8, head_dim=128, block_size=256, dtype=F8)
    assert fp8.bytes_per_token == 2 * 28 * 8 * 128  # K and V, one byte an element
    assert bf16.bytes_per_block == 2 * fp8.bytes_per_block
    gib = 1 << 30
    gpu = [gpu_num_blocks(s, 80 * gib, 70 * gib, 2 * gib, 0.9) for s in (bf16, fp8)]
    assert gpu[1] in (2 * gpu[0], 2 * gpu[0] + 1)  # the same bytes, floored to whole blocks
    cpu = [cpu_num_blocks(s, max_model_len=4096, max_num_seqs=512, budget_bytes=gib) for s in (bf16, fp8)]
    assert cpu[1] == 2 * cpu[0]
    cache = fp8.allocate(3, torch.device("cpu"))
    assert cache[0][0].dtype == F8 and cache[0][0].shape == (3, 256, 8, 128)


# ---------------------------------------------------------------- the reference rounding (torch_ref)

def test_quantize_rounds_to_nearest_even_and_saturates():
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # +0 .. 448, every finite positive e4m3 value, ascending
    grid = codes.view(F8).float()
    mid = (grid[1:] + grid[:-1]) / 2  # exact ties in float32
    q = quantize_kv(mid, F8, None)
    lower_even = (codes[:-1] % 2 == 0)  # ties go to the even code
    assert torch.equal(bits(q), torch.where(lower_even, codes[:-1], codes[1:]))
    assert torch.equal(bits(quantize_kv(-mid, F8, None)), bits(quantize_kv(mid, F8, None)) | 0x80)
    big = torch.tensor([448.0, 463.9, 464.0, 1e6, float("inf")])
    assert torch.equal(quantize_kv(big, F8, None).float(), torch.full((5,), FP8_E4M3_MAX))
    assert torch.equal(quantize_kv(-big, F8, None).float(), torch.full((5,), -FP8_E4M3_MAX))


@pytest.mark.parametrize("scale", [1.0, 0.0123, 7.5])
def test_store_then_read_round_trip_within_half_an_fp8_step(scale):
    """``store_kv_cache_ref`` then ``dequantize_kv`` of the gathered slots: within half a step of e4m3 (2^-4
    relative, 2^-10 * scale absolute below the normal range), saturating at 448 * scale."""
    gen = torch.Generator().manual_seed(1)
    key, value = wide_values((40, 2, 16), gen) * scale, wide_values((40, 2, 16), gen) * scale
    k_cache, v_cache = nan_cache((8, 8, 2, 16), "cpu"), nan_cache((8, 8, 2, 16), "cpu")
    slots = torch.randperm(64, generator=gen)[:40]
    k_scale, v_scale = scales(scale, 2 * scale, "cpu")
    store_kv_cache_ref(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    for x, cache, s in ((key, k_cache, scale), (value, v_cache, 2 * scale)):
        read = dequantize_kv(cache.view(-1, 2, 16)[slots], torch.tensor([s]))
        target = x.clamp(-FP8_E4M3_MAX * s, FP8_E4M3_MAX * s)
        err = (read - target).abs()
        bound = torch.maximum(target.abs() * 2**-4, torch.full_like(target, 2**-10 * s)) * (1 + 1e-6)
        assert (err <= bound).all(), float((err / bound).max())
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert k_cache.view(-1, 2, 16)[untouched].float().isnan().all()


def test_non_fp8_caches_ignore_the_scales():
    x = torch.randn(5, 2, 8)
    assert torch.equal(quantize_kv(x, torch.bfloat16, torch.tensor([3.0])), x.to(torch.bfloat16))
    assert torch.equal(dequantize_kv(x.to(torch.bfloat16), torch.tensor([3.0])), x.to(torch.bfloat16).float())
