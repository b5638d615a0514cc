"""The CPU forward compiled by inductor at start-up: one decoder layer (level 3) or the whole forward (level 2).

Eager decode on the CPU runs some fifty small torch ops per layer (norms, RoPE, activation, views), each
a few microseconds of dispatch; ``torch.compile`` fuses them into a handful of C++ loops per layer and
leaves the matmuls to the same packed kernels (see ``allmos.layers.quantization``) and attention to one
opaque op (``allmos.attention.custom_op``).

Level 3 (``compilation_config=3``) compiles one decoder layer's forward and runs every layer through it:
the layers share their code, their parameters are inputs of the graph (torch's inlining of ``nn.Module``
calls) and the attention op takes the layer index as a tensor, so one graph serves them all. Embedding,
RoPE tables and the final norm stay eager (a handful of ops). Start-up compiles one layer instead of all of
them (on the default model about 6 s instead of 42 s without torch's compile cache, 3 s instead of 8 s with
it), and steps call the layer's graphs directly (``allmos.engine.direct_graphs``), so that thirty calls per
step cost no more than the one call of level 2.
Level 2 compiles the whole ``model.forward`` (every layer traced and compiled: a slower start-up).

Invariants (both levels): every graph is compiled inside ``LLM(...)`` (``warm_up``): one specialized to a
single new token (batch-1 decode) and one with a dynamic token count for every larger step (decode batches,
prefill chunks). Afterwards the compiled code runs with recompilation forbidden: a step that would need a new
graph runs eagerly instead, with a warning, rather than compiling inside a user's request (the direct calls
of level 3 pick the graph by token count and never compile). The guards that would notice a change to the
model's modules are dropped (``_compile``): modules, their attributes and their tensors' layouts stay as
they were at start-up (weights may change in value, in place). ``enforce_eager=True`` skips all of this.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from allmos.engine.direct_graphs import DirectLayerGraphs

logger = logging.getLogger("allmos")

LAYERWISE, WHOLE_FORWARD = 3, 2  # compilation_config levels


def compile_unsupported_reason(model: nn.Module, device: torch.device, level: int = LAYERWISE) -> str | None:
    """Why ``model`` is not compiled on ``device`` at ``level`` (None: it is compiled)."""
    if device.type != "cpu":
        return "only the CPU forward is compiled (CUDA uses graphs)"
    if not hasattr(torch.compiler, "set_stance"):
        return f"torch {torch.__version__} lacks torch.compiler.set_stance"
    rotary = model.model.layers[0].self_attn.rotary_emb
    if level == WHOLE_FORWARD and rotary.needs_seq_lens:
        return "dynamic NTK RoPE reads per-step sequence lengths from the forward context"
    return None


def _compile(fn: Callable, input_guards_only: bool, backend: str | Callable = "inductor") -> Callable:
    """``fn`` through inductor (or ``backend``), whole graphs only, with a graph cache of its own where torch
    offers one (``isolate_recompiles``): engines in one process then never share graphs nor count towards
    each other's recompilation limit.

    ``input_guards_only``: keep only the guards on ``fn``'s tensor inputs and on global state (grad mode and
    the like), which tell the graphs of one and of several tokens apart, and drop those on modules and
    module globals: hundreds of checks per call (0.4-0.8 ms per step on the default model) of things that
    do not change after start-up. Callers make sure that every module a graph may see was traced alike.
    Only with a cache of its own: a graph another engine traced on other modules could pass the input guards."""
    kwargs = {}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        kwargs["isolate_recompiles"] = True
        if input_guards_only and hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):
            kwargs["options"] = {"guard_filter_fn": _input_guards}
    return torch.compile(fn, fullgraph=True, backend=backend, **kwargs)


def _input_guards(entries: list) -> list[bool]:
    """Which of a graph's guards to keep (``guard_filter_fn``): none on modules, none on globals."""
    modules = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    module_globals = torch.compiler.skip_guard_on_globals_unsafe(entries)
    return [a and b for a, b in zip(modules, module_globals)]


def layers_alike(layers: Iterable[nn.Module]) -> bool:
    """Whether one graph traced on the first layer computes every layer: the same submodule types and plain
    attributes (the layer index aside: the graph reads it as a tensor) and the same tensor layouts. A model
    that mixes kinds of layers (say int4 and int8 projections) is not."""
    signatures = [_layer_signature(layer) for layer in layers]
    return all(sig == signatures[0] for sig in signatures[1:])


def _layer_signature(layer: nn.Module) -> tuple:
    tensors = [(name, t.shape, t.stride(), t.dtype, t.device)
               for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers())]
    modules = [(name, type(m), _plain_attributes(m, depth=1)) for name, m in layer.named_modules()]
    return tensors, modules


def _plain_attributes(obj: object, depth: int) -> list:
    """``obj``'s public attributes other than tensors, modules and ``layer_idx``: scalars by value, other
    objects by type and (``depth`` levels down) their own attributes."""
    out = []
    for key, value in sorted(vars(obj).items()):
        if key.startswith("_") or key == "layer_idx" or isinstance(value, (torch.Tensor, nn.Module)):
            continue
        if value is None or isinstance(value, (bool, int, float, str, list, tuple)):
            out.append((key, value))
        else:
            nested = _plain_attributes(value, depth - 1) if depth > 0 and hasattr(value, "__dict__") else None
            out.append((key, type(value), nested))
    return out


