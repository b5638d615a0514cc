"""Start-up calibration of an fp8 KV cache: each attention layer's ``k_center``, ``k_scale`` and ``v_scale``.

Why a center: in many models some K channels carry a large offset shared by all tokens (in SmolLM2-135M up to
about 14, varying by about 3). e4m3 keeps 3 mantissa bits of each element, so such a channel is stored with
steps of 1, coarse against its token-to-token variation, which is what attention uses; the query's matching
channel turns the error into score noise. Storing ``K - k_center`` quantizes the variation instead (steps of
1/4 there) and costs attention nothing: the center shifts all of one query's scores equally, which softmax
cancels (``allmos.attention.torch_ref``). On the default model it cut the root mean square of the fp8 cache's
per-token logprob error by 7-18% (docs/benchmarks.md).

How: one prefill of ``CALIBRATION_TOKENS`` seeded pseudo-random token ids through the model on a scratch
cache, recording each layer's K and V as they reach the attention layer. Per layer:

    k_center = mean over the tokens of K          [num_kv_heads, head_dim]
    k_scale  = max(1, amax|K - k_center| / (448 / HEADROOM)),   v_scale = max(1, amax|V| / (448 / HEADROOM))

so the scales leave 1.0 only for values within ``HEADROOM`` of e4m3's largest (448): a smaller scale would add
no precision (e4m3's relative step is the same over its whole normal range). Token ids rather than text: the
runner has no tokenizer, every start (and every tensor-parallel rank, which all run this forward together)
gets the same values, and on the default model centers from such ids did as well as centers from real text,
within the measurements' spread (docs/benchmarks.md).

It runs inside the runner's start-up, after memory profiling and before CUDA graphs are captured, the CPU
forward is compiled or anything real is stored, so every stored K uses the final center. The K/V reach the
layer unfused there (the fused q/k-norm + RoPE + store kernel is switched on with the graphs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from allmos.attention.torch_ref import FP8_E4M3_MAX, FP8_KV_DTYPE
from allmos.layers.attention import Attention

if TYPE_CHECKING:
    from allmos.engine.model_runner import LocalModelRunner

CALIBRATION_TOKENS = 256
CALIBRATION_SEED = 0
HEADROOM = 2.0  # scales keep values at most 448 / HEADROOM


def calibrate_kv_cache(runner: LocalModelRunner) -> None:
    """Set every attention layer's fp8 cache scales from one scratch prefill; nothing for other cache dtypes."""
    if runner.kv_spec.dtype != FP8_KV_DTYPE:
        return
    from allmos.engine.model_runner import run_scratch_forward

    layers = [m for m in runner.model.modules() if isinstance(m, Attention)]
    num_tokens = min(CALIBRATION_TOKENS, runner.max_model_len)
    gen = torch.Generator().manual_seed(CALIBRATION_SEED)
    token_ids = torch.randint(0, runner.model_config.vocab_size, (num_tokens,), generator=gen).to(runner.device)
    hooks = [layer.register_forward_pre_hook(_calibrate_on_call) for layer in layers]
    try:  # a prefill of num_tokens tokens whose ids are token_ids
        run_scratch_forward(runner, [num_tokens], lambda _ids, positions: runner.model(token_ids, positions))
    finally:
        for hook in hooks:
            hook.remove()


def _calibrate_on_call(layer: Attention, args: tuple) -> None:
    """Forward pre-hook of an ``Attention`` layer: its (q, k, v) arguments set its scales."""
    _, key, value = args
    if key is None:
        raise RuntimeError("fp8 KV-cache calibration needs K and V at the attention layer (unfused store path)")
    set_kv_scales(layer, key, value)


def set_kv_scales(layer: Attention, key: torch.Tensor, value: torch.Tensor) -> None:
    """Calibrate ``layer`` from key, value [num_tokens, num_kv_heads, head_dim] (module docstring); in place,
    on the device, without synchronizing."""
    k = key.float()
    center = k.mean(dim=0)  # [num_kv_heads, head_dim]
    limit = FP8_E4M3_MAX / HEADROOM
    layer.k_center.copy_(center)
    layer.k_scale.copy_(((k - center).abs().amax() / limit).clamp(min=1.0).reshape(1))
    layer.v_scale.copy_((value.float().abs().amax() / limit).clamp(min=1.0).reshape(1))
