"""The reference attention backend in plain torch: runs on CPU and CUDA, and is the oracle.

Decode reads only the cache slots of each sequence's context: the first layer of a step turns the block
tables into one flat slot index per context token, shared by every later layer, so a layer gathers
``num_seqs * max_seq_len`` rows (never whole padded blocks) and runs one float32 SDPA over them (float32:
the CPU's bfloat16 SDPA kernel is several times slower than the conversion plus a float32 SDPA). A single
sequence whose blocks are consecutive in the cache (the usual batch-1 case) skips the gather: its context
is one slice of the flat cache, converted straight to float32 (the same values, fewer ops per layer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from allmos.attention.backend import AttentionBackend
from allmos.attention.metadata import AttentionMetadata
from allmos.attention.torch_ref import (
    KVScales,
    as_storage,
    dequantize_kv,
    paged_attention_ref,
    quantize_kv_pair,
    store_kv_cache_ref,
)


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    """``AttentionMetadata`` plus per-step values this backend derives once and every layer reuses."""

    slots_all_valid: bool = False  # no -1 in slot_mapping: stores need no masking
    uniform_lengths: bool = False  # every sequence has max_seq_len tokens: decode needs no mask
    token_slots: torch.Tensor | None = None  # [num_seqs * max_seq_len] int64, built by the first layer
    context_mask: torch.Tensor | None = None  # [num_seqs, 1, 1, max_seq_len] bool (None: uniform_lengths)
    # one sequence in consecutive blocks: flat cache slot of its first token (set by the first layer; then
    # token_slots stays None)
    context_start: int | None = None


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def prepare(self, metadata: AttentionMetadata) -> TorchAttentionMetadata:
        values = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(AttentionMetadata)}
        slots_all_valid = metadata.slot_mapping.device.type == "cpu" and (
            metadata.slot_mapping.numel() == 0 or int(metadata.slot_mapping.min()) >= 0)
        lengths = metadata.seq_lens_cpu
        uniform = lengths is not None and len(lengths) > 0 and min(lengths) == max(lengths)
        return TorchAttentionMetadata(**values, slots_all_valid=slots_all_valid, uniform_lengths=uniform)

    def forward(self, query, key, value, k_cache, v_cache, metadata: AttentionMetadata, scale: float,
                kv_scales: KVScales | None = None):
        if isinstance(metadata, TorchAttentionMetadata) and metadata.slots_all_valid:
            _store_all(key, value, k_cache, v_cache, metadata.slot_mapping, kv_scales)
        else:
            store_kv_cache_ref(key, value, k_cache, v_cache, metadata.slot_mapping, kv_scales)
        if metadata.is_decode:
            if not isinstance(metadata, TorchAttentionMetadata):
                metadata = self.prepare(metadata)
            return _decode(query, k_cache, v_cache, metadata, scale, kv_scales)
        return paged_attention_ref(query, k_cache, v_cache, metadata.query_start_loc_cpu,
                                   metadata.seq_lens_cpu, metadata.block_tables, scale, kv_scales)


def _store_all(key, value, k_cache, v_cache, slot_mapping: torch.Tensor, kv_scales: KVScales | None) -> None:
    """``store_kv_cache_ref`` when every slot is valid: two index copies, no boolean masks."""
    k_new, v_new = quantize_kv_pair(key, value, k_cache.dtype, kv_scales)
    as_storage(k_cache).view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, as_storage(k_new))
    as_storage(v_cache).view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, as_storage(v_new))


def _plan_context(metadata: TorchAttentionMetadata, block_size: int) -> None:
    """How this step's decode reads the context, decided once for every layer: ``context_start`` for a
    single sequence whose blocks are consecutive (read on the host: the CPU's tensors), else ``token_slots``."""
    if metadata.num_seqs == 1 and metadata.block_tables.device.type == "cpu":
        num_blocks = -(-metadata.max_seq_len // block_size)
        blocks = metadata.block_tables[0, :num_blocks].tolist()
        if blocks == list(range(blocks[0], blocks[0] + num_blocks)):
            metadata.context_start = blocks[0] * block_size
            return
    _context_slots(metadata, block_size)


def _context_slots(metadata: TorchAttentionMetadata, block_size: int) -> None:
    """Fill ``token_slots`` (cache slot of token t of sequence s at ``s * max_seq_len + t``; tokens past a
    sequence's length point at a valid slot and are masked) and ``context_mask``."""
    max_len = metadata.max_seq_len
    t = torch.arange(max_len, device=metadata.block_tables.device)  # [max_len]
    blocks = metadata.block_tables[:, t // block_size].long()  # [num_seqs, max_len]
    metadata.token_slots = (blocks * block_size + t % block_size).flatten()
    if not metadata.uniform_lengths:
        valid = t[None, :] < metadata.seq_lens[:, None]  # [num_seqs, max_len]
        metadata.context_mask = valid[:, None, None, :]


def _gather_context(cache: torch.Tensor, token_slots: torch.Tensor, cache_scale: torch.Tensor | None,
                    shape: tuple[int, ...]) -> torch.Tensor:  # [num_seqs, max_len, num_kv_heads, head_dim] fp32
    """The cached rows of ``token_slots``, as float32 (fp8 rows dequantized with ``cache_scale``)."""
    rows = as_storage(cache).view(-1, *cache.shape[2:]).index_select(0, token_slots).view(cache.dtype)
    return dequantize_kv(rows, cache_scale).view(shape)


def _slice_context(cache: torch.Tensor, start: int, cache_scale: torch.Tensor | None,
                   shape: tuple[int, ...]) -> torch.Tensor:  # [1, max_len, num_kv_heads, head_dim] float32
    """``_gather_context`` of one sequence whose context is the flat cache's slots ``start ...``."""
    rows = cache.view(-1, *cache.shape[2:])[start:start + shape[1]]  # [max_len, num_kv_heads, head_dim]
    return dequantize_kv(rows, cache_scale).view(shape)


def _decode(query, k_cache, v_cache, metadata: TorchAttentionMetadata, scale: float,
            kv_scales: KVScales | None = None) -> torch.Tensor:
    """All sequences at once: gather each one's context slots, mask past its length, one GQA SDPA call."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if metadata.token_slots is None and metadata.context_start is None:
        _plan_context(metadata, k_cache.shape[1])
    shape = (num_seqs, metadata.max_seq_len, num_kv_heads, head_dim)
    # float32 before the transpose: converting the strided view is several times slower
    k_scale, v_scale = (None, None) if kv_scales is None else (kv_scales.k_scale, kv_scales.v_scale)
    if metadata.context_start is not None:  # one sequence, one slice
        k = _slice_context(k_cache, metadata.context_start, k_scale, shape)
        v = _slice_context(v_cache, metadata.context_start, v_scale, shape)
    else:
        k = _gather_context(k_cache, metadata.token_slots, k_scale, shape)
        v = _gather_context(v_cache, metadata.token_slots, v_scale, shape)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [num_seqs, num_kv_heads, max_len, head_dim]
    q = query.unsqueeze(2).float()  # [num_seqs, num_heads, 1, head_dim]
    # GQA inside SDPA (no repeated K/V copies). Masked slots hold finite values (the runner zero-fills the
    # cache at allocation; later they hold stale K/V): a masked score still meets its V row in the weighted
    # sum, and 0 * NaN would be NaN.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=metadata.context_mask, scale=scale,
                                         enable_gqa=num_heads != num_kv_heads)
    return out.squeeze(2).to(query.dtype)  # [num_seqs, num_heads, head_dim]