def _mark_dynamic(*tensors: torch.Tensor | None) -> None:
    """Compile the next graph with the first (token) dimension of ``tensors`` dynamic."""
    for t in tensors:
        if t is not None:
            torch._dynamo.mark_dynamic(t, 0)


def _layer_forward(layer: nn.Module, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, rope):
    return layer(positions, x, residual, rope)


class CompiledForward:
    """``model(input_ids, positions)`` through inductor; call ``warm_up`` once before serving.

    Subclasses say what is compiled (``_run``); this class owns warm-up and the eager fallback."""

    level: int

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._warming = False  # inside warm_up: graphs may be compiled, steps of 2+ tokens mark dims dynamic
        self._warned = False  # a step fell back to eager (logged once)

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
            return self._run(input_ids, positions)
        try:
            # guards that only tell the graphs apart (the runner always calls in inference mode with the
            # same parameters); a step no graph takes raises instead of recompiling
            with torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
                return self._run(input_ids, positions)
        except RuntimeError as exc:
            if "recompil" not in str(exc).lower():
                raise
            if not self._warned:
                logger.warning("compiled CPU forward has no graph for this step (%d tokens); running it eagerly "
                               "(%s)", input_ids.shape[0], str(exc).splitlines()[0][:200])
                self._warned = True
            # a layer that ran before the failure stored this step's K/V already: storing them again is harmless
            return self.model(input_ids, positions)


class WholeForward(CompiledForward):
    """Level 2: the whole ``model.forward`` in one graph."""

    level = WHOLE_FORWARD

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._compiled = _compile(model.forward, input_guards_only=True)  # traced on every module it runs

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self._warming and input_ids.shape[0] >= 2:
            _mark_dynamic(input_ids, positions)
        return self._compiled(input_ids, positions)


class LayerwiseForward(CompiledForward):
    """Level 3: one compiled decoder layer runs every layer; the rest of the forward stays eager.

    Where the layers are alike, steps call the layer's graphs directly (``DirectLayerGraphs``) once warm-up
    found that equal to calling them through ``torch.compile``."""

    level = LAYERWISE

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        layers = model.model.layers
        alike = layers_alike(layers)
        if not alike:
            logger.info("decoder layers differ in kind: each kind gets its own compiled graphs, every call checks "
                        "which one applies")
        self._direct = DirectLayerGraphs(layers) if alike else None
        self._compiled_layer = _compile(_layer_forward, input_guards_only=alike,
                                        backend=self._direct.backend if alike else "inductor")
        self._checking = False  # warm-up: compare each layer's direct call with its torch.compile call

    def warm_up(self, run_step: Callable[[int], None]) -> float:
        start = time.perf_counter()
        super().warm_up(run_step)
        if self._direct is not None:
            self._checking = True
            try:
                run_step(1)
                run_step(3)
            finally:
                self._checking = False
            logger.info("compiled layer called %s", "directly" if self._direct.usable else
                        "through torch.compile (its direct call was not found equal)")
        return time.perf_counter() - start

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        direct = self._direct is not None and self._direct.usable and not self._checking
        return self.model(input_ids, positions, layer_forward=self._direct if direct else self._layer)

    def _layer(self, layer: nn.Module, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, rope):
        activations = (positions, x, residual, *((rope.cos, rope.sin) if rope is not None else (None, None)))
        if self._warming:
            if x.shape[0] >= 2:
                _mark_dynamic(*activations)
            if self._direct is not None:
                self._direct.tracing(layer, activations)
        out = self._compiled_layer(layer, positions, x, residual, rope)
        if self._checking:
            self._direct.check(out, layer, positions, x, residual, rope)
        return out


def compile_cpu_forward(model: nn.Module, device: torch.device,
                        scratch_step: Callable[[Callable], Callable[[int], None]],
                        level: int = LAYERWISE) -> CompiledForward | None:
    """The CPU forward compiled by inductor at ``level`` and warmed now (None: it stays eager, with the
    reason logged).

    ``scratch_step(forward)`` returns ``run(n)``: one decode forward of ``n`` one-token sequences through
    ``forward`` on a scratch cache."""
    reason = compile_unsupported_reason(model, device, level)
    if reason is not None:
        if device.type == "cpu":
            logger.info("CPU forward stays eager: %s", reason)
        return None
    compiled = (LayerwiseForward if level == LAYERWISE else WholeForward)(model)
    what = "one decoder layer" if level == LAYERWISE else "the whole CPU forward"
    logger.info("compiling %s (torch.compile, inductor; compilation_config=0 skips this) ...", what)
    try:
        seconds = compiled.warm_up(scratch_step(compiled))
    except Exception as exc:  # no C++ compiler, an inductor limitation: serve eagerly rather than fail
        logger.warning("torch.compile of the CPU forward failed, running eagerly: %s",
                       str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return None
    logger.info("compiled %s in %.1f s", what, seconds)
    return compiled
