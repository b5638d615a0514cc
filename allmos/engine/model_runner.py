"""The model runner: turns a ``ScheduledBatch`` into tensors, runs the model and samples.

It owns the model, the KV cache, the attention backend and the sampler of one rank. The scheduler never
sees a tensor; the runner never makes a scheduling decision.
"""

from __future__ import annotations

import abc
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from allmos.attention.backend import AttentionBackend
from allmos.attention.context import ForwardContext, forward_context
from allmos.attention.metadata import AttentionMetadata
from allmos.attention.torch_backend import TorchAttentionBackend
from allmos.config import EngineConfig
from allmos.engine.batch import ScheduledBatch, ScheduledSeq
from allmos.engine.core_types import LogprobEntries, PromptLogprobsResult
from allmos.engine.cpu_compile import compile_cpu_forward
from allmos.engine.cuda_graphs import DecodeGraphs
from allmos.engine.kv_cache import KVCacheSpec, cpu_num_blocks, gpu_num_blocks
from allmos.engine.kv_calibration import calibrate_kv_cache
from allmos.engine.sampler import GraphDraw, Sampler, SamplerOutput, SamplingRow, SamplingTensors, raw_logprobs
from allmos.engine.step_inputs import HostStep, host_step, upload
from allmos.layers.quantization import quantize_model
from allmos.layers.tp import SINGLE, TPGroup
from allmos.models.loader import build_model, init_dummy_weights, load_weights, safetensors_files
from allmos.models.model_config import ModelConfig
from allmos.utils.transfer import to_device

logger = logging.getLogger("allmos")

PROMPT_LOGPROBS_ROWS = 256  # prompt positions per LM-head call (bounds the [rows, vocab] float32 temporaries)


@dataclass
class StepResult:
    """Sampled tokens of ``batch.sampled_seqs``, in that order, and the logprobs asked for."""

    token_ids: list[int]
    logprobs: list[LogprobEntries] | None = None  # per sampled row (empty list for rows that asked none)
    prompt_logprobs: list[PromptLogprobsResult] = field(default_factory=list)


@dataclass
class PromptLogprobsOutput:
    """Device tensors of a step's prompt logprobs (the positions of every chunk, concatenated)."""

    logprobs: torch.Tensor  # [num_positions, 1 + max_k] float32, column 0 = the next prompt token
    token_ids: torch.Tensor  # [num_positions, 1 + max_k] int64
    ranks: torch.Tensor  # [num_positions] int64, rank of the next prompt token
    chunks: list[tuple[str, int, int, int]]  # (request_id, start_pos, num_positions, num_logprobs)


