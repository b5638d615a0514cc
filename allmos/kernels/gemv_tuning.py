"""Start-up choice of the small-batch projection kernels, per batch size, from timings on this device.

A projection *site* (``GemvSignature``: the shape and what is fused around it) is timed at each decode
batch size on fresh random tensors of its shape, against the path it replaces: the torch path (cuBLAS
``F.linear``, with the fused RMSNorm and SiLU-mul kernels before and after it where the site has them).
Candidates: every ``gemv.candidate_configs`` tile with the norm fused into the GEMV, and the fastest of
those tiles again behind a separate norm kernel (the fused norm re-reads the input once per program,
which can lose at larger batches; above ``FUSED_NORM_MAX_BATCH`` rows only the separate norm is timed).
Ties go to the torch path. The fastest wins; the result (``GemvTable``) maps a batch size to a
``GemvChoice``. Times are medians of ``triton.testing.do_bench`` (L2 flushed before each run, as in a
decode step where each layer's weights come from memory).

Results are memoized per process (signature, sizes, device): every engine of a process makes the same
choices, so two engines (e.g. a captured and an eager one) compute bit-identical results.
"""

from __future__ import annotations

import functools
import logging
import math
from bisect import bisect_left
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from allmos.kernels import fused_layers
from allmos.kernels.gemv import GemvConfig, candidate_configs, gemv, rms_norm_gemv

logger = logging.getLogger("allmos")

MAX_GEMV_BATCH = 256  # larger batches keep cuBLAS
FUSED_NORM_MAX_BATCH = 64  # above this the norm inside the GEMV (recomputed per program) is not even timed
LARGE_BATCH_SIZES = (96, 128, 192, 256)  # timed above 64 rows (not every captured size: start-up time)
WARMUP_MS, REP_MS = 2, 8  # do_bench budget per candidate (about 0.1 ms per run with the L2 flush)


@dataclass(frozen=True)
class GemvSignature:
    """What a projection site computes, independent of its weights' values."""

    n: int  # output features (the activation width with silu_mul; the weight then has 2 * n rows)
    k: int  # input features
    dtype: torch.dtype
    has_bias: bool = False
    norm: bool = False  # the input is RMSNorm(x + residual), fusable into the GEMV
    silu_mul: bool = False  # the output is silu(gate) * up of a packed [gate | up] projection


@dataclass(frozen=True)
class GemvChoice:
    """How one site runs at one batch size: ``config`` None is the torch path."""

    config: GemvConfig | None
    fuse_norm: bool = False  # norm sites: RMSNorm inside the GEMV (else the separate norm kernel)
    time_us: float = math.nan  # measured median (nan where nothing was measured)

    def describe(self) -> str:
        if self.config is None:
            return "torch"
        c = self.config
        kind = "rows" if c.block_m == 1 else f"dot{c.block_m}"
        return f"{kind} n{c.block_n} k{c.block_k} w{c.num_warps} s{c.num_stages}{' +norm' if self.fuse_norm else ''}"


@dataclass(frozen=True)
class GemvTable:
    """Per batch size (ascending), the choice made; a batch takes the entry of the smallest size that
    holds it (decode graphs run padded to those sizes); larger batches take the torch path."""

    sizes: tuple[int, ...]
    choices: tuple[GemvChoice, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.choices) or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"GemvTable needs ascending distinct sizes, one choice each: {self.sizes}")

    def lookup(self, m: int) -> GemvChoice | None:
        """The choice for ``m`` rows, or None (torch path) above the largest size."""
        i = bisect_left(self.sizes, m)
        return self.choices[i] if i < len(self.choices) else None

    def describe(self) -> str:
        return ", ".join(f"{s}: {c.describe()} {c.time_us:.1f}us" for s, c in zip(self.sizes, self.choices))


def fixed_table(sizes: tuple[int, ...], fuse_norm: bool = True) -> GemvTable:
    """Triton everywhere with ``gemv.default_gemv_config`` (no timing): for tests and the interpreter."""
    from allmos.kernels.gemv import default_gemv_config

    return GemvTable(tuple(sizes), tuple(GemvChoice(default_gemv_config(m), fuse_norm) for m in sizes))


ROW_KERNEL_ROLES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # the LM head stays on cuBLAS
ROW_KERNEL_BATCH_SIZES = (1, 2, 4)  # decode batches (captured sizes) that take the row kernel by default


def row_kernel_config(k: int) -> GemvConfig:
    """The row-kernel tile for small decode batches: 4 output features per program and the whole K (up to
    4096) in one load, reused by every row; 8 warps from K = 2048. Timed inside a CUDA graph on an H200 (one
    launch per layer on distinct weights, ``benchmarks/bench_gemv_graph.py``), it beat cuBLAS at each
    decoder projection of the benchmark model; docs/benchmarks.md has the tables."""
    block_k = min(triton.next_power_of_2(k), 4096)
    return GemvConfig(1, 4, block_k, 8 if block_k >= 2048 else 4, 1)


def row_kernel_tables(sites: dict[str, tuple[GemvSignature, list]]) -> dict[str, GemvTable]:
    """Default tables for a CUDA model without start-up tuning: the decoder projections of batches up to 4
    rows through ``row_kernel_config`` (the norm stays a separate kernel; SiLU-and-mul joins the gate/up
    GEMV), larger batches and the LM head on cuBLAS. Sites whose weights are not 16-bit floats are left out.
    (The norm inside the row kernel measured no faster at one row and slower at 2 and 4 rows on an H200:
    docs/benchmarks.md.)"""
    sizes = ROW_KERNEL_BATCH_SIZES
    return {role: GemvTable(sizes, tuple(GemvChoice(row_kernel_config(sig.k)) for _ in sizes))
            for role, (sig, _) in sites.items() if role in ROW_KERNEL_ROLES and sig.dtype in (torch.bfloat16,
                                                                                               torch.float16)}


