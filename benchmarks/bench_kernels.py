"""Benchmark of allmos's Triton attention kernels (needs a CUDA GPU).

Decode attention is memory bound: its figure of merit is the K/V bytes it reads per second, compared
with a measured device-to-device copy bandwidth (bytes read + written per second of a large
``Tensor.copy_``). Prefill is compute bound: it reports causal-attention TFLOP/s next to torch's
``scaled_dot_product_attention`` on contiguous tensors. Shapes are Qwen3-0.6B's (16 query heads, 8 KV
heads, head_dim 128, bfloat16) with block_size 256. Times are medians of ``triton.testing.do_bench``
(which flushes the L2 cache before each run); decode is timed as replays of a captured CUDA graph, as
the engine runs it (otherwise the host's launch time, tens of microseconds, dominates small batches).

Usage: ``PYTHONPATH=. python benchmarks/bench_kernels.py [--sweep-decode] [--sweep-prefill] [--splits] [--fp8]``
(the sweeps also time other tile configurations, ``--splits`` every split count over more batch sizes).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from allmos.attention.torch_ref import KVScales
from allmos.kernels.decode_attention import (
    DecodeConfig,
    DecodeWorkspace,
    choose_num_splits,
    max_shared_memory,
    paged_decode_attention,
)
from allmos.kernels.prefill_attention import PrefillConfig, paged_prefill_attention


@dataclass(frozen=True)
class Shapes:
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 256
    dtype: torch.dtype = torch.bfloat16
    cache_dtype: torch.dtype | None = None  # None: ``dtype``; torch.float8_e4m3fn for an fp8 cache


DECODE_SWEEP = {
    256: [DecodeConfig(n, w, s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)],
    16: [DecodeConfig(n, 4, s) for n in (16, 32, 64, 128) for s in (2, 3, 4)],
}
FP8_DECODE_SWEEP = [DecodeConfig(n, w, s) for n in (64, 128, 256) for w in (4, 8) for s in (2, 3, 4)]
PREFILL_SWEEP = [
    PrefillConfig(*c)
    for c in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 4, 2), (128, 128, 8, 1), (64, 128, 4, 2),
              (64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3), (256, 64, 8, 2), (256, 32, 8, 3),
              (128, 64, 4, 3)]
]


@dataclass
class PagedInputs:
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, shuffled
    seq_lens: torch.Tensor  # [num_seqs] int32

    def kv_bytes(self) -> int:
        """Bytes of K and V the sequences own (what attention must read)."""
        per_token = 2 * self.k_cache.shape[2] * self.k_cache.shape[3] * self.k_cache.element_size()
        return int(self.seq_lens.sum()) * per_token


def row(*cells: object, widths: tuple[int, ...]) -> str:
    """One right-aligned table row."""
    return " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=False))


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(num_bytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3)


def make_paged(num_seqs: int, seq_len: int, shapes: Shapes) -> PagedInputs:
    """Random caches holding exactly the sequences' pages, with shuffled block tables."""
    blocks_per_seq = math.ceil(seq_len / shapes.block_size)
    num_blocks = num_seqs * blocks_per_seq
    cache_shape = (num_blocks, shapes.block_size, shapes.num_kv_heads, shapes.head_dim)
    cache_dtype = shapes.cache_dtype or shapes.dtype
    k_cache = torch.randn(cache_shape, device="cuda", dtype=shapes.dtype).to(cache_dtype)
    v_cache = torch.randn(cache_shape, device="cuda", dtype=shapes.dtype).to(cache_dtype)
    perm = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
    block_tables = perm.view(num_seqs, blocks_per_seq).contiguous()
    seq_lens = torch.full((num_seqs,), seq_len, device="cuda", dtype=torch.int32)
    return PagedInputs(k_cache, v_cache, block_tables, seq_lens)


