"""The torch attention path (torch_ref prefill, torch backend decode) against attention written out per
head and query in float64, on paged caches with garbage in the slots no sequence owns."""

from __future__ import annotations

import math

import pytest
import torch

from allmos.attention.metadata import AttentionMetadata
from allmos.attention.torch_backend import TorchAttentionBackend
from allmos.attention.torch_ref import paged_attention_ref

BLOCK, KV_HEADS, HEADS, DIM = 4, 2, 6, 16


def _naive(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_pos: int, scale: float) -> torch.Tensor:
    """q [q_len, heads, d]; keys/values [seq_len, kv_heads, d]; query i sits at position first_pos + i."""
    group = q.shape[1] // keys.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        for h in range(q.shape[1]):
            visible = first_pos + i + 1
            scores = [scale * float(q[i, h].double() @ keys[t, h // group].double()) for t in range(visible)]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            out[i, h] = sum(w / total * values[t, h // group].double() for t, w in enumerate(weights))
    return out


def _cache(num_blocks: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=g) * 1e3).to(dtype)  # garbage, but finite
    v = (torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=g) * 1e3).to(dtype)
    return k, v


def _write(cache: torch.Tensor, table: list[int], values: torch.Tensor) -> None:
    for t in range(values.shape[0]):
        cache[table[t // BLOCK], t % BLOCK] = values[t].to(cache.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_reference_fresh_and_after_cached_context(dtype):
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = _cache(16, dtype)
    # (seq_len, q_len): a fresh prompt (causal from 0), a chunk after cached context, a single token
    cases = [(7, 7), (10, 3), (5, 1)]
    tables = [[3, 9], [0, 12, 5], [14, 2]]
    keys = [torch.randn(n, KV_HEADS, DIM, generator=g).to(dtype) for n, _ in cases]
    values = [torch.randn(n, KV_HEADS, DIM, generator=g).to(dtype) for n, _ in cases]
    for table, k, v in zip(tables, keys, values):
        _write(k_cache, table, k)
        _write(v_cache, table, v)
    q = torch.randn(sum(q for _, q in cases), HEADS, DIM, generator=g).to(dtype)
    starts = [0, 7, 10, 11]
    block_tables = torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32)
    out = paged_attention_ref(q, k_cache, v_cache, starts, [n for n, _ in cases], block_tables, DIM**-0.5)
    assert out.dtype == dtype
    for s, (n, q_len) in enumerate(cases):
        ref = _naive(q[starts[s]:starts[s + 1]], keys[s], values[s], n - q_len, DIM**-0.5)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[starts[s]:starts[s + 1]].double(), ref, atol=tol, rtol=tol)


def _decode_case(seq_lens: list[int], dtype: torch.dtype, valid_slots: bool = True):
    g = torch.Generator().manual_seed(2)
    k_cache, v_cache = _cache(20, dtype, seed=3)
    tables = [[7, 1, 15], [4, 11, 0], [19, 2, 8]][: len(seq_lens)]
    keys = [torch.randn(n, KV_HEADS, DIM, generator=g).to(dtype) for n in seq_lens]
    values = [torch.randn(n, KV_HEADS, DIM, generator=g).to(dtype) for n in seq_lens]
    for table, k, v, n in zip(tables, keys, values, seq_lens):  # all but the new token, which forward stores
        _write(k_cache, table, k[: n - 1])
        _write(v_cache, table, v[: n - 1])
    slots = [table[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for table, n in zip(tables, seq_lens)]
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots if valid_slots else slots[:-1] + [-1]),
        query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=1, max_seq_len=max(seq_lens), is_decode=True,
        query_start_loc_cpu=list(range(len(seq_lens) + 1)), seq_lens_cpu=list(seq_lens))
    q = torch.randn(len(seq_lens), HEADS, DIM, generator=g).to(dtype)
    new_k = torch.stack([k[-1] for k in keys])
    new_v = torch.stack([v[-1] for v in values])
    return q, new_k, new_v, k_cache, v_cache, md, keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_lens", [[9], [6, 6, 6], [5, 1, 11]], ids=["one", "equal", "ragged"])
