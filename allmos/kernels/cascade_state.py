"""The hand-over from cascade prefix attention to the decode kernel (``allmos.kernels.cascade_attention``).

The prefix kernel leaves, per (sequence, query head, prefix split), a float32 output normalized over that
split's keys and its log-sum-exp (base 2). The decode kernel, given a ``CascadePrefix``, skips each
sequence's ``prefix_blocks`` leading blocks and starts the online softmax of its first key split from the
merge of those partials (``cascade_prefix_state``), so the result covers prefix and suffix. A sequence
with ``prefix_blocks == 0`` starts from the empty state, as without cascade.

Layout: ``partial_out`` is ``[num_seqs, num_heads, num_splits, head_dim]`` and ``lse``
``[num_seqs, num_heads, num_splits]``, both contiguous (flat index ``(seq * num_heads + head) * num_splits +
split``), where ``num_splits`` is this launch's prefix split count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class CascadePrefix:
    """The prefix result one decode launch merges in (device tensors)."""

    prefix_blocks: torch.Tensor  # [num_seqs] int32: leading blocks attended by the prefix kernel (0: none)
    partial_out: torch.Tensor  # [num_seqs, num_heads, num_splits, head_dim] float32, contiguous
    lse: torch.Tensor  # [num_seqs, num_heads, num_splits] float32, contiguous; -inf: no keys
    num_splits: int

    def check(self, query: torch.Tensor) -> None:
        """Raise ValueError unless the buffers fit ``query`` [num_seqs, num_heads, head_dim]."""
        num_seqs, num_heads, head_dim = query.shape
        want = (num_seqs, num_heads, self.num_splits, head_dim)
        if tuple(self.partial_out.shape) != want or tuple(self.lse.shape) != want[:3]:
            raise ValueError(f"cascade partial_out {tuple(self.partial_out.shape)} / lse {tuple(self.lse.shape)} "
                             f"must be {want} / {want[:3]}")
        if not (self.partial_out.is_contiguous() and self.lse.is_contiguous()):
            raise ValueError("cascade partial_out and lse must be contiguous")
        if self.prefix_blocks.shape != (num_seqs,) or self.prefix_blocks.dtype != torch.int32:
            raise ValueError(f"cascade prefix_blocks must be int32 [{num_seqs}]")


def cascade_launch_args(cascade: CascadePrefix | None, query: torch.Tensor, unused: torch.Tensor) -> tuple:
    """The decode kernel's (cascade_blocks_ptr, cascade_part_ptr, cascade_lse_ptr, cascade_splits); ``unused``
    stands in for the pointers when ``cascade`` is None (the kernel then reads none of them)."""
    if cascade is None:
        return unused, unused, unused, 0
    cascade.check(query)
    return cascade.prefix_blocks, cascade.partial_out, cascade.lse, cascade.num_splits


@triton.jit
def cascade_prefix_state(
    part_ptr, lse_ptr, seq, split, skip, heads, row_valid, num_splits,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, CASCADE: tl.constexpr,
):
    """Online-softmax state (acc [GROUP_P, HEAD_DIM], m [GROUP_P], l [GROUP_P], base 2) of decode split
    ``split`` of ``seq`` before its first key: for split 0 of a sequence with ``skip > 0`` prefix blocks, the
    merge of the ``num_splits`` prefix partials of its query ``heads``; else (and without ``CASCADE``) the
    empty state. A partial (o, lse) stands for acc = o * 2^(lse - m), l = 2^(lse - m)."""
    acc = tl.zeros([GROUP_P, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([GROUP_P], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_P], dtype=tl.float32)
    if CASCADE:
        dims = tl.arange(0, HEAD_DIM)
        rows = (seq.to(tl.int64) * tl.num_programs(1) * GROUP + heads) * num_splits  # [GROUP_P] split-0 index
        for k in range(tl.where((skip > 0) & (split == 0), num_splits, 0)):
            lse = tl.load(lse_ptr + rows + k, mask=row_valid, other=float("-inf"))  # [GROUP_P]
            o = tl.load(part_ptr + (rows + k)[:, None] * HEAD_DIM + dims[None, :], mask=row_valid[:, None],
                        other=0.0)  # [GROUP_P, HEAD_DIM]
            m_new = tl.maximum(m_i, lse)
            alpha = tl.exp2(m_i - m_new)
            beta = tl.exp2(lse - m_new)  # 0 for an empty split (lse = -inf)
            acc = acc * alpha[:, None] + o * beta[:, None]
            l_i = l_i * alpha + beta
            m_i = m_new
    return acc, m_i, l_i
