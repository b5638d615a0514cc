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
row GEMV for batches of up to 4 rows; other batch sizes keep cuBLAS. With ``ALLMOS_DECODE_KERNELS=1`` the tuned decode
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
from allmos.engine.sampler import graph_draw, graph_threshold
from allmos.engine.step_inputs import HostStep
from allmos.utils.transfer import StagingRing, pack_aligned

logger = logging.getLogger("allmos")

MAX_CAPTURE_SIZE = 512
DECODE_KERNELS_ENV = "ALLMOS_DECODE_KERNELS"
# sizes up to this one also capture a filtered draw; its float32 [bs, vocab] temporaries stay in the graph
# pool (under 10 MB each at 16 rows of a 151,936 vocabulary), and larger batches sample eagerly
FILTERED_DRAW_MAX_BATCH = 16
# the int32 buffer's parts: seq_lens, cascade prefix blocks, members, the draw columns, then tiles and tables
_DRAW_COLUMNS = 7
_TILES = 3 + _DRAW_COLUMNS
_TABLES = _TILES + 1


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
    ``_layout(bs)``: one int64 buffer holds ``input_ids | positions | slot_mapping | input_index``, one int32
    buffer holds ``seq_lens | cascade prefix blocks | cascade members | draw columns (noise key low / high,
    inv_temperature, noise_scale, top_k, top_p, min_p) | cascade tiles | block_tables``. Rows ``n..bs`` are
    padding written by the host (slot -1, seq_len 0, no cascade group); the block-table rows past ``n`` are
    not sent (a row of seq_len 0 reads none). No device-to-device copy separates the upload from the replay.

    The previous step's sampled tokens live in ``sampled`` (the int64 buffer's tail; the runner stores there
    the tokens of every step it samples outside these graphs): a graph starts by gathering each row's input
    from the int64 buffer at ``input_index``, which points at the row's own ``input_ids`` entry or at its
    token in ``sampled``. Each forward graph has a draw graph (``draw``): the plain draw of a
    ``sampler.GraphDraw`` batch over its logits, writing the tokens into ``sampled``; up to
    ``FILTERED_DRAW_MAX_BATCH`` rows a second one (``draw(filtered=True)``) first applies the rows' top-k,
    top-p and min-p. A step whose rows need more (penalties, logprobs, a larger top-k, top-p without top-k,
    or filters in a larger batch) samples the logits with the runner's sampler instead.
    """

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, kv_caches, max_num_seqs: int,
                 max_blocks_per_seq: int, device: torch.device, capture: bool = True) -> None:
        self.model, self.backend, self.kv_caches, self.device = model, backend, kv_caches, device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.tile_members = backend.cascade_members_per_tile  # None: no cascade graphs
        max_bs = self.sizes[-1]
        i64_size, i32_size = _buffer_sizes(max_bs, max_blocks_per_seq, self.tile_members)
        self.sampled_offset = i64_size  # sampled tokens after the inputs: an upload never reaches them
        self.i64 = torch.zeros(i64_size + max(max_num_seqs, max_bs), dtype=torch.int64, device=device)
        self.sampled = self.i64[i64_size:]  # [max(max_num_seqs, max_bs)] the last sampled tokens
        self.i32 = torch.zeros(i32_size, dtype=torch.int32, device=device)
        self._stage64 = StagingRing(i64_size, torch.int64, device)  # host side of the uploads
        self._stage32 = StagingRing(i32_size, torch.int32, device)
        self.layouts = {bs: _layout(bs, max_blocks_per_seq, self.tile_members) for bs in self.sizes}
        self._row_index = np.arange(max_bs, dtype=np.int64)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # by (batch size, cascade)
        self.draw_graphs: dict[tuple[int, bool, bool], torch.cuda.CUDAGraph] = {}  # by (size, cascade, filtered)
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}  # logits [bs, vocab] of each forward graph
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
        views.input_index.copy_(torch.arange(bs, device=views.input_index.device))  # the inputs themselves
        for column in views.draw_columns:
            column.zero_()

    def _views(self, bs: int) -> GraphInputs:
        """The views of the persistent buffers that the graph of size ``bs`` reads."""
        i64, i32 = self.layouts[bs]
        ids, pos, slots, index = (self.i64[start:start + bs] for start in i64)
        seq_lens, prefix_blocks, members, *draw = (self.i32[start:start + bs] for start in i32[:_TILES])
        capacity = _tile_capacity(bs, self.tile_members)
        tiles = self.i32[i32[_TILES]:i32[_TILES] + capacity * 3].view(capacity, 3)
        tables = self.i32[i32[_TABLES]:i32[_TABLES] + bs * self.max_blocks_per_seq].view(bs, self.max_blocks_per_seq)
        return GraphInputs(ids, pos, slots, index, seq_lens, tables, prefix_blocks, members, tiles, tuple(draw))

    def load(self, host: HostStep, draw_columns: list[np.ndarray] | None = None) -> None:
        """Copy one decode step's host inputs into the buffers of its size: ``host`` (its inputs that are
        previous samples point into ``sampled``) and, for ``draw``, the 7 int32 ``[n]`` columns of
        ``GraphDraw.columns`` (zeros when None)."""
        n, bs = host.num_seqs, self.size_for(host.num_seqs)
        width, used = self.max_blocks_per_seq, host.block_tables.shape[1]
        if used > width:
            raise ValueError(f"a block table of {used} blocks exceeds {width}")
        s64, s32 = self.layouts[bs]
        a = self._stage64.take()
        _put(a, s64[0], host.input_ids, bs, 0)
        _put(a, s64[1], host.positions, bs, 0)
        _put(a, s64[2], host.slot_mapping, bs, -1)
        index = a[s64[3]:s64[3] + bs]
        index[:] = self._row_index[:bs] + s64[0]  # row r's input: its own input_ids entry ...
        index[host.pending] = self.sampled_offset + host.pending_rows  # ... or a sample (flat index = row)
        b = self._stage32.take()
        _put(b, s32[0], host.seq_lens, bs, 0)
        self._put_cascade(b, s32, host.cascade, bs)
        for start, column in zip(s32[3:_TILES], draw_columns or [()] * _DRAW_COLUMNS, strict=True):
            _put(b, start, column, bs, 0)
        tables = b[s32[_TABLES]:s32[_TABLES] + n * width].reshape(n, width)
        tables[:, :used] = host.block_tables
        tables[:, used:] = 0
        self._stage64.upload(self.i64, s64[3] + bs)
        self._stage32.upload(self.i32, s32[_TABLES] + n * width)

    def store_sampled(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Keep the tokens of a step sampled outside the draw graphs ([m] int64) where the next graph step
        gathers its inputs; returns that view."""
        stored = self.sampled[:token_ids.shape[0]]
        stored.copy_(token_ids)
        return stored

    def _put_cascade(self, b: np.ndarray, s32: list[int], arrays: CascadeArrays | None, bs: int) -> None:
        """The cascade entries of size ``bs``'s buffers: the step's groups, zeros elsewhere."""
        capacity = _tile_capacity(bs, self.tile_members)
        if arrays is not None and self.tile_members is None:
            raise RuntimeError("cascade groups reached decode graphs captured without cascade")
        parts = (arrays.prefix_blocks, arrays.members, arrays.tiles.ravel()) if arrays is not None else ((), (), ())
        for start, values, size in zip((s32[1], s32[2], s32[_TILES]), parts, (bs, bs, capacity * 3), strict=True):
            _put(b, start, values, size, 0)

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
        input_ids = self.i64.index_select(0, views.input_index)  # [bs]: own inputs and previous samples
        with forward_context(ctx):
            hidden = self.model(input_ids, views.positions)  # [bs, hidden]
        return self.model.compute_logits(hidden)  # [bs, vocab]

    def _draw(self, bs: int, cascade: bool, filtered: bool) -> None:
        _draw_from_columns(self.outputs[bs, cascade], self.inputs[bs].draw_columns, self.sampled[:bs], filtered)

    def draws_filtered(self, num_seqs: int) -> bool:
        """Whether the size that holds ``num_seqs`` rows has a filtered draw."""
        return self.size_for(num_seqs) <= FILTERED_DRAW_MAX_BATCH

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for bs, cascade in self._variants():
            self._write_padding(bs)
            self.outputs[bs, cascade] = self._forward(bs, cascade)  # warm-up: compiles kernels outside the capture
            filters = (False, True) if bs <= FILTERED_DRAW_MAX_BATCH else (False,)
            for filtered in filters:
                self._draw(bs, cascade, filtered)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs, cascade] = self._forward(bs, cascade)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs, cascade] = graph
            for filtered in filters:
                draw_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(draw_graph, pool=pool):
                    self._draw(bs, cascade, filtered)
                self.draw_graphs[bs, cascade, filtered] = draw_graph
        torch.cuda.synchronize()

    def replay(self, num_seqs: int, cascade: bool = False) -> torch.Tensor:
        """Run the size that ``load`` filled for ``num_seqs`` rows (its cascade graph when the loaded step
        has cascade groups); returns logits ``[num_seqs, vocab]``."""
        bs = self.size_for(num_seqs)
        if not self.capture:
            self.outputs[bs, cascade] = self._forward(bs, cascade)
        else:
            self.graphs[bs, cascade].replay()
        return self.outputs[bs, cascade][:num_seqs]

    def draw(self, num_seqs: int, cascade: bool = False, filtered: bool = False) -> torch.Tensor:
        """After ``replay`` of the same size: the draw over its logits with the columns ``load`` wrote (with
        ``filtered``, the rows' top-k / top-p / min-p first: ``draws_filtered`` must hold); returns the tokens
        ``[num_seqs]`` int64, a view of ``sampled``."""
        bs = self.size_for(num_seqs)
        if filtered and not self.draws_filtered(num_seqs):
            raise ValueError(f"no filtered draw for {num_seqs} rows (up to {FILTERED_DRAW_MAX_BATCH})")
        if not self.capture:
            self._draw(bs, cascade, filtered)
        else:
            self.draw_graphs[bs, cascade, filtered].replay()
        return self.sampled[:num_seqs]


