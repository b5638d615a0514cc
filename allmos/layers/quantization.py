"""Weight-only quantization of linear layers on the CPU, through torch's own packed-weight kernels.

Methods (the engine option ``quantization``, named as in vLLM's ``LLM(quantization=...)``):

* ``"int8"``: per-output-channel symmetric int8, ``w[n, k] = q[n, k] * scale[n]``; matmul by
  ``torch.ops.aten._weight_int8pack_mm`` (int8 weights, activations in bfloat16/float16/float32).
* ``"int4"``: group-wise asymmetric 4 bit along the input dimension, groups of ``INT4_GROUP_SIZE``;
  ``w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]`` with ``g = k // group_size`` and ``q`` in 0..15,
  packed by ``_convert_weight_to_int4pack_for_cpu`` and multiplied by ``_weight_int4pack_mm_for_cpu``.
  A GGUF Q4_0/Q4_1 tensor (blocks of 32 along the input dimension, ``d * q + m``) is on this grid, so
  its dequantized values come back up to the rounding of scale and zero to the activation dtype.

Invariants: weights are loaded in the activation dtype as usual, then ``quantize_model`` replaces each
linear layer's float ``weight`` by packed buffers (``process_weights_after_loading``, as vLLM calls the
step) and the layer's ``forward`` goes through ``QuantMethod.apply``. Scales are stored in the activation
dtype (the kernels require it). The LM head is quantized to int8 under both methods (as GGUF files keep
the output matrix at 8 bits); a tied input embedding keeps its float table for lookups. A layer whose
shape the int4 kernel cannot take falls back to int8.
"""

from __future__ import annotations

import abc
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("allmos")

QUANTIZATION_METHODS = ("int8", "int4")
INT4_GROUP_SIZE = 32
_INT4_INNER_K_TILES = 2  # kernel tiling argument of the CPU int4 pack (any of 2, 4, 8 is accepted)


def check_quantization(method: str | None, device: torch.device) -> None:
    """ValueError unless ``method`` is None or a method this torch build runs on ``device``."""
    if method is None:
        return
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be None or one of {QUANTIZATION_METHODS}, got {method!r}")
    if device.type != "cpu":
        raise ValueError(f"quantization={method!r} is implemented for the CPU only (device={device.type!r}); "
                         "leave quantization=None on a GPU")
    op = "_weight_int8pack_mm" if method == "int8" else "_weight_int4pack_mm_for_cpu"
    if not hasattr(torch.ops.aten, op):
        raise ValueError(f"quantization={method!r} needs torch.ops.aten.{op}, which torch {torch.__version__} "
                         "lacks")


