"""Linear layers that know how to load their own tensor-parallel shard.

Column-parallel layers split the output features across ranks (no communication); row-parallel layers
split the input features and all-reduce the output. Each parameter carries ``weight_loader(param,
loaded, shard_id=None)`` where ``loaded`` is the full checkpoint tensor (or a lazy safetensors slice) and
``shard_id`` names a packed part ("q"/"k"/"v", or an index into ``output_sizes``).

After loading, ``allmos.layers.quantization.quantize_model`` may replace a layer's float ``weight`` by
packed buffers and set ``quant_method``; ``matmul`` then goes through that method's kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from allmos.layers.fused_linear import project
from allmos.layers.quantization import QuantMethod
from allmos.layers.tp import SINGLE, TPGroup
from allmos.layers.weights import copy_checked, narrow, shape_of

if TYPE_CHECKING:
    from allmos.kernels.gemv_tuning import GemvTable


class LinearBase(nn.Module):
    gemv_table: GemvTable | None = None  # CUDA: small batches through the Triton GEMV (see layers.fused_linear)
    quant_method: QuantMethod | None = None  # set by quantize_model after loading

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T`` without bias, through the quantized kernel when there is one."""
        if self.quant_method is not None:
            return self.quant_method.apply(self, x)
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv_table is not None:  # CUDA, tuned at start-up: small batches may take the Triton GEMV
            return project(self, x, self.bias)
        if self.quant_method is not None:
            y = self.quant_method.apply(self, x)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """The same full weight on every rank."""

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        copy_checked(param, narrow(loaded, 0, 0, shape_of(loaded)[0]), "ReplicatedLinear")


class ColumnParallelLinear(LinearBase):
    """``y = x W^T`` with W's rows (output features) split across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup = SINGLE) -> None:
        self.full_out_features = out_features
        _, local = tp.shard(out_features)
        super().__init__(in_features, local, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        _check_dim(loaded, 0, self.full_out_features, type(self).__name__)
        start, size = self.tp.shard(self.full_out_features)
        copy_checked(param, narrow(loaded, 0, start, size), type(self).__name__)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs packed in one weight (e.g. gate_proj + up_proj = gate_up_proj).
    Each rank holds its shard of every part, concatenated in order."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, tp: TPGroup = SINGLE):
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        part = int(shard_id)
        _check_dim(loaded, 0, self.output_sizes[part], f"{type(self).__name__} part {part}")
        start, size = self.tp.shard(self.output_sizes[part])
        offset = sum(self.output_sizes[:part]) // self.tp.size
        copy_checked(param.data.narrow(0, offset, size), narrow(loaded, 0, start, size),
                     f"{type(self).__name__} part {part}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections packed in one weight, split by attention head.

    When ranks outnumber KV heads, each KV head is replicated on ``tp.size // num_kv_heads`` ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TPGroup = SINGLE) -> None:
        if num_heads % tp.size:
            raise ValueError(f"num_attention_heads={num_heads} is not divisible by tensor_parallel_size={tp.size}")
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(f"num_key_value_heads={num_kv_heads} and tensor_parallel_size={tp.size}: "
                             "one must divide the other")
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        local_out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, local_out, bias, tp)
        self.full_out_features = (num_heads + 2 * num_kv_heads) * head_dim

    def kv_head_start(self) -> int:
        """Index of the first KV head this rank holds."""
        if self.total_num_kv_heads >= self.tp.size:
            return self.tp.rank * self.num_kv_heads
        return self.tp.rank // (self.tp.size // self.total_num_kv_heads)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        d = self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            total, start, size, offset = self.total_num_heads * d, self.tp.rank * q_size, q_size, 0
        elif shard_id in ("k", "v"):
            total, start, size = self.total_num_kv_heads * d, self.kv_head_start() * d, kv_size
            offset = q_size + (kv_size if shard_id == "v" else 0)
        else:
            raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        _check_dim(loaded, 0, total, f"{shard_id}_proj")
        copy_checked(param.data.narrow(0, offset, size), narrow(loaded, 0, start, size), f"{shard_id}_proj")


class RowParallelLinear(LinearBase):
    """``y = x W^T`` with W's columns (input features) split across ranks, then an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup = SINGLE) -> None:
        self.full_in_features = in_features
        _, local = tp.shard(in_features)
        super().__init__(local, out_features, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if param.dim() == 1:  # bias: full on every rank, added once after the reduce
            copy_checked(param, narrow(loaded, 0, 0, shape_of(loaded)[0]), "RowParallelLinear bias")
            return
        _check_dim(loaded, 1, self.full_in_features, "RowParallelLinear")
        start, size = self.tp.shard(self.full_in_features)
        copy_checked(param, narrow(loaded, 1, start, size), "RowParallelLinear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = project(self, x, None) if self.gemv_table is not None else self.matmul(x)
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


def _check_dim(loaded: Any, dim: int, expected: int, what: str) -> None:
    shape = shape_of(loaded)
    if len(shape) <= dim or shape[dim] != expected:
        raise ValueError(f"{what}: checkpoint shape {shape} has {shape[dim] if len(shape) > dim else '?'} "
                         f"along dim {dim}, the model expects {expected} (is config.json the checkpoint's own?)")
