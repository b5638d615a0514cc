"""Fused elementwise layers in Triton: RMSNorm (+ residual add), SiLU-and-multiply, and q/k RMSNorm + RoPE.

Each kernel reproduces the rounding of the torch reference layers in the activation dtype (every
intermediate that torch stores in that dtype is rounded to it here too), so bf16 results match the
reference bit for bit or within one rounding step. One program per row (token), or per (token, head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from allmos.kernels.pdl import pdl_enter, pdl_kwargs


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro,
                     n_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    pdl_enter(PDL)  # allmos.kernels.pdl: the next kernel may load its weights; the one before must be done
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
        x = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = (x * inv_rms).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (y * w).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * norm(x)`` over the last dim; with ``residual``: ``s = x + residual``, returns ``(norm(s), s)``.

    x, residual: [num_tokens, hidden] (last dim contiguous); weight: [hidden].
    """
    n_rows, n_cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    res = residual if residual is not None else x
    if n_rows:
        _rms_norm_kernel[(n_rows,)](
            x, res, weight, out, res_out, x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
            n_cols, eps, HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n_cols),
            num_warps=4 if n_cols <= 2048 else 8, **pdl_kwargs(x.device))
    return out if residual is None else (out, res_out)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    dtype = gate.dtype
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :d]) * x[:, d:]`` for x [num_tokens, 2 * d] -> [num_tokens, d]."""
    n_rows, two_d = x.shape
    d = two_d // 2
    out = torch.empty(n_rows, d, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(d))
    if n_rows:
        _silu_mul_kernel[(n_rows, triton.cdiv(d, block))](x, out, x.stride(0), out.stride(0), d, BLOCK=block)
    return out


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr,
                         stride_qkv, stride_qo, stride_ko, stride_cos, num_heads, eps,
                         HAS_NORM: tl.constexpr, HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # 0 .. num_heads + num_kv_heads - 1: q heads first, then k heads
    d = tl.arange(0, HALF)
    src = qkv_ptr + token * stride_qkv + head * (2 * HALF)
    x1 = tl.load(src + d)
    x2 = tl.load(src + HALF + d)
    dtype = x1.dtype
    is_q = head < num_heads
    if HAS_NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / (2 * HALF) + eps)
        w_ptr = tl.where(is_q, qw_ptr, kw_ptr)
        w1 = tl.load(w_ptr + d).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
        x1 = ((f1 * inv_rms).to(dtype).to(tl.float32) * w1).to(dtype)
        x2 = ((f2 * inv_rms).to(dtype).to(tl.float32) * w2).to(dtype)
    pos = tl.load(pos_ptr + token)
    cos = tl.load(cos_ptr + pos * stride_cos + d).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + d).to(dtype).to(tl.float32)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = ((a1 * cos).to(dtype).to(tl.float32) - (a2 * sin).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((a2 * cos).to(dtype).to(tl.float32) + (a1 * sin).to(dtype).to(tl.float32)).to(dtype)
    if is_q:
        dst = q_out_ptr + token * stride_qo + head * (2 * HALF)
    else:
        dst = k_out_ptr + token * stride_ko + (head - num_heads) * (2 * HALF)
    tl.store(dst + d, o1)
    tl.store(dst + HALF + d, o2)


def qk_norm_rope(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (when weights are given) followed by neox RoPE over the whole head.

    qkv [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]; cos/sin [num_positions, head_dim // 2]
    (float32 tables, rounded to the activation dtype as the reference does); positions [num_tokens] index
    the tables. Returns q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim].
    """
    num_tokens = qkv.shape[0]
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(num_tokens, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    has_norm = q_weight is not None
    if num_tokens:
        _qk_norm_rope_kernel[(num_tokens, num_heads + num_kv_heads)](
            qkv, q, k, q_weight if has_norm else cos, k_weight if has_norm else cos, cos, sin, positions,
            qkv.stride(0), q.stride(0), k.stride(0), cos.stride(0), num_heads, eps,
            HAS_NORM=has_norm, HALF=head_dim // 2, num_warps=1 if head_dim <= 128 else 2)
    return q, k
