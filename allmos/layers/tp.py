"""Tensor-parallel group handle passed explicitly to every sharded layer (no global state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group; ``size == 1`` means no communication."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def shard(self, total: int) -> tuple[int, int]:
        """(start, size) of this rank's part of ``total`` items split evenly (``total % size == 0``)."""
        if total % self.size:
            raise ValueError(f"{total} is not divisible by tensor_parallel_size={self.size}")
        per_rank = total // self.size
        return self.rank * per_rank, per_rank


SINGLE = TPGroup()
