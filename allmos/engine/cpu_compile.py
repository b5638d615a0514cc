"""The model forward compiled by inductor for the CPU, at start-up.

Eager decode on the CPU runs some fifty small torch ops per layer (norms, RoPE, activation, views), each
a few microseconds of dispatch; ``torch.compile`` fuses them into a handful of C++ loops per layer and
leaves the matmuls to the same packed kernels (see ``allmos.layers.quantization``) and attention to one
opaque op (``allmos.attention.custom_op``).

Invariants: both graphs are compiled inside ``LLM(...)`` (``warm_up``): one specialized to a single new
token (batch-1 decode) and one with a dynamic token count for every larger step (decode batches,
prefill chunks). Afterwards the compiled function runs with recompilation forbidden: a step that would
need a new graph runs eagerly instead, with a warning, rather than compiling inside a user's request.
``enforce_eager=True`` skips all of this.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger("allmos")


def compile_unsupported_reason(model: nn.Module, device: torch.device) -> str | None:
    """Why ``model`` is not compiled on ``device`` (None: it is compiled)."""
    if device.type != "cpu":
        return "only the CPU forward is compiled (CUDA uses graphs)"
    if not hasattr(torch.compiler, "set_stance"):
        return f"torch {torch.__version__} lacks torch.compiler.set_stance"
    rotary = model.model.layers[0].self_attn.rotary_emb
    if rotary.needs_seq_lens:
        return "dynamic NTK RoPE reads per-step sequence lengths from the forward context"
    return None


class CompiledForward:
    """``model(input_ids, positions)`` through inductor; call ``warm_up`` once before serving."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._compiled = torch.compile(model.forward, fullgraph=True, backend="inductor")
        self._warming = False
        self._warned = False  # a step fell back to eager (logged once)

    def warm_up(self, run_step: Callable[[int], None]) -> float:
        """Compile both graphs; ``run_step(num_tokens)`` runs one forward of that many new tokens through
        ``self`` inside a forward context (in inference mode). Returns the seconds it took."""
        start = time.perf_counter()
        self._warming = True
        try:
            run_step(1)  # the graph of one new token
            run_step(2)  # the graph of a dynamic token count
        finally:
            self._warming = False
        run_step(3)  # must take the dynamic graph without recompiling: fail here rather than in a request
        if self._warned:
            raise RuntimeError("the dynamic-shape graph did not serve a 3-token step")
        return time.perf_counter() - start

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self._warming:
            if input_ids.shape[0] >= 2:
                torch._dynamo.mark_dynamic(input_ids, 0)
                torch._dynamo.mark_dynamic(positions, 0)
            return self._compiled(input_ids, positions)
        try:
            # guards that only tell the two graphs apart (the runner always calls in inference mode with
            # the same parameters); a step neither graph takes raises instead of recompiling
            with torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
                return self._compiled(input_ids, positions)
        except RuntimeError as exc:
            if "recompil" not in str(exc).lower():
                raise
            if not self._warned:
                logger.warning("compiled CPU forward has no graph for this step (%d tokens); running it eagerly "
                               "(%s)", input_ids.shape[0], str(exc).splitlines()[0][:200])
                self._warned = True
            return self.model(input_ids, positions)


def compile_cpu_forward(model: nn.Module, device: torch.device,
                        scratch_step: Callable[[Callable], Callable[[int], None]]) -> CompiledForward | None:
    """The CPU forward compiled by inductor and warmed now (None: it stays eager, with the reason logged).

    ``scratch_step(forward)`` returns ``run(n)``: one decode forward of ``n`` one-token sequences through
    ``forward`` on a scratch cache."""
    reason = compile_unsupported_reason(model, device)
    if reason is not None:
        if device.type == "cpu":
            logger.info("CPU forward stays eager: %s", reason)
        return None
    compiled = CompiledForward(model)
    logger.info("compiling the CPU forward (torch.compile, inductor; compilation_config=0 skips this) ...")
    try:
        seconds = compiled.warm_up(scratch_step(compiled))
    except Exception as exc:  # no C++ compiler, an inductor limitation: serve eagerly rather than fail
        logger.warning("torch.compile of the CPU forward failed, running eagerly: %s",
                       str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return None
    logger.info("compiled the CPU forward in %.1f s", seconds)
    return compiled
