"""Small-batch linear layers in Triton: ``y[M, N] = x[M, K] @ W[N, K]^T`` for decode batches (M up to 256).

At these sizes a projection is a read of its weight: every program owns ``BLOCK_N`` output features
(rows of W) for ``BLOCK_M`` input rows and walks the whole K dimension, so each weight byte is read from
memory exactly once per M tile (one tile for M <= BLOCK_M) and no split-K partials or reduce kernels
exist. Accumulation is float32.

Two inner products, chosen by ``BLOCK_M`` (a compile-time constant):
- ``BLOCK_M == 1``: a row reduction, ``sum(W_tile * x_row)`` over a ``[BLOCK_N, BLOCK_K]`` tile, for a few
  rows (``ROW_KERNEL_MAX_ROWS``); no tensor cores, no shared-memory staging, any power-of-two ``BLOCK_N``.
  Without a fused norm this is its own kernel (``_row_gemv_kernel``): it loads its weight tile first and
  then takes the rows of x one by one against it (with the whole K in one tile, each weight byte is read
  once for all rows). On Hopper it is launched with programmatic dependent launch (PDL), so that weight
  read starts while the kernel before it finishes; ``gdc_wait`` then holds the program until that kernel's
  writes (x among them) are visible (``allmos.kernels.pdl``).
- ``BLOCK_M >= 16``: ``tl.dot`` with the input rows padded to ``BLOCK_M`` (masked loads give zeros); the
  wasted MMA work costs nothing in a memory-bound kernel, and the pipelined loads keep many weight bytes
  in flight.

Optional fusions, all reproducing the rounding of the torch reference layers in the activation dtype:
- ``rms_norm_gemv``: the input is ``RMSNorm(x + residual)`` (``allmos.layers.norm.RMSNorm``): every program
  computes the norm of its rows itself (a first pass over K), and the programs of the first N tile write
  the residual sum ``x + residual``. Saves the norm kernel and a write + read of the normed activation.
- ``silu_mul=True``: W packs ``[gate | up]`` (2 * N rows); the program computes both halves of its columns
  and writes ``silu(gate) * up`` directly (``allmos.layers.activation.SiluAndMul``): saves a kernel and a
  write + read of the ``[M, 2 * N]`` intermediate.

No host synchronization, fixed grids from host-known sizes: the launches can be captured in CUDA graphs.
Which ``GemvConfig`` to use per batch size is measured at start-up (``allmos.kernels.gemv_tuning``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from allmos.kernels.pdl import pdl_enter, pdl_kwargs

ROW_KERNEL_MAX_ROWS = 16  # the row-reduction kernels compute rows one by one: for small decode batches only


@dataclass(frozen=True)
class GemvConfig:
    """Tile shape and launch parameters of one GEMV kernel variant (each distinct value compiles once)."""

    block_m: int  # 1: row-reduction kernel (M <= ROW_KERNEL_MAX_ROWS); 16 or more: tl.dot with rows padded
    block_n: int  # output features per program
    block_k: int  # input features per loop iteration
    num_warps: int = 4
    num_stages: int = 3

    def fits(self, m: int) -> bool:
        """Whether this config can run ``m`` input rows (the row-reduction kernel takes a few)."""
        return 1 <= m <= ROW_KERNEL_MAX_ROWS if self.block_m == 1 else m >= 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {value}")
        if self.block_m != 1 and (self.block_m < 16 or self.block_n < 16 or self.block_k < 16):
            raise ValueError(f"tl.dot tiles need block_m, block_n, block_k >= 16, got {self}")


@triton.jit
def _dot_accumulate(acc, xk, w, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += xk [BLOCK_M, BLOCK_K] @ w [BLOCK_N, BLOCK_K]^T in float32."""
    if USE_DOT:
        acc = tl.dot(xk, tl.trans(w), acc, input_precision=DOT_PRECISION)
    else:  # BLOCK_M == 1: xk [1, BLOCK_K] broadcasts over the weight rows
        acc += tl.sum(w.to(tl.float32) * xk.to(tl.float32), axis=1)[None, :]
    return acc


