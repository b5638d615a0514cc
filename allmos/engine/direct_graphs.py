"""Calls of the compiled decoder-layer graphs without ``torch.compile``'s work around each call.

A call through ``torch.compile`` costs some 25 us on a small CPU before its graph runs (frame hook, guard
lookup, fetching every parameter from the module tree), once per layer per step: about 0.75 ms of a 6.6 ms
batch-1 step of the default model. The graphs themselves (inductor's compiled code) take a flat list of
inputs. ``DirectLayerGraphs.backend`` compiles each graph as the ``inductor`` backend does and records which
argument each input is, matched by identity on the call being traced: a tensor of the layer (by its name, so
that any alike layer supplies its own), an activation, or the token count. Afterwards ``__call__`` feeds a
graph directly, choosing it by the token count (the graph of one token, or the dynamic one), with each layer's
tensors gathered once.

Only for layers that ``cpu_compile.layers_alike`` found alike (one graph serves every layer), and only once
``check`` found the direct call equal to the ``torch.compile`` call on both graphs (see
``cpu_compile.LayerwiseForward.warm_up``); otherwise the layers run through ``torch.compile``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = ("positions", "x", "residual", "rope cos", "rope sin")
TOKEN_COUNT = len(ACTIVATIONS)  # slot value: the token count (the dynamic graph's size symbol)


def _named_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(layer.named_parameters(), layer.named_buffers()))


class DirectLayerGraphs:
    """A ``torch.compile`` backend for the decoder-layer function, and a direct caller of what it compiled."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.layers = layers
        # one token (True) or a dynamic count (False) -> (graph, its input slots, per-layer input templates)
        self._graphs: dict[bool, tuple] = {}
        self._tracing: tuple | None = None  # (layer, activations) of the call that may be compiled now
        self.checked = 0  # layer calls found equal by ``check``
        self.mismatch = False  # a direct call differed from the torch.compile call (or could not run)

    @property
    def ready(self) -> bool:
        """Both graphs are recorded with every input accounted for."""
        return len(self._graphs) == 2

    @property
    def usable(self) -> bool:
        return self.ready and self.checked > 0 and not self.mismatch

    def tracing(self, layer: nn.Module, activations: tuple) -> None:
        """Say which layer and activations the next compiled call gets (during warm-up)."""
        self._tracing = (layer, activations)

    def backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs)
        plan = self._plan(example_inputs) if self._tracing is not None else None
        if plan is not None:
            one_token = not any(isinstance(e, torch.SymInt) for e in example_inputs)
            self._graphs[one_token] = (compiled, *plan)
        return compiled

    def _plan(self, example_inputs: list) -> tuple | None:
        """(slots, templates): ``slots`` [(input index, activation index or TOKEN_COUNT)], ``templates``
        {id(layer): the inputs with that layer's tensors in place}; None where an input is none of these."""
        layer, activations = self._tracing
        names = {id(t): name for name, t in _named_tensors(layer).items()}
        positions = {id(t): i for i, t in enumerate(activations) if t is not None}
        slots, tensor_slots = [], []
        for i, e in enumerate(example_inputs):
            if isinstance(e, torch.SymInt):
                slots.append((i, TOKEN_COUNT))
            elif id(e) in positions:
                slots.append((i, positions[id(e)]))
            elif id(e) in names:
                tensor_slots.append((i, names[id(e)]))
            else:
                return None
        if sum(k == TOKEN_COUNT for _, k in slots) > 1:
            return None  # more than one size symbol: not only the token count varies
        templates = {}
        for each in self.layers:
            tensors = _named_tensors(each)
            template = [None] * len(example_inputs)
            for i, name in tensor_slots:
                template[i] = tensors[name]
            templates[id(each)] = template
        return slots, templates

    def __call__(self, layer: nn.Module, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, rope):
        """``layer(positions, x, residual, rope)`` through the recorded graph -> (x, residual)."""
        compiled, slots, templates = self._graphs[x.shape[0] == 1]
        inputs = list(templates[id(layer)])
        cos, sin = (rope.cos, rope.sin) if rope is not None else (None, None)
        values = (positions, x, residual, cos, sin, x.shape[0])
        for i, k in slots:
            inputs[i] = values[k]
        out = compiled(*inputs)
        return out[0], out[1]

    def check(self, expected: tuple[torch.Tensor, torch.Tensor], layer: nn.Module, *args) -> None:
        """Compare a direct call of ``layer`` on ``args`` with ``expected``, the torch.compile call's result."""
        if not self.ready or self.mismatch:
            return
        try:
            got = self(layer, *args)
        except Exception:  # an input the plan got wrong: the graph's size asserts, a missing layer
            self.mismatch = True
            return
        if all(torch.equal(a, b) for a, b in zip(got, expected)):
            self.checked += 1
        else:
            self.mismatch = True
