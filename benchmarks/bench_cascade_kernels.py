"""Cascade against plain decode attention, one layer, on a shared prefix (GPU).

Usage: python benchmarks/bench_cascade_kernels.py [--sweep]

256 sequences (Qwen3-0.6B attention shapes: 16 query heads, 8 KV heads of 128, bf16, block size 256)
share their first 11 blocks (2,816 tokens) and own 200-375 more tokens each. Prints microseconds per
call of: plain decode over the shared blocks, plain decode over unshared copies of the same context (every
sequence's blocks its own, as without prefix caching), plain decode over the suffixes alone, and cascade
decode (prefix kernel + suffix decode) with the default prefix-kernel config; ``--sweep`` also times
block_m 64/128, block_n 32/64/128, 4/8 warps, 2/3 stages and 4/9/16 prefix splits (about a minute of
compilation) and prints the fastest. Each cascade result is checked against plain decode.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from allmos.attention.cascade import CascadeGroup, cascade_arrays
from allmos.kernels.cascade_attention import (
    CascadeConfig,
    CascadeTiles,
    CascadeWorkspace,
    cascade_decode_attention,
    cascade_prefix_attention,
    choose_prefix_splits,
    default_cascade_config,
    members_per_tile,
)
from allmos.kernels.decode_attention import max_shared_memory, paged_decode_attention

NUM_SEQS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 256, 16, 8, 128, 256
SHARED_BLOCKS, OWN_BLOCKS = 11, 2
SCALE = HEAD_DIM ** -0.5


def time_us(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1000


def build(device: str = "cuda"):
    """(query, k_cache, v_cache, seq_lens, shared tables, unshared tables)."""
    torch.manual_seed(0)
    lens = (SHARED_BLOCKS * BLOCK_SIZE + torch.randint(200, 376, (NUM_SEQS,))).to(torch.int32)
    width = SHARED_BLOCKS + OWN_BLOCKS
    num_blocks = SHARED_BLOCKS + NUM_SEQS * OWN_BLOCKS + NUM_SEQS * width
    k = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    tables = torch.zeros(NUM_SEQS, width, dtype=torch.int32)
    tables[:, :SHARED_BLOCKS] = torch.arange(SHARED_BLOCKS)
    tables[:, SHARED_BLOCKS:] = SHARED_BLOCKS + torch.arange(NUM_SEQS * OWN_BLOCKS).view(NUM_SEQS, OWN_BLOCKS)
    unshared = SHARED_BLOCKS + NUM_SEQS * OWN_BLOCKS + torch.arange(NUM_SEQS * width).view(NUM_SEQS, width)
    query = torch.randn(NUM_SEQS, NUM_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    return (query, k, torch.randn_like(k), lens.to(device), tables.to(device),
            unshared.to(torch.int32).to(device))


def groups_for(tile_members: int, device: str = "cuda") -> CascadeTiles:
    arrays = cascade_arrays([CascadeGroup(torch.arange(NUM_SEQS).numpy(), SHARED_BLOCKS)], NUM_SEQS, tile_members)
    return CascadeTiles(*(torch.from_numpy(a).to(device) for a in (arrays.prefix_blocks, arrays.members,
                                                                   arrays.tiles)))


def time_cascade(data, cfg: CascadeConfig, splits: int, workspace: CascadeWorkspace, reference) -> tuple:
    """(total us, prefix-kernel us, max abs difference from plain decode)."""
    query, k, v, lens, tables, _ = data
    groups = groups_for(members_per_tile(NUM_HEADS // NUM_KV_HEADS, cfg.block_m))

    def full():
        return cascade_decode_attention(query, k, v, lens, tables, groups, SCALE, num_prefix_splits=splits,
                                        workspace=workspace, config=cfg)

    err = (full().float() - reference.float()).abs().max().item()
    prefix = time_us(lambda: cascade_prefix_attention(query, k, v, tables, groups, SCALE, num_splits=splits,
                                                      workspace=workspace, config=cfg), 20)
    return time_us(full, 20), prefix, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also time the prefix kernel's tile configurations")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cascade_kernels.py needs a CUDA device")
    data = build()
    query, k, v, lens, tables, unshared = data
    tokens = int(lens.sum())
    kv_bytes = tokens * NUM_KV_HEADS * HEAD_DIM * 2 * 2
    plain = time_us(lambda: paged_decode_attention(query, k, v, lens, tables, SCALE))
    copies = time_us(lambda: paged_decode_attention(query, k, v, lens, unshared, SCALE))
    suffix_tables = tables[:, SHARED_BLOCKS:].contiguous()
    suffix = time_us(lambda: paged_decode_attention(query, k, v, lens - SHARED_BLOCKS * BLOCK_SIZE, suffix_tables,
                                                    SCALE))
    print(f"plain decode, shared blocks:   {plain:6.0f} us ({kv_bytes / plain / 1e6:.2f} TB/s of logical KV)")
    print(f"plain decode, unshared copies: {copies:6.0f} us ({kv_bytes / copies / 1e6:.2f} TB/s)")
    print(f"plain decode, suffixes alone:  {suffix:6.0f} us")
    reference = paged_decode_attention(query, k, v, lens, tables, SCALE)
    workspace = CascadeWorkspace.allocate(NUM_SEQS * 16, NUM_HEADS, HEAD_DIM, "cuda")
    cfg = default_cascade_config(NUM_HEADS // NUM_KV_HEADS, HEAD_DIM, torch.bfloat16, max_shared_memory(query.device))
    splits = choose_prefix_splits(NUM_SEQS, members_per_tile(NUM_HEADS // NUM_KV_HEADS, cfg.block_m), NUM_KV_HEADS,
                                  4096, torch.cuda.get_device_properties(0).multi_processor_count)
    total, prefix, err = time_cascade(data, cfg, splits, workspace, reference)
    print(f"cascade (default {cfg}, {splits} splits): {total:.0f} us, prefix kernel {prefix:.0f} us, "
          f"max |diff| {err:.3g}")
    if args.sweep:
        rows = []
        for bm, bn, warps, stages, sp in itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3], [4, 9, 16]):
            try:
                rows.append((*time_cascade(data, CascadeConfig(bm, bn, warps, stages), sp, workspace, reference),
                             bm, bn, warps, stages, sp))
            except Exception as exc:  # a configuration that does not fit this card's shared memory
                print(f"block_m={bm} block_n={bn} warps={warps} stages={stages}: {type(exc).__name__}")
        for total, prefix, err, bm, bn, warps, stages, sp in sorted(rows)[:10]:
            print(f"cascade {total:5.0f} us (prefix {prefix:4.0f} us)  block_m={bm} block_n={bn} warps={warps} "
                  f"stages={stages} splits={sp}  max |diff| {err:.3g}")


if __name__ == "__main__":
    main()
