"""Vocabulary-parallel embedding and LM head: each rank holds ``ceil(vocab / tp)`` rows."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allmos.layers.fused_linear import project
from allmos.layers.tp import SINGLE, TPGroup
from allmos.layers.weights import copy_checked, narrow, shape_of


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank
        self.num_local_rows = max(0, min(self.rows_per_rank, vocab_size - self.vocab_start))
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        shape = shape_of(loaded)
        if shape[0] != self.vocab_size:
            raise ValueError(f"embedding: checkpoint has {shape[0]} rows, config.json vocab_size is {self.vocab_size}")
        param.data.zero_()  # padding rows of the last shard stay zero
        copy_checked(param.data[: self.num_local_rows],
                     narrow(loaded, 0, self.vocab_start, self.num_local_rows), "embedding")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden]
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_local_rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the whole vocabulary from each rank's rows (may share the embedding's weight)."""

    gemv_table = None  # CUDA: small batches through the Triton GEMV (see layers.fused_linear)
    quant_method = None  # allmos.layers.quantization.QuantMethod, set by quantize_model after loading

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [num_seqs, hidden] -> [num_seqs, vocab]
        if self.quant_method is not None:
            logits = self.quant_method.apply(self, hidden)
        else:
            logits = project(self, hidden, None)
        if logits.device.type == "cpu" and logits.dtype != torch.float32:
            logits = logits.float()  # the CPU's bfloat16 argmax / softmax over the vocabulary are slow
        logits = self.tp.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