def test_decode_reads_each_sequence_context_only(dtype, seq_lens):
    q, k, v, k_cache, v_cache, md, keys, values = _decode_case(seq_lens, dtype)
    backend = TorchAttentionBackend()
    prepared = backend.prepare(md)
    assert prepared.slots_all_valid and prepared.uniform_lengths == (len(set(seq_lens)) == 1)
    out = backend.forward(q, k, v, k_cache, v_cache, prepared, DIM**-0.5)
    assert out.dtype == dtype and not out.isnan().any()
    assert prepared.token_slots.numel() == len(seq_lens) * max(seq_lens)  # tokens, not whole blocks
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for s, n in enumerate(seq_lens):
        ref = _naive(q[s:s + 1], keys[s], values[s], n - 1, DIM**-0.5)
        torch.testing.assert_close(out[s:s + 1].double(), ref, atol=tol, rtol=tol)
    # the new tokens were stored where the slot mapping says
    for s, slot in enumerate(md.slot_mapping.tolist()):
        assert torch.equal(k_cache.view(-1, KV_HEADS, DIM)[slot], k[s])


def test_decode_skips_slots_of_minus_one():
    q, k, v, k_cache, v_cache, md, keys, values = _decode_case([5, 7, 3], torch.float32, valid_slots=False)
    before = k_cache.clone()
    prepared = TorchAttentionBackend().prepare(md)
    assert not prepared.slots_all_valid
    TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, prepared, DIM**-0.5)
    changed = (k_cache != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == sorted({md.slot_mapping[0].item() // BLOCK, md.slot_mapping[1].item() // BLOCK})


@pytest.mark.parametrize("is_decode", [True, False], ids=["decode", "prefill"])
def test_fp8_cache_attends_over_the_dequantized_values(is_decode):
    """An fp8 cache through the torch backend (store + attention) against the float64 attention above over
    what the cache holds: each stored byte decoded by a table of all 256 e4m3 values, times its scale. K is
    stored less the layer's center; the float64 reference attends over the original K plus the rounding
    error, i.e. without the center (softmax cancels it)."""
    from allmos.attention.torch_ref import FP8_KV_DTYPE, KVScales

    g = torch.Generator().manual_seed(5)
    decoded = torch.arange(256, dtype=torch.uint8).view(FP8_KV_DTYPE).double()  # code -> value (NaN codes too)
    seq_lens = [9, 3, 13]
    q_lens = [1, 1, 1] if is_decode else [9, 2, 6]
    tables = [[7, 1, 15, 0], [4, 11, 0, 0], [19, 2, 8, 5]]
    k_cache, v_cache = (c.clamp(-448, 448).to(FP8_KV_DTYPE) for c in _cache(20, torch.float32, seed=6))  # garbage
    scales = KVScales(torch.tensor([0.3]), torch.tensor([0.05]), torch.randn(KV_HEADS, DIM, generator=g) * 4)
    keys = [torch.randn(n, KV_HEADS, DIM, generator=g) * 3 + scales.k_center for n in seq_lens]
    values = [torch.randn(n, KV_HEADS, DIM, generator=g) for n in seq_lens]
    backend = TorchAttentionBackend()
    for table, k, v, n, q_len in zip(tables, keys, values, seq_lens, q_lens):  # context; forward stores the rest
        md = _one_seq_prefill(table, n - q_len)
        if n > q_len:
            backend.forward(torch.zeros(n - q_len, HEADS, DIM), k[: n - q_len], v[: n - q_len], k_cache, v_cache, md,
                            1.0, scales)
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    slots = [t[p // BLOCK] * BLOCK + p % BLOCK
             for t, n, q_len in zip(tables, seq_lens, q_lens) for p in range(n - q_len, n)]
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), is_decode=is_decode, query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens)
    q = torch.randn(starts[-1], HEADS, DIM, generator=g)
    new_k = torch.cat([k[n - q_len:] for k, n, q_len in zip(keys, seq_lens, q_lens)])
    new_v = torch.cat([v[n - q_len:] for v, n, q_len in zip(values, seq_lens, q_lens)])
    out = backend.forward(q, new_k, new_v, k_cache, v_cache, backend.prepare(md), DIM**-0.5, scales)
    for s, (table, n, q_len) in enumerate(zip(tables, seq_lens, q_lens)):
        rows = [table[t // BLOCK] * BLOCK + t % BLOCK for t in range(n)]
        stored_k = decoded[k_cache.view(-1, KV_HEADS, DIM).view(torch.uint8)[rows].long()] * 0.3
        stored_v = decoded[v_cache.view(-1, KV_HEADS, DIM).view(torch.uint8)[rows].long()] * 0.05
        centered = keys[s].double() - scales.k_center.double()
        assert ((stored_k - centered).abs() <= centered.abs() * 2**-4 + 2**-10 * 0.3 + 1e-6).all()  # half a step
        ref = _naive(q[starts[s]:starts[s + 1]], stored_k, stored_v, n - q_len, DIM**-0.5)
        torch.testing.assert_close(out[starts[s]:starts[s + 1]].double(), ref, atol=1e-5, rtol=1e-5)


def _one_seq_prefill(table: list[int], n: int) -> AttentionMetadata:
    """Metadata of one fresh sequence of ``n`` tokens (a prefill that stores its K/V)."""
    slots = [table[t // BLOCK] * BLOCK + t % BLOCK for t in range(n)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32), block_tables=torch.tensor([table], dtype=torch.int32),
        max_query_len=n, max_seq_len=n, is_decode=n == 1, query_start_loc_cpu=[0, n], seq_lens_cpu=[n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize(("table", "seq_len"), [([6, 0, 0], 3), ([3, 4, 5], 9), ([3, 4, 5], 12), ([3, 4, 9], 6)],
                         ids=["one-block", "three-blocks", "full-blocks", "consecutive-prefix"])
def test_one_sequence_in_consecutive_blocks_reads_one_slice(dtype, table, seq_len):
    """Decode of a single sequence whose context blocks are consecutive reads one slice of the flat cache:
    bitwise the output of the gather through per-token slots, and the float64 attention over its context."""
    from allmos.attention.torch_backend import _context_slots, _decode
    from allmos.attention.torch_ref import FP8_KV_DTYPE, KVScales

    g = torch.Generator().manual_seed(7)
    k_cache, v_cache = (c.clamp(-448, 448).to(dtype) for c in _cache(12, torch.float32, seed=8))  # garbage
    scales = KVScales(torch.tensor([0.3]), torch.tensor([0.05]), None) if dtype == FP8_KV_DTYPE else None
    keys = torch.randn(seq_len, KV_HEADS, DIM, generator=g)
    values = torch.randn(seq_len, KV_HEADS, DIM, generator=g)
    backend = TorchAttentionBackend()
    backend.forward(torch.zeros(seq_len - 1, HEADS, DIM), keys[:-1], values[:-1], k_cache, v_cache,
                    _one_seq_prefill(table, seq_len - 1), 1.0, scales)  # the context, then one decode step
    md = backend.prepare(_one_seq_prefill(table, seq_len))
    md.slot_mapping, md.is_decode = md.slot_mapping[-1:], True
    md.query_start_loc, md.query_start_loc_cpu, md.max_query_len = torch.tensor([0, 1], dtype=torch.int32), [0, 1], 1
    q = torch.randn(1, HEADS, DIM, generator=g).to(k_cache.dtype if dtype != FP8_KV_DTYPE else torch.float32)
    out = backend.forward(q, keys[-1:].to(q.dtype), values[-1:].to(q.dtype), k_cache, v_cache, md, DIM**-0.5, scales)
    assert md.context_start == table[0] * BLOCK and md.token_slots is None
    gathered = backend.prepare(md)
    gathered.context_start = None
    _context_slots(gathered, BLOCK)
    assert torch.equal(out, _decode(q, k_cache, v_cache, gathered, DIM**-0.5, scales))
    if dtype != FP8_KV_DTYPE:
        ref = _naive(q, keys.to(dtype), values.to(dtype), seq_len - 1, DIM**-0.5)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