@dataclass
class GraphInputs:
    """The persistent input views of one captured size ``bs``."""

    input_ids: torch.Tensor  # [bs] int64, the inputs known on the host
    positions: torch.Tensor  # [bs] int64
    slot_mapping: torch.Tensor  # [bs] int64, -1 on padding rows
    input_index: torch.Tensor  # [bs] int64: where in the int64 buffer each row's input is (its own or a sample)
    seq_lens: torch.Tensor  # [bs] int32, 0 on padding rows
    block_tables: torch.Tensor  # [bs, max_blocks_per_seq] int32
    cascade_prefix_blocks: torch.Tensor  # [bs] int32
    cascade_members: torch.Tensor  # [bs] int32
    cascade_tiles: torch.Tensor  # [tile capacity of bs, 3] int32 (0 rows without cascade)
    draw_columns: tuple[torch.Tensor, ...]  # 7 x [bs] int32: GraphDraw.columns (noise keys, float bits, top_k)


def _draw_from_columns(logits: torch.Tensor, columns: tuple[torch.Tensor, ...], out: torch.Tensor,
                       filtered: bool) -> None:
    """The draw of ``logits`` [bs, vocab] from the 7 int32 draw columns into ``out`` [bs] int64 (``filtered``:
    the rows' top-k / top-p / min-p threshold first)."""
    lo, hi, inv_t, noise, top_k, top_p, min_p = columns
    inv_t, noise = inv_t.view(torch.float32), noise.view(torch.float32)
    threshold = None
    if filtered:
        threshold = graph_threshold(logits, inv_t, top_k, top_p.view(torch.float32), min_p.view(torch.float32))
    graph_draw(logits, inv_t, noise, lo, hi, out=out, threshold=threshold)