class PendingStep:
    """A launched step whose sampled tokens (and logprobs) are being copied to the host; ``result()``
    waits for them.

    The copies are non-blocking into pinned memory, so the host can schedule and launch the next step
    while the device still works on this one; they are queued before the next step, which may overwrite the
    tensors they read.
    """

    def __init__(self, out: SamplerOutput | None, num_logprobs: list[int | None],
                 prompt: PromptLogprobsOutput | None = None) -> None:
        self._num_logprobs = num_logprobs
        self._prompt_chunks = prompt.chunks if prompt is not None else []
        self._has_tokens = out is not None
        self._has_logprobs = out is not None and out.logprobs is not None
        self._event = None
        self._host = None
        tensors = []
        if out is not None:
            tensors.append(out.token_ids)
            if out.logprobs is not None:
                tensors += [out.logprobs, out.logprob_token_ids, out.sampled_ranks]
        if prompt is not None:
            tensors += [prompt.logprobs, prompt.token_ids, prompt.ranks]
        if not tensors:
            return
        if tensors[0].device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, dev in zip(self._host, tensors):
                host.copy_(dev, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # copied now: a tensor may be a buffer that the next step overwrites (the decode graphs' tokens)
            self._host = [t.clone() for t in tensors]

    def is_ready(self) -> bool:
        """True when ``result()`` will not wait for the device."""
        return self._event is None or self._event.query()

    def result(self) -> StepResult:
        if self._host is None:
            return StepResult([])
        if self._event is not None:
            self._event.synchronize()
        host = list(self._host)
        token_ids = host.pop(0).tolist() if self._has_tokens else []
        logprobs = None
        if self._has_logprobs:
            values, ids, ranks = (t.tolist() for t in host[:3])
            del host[:3]
            logprobs = [_entries(ids[row], values[row], ranks[row], k) if k is not None else []
                        for row, k in enumerate(self._num_logprobs)]
        return StepResult(token_ids, logprobs, self._prompt_results(host))

    def _prompt_results(self, host: list[torch.Tensor]) -> list[PromptLogprobsResult]:
        if not self._prompt_chunks:
            return []
        values, ids, ranks = (t.tolist() for t in host)
        results, first = [], 0
        for request_id, start_pos, count, k in self._prompt_chunks:
            rows = range(first, first + count)
            results.append(PromptLogprobsResult(request_id, start_pos,
                                                [_entries(ids[i], values[i], ranks[i], k) for i in rows]))
            first += count
        return results


def _entries(ids: list[int], values: list[float], rank: int, k: int) -> LogprobEntries:
    """One position's (token, logprob, rank) triples: the chosen token, then the top ``k`` (ranks 1..k)."""
    return [(ids[0], values[0], rank)] + [(ids[j], values[j], j) for j in range(1, k + 1)]


class ModelRunner(abc.ABC):
    """Executes scheduled batches on one device (or one tensor-parallel rank)."""

    num_kv_blocks: int

    @abc.abstractmethod
    def execute(self, batch: ScheduledBatch) -> PendingStep:
        """Launch the step: compute KV for every scheduled token and sample the sequences that ask for it.

        A sequence with ``input_from_previous_sample`` takes as its last input the token this runner sampled
        for it in the previous ``execute`` call; it is filled in on the device, without waiting for the host
        copy."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release devices and workers."""


def make_backend(name: str, model_config: ModelConfig, tp_size: int, config: EngineConfig,
                 device: torch.device) -> AttentionBackend:
    if name == "torch":
        return TorchAttentionBackend()
    from allmos.attention.triton_backend import TritonAttentionBackend
    # cascade reads model-dtype caches only: an fp8 cache keeps every sequence on the plain decode path
    cascade = config.enable_cascade_attention and config.kv_cache_dtype == "auto"
    return TritonAttentionBackend(model_config, tp_size, config.max_num_seqs, config.max_model_len, device,
                                  enable_cascade=cascade)


class RowsMemo:
    """A value derived from one step's sampling rows, kept for the next step. Rows are immutable and reused
    per request, so when a step's rows are the previous step's row objects in the same order (most decode
    steps), what was derived from them still holds."""

    MISSING = object()

    def __init__(self) -> None:
        self._rows: list[SamplingRow] | None = None
        self._value = None

    def get(self, rows: list[SamplingRow]):
        """The value put for these very row objects, else ``MISSING``."""
        previous = self._rows
        if previous is not None and len(previous) == len(rows) and all(
                a is b for a, b in zip(previous, rows, strict=True)):
            return self._value
        return RowsMemo.MISSING

    def put(self, rows: list[SamplingRow], value):
        self._rows, self._value = rows, value
        return value


class LocalModelRunner(ModelRunner):
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_path: Path | None,
                 device: torch.device, dtype: torch.dtype, tp: TPGroup = SINGLE) -> None:
        self.config, self.model_config = config, model_config
        self.device, self.dtype, self.tp = device, dtype, tp
        self._last_sampled: tuple[torch.Tensor, dict[str, int]] | None = None  # previous step's device tokens
        self._sampling_memo = RowsMemo()  # the last step's rows -> their SamplingTensors
        self._draw_memo = RowsMemo()  # the last step's rows -> their GraphDraw (None: they need the sampler)
        self.model = build_model(model_config, dtype, device, tp)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            load_weights(self.model, safetensors_files(model_path))
        if config.quantization is not None:
            logger.info("quantization=%s: %s layers", config.quantization,
                        quantize_model(self.model, config.quantization))
        self.kv_spec = KVCacheSpec.for_model(model_config, config.kvcache_block_size,
                                             config.resolved_kv_cache_dtype(dtype), tp.size)
        self.block_size = config.kvcache_block_size
        self.max_model_len = model_config.effective_max_model_len(config.max_model_len)
        self.backend = make_backend(config.resolved_backend(device), model_config, tp.size, config, device)
        self.sampler = Sampler()
        self.num_kv_blocks = self._min_over_ranks(self._decide_num_blocks())
        self.kv_caches = self._allocate_kv_cache(self.num_kv_blocks)
        calibrate_kv_cache(self)  # fp8 caches: each layer's scales, before graphs, compile or real KV
        self.graphs = self._capture_graphs()
        self.compiled = compile_cpu_forward(self.model, self.device, self._scratch_decode, config.compilation_config) \
            if config.compile_cpu_forward else None

    def _scratch_decode(self, forward) -> Callable[[int], None]:
        """``run(n)``: one decode forward of ``n`` one-token sequences through ``forward`` (compile warm-up)."""
        return lambda num_tokens: run_scratch_forward(self, [1] * num_tokens, forward)

    def _capture_graphs(self) -> DecodeGraphs | None:
        """Decode runner for CUDA: captured graphs, or (enforce_eager) the same padded shapes run eagerly."""
        if not (self.device.type == "cuda" and self.backend.supports_cuda_graphs()):
            return None
        max_blocks = -(-self.max_model_len // self.block_size)
        return DecodeGraphs(self.model, self.backend, self.kv_caches, self.config.max_num_seqs, max_blocks,
                            self.device, capture=self.config.use_cuda_graphs)

    def release_graphs(self, synchronize: bool = True) -> None:
        """Drop the captured decode graphs (before tearing down a communicator they captured); idempotent."""
        if self.graphs is None:
            return
        if synchronize and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.graphs = None
        gc.collect()

    # ------------------------------------------------------------------ KV cache (sizes: allmos.engine.kv_cache)
    def _min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` of all tensor-parallel ranks (one block manager serves them all)."""
        if self.tp.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.tp.group)
        return int(t.item())

    def _decide_num_blocks(self) -> int:
        if self.config.num_kvcache_blocks is not None:
            return self.config.num_kvcache_blocks
        if self.device.type == "cpu":
            return cpu_num_blocks(self.kv_spec, self.max_model_len, self.config.max_num_seqs)
        return self._profile_num_blocks()

    def _profile_num_blocks(self) -> int:
        """Blocks that fit in what ``gpu_memory_utilization`` leaves after a forward at the token budget.

        Counts everything already on the card (weights, other processes and engines) plus this engine's
        activation peak, measured by a forward over ``max_num_batched_tokens`` tokens."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        num_tokens = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)
        self._profile_forward(num_tokens)
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return gpu_num_blocks(self.kv_spec, total, free, activation_peak, self.config.gpu_memory_utilization)

    def _profile_forward(self, num_tokens: int) -> None:
        """One forward over ``num_tokens`` prompt tokens (in sequences of at most max_model_len)."""
        per_seq = min(num_tokens, self.max_model_len)
        seq_lens = [per_seq] * (num_tokens // per_seq) + ([num_tokens % per_seq] if num_tokens % per_seq else [])
        run_scratch_forward(self, seq_lens, self.model, logits=True)

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.kv_spec.allocate(num_blocks, self.device)

    # ------------------------------------------------------------------ one step
    def execute(self, batch: ScheduledBatch) -> PendingStep:
        if batch.is_empty:
            return PendingStep(None, [])
        host = self._host_step(batch)
        sampled = batch.sampled_seqs
        rows, sample_positions = [s.sampling for s in sampled], [s.seq_len for s in sampled]  # token at seq_len
        prompt = None
        # uploaded outside inference mode, as the compiled CPU forward's warm-up does (its guards see the same
        # kind of tensors)
        graph = self._fits_graphs(host, batch)
        inputs = None if graph else upload(host, self.device, self._last_sampled)
        with torch.inference_mode():
            if graph:
                # logits [num_seqs, vocab] (every row samples); tokens when the graphs drew them
                logits, token_ids = self._run_graph(host, rows, sample_positions)
                if token_ids is not None:  # drawn inside the graphs
                    self._last_sampled = _last_sampled(token_ids, sampled)
                    return PendingStep(SamplerOutput(token_ids, None, None), [None] * len(sampled))
            else:
                input_ids, positions, metadata, rope_seq_lens = inputs
                ctx = ForwardContext(self.backend.prepare(metadata), self.kv_caches, self.backend, rope_seq_lens)
                with forward_context(ctx):
                    hidden = (self.compiled or self.model)(input_ids, positions)  # [num_tokens, hidden]
                if batch.has_prompt_logprobs:
                    prompt = self._prompt_logprobs(batch, metadata, hidden)
                if not sampled:
                    self._last_sampled = None
                    return PendingStep(None, [], prompt)
                last = _sample_rows(batch, metadata, self.device)  # [num_sampled]
                logits = self.model.compute_logits(hidden[last])  # [num_sampled, vocab]
            out = self.sampler(logits, self._sampling_tensors(rows, sample_positions))
            # with decode graphs, the next graph step gathers its inputs from the graphs' ``sampled`` buffer
            tokens = self.graphs.store_sampled(out.token_ids) if self.graphs is not None else out.token_ids
        self._last_sampled = _last_sampled(tokens, sampled)
        return PendingStep(out, [row.num_logprobs for row in rows], prompt)

    def _fits_graphs(self, host: HostStep, batch: ScheduledBatch) -> bool:
        return (self.graphs is not None and host.is_decode and host.num_seqs <= self.graphs.max_batch_size
                and not batch.has_prompt_logprobs)

    def _run_graph(self, host: HostStep, rows: list[SamplingRow],
                   positions: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode through the captured graphs: inputs go straight into their persistent buffers, and a
        ``GraphDraw`` batch is drawn by the graphs too (with filters only up to ``FILTERED_DRAW_MAX_BATCH``
        rows). Returns (logits [num_seqs, vocab], the drawn tokens [num_seqs] or None when the runner's
        sampler must sample the logits).

        One reference for the whole step: a tensor-parallel abort on another thread may release the graphs
        meanwhile (``release_graphs``); then this step raises RuntimeError, the symptom the TP runner maps
        to the worker's failure."""
        graphs = self.graphs
        if graphs is None:
            raise RuntimeError("the decode graphs were released during the step (the runner is being stopped)")
        draw = self._draw_memo.get(rows)
        if draw is RowsMemo.MISSING:
            draw = self._draw_memo.put(rows, GraphDraw.of(rows, self.model_config.vocab_size))
        if draw is not None and draw.filtered and not graphs.draws_filtered(host.num_seqs):
            draw = None
        graphs.load(host, draw.columns(positions) if draw is not None else None)
        cascade = host.cascade is not None
        logits = graphs.replay(host.num_seqs, cascade)  # [num_seqs, vocab]
        return logits, graphs.draw(host.num_seqs, cascade, draw.filtered) if draw is not None else None

    def _prompt_logprobs(self, batch: ScheduledBatch, metadata: AttentionMetadata,
                         hidden: torch.Tensor) -> PromptLogprobsOutput | None:
        """Raw logprobs (and ranks) of the next prompt token at every position of the chunks that ask,
        plus their top-k; the LM head runs on ``PROMPT_LOGPROBS_ROWS`` positions at a time. Every
        tensor-parallel rank runs this (the LM head gathers over ranks); only the driver's copy is read."""
        starts = metadata.query_start_loc_cpu
        rows, targets, chunks = [], [], []
        for i, s in enumerate(batch.seqs):
            chunk = s.prompt_logprobs
            if chunk is None or not chunk.target_token_ids:
                continue
            count = len(chunk.target_token_ids)
            rows.append(np.arange(starts[i], starts[i] + count, dtype=np.int64))
            targets.append(np.asarray(chunk.target_token_ids, dtype=np.int64))
            chunks.append((s.request_id, s.start_pos, count, chunk.num_logprobs))
        if not chunks:
            return None
        max_k = max(c[3] for c in chunks)
        rows_dev = to_device(np.concatenate(rows), self.device)  # [num_positions]
        targets_dev = to_device(np.concatenate(targets), self.device)  # [num_positions]
        parts = []
        for first in range(0, rows_dev.numel(), PROMPT_LOGPROBS_ROWS):
            part = slice(first, first + PROMPT_LOGPROBS_ROWS)
            logits = self.model.compute_logits(hidden[rows_dev[part]])  # [rows, vocab]
            parts.append(raw_logprobs(logits, targets_dev[part], max_k))
        values, ids, ranks = (torch.cat(column) for column in zip(*parts, strict=True))
        return PromptLogprobsOutput(values, ids, ranks, chunks)

    def _sampling_tensors(self, rows: list[SamplingRow], positions: list[int]) -> SamplingTensors:
        """The step's sampling tensors. Rows come from validated SamplingParams; ``positions`` are the sampled
        tokens' indices. When the rows repeat (``RowsMemo``), only the positions are new."""
        previous = self._sampling_memo.get(rows)
        if previous is not RowsMemo.MISSING:
            return self._sampling_memo.put(rows, previous.at_positions(positions))
        return self._sampling_memo.put(rows, SamplingTensors.build(
            rows, self.model_config.vocab_size, self.device, validate=False, positions=positions))

    def _prepare(self, batch: ScheduledBatch):
        """Host lists -> device tensors (token ids, positions, attention metadata) in two packed copies."""
        return upload(self._host_step(batch), self.device, self._last_sampled)

    def _host_step(self, batch: ScheduledBatch) -> HostStep:
        return host_step(batch, self.block_size, self._last_sampled, self.backend.cascade_members_per_tile)


def run_scratch_forward(runner: LocalModelRunner, seq_lens: list[int], forward: Callable,
                        logits: bool = False) -> None:
    """One forward of fresh sequences of ``seq_lens`` tokens on a scratch KV cache (memory profiling at
    start-up, compile warm-up); ``logits``: also the LM head over one row per sequence."""
    block_size = runner.block_size
    caches = runner._allocate_kv_cache(sum(-(-n // block_size) for n in seq_lens))
    seqs, next_block = [], 0
    for i, n in enumerate(seq_lens):
        num_blocks = -(-n // block_size)
        seqs.append(ScheduledSeq(f"scratch-{i}", [0] * n, 0, list(range(next_block, next_block + num_blocks)), None))
        next_block += num_blocks
    input_ids, positions, metadata, rope_seq_lens = runner._prepare(ScheduledBatch(seqs))
    ctx = ForwardContext(runner.backend.prepare(metadata), caches, runner.backend, rope_seq_lens)
    with torch.inference_mode(), forward_context(ctx):
        hidden = forward(input_ids, positions)  # [num_tokens, hidden]
        if logits:
            runner.model.compute_logits(hidden[:len(seq_lens)])


def _last_sampled(token_ids: torch.Tensor, sampled: list[ScheduledSeq]) -> tuple[torch.Tensor, dict[str, int]]:
    """A step's tokens on the device ([num_sampled]) and each sequence's row in them, for the next step's
    inputs that are these samples."""
    return token_ids, {s.request_id: row for row, s in enumerate(sampled)}


def _sample_rows(batch: ScheduledBatch, metadata: AttentionMetadata, device: torch.device) -> torch.Tensor:
    """Index of each sampling sequence's last token in the step's flat token list."""
    ends = metadata.query_start_loc_cpu[1:]
    rows = np.array([end - 1 for end, s in zip(ends, batch.seqs, strict=True) if s.sampling is not None],
                    dtype=np.int64)
    return to_device(rows, device)
