"""Qwen3 (dense): per-head RMSNorm on q and k; biases only if ``attention_bias``."""

from __future__ import annotations

from allmos.models.decoder import DecoderForCausalLM, DecoderSpec
from allmos.models.model_config import ModelConfig


class Qwen3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def make_spec(cls, cfg: ModelConfig) -> DecoderSpec:
        bias = cfg.attention_bias
        return DecoderSpec(qk_norm=True, qkv_bias=bias, o_bias=bias)