def _tile_capacity(bs: int, tile_members: int | None) -> int:
    return 0 if tile_members is None else tile_capacity(bs, tile_members)


def _i32_parts(bs: int, max_blocks: int, tile_members: int | None) -> list[np.ndarray]:
    capacity = _tile_capacity(bs, tile_members)
    return [np.zeros(bs, np.int32)] * _TILES + [np.zeros(capacity * 3, np.int32), np.zeros(bs * max_blocks, np.int32)]


def _layout(bs: int, max_blocks: int, tile_members: int | None) -> tuple[list[int], list[int]]:
    """Start of each part in the int64 and int32 buffers for size ``bs`` (``pack_aligned``'s layout, so a
    step's packed upload lands exactly on the views its graph captured)."""
    _, i64_starts = pack_aligned([np.zeros(bs, np.int64)] * 4, np.int64)
    _, i32_starts = pack_aligned(_i32_parts(bs, max_blocks, tile_members), np.int32)
    return i64_starts, i32_starts


def _buffer_sizes(max_bs: int, max_blocks: int, tile_members: int | None) -> tuple[int, int]:
    """Buffer lengths that hold the largest size's parts."""
    i64, _ = pack_aligned([np.zeros(max_bs, np.int64)] * 4, np.int64)
    i32, _ = pack_aligned(_i32_parts(max_bs, max_blocks, tile_members), np.int32)
    return i64.size, i32.size


def _put(buffer: np.ndarray, start: int, values, size: int, fill: int) -> None:
    """``buffer[start:start + size]`` = ``values`` followed by ``fill`` (padding rows)."""
    count = len(values)
    buffer[start:start + count] = values
    buffer[start + count:start + size] = fill