def time_decode(
    inputs: PagedInputs, shapes: Shapes, num_splits: int, config: DecodeConfig | None = None
) -> float:
    num_seqs = inputs.seq_lens.shape[0]
    query = torch.randn(num_seqs, shapes.num_heads, shapes.head_dim, device="cuda", dtype=shapes.dtype)
    out = torch.empty_like(query)
    workspace = DecodeWorkspace.allocate(num_seqs, shapes.num_heads, shapes.head_dim, num_splits, "cuda")
    scale = shapes.head_dim**-0.5
    kv_scales = None
    if inputs.k_cache.dtype == torch.float8_e4m3fn:
        ones = torch.ones(1, device="cuda", dtype=torch.float32)
        kv_scales = KVScales(ones, ones.clone())

    def run() -> None:
        paged_decode_attention(query, inputs.k_cache, inputs.v_cache, inputs.seq_lens, inputs.block_tables,
                               scale, num_splits=num_splits, out=out, workspace=workspace, config=config,
                               kv_scales=kv_scales)

    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return median_ms(graph.replay)


def decode_table(shapes: Shapes, copy_bw: float, all_splits: bool) -> None:
    widths = (6, 6, 7, 9, 8, 7)
    cache = str(shapes.cache_dtype or shapes.dtype).removeprefix("torch.")
    print(f"\n## Decode attention, {cache} cache, CUDA-graph replays (KV bytes read / s; % of copy bandwidth)")
    print(row("batch", "ctx", "splits", "time us", "GB/s", "% copy", widths=widths))
    layouts = [(256, 1024), (1, 1024), (8, 1024), (32, 1024), (1, 8192)]
    if all_splits:
        more = [(b, n) for b in (1, 4, 8, 16, 32, 64) for n in (1024, 4096, 16384)]
        layouts += [layout for layout in more if layout not in layouts]
    for batch, ctx in layouts:
        inputs = make_paged(batch, ctx, shapes)
        chosen = choose_num_splits(batch, shapes.num_kv_heads, ctx)
        for splits in sorted({1, 2, 4, 8, 16, chosen} if all_splits else {1, chosen}):
            ms = time_decode(inputs, shapes, splits)
            bw = inputs.kv_bytes() / (ms * 1e-3)
            mark = " <- choose_num_splits" if splits == chosen else ""
            print(row(batch, ctx, splits, f"{ms * 1e3:.1f}", f"{bw / 1e9:.0f}", f"{100 * bw / copy_bw:.1f}%",
                      widths=widths) + mark)
        del inputs


def decode_sweep(copy_bw: float, fp8: bool = False) -> None:
    widths = (10, 7, 5, 6, 9, 7)
    cache = "fp8 cache, block_size 256" if fp8 else "block_size 256 and 16"
    print(f"\n## Decode config sweep, batch 256, ctx 1024 ({cache})")
    print(row("block_size", "block_n", "warps", "stages", "time us", "% copy", widths=widths))
    for block_size in (256,) if fp8 else (256, 16):
        shapes = Shapes(block_size=block_size, cache_dtype=torch.float8_e4m3fn if fp8 else None)
        inputs = make_paged(256, 1024, shapes)
        for cfg in FP8_DECODE_SWEEP if fp8 else DECODE_SWEEP[block_size]:
            cells = (block_size, cfg.block_n, cfg.num_warps, cfg.num_stages)
            try:
                ms = time_decode(inputs, shapes, 1, cfg)
            except Exception as exc:  # out of shared memory, etc.
                print(row(*cells, widths=widths[:4]) + f"  failed: {exc!r:.60}")
                continue
            pct = 100 * inputs.kv_bytes() / (ms * 1e-3) / copy_bw
            print(row(*cells, f"{ms * 1e3:.1f}", f"{pct:.1f}%", widths=widths))
        del inputs


def prefill_flops(q_lens: list[int], shapes: Shapes, seq_lens: list[int] | None = None) -> float:
    """Causal attention FLOPs (QK^T and PV, 2 flops per multiply-add) of ``q_lens`` new tokens at the end
    of ``seq_lens``-token contexts (default: fresh prompts)."""
    seq_lens = q_lens if seq_lens is None else seq_lens
    return sum(4 * shapes.num_heads * shapes.head_dim * (q * (s - q) + q * (q + 1) / 2)
               for q, s in zip(q_lens, seq_lens, strict=True))