@triton.jit
def _normed_input(x_ptr, res_ptr, nw_ptr, res_out_ptr, rows, ks, mask, inv_rms, K, stride_xm, stride_rm,
                  stride_rom, res_rows, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """One [BLOCK_M, BLOCK_K] tile of the GEMV input: x, or RMSNorm(x + residual) rounded as the reference.

    With a residual, the sum ``x + residual`` (rounded to the activation dtype) is written to
    ``res_out`` for rows below ``res_rows`` (M in the first N tile's programs, 0 elsewhere)."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0)
    if HAS_NORM:
        dtype = x.dtype
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + rows[:, None] * stride_rm + ks[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(res_out_ptr + rows[:, None] * stride_rom + ks[None, :], x, mask=mask & (rows[:, None] < res_rows))
        nw = tl.load(nw_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)  # [BLOCK_K]
        normed = (x.to(tl.float32) * inv_rms[:, None]).to(dtype).to(tl.float32)
        x = (normed * nw[None, :]).to(dtype)
    return x


@triton.jit
def _row_inv_rms(x_ptr, res_ptr, rows, row_ok, K, eps, stride_xm, stride_rm,
                 HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """1 / rms of each row of ``x + residual`` (sum rounded to the activation dtype first): [BLOCK_M] fp32."""
    sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            mask = row_ok[:, None]
        else:
            mask = row_ok[:, None] & (ks[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + rows[:, None] * stride_rm + ks[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        xf = x.to(tl.float32)
        sum_sq += tl.sum(xf * xf, axis=1)
    return 1.0 / tl.sqrt(sum_sq / K + eps)


@triton.jit
def _epilogue(acc, acc_up, b_ptr, cols, col_ok, N, out_dtype: tl.constexpr, HAS_BIAS: tl.constexpr,
              SILU_MUL: tl.constexpr):
    """Bias, then ``silu(gate) * up`` rounded as the reference (linear output, silu(gate) and the product each
    in ``out_dtype``): float32 sums [BLOCK_N] or [BLOCK_M, BLOCK_N] (the bias broadcasts over rows) -> the same
    shape in ``out_dtype``."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if SILU_MUL:
            acc_up += tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)
    if SILU_MUL:
        gate = acc.to(out_dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_dtype).to(tl.float32)
        acc = act * acc_up.to(out_dtype).to(tl.float32)
    return acc.to(out_dtype)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, res_out_ptr,
    M, N, K, eps,
    stride_xm, stride_rm, stride_rom, stride_wn, stride_ym,
    HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M]
    row_ok = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
    col_ok = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    up_rows = w_ptr + (cols + N).to(tl.int64)[:, None] * stride_wn  # "up" half of [gate | up] (SILU_MUL)
    if HAS_NORM:
        inv_rms = _row_inv_rms(x_ptr, res_ptr, rows, row_ok, K, eps, stride_xm, stride_rm,
                               HAS_RESIDUAL, BLOCK_M, BLOCK_K, EVEN_K)
    else:
        inv_rms = tl.zeros([BLOCK_M], dtype=tl.float32)  # unused
    res_rows = tl.where(pid_n == 0, M, 0)  # only the first N tile writes the residual sum
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x_mask = row_ok[:, None]
            w_mask = col_ok[:, None]
        else:
            x_mask = row_ok[:, None] & (ks[None, :] < K)
            w_mask = col_ok[:, None] & (ks[None, :] < K)
        xk = _normed_input(x_ptr, res_ptr, nw_ptr, res_out_ptr, rows, ks, x_mask, inv_rms, K, stride_xm,
                           stride_rm, stride_rom, res_rows, HAS_NORM, HAS_RESIDUAL)
        w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0)
        acc = _dot_accumulate(acc, xk, w, BLOCK_M >= 16, DOT_PRECISION)
        if SILU_MUL:
            wu = tl.load(up_rows + ks[None, :], mask=w_mask, other=0.0)
            acc_up = _dot_accumulate(acc_up, xk, wu, BLOCK_M >= 16, DOT_PRECISION)
    y = _epilogue(acc, acc_up, b_ptr, cols, col_ok, N, y_ptr.dtype.element_ty, HAS_BIAS, SILU_MUL)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, y, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _row_dot(w_rows, x_ptr, ks, w_mask, K):
    """sum(W[cols, ks] * x[ks]) over one [BLOCK_N, BLOCK_K] tile: [BLOCK_N] float32."""
    w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0)
    x = tl.load(x_ptr + ks, mask=ks < K, other=0.0)
    return tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)


