"""Decode at fixed batch sizes: one CUDA graph per size (forward + LM head), fed through persistent
input buffers.

Invariants: a graph for size ``bs`` reads rows ``[:bs]`` of the buffers; the runner writes rows ``[:n]``
and pads rows ``n..bs`` as no-ops (slot -1: nothing stored; seq_len 0: attention returns zeros). The
attention backend's decode launch depends only on ``bs`` (never on sequence lengths), so a graph stays
valid for every later step of that size. With ``capture=False`` (``enforce_eager``) the same padded
forward runs eagerly, so eager and captured decode compute exactly the same thing.

When the backend runs cascade attention (``cascade_members_per_tile``), each size of at least two also gets a
cascade graph over persistent cascade buffers (docs/cascade_attention.md). Every upload rewrites every
cascade entry the graph reads (unused tile slots and padded rows zeroed, so a replay never meets an earlier
step's groups); a step whose inputs carry cascade groups replays the cascade graph, other steps the plain one.

On CUDA, before capturing, ``use_default_decode_kernels`` switches on the decode kernels that measured faster
on an H200: the decoder's fused q/k-norm + RoPE + K/V store (prefill uses it too from then on) and the Triton
GEMV for one-row batches; other batch sizes keep cuBLAS. With ``ALLMOS_DECODE_KERNELS=1`` the tuned decode
kernels replace that choice (``enable_decode_kernels``): small-batch Triton GEMVs chosen per captured size
from timings on this device, with the norm fused in, and split decode attention that merges its splits in the
same launch. That path is off by default: on an H200 it cut the kernels per step (348 -> 208 at batch 1) but
not the GPU time (1.23 -> 1.43 ms at batch 1; docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from allmos.attention.backend import AttentionBackend
from allmos.attention.cascade import MIN_GROUP_SIZE, CascadeArrays, tile_capacity
from allmos.attention.context import ForwardContext, forward_context
from allmos.attention.metadata import AttentionMetadata
from allmos.engine.step_inputs import HostStep
from allmos.utils.transfer import pack_aligned, split_packed, staged

logger = logging.getLogger("allmos")

MAX_CAPTURE_SIZE = 512
DECODE_KERNELS_ENV = "ALLMOS_DECODE_KERNELS"


def decode_kernels_enabled() -> bool:
    """Off unless the environment sets ``ALLMOS_DECODE_KERNELS=1`` (an experimental path; see the module)."""
    value = os.environ.get(DECODE_KERNELS_ENV, "0").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError(f"{DECODE_KERNELS_ENV} must be 0 or 1, got {value!r}")
    return value in ("1", "true", "on")


def enable_decode_kernels(model: torch.nn.Module, backend: AttentionBackend, sizes: list[int],
                          device: torch.device) -> None:
    """Time and choose each projection's small-batch kernel at ``sizes`` and switch the model over, and let
    the backend fold its split-decode merge into the attention launch; a model without ``gemv_sites`` (or
    an install without Triton) keeps its path."""
    from allmos.kernels import gemv

    if hasattr(backend, "fold_split_merge"):
        backend.fold_split_merge = True
    if gemv is None or not hasattr(model, "gemv_sites"):
        return
    from allmos.kernels.gemv_tuning import tune_gemv, tuning_sizes

    timed = tuning_sizes(sizes)
    tables = {role: tune_gemv(sig, timed, device) for role, (sig, _) in model.gemv_sites().items()}
    for role, table in tables.items():
        logger.info("decode GEMV %s: %s", role, table.describe())
    model.use_decode_kernels(tables)


def use_default_decode_kernels(model: torch.nn.Module) -> None:
    """The decode kernels that measured faster on an H200 without start-up tuning (docs/benchmarks.md): the
    fused q/k-norm + RoPE + K/V store at every batch size, and the Triton row GEMV for batches up to 4 rows
    (``gemv_tuning.row_kernel_tables``). A model without these hooks (or an install without Triton) keeps its
    path."""
    from allmos.kernels import gemv

    if gemv is None or not hasattr(model, "gemv_sites"):
        return
    from allmos.kernels.gemv_tuning import row_kernel_tables

    model.use_decode_kernels(row_kernel_tables(model.gemv_sites()), fuse_kv_store=True)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``min(max_num_seqs, 512)`` (always including the cap)."""
    cap = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4, 8) if s <= cap] + list(range(16, cap + 1, 16))
    if sizes[-1] != cap:
        sizes.append(cap)
    return sizes