class QuantMethod(abc.ABC):
    """How one layer's weight is stored and multiplied. Stateless: the buffers live on the layer."""

    name: str = "abstract"

    @abc.abstractmethod
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Replace ``layer.weight`` (float ``[out, in]``, already loaded) by this method's buffers."""

    @abc.abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` for ``x`` of shape ``[..., in]`` -> ``[..., out]`` in ``x.dtype`` (no bias)."""

    @staticmethod
    def _replace_weight(layer: nn.Module, **buffers: torch.Tensor) -> None:
        del layer.weight  # a tied embedding keeps its own reference to the float table
        layer.weight = None
        for name, value in buffers.items():
            layer.register_buffer(name, value, persistent=False)


class Int8WeightOnly(QuantMethod):
    name = "int8"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        qweight, scale = quantize_int8(layer.weight.data)
        dtype = layer.weight.dtype
        self._replace_weight(layer, qweight=qweight, weight_scale=scale.to(dtype))

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        scale = layer.weight_scale  # one module attribute lookup per call: they show on a decode step
        scale = scale if scale.dtype == x.dtype else scale.to(x.dtype)
        if x.dim() == 2:  # [tokens, in], the model's case: no reshapes (the kernel needs a contiguous x)
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), layer.qweight, scale)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), layer.qweight, scale)
        return y.view(*x.shape[:-1], y.shape[-1])


class Int4WeightOnly(QuantMethod):
    name = "int4"

    def __init__(self, group_size: int = INT4_GROUP_SIZE) -> None:
        self.group_size = group_size

    def supports(self, weight: torch.Tensor) -> bool:
        """The CPU int4 kernel takes ``in % group_size == 0`` (and an even ``in``)."""
        return weight.dim() == 2 and weight.shape[1] % self.group_size == 0 and weight.shape[1] % 2 == 0

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data
        q, scale_zero = quantize_int4(weight, self.group_size, weight.dtype)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INT4_INNER_K_TILES)
        self._replace_weight(layer, qweight=packed, scales_and_zeros=scale_zero)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        sz = layer.scales_and_zeros  # one module attribute lookup per call: they show on a decode step
        sz = sz if sz.dtype == x.dtype else sz.to(x.dtype)
        if x.dim() == 2:  # [tokens, in], the model's case: no reshapes (the kernel needs a contiguous x)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), layer.qweight, self.group_size, sz)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, layer.qweight, self.group_size, sz)
        return y.view(*x.shape[:-1], y.shape[-1])


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q [out, in] int8, scale [out] float32)`` with ``weight ~ q * scale[:, None]``."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def quantize_int4(weight: torch.Tensor, group_size: int,
                  scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4 bit per group of ``group_size`` input features.

    Returns ``(q [out, in] int32 in 0..15, scales_and_zeros [in // group_size, out, 2] scale_dtype)`` with
    ``weight[n, k] ~ (q[n, k] - 8) * scale[k // group_size, n] + zero[k // group_size, n]``. Scale and zero are
    rounded to ``scale_dtype`` before ``q`` is chosen, so ``q`` is the nearest grid point of the stored grid.
    """
    out_features, in_features = weight.shape
    w = weight.float().view(out_features, in_features // group_size, group_size)  # [out, groups, group]
    lo, hi = w.amin(dim=2), w.amax(dim=2)  # [out, groups]
    scale = ((hi - lo) / 15.0).clamp(min=1e-12).to(scale_dtype).float()
    zero = (lo + 8.0 * scale).to(scale_dtype).float()
    q = torch.round((w - zero[..., None]) / scale[..., None] + 8.0).clamp(0, 15).to(torch.int32)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(scale_dtype)
    return q.view(out_features, in_features).contiguous(), scales_and_zeros


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 ``[out, in]`` weight of ``quantize_int4``'s output (for tests and error reports)."""
    scale = scales_and_zeros[..., 0].float().t().repeat_interleave(group_size, dim=1)  # [out, in]
    zero = scales_and_zeros[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (q.float() - 8.0) * scale + zero


def quantize_model(model: nn.Module, method: str) -> dict[str, int]:
    """Quantize every linear layer and the LM head of ``model`` in place; returns layer counts per method.

    Must run after the weights are loaded. The LM head always takes int8 (see the module docstring).
    """
    from allmos.layers.embedding import ParallelLMHead
    from allmos.layers.linear import LinearBase

    int8, int4 = Int8WeightOnly(), Int4WeightOnly()
    counts = {"int8": 0, "int4": 0}
    for name, module in model.named_modules():
        if not isinstance(module, (LinearBase, ParallelLMHead)) or getattr(module, "quant_method", None):
            continue
        chosen = int4 if method == "int4" and isinstance(module, LinearBase) and int4.supports(module.weight) else int8
        if method == "int4" and chosen is int8 and isinstance(module, LinearBase):
            logger.info("quantization: %s %s takes int8 (int4 needs in_features %% %d == 0)", name,
                        tuple(module.weight.shape), int4.group_size)
        chosen.process_weights_after_loading(module)
        module.quant_method = chosen
        counts[chosen.name] += 1
    return counts


# ----------------------------------------------------------------------------------------------------
# The automatic choice on the CPU

# GGUF types of 4-bit blocks of 32 along the input dimension with one scale (and min) per block: int4 with
# groups of 32 holds their values (up to the rounding of scale and zero). Wider types fit int8 per row
# better than 4 bit; F32/F16/BF16 weights are not quantized automatically.
_GGUF_INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
_GGUF_INT8_TYPES = frozenset({"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_K"})
_GGUF_LINEAR_RE = r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$"


@dataclass(frozen=True)
class WeightFormat:
    """How the engine stores weights and computes: ``dtype`` of activations (and float weights, KV cache),
    ``quantization`` of linear weights (None: float ``dtype``), and why (for the start-up log)."""

    dtype: torch.dtype
    quantization: str | None
    reason: str


def gguf_linear_types(gguf_path: Path) -> frozenset[str]:
    """GGUF type names (e.g. 'Q4_1') of the file's transformer-block linear weights (reads the header only)."""
    from gguf import GGMLQuantizationType

    from allmos.models.gguf_header import gguf_tensor_types

    pattern = re.compile(_GGUF_LINEAR_RE)
    return frozenset(GGMLQuantizationType(t).name for name, t in gguf_tensor_types(gguf_path).items()
                     if pattern.match(name))


def quantization_for_gguf(types: frozenset[str]) -> str | None:
    """The method that keeps GGUF linear weights of ``types`` quantized; None when some are float."""
    if not types:
        return None
    if types <= _GGUF_INT4_TYPES:
        return "int4"
    if types <= _GGUF_INT4_TYPES | _GGUF_INT8_TYPES:
        return "int8"
    return None


def cpu_weight_format(requested_dtype: torch.dtype | None, quantization: str | None,
                      checkpoint_dtype: torch.dtype | None, gguf_path: Path | None,
                      native_bf16: bool) -> WeightFormat:
    """The CPU's weight format for ``dtype`` (None: 'auto') and ``quantization`` as the user gave them.

    An explicit dtype is used as given and unquantized unless ``quantization`` is set (float32 is the
    oracle). With ``dtype='auto'`` on a CPU with native bfloat16: explicit quantization computes in
    bfloat16 (the packed kernels' fast path); a GGUF checkpoint whose linear weights are 4/8-bit blocks
    keeps them quantized (int4/int8, as vLLM keeps GGUF weights quantized) instead of dequantizing them
    to float32; a bfloat16/float16 checkpoint runs in bfloat16. Everything else runs in float32.
    """
    if requested_dtype is not None:
        return WeightFormat(requested_dtype, quantization, "dtype given")
    if not native_bf16:
        return WeightFormat(torch.float32, quantization, "this CPU has no native bfloat16")
    if quantization is not None:
        return WeightFormat(torch.bfloat16, quantization, "quantization given, CPU with native bfloat16")
    kept = quantization_for_gguf(gguf_linear_types(gguf_path)) if gguf_path is not None else None
    if kept is not None:
        return WeightFormat(torch.bfloat16, kept, f"GGUF weights kept quantized ({gguf_path.name})")
    if checkpoint_dtype in (torch.bfloat16, torch.float16):
        return WeightFormat(torch.bfloat16, None, f"{checkpoint_dtype} checkpoint, CPU with native bfloat16")
    return WeightFormat(torch.float32, None, "float32 checkpoint")
