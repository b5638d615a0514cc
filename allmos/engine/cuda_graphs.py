"""Decode at fixed batch sizes: one CUDA graph per size (forward + LM head), fed through persistent
input buffers.

Invariants: a graph for size ``bs`` reads rows ``[:bs]`` of the buffers; the runner writes rows ``[:n]``
and pads rows ``n..bs`` as no-ops (slot -1: nothing stored; seq_len 0: attention returns zeros). The
attention backend's decode launch depends only on ``bs`` (never on sequence lengths), so a graph stays
valid for every later step of that size. With ``capture=False`` (``enforce_eager``) the same padded
forward runs eagerly, so eager and captured decode compute exactly the same thing.

When the backend runs cascade attention (``cascade_members_per_tile``), each size of at least two also gets a
cascade graph over persistent cascade buffers (docs/cascade_attention.md). A step whose metadata carries
cascade groups replays it after rewriting every buffer entry the graph reads (unused tile slots and padded
rows zeroed, so a replay never meets an earlier step's groups); other steps replay the plain graph.

With ``ALLMOS_DECODE_KERNELS=1`` the decode kernels are switched on before capturing
(``enable_decode_kernels``): small-batch Triton GEMVs chosen per captured size from timings on this device,
the fused q/k-norm + RoPE + K/V store, and split decode attention that merges its splits in the same launch.
They are off by default: on an H200 they cut the kernels per step (348 -> 208 at batch 1) but not the GPU
time (1.23 -> 1.43 ms at batch 1; docs/benchmarks.md), so cuBLAS and the separate kernels stay the path.
"""

from __future__ import annotations

import logging
import os

import torch

from allmos.attention.backend import AttentionBackend
from allmos.attention.cascade import MIN_GROUP_SIZE, tile_capacity
from allmos.attention.context import ForwardContext, forward_context
from allmos.attention.metadata import AttentionMetadata

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


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``min(max_num_seqs, 512)`` (always including the cap)."""
    cap = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4, 8) if s <= cap] + list(range(16, cap + 1, 16))
    if sizes[-1] != cap:
        sizes.append(cap)
    return sizes


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, kv_caches, max_num_seqs: int,
                 max_blocks_per_seq: int, device: torch.device, capture: bool = True) -> None:
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        max_bs = self.sizes[-1]
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(max_bs, **i32)
        self.query_start_loc = torch.arange(max_bs + 1, **i32)
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, **i32)
        self.tile_members = backend.cascade_members_per_tile  # None: no cascade graphs
        if self.tile_members is not None:
            self.cascade_prefix_blocks = torch.zeros(max_bs, **i32)
            self.cascade_members = torch.zeros(max_bs, **i32)
            self.cascade_tiles = torch.zeros(tile_capacity(max_bs, self.tile_members), 3, **i32)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # by (batch size, cascade)
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.max_seq_len = max_blocks_per_seq * kv_caches[0][0].shape[1]
        self.capture = capture
        if decode_kernels_enabled():
            enable_decode_kernels(model, backend, self.sizes, device)
        if capture:
            self._capture_all()

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def _metadata(self, bs: int, cascade: bool) -> AttentionMetadata:
        fields = {}
        if cascade:
            fields = dict(cascade_prefix_blocks=self.cascade_prefix_blocks[:bs],
                          cascade_members=self.cascade_members[:bs],
                          cascade_tiles=self.cascade_tiles[:tile_capacity(bs, self.tile_members)])
        md = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=self.max_seq_len, is_decode=True, **fields)
        return self.backend.prepare(md)

    def _variants(self) -> list[tuple[int, bool]]:
        """(batch size, cascade) of every graph, largest first."""
        return [(bs, cascade) for bs in reversed(self.sizes) for cascade in (False, True)
                if not cascade or (self.tile_members is not None and bs >= MIN_GROUP_SIZE)]

    def _forward(self, bs: int, cascade: bool = False) -> torch.Tensor:
        ctx = ForwardContext(self._metadata(bs, cascade), self.kv_caches, self.backend,
                             rope_seq_lens=self.seq_lens[:bs])
        with forward_context(ctx):
            hidden = self.model(self.input_ids[:bs], self.positions[:bs])  # [bs, hidden]
        return self.model.compute_logits(hidden)  # [bs, vocab]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for bs, cascade in self._variants():
            self._forward(bs, cascade)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs, cascade] = self._forward(bs, cascade)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs, cascade] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Run the smallest size that fits ``n = len(input_ids)`` rows; returns logits ``[n, vocab]``."""
        n = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(metadata.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(metadata.seq_lens, non_blocking=True)
        width = metadata.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(metadata.block_tables, non_blocking=True)
        if bs > n:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()
        cascade = metadata.cascade_tiles is not None
        if cascade:
            self._fill_cascade(metadata, n, bs)
        if not self.capture:
            return self._forward(bs, cascade)[:n]
        self.graphs[bs, cascade].replay()
        return self.outputs[bs, cascade][:n]

    def _fill_cascade(self, metadata: AttentionMetadata, n: int, bs: int) -> None:
        """Write a step's cascade groups into the buffers a size-``bs`` cascade graph reads, zeroing the rest."""
        if self.tile_members is None:
            raise RuntimeError("cascade metadata reached decode graphs captured without cascade")
        self.cascade_prefix_blocks[:n].copy_(metadata.cascade_prefix_blocks, non_blocking=True)
        self.cascade_prefix_blocks[n:bs].zero_()
        self.cascade_members[:n].copy_(metadata.cascade_members, non_blocking=True)
        num_tiles = metadata.cascade_tiles.shape[0]
        self.cascade_tiles[:num_tiles].copy_(metadata.cascade_tiles, non_blocking=True)
        self.cascade_tiles[num_tiles:tile_capacity(bs, self.tile_members)].zero_()