@dataclass
class _SiteTensors:
    """Random operands of one site at the largest batch size; candidates slice the first m rows."""

    x: torch.Tensor  # [max_m, k]
    residual: torch.Tensor  # [max_m, k]
    norm_weight: torch.Tensor  # [k]
    weight: torch.Tensor  # [n or 2n, k]
    bias: torch.Tensor | None

    @classmethod
    def make(cls, sig: GemvSignature, max_m: int, device: torch.device) -> _SiteTensors:
        rows = 2 * sig.n if sig.silu_mul else sig.n
        kw = dict(dtype=sig.dtype, device=device)
        return cls(x=torch.randn(max_m, sig.k, **kw), residual=torch.randn(max_m, sig.k, **kw),
                   norm_weight=torch.randn(sig.k, **kw), weight=torch.randn(rows, sig.k, **kw) * sig.k**-0.5,
                   bias=torch.randn(rows, **kw) if sig.has_bias else None)


def _run(sig: GemvSignature, t: _SiteTensors, m: int, choice: GemvChoice) -> torch.Tensor:
    """One call of the site at ``m`` rows the way ``choice`` runs it (what the layers do)."""
    x, r = t.x[:m], t.residual[:m]
    if choice.config is not None and choice.fuse_norm:
        return rms_norm_gemv(x, r, t.norm_weight, 1e-6, t.weight, t.bias, choice.config, silu_mul=sig.silu_mul)[0]
    if sig.norm:
        x, _ = fused_layers.rms_norm(x, t.norm_weight, 1e-6, r)
    if choice.config is not None:
        return gemv(x, t.weight, t.bias, choice.config, silu_mul=sig.silu_mul)
    y = F.linear(x, t.weight, t.bias)
    return fused_layers.silu_and_mul(y) if sig.silu_mul else y


def _time_us(fn) -> float:
    fn()  # compile outside the timed region
    torch.cuda.synchronize()
    return 1000.0 * do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def _measure(sig: GemvSignature, t: _SiteTensors, m: int, choice: GemvChoice) -> GemvChoice | None:
    """``choice`` with its measured time, or None when the device cannot run that tile.

    A tile that needs more shared memory than the device has is skipped quietly; any other failure to
    compile or launch a Triton candidate is logged as a warning and skipped too, so that one variant the
    local compiler rejects leaves the site on its other candidates (cuBLAS at worst) instead of failing
    the engine's start-up. The torch path itself is never caught."""
    try:
        us = _time_us(lambda: _run(sig, t, m, choice))
    except OutOfResources as exc:
        logger.info("gemv candidate %s skipped at m=%d: %s", choice.describe(), m, exc)
        return None
    except Exception as exc:  # noqa: BLE001 - see the docstring
        if choice.config is None:
            raise
        logger.warning("gemv candidate %s failed at m=%d for %s, skipped: %r", choice.describe(), m, sig, exc)
        return None
    return GemvChoice(choice.config, choice.fuse_norm, us)


def _best_at(sig: GemvSignature, t: _SiteTensors, m: int) -> GemvChoice:
    fuse = sig.norm and m <= FUSED_NORM_MAX_BATCH
    timed = [_measure(sig, t, m, GemvChoice(None))]
    timed += [_measure(sig, t, m, GemvChoice(c, fuse_norm=fuse)) for c in candidate_configs(m)]
    timed = [c for c in timed if c is not None]
    if fuse:  # the best tile once more, behind the separate norm kernel
        best_fused = min((c for c in timed if c.config is not None), key=lambda c: c.time_us, default=None)
        if best_fused is not None:
            unfused = _measure(sig, t, m, GemvChoice(best_fused.config, fuse_norm=False))
            timed += [unfused] if unfused is not None else []
    return min(timed, key=lambda c: c.time_us)  # the torch path first: it wins ties


@functools.cache
def _tune_cached(sig: GemvSignature, sizes: tuple[int, ...], device_index: int) -> GemvTable:
    device = torch.device("cuda", device_index)
    with torch.cuda.device(device), torch.inference_mode():
        tensors = _SiteTensors.make(sig, max(sizes), device)
        table = GemvTable(sizes, tuple(_best_at(sig, tensors, m) for m in sizes))
        del tensors
    return table


def tuning_sizes(capture_sizes: list[int]) -> tuple[int, ...]:
    """Batch sizes to time: every captured size up to 64, then a few larger ones up to the largest captured
    size (at most ``MAX_GEMV_BATCH``); a batch between them takes the next timed size's choice."""
    largest = capture_sizes[-1] if capture_sizes else 0
    small = {s for s in capture_sizes if s <= FUSED_NORM_MAX_BATCH}
    large = {s for s in LARGE_BATCH_SIZES if s <= largest}
    if FUSED_NORM_MAX_BATCH < largest <= MAX_GEMV_BATCH:
        large.add(largest)
    return tuple(sorted(small | large))


def tune_gemv(sig: GemvSignature, sizes: tuple[int, ...], device: torch.device) -> GemvTable:
    """Measure and choose, at each size in ``sizes`` (at most ``MAX_GEMV_BATCH``), how ``sig`` runs on
    ``device`` (a CUDA device). Memoized per process."""
    sizes = tuple(sorted({s for s in sizes if 1 <= s <= MAX_GEMV_BATCH}))
    if device.type != "cuda":
        raise ValueError(f"tune_gemv measures on a CUDA device, got {device}")
    if not sizes:
        return GemvTable((), ())
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _tune_cached(sig, sizes, index)
