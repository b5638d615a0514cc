"""Llama 2 / 3.x, SmolLM2 and Mistral (Llama architecture); Qwen2 / Qwen2.5 (q/k/v bias)."""

from __future__ import annotations

from allmos.models.decoder import DecoderForCausalLM, DecoderSpec
from allmos.models.model_config import ModelConfig


class LlamaForCausalLM(DecoderForCausalLM):
    @classmethod
    def make_spec(cls, cfg: ModelConfig) -> DecoderSpec:
        bias = cfg.attention_bias
        return DecoderSpec(qk_norm=False, qkv_bias=bias, o_bias=bias, mlp_bias=cfg.mlp_bias)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral without sliding-window attention (configs that need it are rejected)."""

    @classmethod
    def make_spec(cls, cfg: ModelConfig) -> DecoderSpec:
        window = cfg.sliding_window
        if window is not None and window < cfg.max_position_embeddings:
            raise ValueError(f"this Mistral config uses sliding_window={window}, which allmos does not "
                             "implement; set sliding_window to null in config.json only if the model was "
                             "trained without it")
        return DecoderSpec(qk_norm=False, qkv_bias=False, o_bias=False)


class Qwen2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def make_spec(cls, cfg: ModelConfig) -> DecoderSpec:
        if cfg.use_sliding_window:
            raise ValueError("this Qwen2 config sets use_sliding_window=true, which allmos does not implement")
        return DecoderSpec(qk_norm=False, qkv_bias=True, o_bias=False)
