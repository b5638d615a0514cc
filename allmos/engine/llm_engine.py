"""``LLMEngine``: input processing, the engine core and output processing, composed.

    prompt, SamplingParams --InputProcessor--> EngineCoreRequest --EngineCore.step--> CoreStepOutput
        --OutputProcessor--> RequestOutput   (stop strings flow back: OutputProcessor -> core aborts)

Usable online: ``add_request`` / ``step`` / ``abort`` / ``has_unfinished`` (``LLM``, ``LLM.stream`` and the
CLI drive this loop). Each part's contract is in its module's docstring.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from allmos.config import EngineConfig
from allmos.engine.core import EngineCore, kv_cache_summary, make_runner
from allmos.engine.core_types import CoreStepOutput, EngineCoreStats
from allmos.engine.input_processor import InputProcessor, eos_token_ids, load_tokenizer
from allmos.engine.output_processor import OutputProcessor
from allmos.engine.warmup import warm_up
from allmos.inputs import ParsedPrompt, PromptType
from allmos.models.resolve import ModelSource, load_model_source
from allmos.outputs import RequestOutput
from allmos.sampling_params import SamplingParams
from allmos.utils.heap import freeze_startup_heap

logger = logging.getLogger("allmos")

__all__ = ["LLMEngine", "RuntimeInfo", "kv_cache_summary"]


@dataclass(frozen=True)
class RuntimeInfo:
    """Values found at start-up (never written back into the config)."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    num_kv_blocks: int
    device: torch.device
    dtype: torch.dtype


class LLMEngine:
    def __init__(self, config: EngineConfig, runner=None) -> None:
        self.config = config
        self.source: ModelSource = load_model_source(config.model)
        self.tokenizer = load_tokenizer(config, self.source)
        device = config.resolved_device()
        model_config = self.source.model_config
        fmt = config.resolved_weight_format(self.source.checkpoint_dtype, device)
        dtype = fmt.dtype
        logger.info("weights: dtype %s, quantization %s (%s)", dtype, fmt.quantization, fmt.reason)
        runner_config = dataclasses.replace(config, quantization=fmt.quantization)  # the resolved format
        runner = runner or make_runner(runner_config, self.source, device, dtype)
        max_model_len = model_config.effective_max_model_len(config.max_model_len)
        eos = eos_token_ids(self.source, self.tokenizer)
        self.info = RuntimeInfo(max_model_len, model_config.vocab_size, eos, runner.num_kv_blocks, device, dtype)
        self.input_processor = InputProcessor(config, self.source, self.tokenizer, max_model_len,
                                              model_config.vocab_size)
        self.core = EngineCore(config, runner, max_model_len, eos)
        self.output_processor = OutputProcessor(self.tokenizer, eos)
        self._pending_outputs: list[RequestOutput] = []  # abort outputs the next step delivers
        kv_dtype = str(config.resolved_kv_cache_dtype(dtype)).removeprefix("torch.")
        logger.info(kv_cache_summary(runner.num_kv_blocks, config.kvcache_block_size, max_model_len)
                    + f"; {device} {dtype}; KV cache {kv_dtype}")
        if device.type == "cuda":  # Triton compiles kernel variants on first use: do it now, not mid-request
            warm_up(self)
        freeze_startup_heap()

    # ------------------------------------------------------------------ the parts, for inspection
    @property
    def runner(self):
        return self.core.runner

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def block_manager(self):
        return self.core.block_manager

    @property
    def num_generated_tokens(self) -> int:
        return self.core.num_generated_tokens

    @num_generated_tokens.setter
    def num_generated_tokens(self, value: int) -> None:
        self.core.num_generated_tokens = value

    # ------------------------------------------------------------------ requests
    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults applied (as vLLM does)."""
        return self.input_processor.default_sampling_params()

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.input_processor.tokenize(prompt)

    def add_request(self, request_id: str | None, prompt: PromptType | ParsedPrompt,
                    params: SamplingParams | None = None, *, stream: bool = False,
                    arrival_time: float | None = None, detokenize: bool = True, delta: bool = False) -> str:
        """Validate and queue a request; raises ValueError (and queues nothing) on bad input.

        ``prompt``: a text, a list of token ids, ``{"prompt": text}`` or ``{"prompt_token_ids": ids}``.
        ``stream``: an output every step (cumulative); ``delta``: an output every step with only what is new;
        ``detokenize=False``: no text in the outputs (then stop strings, which match text, are refused)."""
        request, text = self.input_processor.process(request_id, prompt, params, arrival_time)
        if request.sampling_params.stop and not detokenize:
            raise ValueError("SamplingParams.stop needs detokenize=True (stop strings are matched on text)")
        self.core.add_request(request)
        self.output_processor.add_request(request, text, stream=stream, delta=delta, detokenize=detokenize)
        return request.request_id

    def abort(self, request_id: str, *, emit_output: bool = True) -> RequestOutput | None:
        """Stop a request now and free its blocks; its final output (``finish_reason='abort'``) is returned
        and, with ``emit_output``, also delivered by the next ``step``. An unknown or already finished id
        changes nothing and returns None."""
        aborted = self.core.abort_requests([request_id])
        out = self.output_processor.abort(request_id, aborted)
        if out is not None and emit_output:
            self._pending_outputs.append(out)
        return out

    def abort_request(self, request_id: str | Iterable[str]) -> list[RequestOutput]:
        """vLLM's name: abort one request id or an iterable of them. Unknown or already finished ids are
        ignored (as in vLLM); returns the final outputs of the requests actually aborted, which the next
        ``step`` also delivers."""
        ids = [request_id] if isinstance(request_id, str) else request_id
        if not isinstance(ids, Iterable):
            raise ValueError(f"request_id must be a str or an iterable of str, got {type(request_id).__name__}")
        ids = list(ids)
        bad = [i for i in ids if not isinstance(i, str)]
        if bad:
            raise ValueError(f"request ids are strings, got {type(bad[0]).__name__} {bad[0]!r}")
        return [out for out in map(self.abort, ids) if out is not None]

    def has_unfinished(self) -> bool:
        return self.output_processor.has_unfinished() or bool(self._pending_outputs) or self.core.has_unfinished()

    def get_stats(self) -> EngineCoreStats:
        return self.core.get_stats()

    def num_cached_tokens(self, request_id: str) -> int | None:
        return self.core.num_cached_tokens(request_id)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """One core step (launch one forward pass, read back the previous one, see ``allmos.engine.core``);
        returns an output for every request that finished, and for every streaming request that advanced,
        in the step read back."""
        outputs, self._pending_outputs = self._pending_outputs, []
        outputs += self._process(self.core.read_back_if_sync())  # stop strings end sequences before scheduling
        outputs += self._process(self.core.step())
        return outputs

    def _process(self, step_output: CoreStepOutput) -> list[RequestOutput]:
        if step_output.is_empty:
            return []
        outputs, to_abort = self.output_processor.process(step_output)
        if to_abort:
            self.core.abort_sequences(to_abort)
        return outputs

    def shutdown(self) -> None:
        self.core.shutdown()
