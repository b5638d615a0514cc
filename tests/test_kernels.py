"""Triton kernels (``allmos.kernels``) against the torch reference (``allmos.attention.torch_ref``).

Two tiers:
1. Small float32 cases that run everywhere: on the CPU through the Triton interpreter (this is how a
   kernel regression fails CI), natively on a GPU when there is one.
2. ``@pytest.mark.gpu`` cases (skipped without CUDA): lengths up to 4096, block sizes 16 and 256, GQA
   1/2/4/8, head_dim 64/128, bfloat16 and float32, prefix hits, chunked prefill, decode splits, graph capture.

Interpreter mode (CPU): ``triton.jit`` picks compiled or interpreted functions when the decorator runs, so
``TRITON_INTERPRET=1`` must be set before ``triton`` itself is first imported (``triton.language``'s own
jit'd helpers such as ``tl.cdiv``/``tl.sum`` are decorated then; setting it later breaks them in the
interpreter). Without CUDA this module sets the variable before importing anything that imports triton.
If another test module (or conftest) imported triton earlier in the same pytest process, the tier-1
tests here skip and ``test_tier1_in_fresh_interpreter`` runs them in a fresh ``python -m pytest``
subprocess with the variable set from the start, so the tier still fails CI on a regression. The
variable stays set for the rest of the pytest process (harmless without a GPU). Setting it in
``conftest.py`` when CUDA is unavailable avoids the subprocess.

Every case draws fresh random data, poisons outputs and unused cache slots with NaN, and shuffles the
block tables (padding entries hold an out-of-range block id that must never be read).
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported (see module docstring)

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from allmos.attention.torch_ref import paged_attention_ref, store_kv_cache_ref  # noqa: E402
from allmos.kernels.decode_attention import DecodeWorkspace, choose_num_splits, paged_decode_attention  # noqa: E402
from allmos.kernels.prefill_attention import paged_prefill_attention  # noqa: E402
from allmos.kernels.store_kv import store_kv_cache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAD_BLOCK_ID = 2**30  # block-table padding: reading it would fault or poison the result
# Triton was imported before TRITON_INTERPRET was set: interpreted kernels cannot run in this process.
INTERPRETER_BROKEN = not torch.cuda.is_available() and not isinstance(tl.cdiv, InterpretedFunction)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
tier1 = pytest.mark.skipif(INTERPRETER_BROKEN, reason="triton imported before TRITON_INTERPRET=1; "
                           "run by test_tier1_in_fresh_interpreter")


@pytest.mark.skipif(not INTERPRETER_BROKEN, reason="tier 1 runs in this process")
def test_tier1_in_fresh_interpreter() -> None:
    """Run this file's tier 1 in a new process where TRITON_INTERPRET=1 precedes the triton import."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
         os.path.abspath(__file__)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@dataclass
class PagedCase:
    """A filled paged KV cache plus the metadata of one forward step."""

    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: list[int]
    q_lens: list[int]

    @property
    def query_start_loc(self) -> list[int]:
        return [0] + [sum(self.q_lens[: i + 1]) for i in range(len(self.q_lens))]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query_start_loc, seq_lens) as int32 device tensors."""
        qsl = torch.tensor(self.query_start_loc, dtype=torch.int32, device=self.k_cache.device)
        return qsl, torch.tensor(self.seq_lens, dtype=torch.int32, device=self.k_cache.device)


def make_block_tables(
    seq_lens: list[int], block_size: int, num_blocks: int, rng: random.Random
) -> torch.Tensor:
    """Shuffled, non-contiguous block ids per sequence; padding entries hold PAD_BLOCK_ID."""
    needed = [math.ceil(n / block_size) for n in seq_lens]
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    table = torch.full((len(seq_lens), max(needed) + 1), PAD_BLOCK_ID, dtype=torch.int32)
    used = 0
    for s, n in enumerate(needed):
        table[s, :n] = torch.tensor(ids[used:used + n], dtype=torch.int32)
        used += n
    return table


def slots_of(block_tables: torch.Tensor, positions: list[tuple[int, int]], block_size: int) -> torch.Tensor:
    """Flat cache slots of (seq, token position) pairs."""
    return torch.tensor([int(block_tables[s, t // block_size]) * block_size + t % block_size
                         for s, t in positions], dtype=torch.int64)


def make_case(seq_lens: list[int], q_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype, seed: int) -> PagedCase:
    """Random K/V for every cached token; free slots and spare blocks are NaN."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(n / block_size) for n in seq_lens) + 3
    block_tables = make_block_tables(seq_lens, block_size, num_blocks, rng)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    positions = [(s, t) for s, n in enumerate(seq_lens) for t in range(n)]
    keys = torch.randn(len(positions), num_kv_heads, head_dim, generator=gen)
    values = torch.randn(len(positions), num_kv_heads, head_dim, generator=gen)
    store_kv_cache_ref(keys, values, k_cache, v_cache, slots_of(block_tables, positions, block_size))
    return PagedCase(k_cache.to(DEVICE), v_cache.to(DEVICE), block_tables.to(DEVICE), seq_lens, q_lens)


