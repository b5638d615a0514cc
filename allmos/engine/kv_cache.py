"""Size and layout of one rank's paged KV cache: the only place that turns model facts into bytes.

The cache of a rank is one tensor ``[2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]``
(K then V), so a block costs ``bytes_per_block`` across all layers. The cache dtype is the model's, or
float8_e4m3fn for ``kv_cache_dtype="fp8"``: one byte per element, so the same memory holds twice the tokens of a
16-bit cache (values are stored divided by each layer's ``k_scale`` / ``v_scale``, see
``allmos.attention.torch_ref.quantize_kv``). How many blocks an engine gets is decided here too: a fixed budget
on the CPU, or what ``gpu_memory_utilization`` leaves on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from allmos.models.model_config import ModelConfig

CPU_KV_CACHE_BYTES = 1 << 30  # KV budget on the CPU when num_kvcache_blocks is not given


@dataclass(frozen=True)
class KVCacheSpec:
    """One rank's KV-cache layout: per-rank KV heads, full layers, ``block_size`` tokens a block."""

    num_layers: int
    num_kv_heads: int  # on this rank
    head_dim: int
    block_size: int
    dtype: torch.dtype  # of the cache (EngineConfig.resolved_kv_cache_dtype), not necessarily the model's

    @classmethod
    def for_model(cls, model_config: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1
                  ) -> KVCacheSpec:
        return cls(model_config.num_hidden_layers, model_config.num_kv_heads_per_rank(tp_size),
                   model_config.head_dim, block_size, dtype)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens of one sequence."""
        return -(-num_tokens // self.block_size)

    def allocate(self, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(k_cache, v_cache) per layer, each [num_blocks, block_size, num_kv_heads, head_dim], zeroed: the
        torch decode path reads (masked) slots past each sequence's length, which must not hold NaN bit
        patterns; the Triton kernels never read them."""
        cache = torch.zeros(2, self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim,
                            dtype=self.dtype, device=device)
        return [(cache[0, i], cache[1, i]) for i in range(self.num_layers)]


def cpu_num_blocks(spec: KVCacheSpec, max_model_len: int, max_num_seqs: int,
                   budget_bytes: int = CPU_KV_CACHE_BYTES) -> int:
    """Blocks on the CPU: what ``budget_bytes`` holds (at least one max_model_len sequence), never more
    than ``max_num_seqs`` such sequences need."""
    per_seq = spec.blocks_for(max_model_len)
    budget_blocks = max(per_seq, budget_bytes // spec.bytes_per_block)
    return min(budget_blocks, per_seq * max_num_seqs)


def gpu_num_blocks(spec: KVCacheSpec, total_bytes: int, free_bytes: int, activation_peak_bytes: int,
                   gpu_memory_utilization: float) -> int:
    """Blocks that fit in what ``gpu_memory_utilization`` of the card leaves after everything already on it
    (``total_bytes - free_bytes``) and the engine's activation peak; ValueError when not one fits."""
    in_use = total_bytes - free_bytes
    available = total_bytes * gpu_memory_utilization - in_use - activation_peak_bytes
    num_blocks = int(available // spec.bytes_per_block)
    if num_blocks < 1:
        raise ValueError(f"no GPU memory left for the KV cache ({in_use / 2**30:.1f} GiB in use, "
                         f"{activation_peak_bytes / 2**30:.1f} GiB activation peak, {total_bytes / 2**30:.1f} GiB "
                         "card); raise gpu_memory_utilization or lower max_num_batched_tokens")
    return num_blocks
