"""Split decode attention with the merge folded into the same launch (``fold_merge``) against the torch
reference: the last split of each (sequence, KV head) merges, and the semaphores are back at zero after
every launch (so the next layer, or the next replay of a graph, starts clean).

The interpreter runs programs one after another, so CPU cases check the logic (arrival counting, who
merges, reset); only the ``@pytest.mark.gpu`` cases, which repeat launches and compare every result,
can show a memory-ordering fault between the splits' partial stores and the merge.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import DEVICE, PagedCase, make_case, random_query, reference, tolerance

from allmos.kernels.decode_attention import DecodeWorkspace, paged_decode_attention


def run_folded(case: PagedCase, num_heads: int, dtype: torch.dtype, num_splits: int, seed: int,
               workspace: DecodeWorkspace, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    head_dim = case.k_cache.shape[3]
    query = random_query(len(case.seq_lens), num_heads, head_dim, dtype, seed)
    out = torch.full_like(query, float("nan"))
    workspace.partial_out.fill_(float("nan"))
    workspace.lse.fill_(float("nan"))
    if seq_lens is None:
        seq_lens = case.tensors()[1]
    paged_decode_attention(query, case.k_cache, case.v_cache, seq_lens, case.block_tables, head_dim**-0.5,
                           num_splits=num_splits, out=out, workspace=workspace, fold_merge=True)
    assert torch.count_nonzero(workspace.semaphores) == 0  # reset by every merging program
    torch.testing.assert_close(out, reference(query, case, head_dim**-0.5), **tolerance(dtype))
    return out


@pytest.mark.parametrize("num_splits", [2, 5])  # DEVICE is the GPU where there is one, else the interpreter
@pytest.mark.parametrize("block_size,num_kv_heads,group,seq_lens", [
    (16, 2, 2, [1, 15, 16, 17, 64, 100]),
    (32, 2, 1, [33, 64, 65, 7]),
    (16, 2, 3, [50, 2]),
])
def test_folded_merge_small(block_size, num_kv_heads, group, seq_lens, num_splits):
    case = make_case(seq_lens, [1] * len(seq_lens), num_kv_heads, 64, block_size, torch.float32, seed=group)
    workspace = DecodeWorkspace.allocate(8, num_kv_heads * group, 64, 8, DEVICE, num_kv_heads=num_kv_heads)
    for seed in range(2):  # a second launch on the same semaphores
        run_folded(case, num_kv_heads * group, torch.float32, num_splits, seed, workspace)


def test_folded_merge_padded_row_is_zero():
    case = make_case([70, 9], [1, 1], 2, 64, 16, torch.float32, seed=7)
    workspace = DecodeWorkspace.allocate(4, 4, 64, 4, DEVICE, num_kv_heads=2)
    query = random_query(3, 4, 64, torch.float32, seed=7)
    seq_lens = torch.tensor(case.seq_lens + [0], dtype=torch.int32, device=DEVICE)
    tables = torch.cat([case.block_tables, case.block_tables[:1]])
    out = paged_decode_attention(query, case.k_cache, case.v_cache, seq_lens, tables, 0.125, num_splits=3,
                                 workspace=workspace, fold_merge=True)
    torch.testing.assert_close(out[:2], reference(query[:2], case, 0.125), atol=1e-4, rtol=1e-4)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.count_nonzero(workspace.semaphores) == 0


def test_folded_merge_needs_semaphores():
    case = make_case([40], [1], 2, 64, 16, torch.float32, seed=1)
    query = random_query(1, 4, 64, torch.float32, seed=1)
    workspace = DecodeWorkspace.allocate(1, 4, 64, 4, DEVICE)  # no num_kv_heads: no semaphores
    with pytest.raises(ValueError, match="semaphores"):
        paged_decode_attention(query, case.k_cache, case.v_cache, case.tensors()[1], case.block_tables, 0.1,
                               num_splits=2, workspace=workspace, fold_merge=True)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [4, 16])
@pytest.mark.parametrize("block_size,num_kv_heads,group,head_dim,dtype", [
    (256, 8, 2, 128, torch.bfloat16), (16, 2, 8, 128, torch.bfloat16), (16, 2, 2, 128, torch.float32)])
def test_folded_merge_gpu_repeated(block_size, num_kv_heads, group, head_dim, dtype, num_splits):
    lens = [1, 2, 15, 16, 17, 255, 256, 257, 1000, 2048, 4095, 4096]
    case = make_case(lens, [1] * len(lens), num_kv_heads, head_dim, block_size, dtype, seed=group)
    workspace = DecodeWorkspace.allocate(len(lens), num_kv_heads * group, head_dim, 16, DEVICE,
                                         num_kv_heads=num_kv_heads)
    first = run_folded(case, num_kv_heads * group, dtype, num_splits, 0, workspace)
    for _ in range(30):  # a race would show as a result that differs from one launch to the next
        again = run_folded(case, num_kv_heads * group, dtype, num_splits, 0, workspace)
        assert torch.equal(again, first)


@pytest.mark.gpu
def test_folded_merge_in_cuda_graph():
    case = make_case([700, 2, 4096, 33], [1] * 4, 8, 128, 256, torch.bfloat16, seed=3)
    query = random_query(4, 16, 128, torch.bfloat16, seed=3)
    lens = torch.tensor([700, 1, 4096, 33], dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(query)
    workspace = DecodeWorkspace.allocate(4, 16, 128, 16, DEVICE, num_kv_heads=8)

    def step() -> None:
        paged_decode_attention(query, case.k_cache, case.v_cache, lens, case.block_tables, 0.1, num_splits=16,
                               out=out, workspace=workspace, fold_merge=True)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    new_lens = [699, 2, 4000, 1]
    lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    case.seq_lens = new_lens
    for seed in range(5):
        query.copy_(random_query(4, 16, 128, torch.bfloat16, seed=4 + seed))
        out.fill_(float("nan"))
        graph.replay()
        torch.testing.assert_close(out, reference(query, case, 0.1), atol=2e-2, rtol=2e-2)
    assert torch.count_nonzero(workspace.semaphores) == 0