def random_query(num_rows: int, num_heads: int, head_dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(num_rows, num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)


def reference(query: torch.Tensor, case: PagedCase, scale: float) -> torch.Tensor:
    return paged_attention_ref(query, case.k_cache, case.v_cache, case.query_start_loc, case.seq_lens,
                               case.block_tables, scale)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


def run_prefill(case: PagedCase, num_heads: int, dtype: torch.dtype, seed: int) -> None:
    head_dim = case.k_cache.shape[3]
    query = random_query(sum(case.q_lens), num_heads, head_dim, dtype, seed)
    scale = head_dim ** -0.5
    out = torch.full_like(query, float("nan"))
    qsl, seq_lens = case.tensors()
    paged_prefill_attention(query, case.k_cache, case.v_cache, qsl, seq_lens, case.block_tables,
                                    scale, max(case.q_lens), out=out)
    torch.testing.assert_close(out, reference(query, case, scale), **tolerance(dtype))


def run_decode(
    case: PagedCase, num_heads: int, dtype: torch.dtype, num_splits: int, seed: int
) -> None:
    head_dim = case.k_cache.shape[3]
    query = random_query(len(case.seq_lens), num_heads, head_dim, dtype, seed)
    scale = head_dim ** -0.5
    out = torch.full_like(query, float("nan"))
    _, seq_lens = case.tensors()
    paged_decode_attention(query, case.k_cache, case.v_cache, seq_lens, case.block_tables, scale,
                                   num_splits=num_splits, out=out)
    torch.testing.assert_close(out, reference(query, case, scale), **tolerance(dtype))


# ---------------------------------------------------------------- tier 1: interpreter-sized, float32

@tier1
@pytest.mark.parametrize("block_size,num_kv_heads", [(16, 2), (256, 4)])
def test_store_kv_cache(block_size: int, num_kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(block_size)
    num_tokens, head_dim = 13, 64
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen).to(DEVICE)
    key, value = qkv[:, :num_kv_heads], qkv[:, num_kv_heads:2 * num_kv_heads]  # strided views
    num_blocks = 2 + num_tokens // block_size
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache_ref(key, value, k_ref, v_ref, slots.to(DEVICE))
    store_kv_cache(key, value, k_cache, v_cache, slots.to(DEVICE))
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


PREFILL_SMALL = [
    # (block_size, num_kv_heads, group, seq_lens, q_lens): full prefill, prefix hits, chunks, mixed decode
    (16, 2, 1, [1, 17, 64, 100], [1, 17, 64, 100]),
    (32, 2, 2, [37, 90, 64, 48], [5, 33, 1, 48]),
    (256, 4, 4, [80, 33, 300], [30, 33, 44]),
    (16, 2, 4, [16, 31, 2], [16, 1, 1]),
    (16, 2, 3, [45, 20], [12, 20]),
]


@tier1
@pytest.mark.parametrize("block_size,num_kv_heads,group,seq_lens,q_lens", PREFILL_SMALL)
def test_prefill_small(block_size, num_kv_heads, group, seq_lens, q_lens) -> None:
    case = make_case(seq_lens, q_lens, num_kv_heads, 64, block_size, torch.float32, seed=len(q_lens) + group)
    run_prefill(case, num_kv_heads * group, torch.float32, seed=block_size)


DECODE_SMALL = [
    # (block_size, num_kv_heads, group, seq_lens): lengths on and around tile/page boundaries
    (16, 2, 2, [1, 15, 16, 17, 64, 100]),
    (32, 2, 1, [33, 64, 65, 7]),
    (256, 4, 4, [1, 100, 63, 300]),
    (16, 2, 3, [50, 2]),
]


@tier1
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("block_size,num_kv_heads,group,seq_lens", DECODE_SMALL)
def test_decode_small(block_size, num_kv_heads, group, seq_lens, num_splits) -> None:
    case = make_case(seq_lens, [1] * len(seq_lens), num_kv_heads, 64, block_size, torch.float32, seed=group)
    run_decode(case, num_kv_heads * group, torch.float32, num_splits, seed=num_splits)


@tier1
def test_decode_preallocated_workspace_and_empty_rows() -> None:
    """A larger preallocated workspace is used in place; a padded row (seq_len 0) comes out as zeros."""
    case = make_case([70, 9, 1], [1, 1, 1], 2, 64, 16, torch.float32, seed=7)
    query = random_query(4, 4, 64, torch.float32, seed=7)
    workspace = DecodeWorkspace.allocate(8, 4, 64, 4, DEVICE)
    workspace.partial_out.fill_(float("nan"))
    workspace.lse.fill_(float("nan"))
    block_tables = torch.cat([case.block_tables, case.block_tables[:1]])
    seq_lens = torch.tensor(case.seq_lens + [0], dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(query, case.k_cache, case.v_cache, seq_lens, block_tables, 0.125,
                                         num_splits=3, workspace=workspace)
    torch.testing.assert_close(out[:3], reference(query[:3], case, 0.125), atol=1e-4, rtol=1e-4)
    assert torch.equal(out[3], torch.zeros_like(out[3]))


@tier1
def test_choose_num_splits() -> None:
    choose = choose_num_splits
    assert choose(256, 8, 1024) == 1  # grid already fills the chip
    assert choose(1, 8, 4096) > 1
    assert choose(1, 8, 100) == 1  # too short to split
    assert all(1 <= choose(b, h, n) <= 16 for b in (1, 3, 8, 64) for h in (1, 8) for n in (1, 512, 65536))


@tier1
def test_rejects_bad_shapes() -> None:
    case = make_case([5], [5], 2, 64, 16, torch.float32, seed=0)
    query = random_query(5, 3, 64, torch.float32, seed=0)  # 3 heads over 2 KV heads
    qsl, seq_lens = case.tensors()
    with pytest.raises(ValueError, match="num_kv_heads"):
        paged_prefill_attention(query, case.k_cache, case.v_cache, qsl, seq_lens, case.block_tables,
                                        0.1, 5)


# ---------------------------------------------------------------- tier 2: GPU, real sizes

GPU_SHAPES = [
    # (block_size, num_kv_heads, group, head_dim, dtype)
    (16, 4, 1, 128, torch.bfloat16),
    (256, 8, 2, 128, torch.bfloat16),
    (256, 2, 4, 64, torch.bfloat16),
    (16, 2, 8, 128, torch.bfloat16),
    (256, 2, 8, 64, torch.float32),
    (16, 2, 2, 128, torch.float32),
]
# prefill: full 4096 prompt, prefix hit, single-token chunk, chunk ending at a page edge, short prompt
GPU_PREFILL_LENS = ([4096, 3000, 2049, 512, 300, 17 + 256], [4096, 1000, 1, 256, 300, 17])
GPU_DECODE_LENS = [1, 2, 15, 16, 17, 255, 256, 257, 1000, 2048, 4095, 4096]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("block_size,num_kv_heads,group,head_dim,dtype", GPU_SHAPES)
def test_prefill_gpu(block_size, num_kv_heads, group, head_dim, dtype) -> None:
    seq_lens, q_lens = GPU_PREFILL_LENS
    case = make_case(seq_lens, q_lens, num_kv_heads, head_dim, block_size, dtype, seed=group)
    run_prefill(case, num_kv_heads * group, dtype, seed=head_dim)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("block_size,num_kv_heads,group,head_dim,dtype", GPU_SHAPES)
def test_decode_gpu(block_size, num_kv_heads, group, head_dim, dtype, num_splits) -> None:
    case = make_case(GPU_DECODE_LENS, [1] * len(GPU_DECODE_LENS), num_kv_heads, head_dim, block_size, dtype,
                     seed=group)
    run_decode(case, num_kv_heads * group, dtype, num_splits, seed=num_splits)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("block_size,dtype", [(256, torch.bfloat16), (16, torch.float32)])
def test_store_kv_cache_gpu(block_size, dtype) -> None:
    num_tokens, num_kv_heads, head_dim = 1000, 8, 128
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE, dtype=dtype)
    value = torch.randn_like(key)
    num_blocks = 4 + num_tokens // block_size * 2
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[::7] = -1
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache_ref(key, value, k_ref, v_ref, slots)
    store_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.gpu
@requires_cuda
def test_decode_cuda_graph_replay() -> None:
    """Split decode is capturable: replays follow new seq_lens / queries written into the static inputs."""
    new_lens = [699, 2, 4000, 1]
    case = make_case([700, 2, 4096, 33], [1] * 4, 8, 128, 256, torch.bfloat16, seed=3)  # every token filled
    query = random_query(4, 16, 128, torch.bfloat16, seed=3)
    lens = torch.tensor([700, 1, 4096, 33], dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(query)
    workspace = DecodeWorkspace.allocate(4, 16, 128, 8, DEVICE)

    def step() -> None:
        paged_decode_attention(query, case.k_cache, case.v_cache, lens, case.block_tables, 0.1,
                                       num_splits=8, out=out, workspace=workspace)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    query.copy_(random_query(4, 16, 128, torch.bfloat16, seed=4))
    out.fill_(float("nan"))
    graph.replay()
    case.seq_lens = new_lens
    torch.testing.assert_close(out, reference(query, case, 0.1), atol=2e-2, rtol=2e-2)