@triton.jit
def _row_times_tile(w, wu, w_rows, up_rows, x_row, y_row, b_ptr, cols, col_ok, ks, N, K, HAS_BIAS: tl.constexpr,
                    SILU_MUL: tl.constexpr, BLOCK_K: tl.constexpr):
    """One input row against the program's weights: the first K tile ``w`` / ``wu`` held in registers, the
    rest of K (past ``BLOCK_K``) read here; stores ``y_row[cols]``."""
    x = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)  # [BLOCK_K]
    acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)  # [BLOCK_N]
    if SILU_MUL:
        acc_up = tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
    else:
        acc_up = tl.zeros_like(acc)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + ks
        mask = col_ok[:, None] & (kk[None, :] < K)
        acc += _row_dot(w_rows, x_row, kk, mask, K)
        if SILU_MUL:
            acc_up += _row_dot(up_rows, x_row, kk, mask, K)
    y = _epilogue(acc, acc_up, b_ptr, cols, col_ok, N, y_row.dtype.element_ty, HAS_BIAS, SILU_MUL)
    tl.store(y_row + cols, y, mask=col_ok)


@triton.jit(do_not_specialize=["M"])
def _row_gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                     SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_ROW: tl.constexpr,
                     PDL: tl.constexpr):
    """y[m, cols] = W[cols, :] @ x[m, :] (then SiLU-and-mul) for the program's ``BLOCK_N`` output features, one
    input row after the other. The first K tile of the weights is loaded before anything else and reused by
    every row (with K <= BLOCK_K, the whole weight slice: each weight byte is read once for all M rows; past
    BLOCK_K the rest is read per row). With ``PDL`` the program lets the next launch start and waits for the
    previous kernel right after issuing that first load (nothing is read from or written to activations
    before the wait). ``ONE_ROW`` (M == 1) compiles without the row loop (measured faster at one row)."""
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N] output features
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols[:, None] * stride_wn  # [BLOCK_N, 1]
    up_rows = w_ptr + (cols + N)[:, None] * stride_wn  # "up" half of [gate | up] (SILU_MUL)
    w_mask = col_ok[:, None] & (ks[None, :] < K)
    w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0)  # [BLOCK_N, BLOCK_K]
    if SILU_MUL:
        wu = tl.load(up_rows + ks[None, :], mask=w_mask, other=0.0)
    else:
        wu = w
    pdl_enter(PDL)
    if ONE_ROW:
        _row_times_tile(w, wu, w_rows, up_rows, x_ptr, y_ptr, b_ptr, cols, col_ok, ks, N, K, HAS_BIAS, SILU_MUL,
                        BLOCK_K)
    else:
        for m in range(M):
            _row_times_tile(w, wu, w_rows, up_rows, x_ptr + m * stride_xm, y_ptr + m * stride_ym, b_ptr, cols,
                            col_ok, ks, N, K, HAS_BIAS, SILU_MUL, BLOCK_K)


def _launch_row(x, weight, bias, y, n: int, config: GemvConfig, silu_mul: bool) -> None:
    """The row kernel (``_row_gemv_kernel``) over all M rows of x [M, K] into y [M, N]."""
    m, k = x.shape
    _row_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, SILU_MUL=silu_mul, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        ONE_ROW=m == 1, num_warps=config.num_warps, num_stages=config.num_stages, **pdl_kwargs(x.device))


def _dot_precision(dtype: torch.dtype) -> str:
    """Exact float32 products for float32 inputs (the tests' oracle dtype); the default for 16-bit."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig,
                silu_mul: bool) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv needs x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("gemv needs a contiguous last (K) dimension in x and weight")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"gemv: x ({x.dtype}, {x.device}) and weight ({weight.dtype}, {weight.device}) differ")
    if silu_mul and weight.shape[0] % 2:
        raise ValueError(f"gemv silu_mul needs a packed [gate | up] weight of even rows, got {weight.shape[0]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"gemv bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not config.fits(x.shape[0]):
        raise ValueError(f"{config} cannot run M={x.shape[0]} rows (block_m 1 takes 1 to {ROW_KERNEL_MAX_ROWS})")


def _output(out: torch.Tensor | None, shape: tuple[int, int], like: torch.Tensor, what: str) -> torch.Tensor:
    """``out`` checked (shape, dtype, contiguous rows), or a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.stride(-1) != 1:
        raise ValueError(f"{what} must be {shape} {like.dtype} with a contiguous last dim, got "
                         f"{tuple(out.shape)} {out.dtype}")
    return out