class DecodeGraphs:
    """The captured decode graphs and their persistent input buffers.

    Inputs reach a graph in two host-to-device copies straight into its buffers (``load``), laid out by
    ``_layout(bs)``: one int64 buffer holds ``input_ids | positions | slot_mapping`` (then the indices of
    inputs that are the previous step's samples, for the runner's device-side fill), one int32 buffer holds
    ``seq_lens | cascade prefix blocks | cascade members | cascade tiles | block_tables``. Rows ``n..bs``
    are padding written by the host (slot -1, seq_len 0, no cascade group); the block-table rows past ``n``
    are not sent (a row of seq_len 0 reads none). No device-to-device copy
    separates the upload from the replay.
    """

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, kv_caches, max_num_seqs: int,
                 max_blocks_per_seq: int, device: torch.device, capture: bool = True) -> None:
        self.model, self.backend, self.kv_caches, self.device = model, backend, kv_caches, device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.tile_members = backend.cascade_members_per_tile  # None: no cascade graphs
        max_bs = self.sizes[-1]
        i64_size, i32_size = _buffer_sizes(max_bs, max_blocks_per_seq, self.tile_members)
        self.i64 = torch.zeros(i64_size, dtype=torch.int64, device=device)
        self.i32 = torch.zeros(i32_size, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # by (batch size, cascade)
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.max_seq_len = max_blocks_per_seq * kv_caches[0][0].shape[1]
        self.capture = capture
        self.inputs = {bs: self._views(bs) for bs in self.sizes}
        if decode_kernels_enabled():
            enable_decode_kernels(model, backend, self.sizes, device)
        elif device.type == "cuda":
            use_default_decode_kernels(model)
        if capture:
            self._capture_all()

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def size_for(self, num_seqs: int) -> int:
        """The smallest captured batch size that holds ``num_seqs`` rows."""
        return next(s for s in self.sizes if s >= num_seqs)

    def _write_padding(self, bs: int) -> None:
        """Size ``bs``'s inputs as all-padding rows (what its warm-up and capture run on; the sizes' views
        overlap, so each is written just before use)."""
        views = self.inputs[bs]
        views.input_ids.zero_()
        views.positions.zero_()
        views.slot_mapping.fill_(-1)
        views.seq_lens.zero_()
        views.cascade_prefix_blocks.zero_()
        views.cascade_members.zero_()
        views.cascade_tiles.zero_()

    def _views(self, bs: int) -> GraphInputs:
        """The views of the persistent buffers that the graph of size ``bs`` reads."""
        i64, i32 = _layout(bs, self.max_blocks_per_seq, self.tile_members)
        ids, pos, slots = (self.i64[start:start + bs] for start in i64[:3])
        seq_lens, prefix_blocks, members = (self.i32[start:start + bs] for start in i32[:3])
        capacity = _tile_capacity(bs, self.tile_members)
        tiles = self.i32[i32[3]:i32[3] + capacity * 3].view(capacity, 3)
        tables = self.i32[i32[4]:i32[4] + bs * self.max_blocks_per_seq].view(bs, self.max_blocks_per_seq)
        return GraphInputs(ids, pos, slots, seq_lens, tables, prefix_blocks, members, tiles)

    def load(self, host: HostStep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy one decode step's host inputs into the buffers of its size; returns the device views
        (input_ids ``[n]``, the flat indices of inputs that are previous samples, and their sample rows),
        so the caller can fill those inputs on the device before ``replay``."""
        n, bs = host.num_seqs, self.size_for(host.num_seqs)
        width = self.max_blocks_per_seq
        if host.block_tables.shape[1] > width:
            raise ValueError(f"a block table of {host.block_tables.shape[1]} blocks exceeds {width}")
        i64_parts = [_padded(host.input_ids, bs, 0), _padded(host.positions, bs, 0),
                     _padded(host.slot_mapping, bs, -1), host.pending, host.pending_rows]
        tables = np.zeros((n, width), dtype=np.int32)
        tables[:, :host.block_tables.shape[1]] = host.block_tables
        i32_parts = [_padded(host.seq_lens, bs, 0), *self._cascade_parts(host.cascade, bs), tables.ravel()]
        i64, i64_starts = pack_aligned(i64_parts, np.int64)
        i32, _ = pack_aligned(i32_parts, np.int32)
        self.i64[:i64.size].copy_(staged(i64, self.device), non_blocking=True)
        self.i32[:i32.size].copy_(staged(i32, self.device), non_blocking=True)
        input_ids, _, _, pending, rows = split_packed(self.i64, i64_starts, [p.size for p in i64_parts])
        return input_ids[:n], pending, rows

    def _cascade_parts(self, arrays: CascadeArrays | None, bs: int) -> list[np.ndarray]:
        """The cascade entries of size ``bs``'s buffers: the step's groups, zeros elsewhere."""
        capacity = _tile_capacity(bs, self.tile_members)
        if arrays is None:
            return [np.zeros(bs, np.int32), np.zeros(bs, np.int32), np.zeros(capacity * 3, np.int32)]
        if self.tile_members is None:
            raise RuntimeError("cascade groups reached decode graphs captured without cascade")
        return [_padded(arrays.prefix_blocks, bs, 0), _padded(arrays.members, bs, 0),
                _padded(arrays.tiles.ravel(), capacity * 3, 0)]

    def _metadata(self, bs: int, views: GraphInputs, cascade: bool) -> AttentionMetadata:
        fields = dict(cascade_prefix_blocks=views.cascade_prefix_blocks, cascade_members=views.cascade_members,
                      cascade_tiles=views.cascade_tiles) if cascade else {}
        md = AttentionMetadata(
            slot_mapping=views.slot_mapping, query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=views.seq_lens, block_tables=views.block_tables, max_query_len=1,
            max_seq_len=self.max_seq_len, is_decode=True, **fields)
        return self.backend.prepare(md)

    def _variants(self) -> list[tuple[int, bool]]:
        """(batch size, cascade) of every graph, largest first."""
        return [(bs, cascade) for bs in reversed(self.sizes) for cascade in (False, True)
                if not cascade or (self.tile_members is not None and bs >= MIN_GROUP_SIZE)]

    def _forward(self, bs: int, cascade: bool = False) -> torch.Tensor:
        views = self.inputs[bs]
        ctx = ForwardContext(self._metadata(bs, views, cascade), self.kv_caches, self.backend,
                             rope_seq_lens=views.seq_lens)
        with forward_context(ctx):
            hidden = self.model(views.input_ids, views.positions)  # [bs, hidden]
        return self.model.compute_logits(hidden)  # [bs, vocab]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for bs, cascade in self._variants():
            self._write_padding(bs)
            self._forward(bs, cascade)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs, cascade] = self._forward(bs, cascade)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs, cascade] = graph
        torch.cuda.synchronize()

    def replay(self, num_seqs: int, cascade: bool = False) -> torch.Tensor:
        """Run the size that ``load`` filled for ``num_seqs`` rows (its cascade graph when the loaded step
        has cascade groups); returns logits ``[num_seqs, vocab]``."""
        bs = self.size_for(num_seqs)
        if not self.capture:
            return self._forward(bs, cascade)[:num_seqs]
        self.graphs[bs, cascade].replay()
        return self.outputs[bs, cascade][:num_seqs]


@dataclass
class GraphInputs:
    """The persistent input views of one captured size ``bs``."""

    input_ids: torch.Tensor  # [bs] int64
    positions: torch.Tensor  # [bs] int64
    slot_mapping: torch.Tensor  # [bs] int64, -1 on padding rows
    seq_lens: torch.Tensor  # [bs] int32, 0 on padding rows
    block_tables: torch.Tensor  # [bs, max_blocks_per_seq] int32
    cascade_prefix_blocks: torch.Tensor  # [bs] int32
    cascade_members: torch.Tensor  # [bs] int32
    cascade_tiles: torch.Tensor  # [tile capacity of bs, 3] int32 (0 rows without cascade)


def _tile_capacity(bs: int, tile_members: int | None) -> int:
    return 0 if tile_members is None else tile_capacity(bs, tile_members)


def _i32_parts(bs: int, max_blocks: int, tile_members: int | None) -> list[np.ndarray]:
    capacity = _tile_capacity(bs, tile_members)
    return [np.zeros(bs, np.int32)] * 3 + [np.zeros(capacity * 3, np.int32), np.zeros(bs * max_blocks, np.int32)]


def _layout(bs: int, max_blocks: int, tile_members: int | None) -> tuple[list[int], list[int]]:
    """Start of each part in the int64 and int32 buffers for size ``bs`` (``pack_aligned``'s layout, so a
    step's packed upload lands exactly on the views its graph captured)."""
    _, i64_starts = pack_aligned([np.zeros(bs, np.int64)] * 3, np.int64)
    _, i32_starts = pack_aligned(_i32_parts(bs, max_blocks, tile_members), np.int32)
    return i64_starts, i32_starts


def _buffer_sizes(max_bs: int, max_blocks: int, tile_members: int | None) -> tuple[int, int]:
    """Buffer lengths that hold the largest size's parts (int64 also the two pending-index parts)."""
    i64, _ = pack_aligned([np.zeros(max_bs, np.int64)] * 5, np.int64)
    i32, _ = pack_aligned(_i32_parts(max_bs, max_blocks, tile_members), np.int32)
    return i64.size, i32.size


def _padded(values: np.ndarray, size: int, fill: int) -> np.ndarray:
    """``values`` followed by ``fill`` up to ``size`` entries."""
    out = np.full(size, fill, dtype=values.dtype)
    out[:values.size] = values
    return out