def time_prefill(num_seqs: int, seq_len: int, shapes: Shapes, config: PrefillConfig | None = None,
                 q_len: int | None = None) -> float:
    """Median ms of prefilling the last ``q_len`` (default: all) tokens of ``num_seqs`` sequences."""
    q_len = seq_len if q_len is None else q_len
    inputs = make_paged(num_seqs, seq_len, shapes)
    num_tokens = num_seqs * q_len
    query = torch.randn(num_tokens, shapes.num_heads, shapes.head_dim, device="cuda", dtype=shapes.dtype)
    qsl = torch.arange(0, num_seqs + 1, device="cuda", dtype=torch.int32) * q_len
    out = torch.empty_like(query)
    scale = shapes.head_dim**-0.5
    return median_ms(lambda: paged_prefill_attention(
        query, inputs.k_cache, inputs.v_cache, qsl, inputs.seq_lens, inputs.block_tables, scale, q_len,
        out=out, config=config))


def time_sdpa(num_seqs: int, seq_len: int, shapes: Shapes) -> float:
    options = {"device": "cuda", "dtype": shapes.dtype}
    q = torch.randn(num_seqs, shapes.num_heads, seq_len, shapes.head_dim, **options)
    k = torch.randn(num_seqs, shapes.num_kv_heads, seq_len, shapes.head_dim, **options)
    v = torch.randn_like(k)
    return median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def prefill_table(shapes: Shapes, sweep: bool) -> None:
    widths = (22, 32, 8, 8)
    print("\n## Prefill attention, 16k new tokens (causal TFLOP/s)")
    print(row("seqs x len", "kernel", "time ms", "TFLOP/s", widths=widths))
    # (sequences, context, new tokens): fresh prompts, then 224 new tokens after a 2,816-token cached prefix
    for num_seqs, seq_len, q_len in [(1, 16384, 16384), (4, 4096, 4096), (16, 1024, 1024), (64, 3040, 224)]:
        layout = f"{num_seqs} x {seq_len}" + (f" ({q_len} new)" if q_len < seq_len else "")
        flops = prefill_flops([q_len] * num_seqs, shapes, [seq_len] * num_seqs)
        for cfg in [None] + (PREFILL_SWEEP if sweep else []):
            name = "allmos default" if cfg is None else (
                f"m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}")
            try:
                ms = time_prefill(num_seqs, seq_len, shapes, cfg, q_len)
            except Exception as exc:
                print(row(layout, name, widths=widths[:2]) + f"  failed: {exc!r:.60}")
                continue
            print(row(layout, name, f"{ms:.3f}", f"{flops / (ms * 1e-3) / 1e12:.1f}", widths=widths))
        if q_len < seq_len:
            continue  # SDPA below is causal over fresh prompts only
        ms = time_sdpa(num_seqs, seq_len, shapes)
        tflops = flops / (ms * 1e-3) / 1e12
        print(row(layout, "torch sdpa (contiguous)", f"{ms:.3f}", f"{tflops:.1f}", widths=widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-decode", action="store_true", help="time other decode tile configs")
    parser.add_argument("--sweep-prefill", action="store_true", help="time other prefill tile configs")
    parser.add_argument("--splits", action="store_true", help="time every split count over more batches")
    parser.add_argument("--fp8", action="store_true", help="also time decode attention over an fp8 (e4m3) cache")
    parser.add_argument("--sweep-fp8", action="store_true", help="time other decode tile configs on an fp8 cache")
    parser.add_argument("--no-prefill", action="store_true", help="skip the prefill table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    shapes = Shapes()
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    print(f"shared memory per program: {max_shared_memory(torch.device('cuda')) // 1024} KiB")
    decode_table(shapes, copy_bw, args.splits)
    if args.fp8:
        decode_table(Shapes(cache_dtype=torch.float8_e4m3fn), copy_bw, args.splits)
    if args.sweep_decode:
        decode_sweep(copy_bw)
    if args.sweep_fp8:
        decode_sweep(copy_bw, fp8=True)
    if not args.no_prefill:
        prefill_table(shapes, args.sweep_prefill)


if __name__ == "__main__":
    main()