def _launch(x, residual, norm_weight, eps, weight, bias, config: GemvConfig, silu_mul: bool,
            res_out: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    y = _output(out, (m, n), x, "out")
    if m == 0 or n == 0:
        return y
    has_norm, has_res = norm_weight is not None, residual is not None
    if config.block_m == 1 and not has_norm:
        _launch_row(x, weight, bias, y, n, config, silu_mul)
        return y
    res = residual if has_res else x
    res_out = res_out if res_out is not None else y
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
    _gemv_kernel[grid](
        x, res, norm_weight if has_norm else weight, weight, bias if bias is not None else weight, y, res_out,
        m, n, k, eps,
        x.stride(0), res.stride(0), res_out.stride(0), weight.stride(0), y.stride(0),
        HAS_NORM=has_norm, HAS_RESIDUAL=has_res, HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


def gemv(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] ([2 * N, K] packed gate | up with silu_mul)
    bias: torch.Tensor | None,  # [N] (or [2 * N])
    config: GemvConfig,
    *,
    silu_mul: bool = False,
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:  # [M, N]
    """``F.linear(x, weight, bias)`` (then ``silu(gate) * up`` with ``silu_mul``) in one kernel."""
    _check_args(x, weight, bias, config, silu_mul)
    return _launch(x, None, None, 0.0, weight, bias, config, silu_mul, None, out)


def rms_norm_gemv(
    x: torch.Tensor,  # [M, K]
    residual: torch.Tensor | None,  # [M, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K] ([2 * N, K] packed gate | up with silu_mul)
    bias: torch.Tensor | None,
    config: GemvConfig,
    *,
    silu_mul: bool = False,
    out: torch.Tensor | None = None,  # [M, N]
    residual_out: torch.Tensor | None = None,  # [M, K]
) -> tuple[torch.Tensor, torch.Tensor]:  # ([M, N], [M, K])
    """``h, s = RMSNorm(x, residual)`` then ``gemv(h, ...)``, in one kernel; returns ``(y, s)``.

    ``s = x + residual`` (``residual_out`` or a new tensor) or ``x`` itself without a residual, as
    ``RMSNorm.forward`` returns it.
    """
    _check_args(x, weight, bias, config, silu_mul)
    if norm_weight.shape != (x.shape[1],) or norm_weight.dtype != x.dtype:
        raise ValueError(f"norm weight must be [{x.shape[1]}] {x.dtype}, got {tuple(norm_weight.shape)} "
                         f"{norm_weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual must be {tuple(x.shape)} with a contiguous last dim, got {tuple(residual.shape)}")
    res_out = _output(residual_out, tuple(x.shape), x, "residual_out") if residual is not None else None
    y = _launch(x, residual, norm_weight, eps, weight, bias, config, silu_mul, res_out, out)
    return y, (res_out if res_out is not None else x)


def default_gemv_config(m: int) -> GemvConfig:
    """The fixed rule where nothing was measured (the CPU interpreter, tests): one row -> row reduction,
    more -> the smallest tl.dot tile that holds all rows (at most 128; larger batches use several M tiles)."""
    if m == 1:
        return GemvConfig(block_m=1, block_n=16, block_k=256, num_warps=4, num_stages=1)
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    return GemvConfig(block_m=block_m, block_n=16, block_k=max(64, min(256, 8192 // block_m)), num_warps=4,
                      num_stages=3)


def candidate_configs(m: int) -> list[GemvConfig]:
    """The few configurations start-up tuning times for ``m`` rows.

    ``block_k`` keeps the staged input tile at 16 KiB or less (``block_m * block_k <= 8192`` 16-bit values),
    so 3-4 stages fit shared memory beside the weight tiles. One row also tries the row-reduction kernel
    with narrow tiles (more programs for small N: o_proj and down_proj have N = hidden). Above 64 rows the
    tiles are GEMM-shaped (128 rows; two M tiles at 256 rows, the second reading the weights from L2).
    """
    if m > 64:
        return [GemvConfig(128, 32, 64, 4, 4), GemvConfig(128, 64, 64, 8, 3), GemvConfig(128, 128, 64, 8, 3)]
    block_m = max(16, triton.next_power_of_2(m))
    block_k = min(256, 8192 // block_m)
    dot = [GemvConfig(block_m, 16, block_k, 4, 4), GemvConfig(block_m, 32, block_k, 4, 4),
           GemvConfig(block_m, 64, max(64, block_k // 2), 4, 3)]
    if m == 1:
        return [GemvConfig(1, 8, 512, 4, 1), GemvConfig(1, 16, 256, 4, 1)] + dot[:2]
    return dot
