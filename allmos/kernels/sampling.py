"""The sampler's random draw as one Triton kernel: per row, argmax of ``where(x * inv_t >= thr, x * inv_t,
-inf) + noise * g`` with ``g`` the Gumbel noise of the counter hash (``allmos.engine.sampler`` documents the
hash; its torch code gives the same noise bits). Raw tensors in, token ids out; no engine types.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

DRAW_CHUNK = 8192  # logits per program (a fixed size, never derived from the batch)
DRAW_BLOCK = 1024



@triton.jit
def _fmix32(x):
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)

@triton.jit
def _gumbel(idx, key_lo, key_hi):
    x = idx.to(tl.uint32) * 0x9E3779B1 + key_lo
    x = _fmix32(x)
    x = _fmix32(x ^ key_hi)
    u = ((x >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08
    return -tl.log(-tl.log(u))

@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr, row_stride, inv_t_ptr, noise_ptr, thr_ptr, key_lo_ptr, key_hi_ptr,
    best_val_ptr, best_idx_ptr, vocab_size, num_chunks,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALL_RANDOM: tl.constexpr,
):
    """Per (row, chunk): max and first argmax of where(z >= thr, z, -inf) + noise * g.

    The threshold select always runs (thr = -inf when no filter is on): it keeps
    the compiler from contracting x * inv_t + g into one FMA, whose rounding would
    differ from the filtered case and from the torch path.
    """
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    inv_t = tl.load(inv_t_ptr + row)
    thr = tl.load(thr_ptr + row)
    key_lo = tl.load(key_lo_ptr + row).to(tl.uint32, bitcast=True)
    key_hi = tl.load(key_hi_ptr + row).to(tl.uint32, bitcast=True)
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    chunk_len = tl.minimum(vocab_size - chunk * CHUNK, CHUNK)
    for start in range(0, chunk_len, BLOCK):
        idx = chunk * CHUNK + start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + idx, mask=idx < vocab_size, other=float("-inf")).to(tl.float32)
        z = x * inv_t
        z = tl.where(z >= thr, z, float("-inf"))
        g = _gumbel(idx, key_lo, key_hi)
        if not ALL_RANDOM:
            g = g * tl.load(noise_ptr + row)
        z = z + g
        better = z > best_val  # strict: each lane keeps its first maximum
        best_val = tl.where(better, z, best_val)
        best_idx = tl.where(better, idx, best_idx)
    top = tl.max(best_val, axis=0)
    first = tl.min(tl.where(best_val == top, best_idx, 2147483647), axis=0)
    tl.store(best_val_ptr + row * num_chunks + chunk, top)
    tl.store(best_idx_ptr + row * num_chunks + chunk, first)


@triton.jit
def _first_max_kernel(best_val_ptr, best_idx_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr):
    """Per row: the index kept by the first chunk holding the row's maximum (int64 into ``out``)."""
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    ok = c < num_chunks
    vals = tl.load(best_val_ptr + row * num_chunks + c, mask=ok, other=float("-inf"))
    idx = tl.load(best_idx_ptr + row * num_chunks + c, mask=ok, other=0)
    top = tl.max(vals, axis=0)
    first = tl.min(tl.where(ok & (vals == top), c, BLOCK_C), axis=0)
    tl.store(out_ptr + row, tl.sum(tl.where(c == first, idx, 0), axis=0).to(tl.int64))


def gumbel_argmax(
    x: torch.Tensor, inv_temperature: torch.Tensor, noise_scale: torch.Tensor, threshold: torch.Tensor | None,
    key_lo: torch.Tensor, key_hi: torch.Tensor, *, all_random: bool,
    chunk_size: int = DRAW_CHUNK, block_size: int = DRAW_BLOCK, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One read of x: [B, V] logits (any float dtype); inv_temperature, noise_scale, threshold: [B] float32
    (threshold None: no filter); key_lo, key_hi: [B] int32 (uint32 bits of the noise key). Returns [B] int64
    (``out`` when given: a contiguous [B] int64 tensor).

    Each program reduces ``chunk_size`` logits of one row; a second kernel combines a row's partial results
    to the first maximum of the row, the same index torch.argmax returns, whatever the chunk size.
    """
    batch, vocab = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if chunk_size % block_size:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of block_size {block_size}")
    num_chunks = triton.cdiv(vocab, chunk_size)
    best_val = torch.empty(batch, num_chunks, dtype=torch.float32, device=x.device)  # [B, C]
    best_idx = torch.empty(batch, num_chunks, dtype=torch.int32, device=x.device)  # [B, C]
    if threshold is None:
        threshold = torch.full((batch,), -math.inf, dtype=torch.float32, device=x.device)
    if batch:
        _gumbel_argmax_kernel[(batch, num_chunks)](
            x, x.stride(0), inv_temperature, noise_scale, threshold, key_lo, key_hi, best_val, best_idx, vocab,
            num_chunks, CHUNK=chunk_size, BLOCK=block_size, ALL_RANDOM=all_random, num_warps=4,
        )
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=x.device)
    elif out.shape != (batch,) or out.dtype != torch.int64 or out.stride(0) != 1:
        raise ValueError(f"out must be a contiguous [{batch}] int64 tensor, got {tuple(out.shape)} {out.dtype}")
    if batch:
        _first_max_kernel[(batch,)](best_val, best_idx, out, num_chunks,
                                    BLOCK_C=max(16, triton.next_power_of_2(num_chunks)), num_warps=1)
    return out
