"""One decoder-only transformer shared by the Llama, Qwen2 and Qwen3 families.

Family differences are explicit in ``DecoderSpec`` and chosen by the architecture name (see
``models.registry``): Qwen3 normalizes q and k per head, Qwen2 always has a q/k/v bias, Llama-style
models take biases from ``attention_bias`` / ``mlp_bias``. Module names equal checkpoint keys; packed
modules (``qkv_proj``, ``gate_up_proj``) are declared in ``packed_modules_mapping``. Every class takes the
model's facts as a ``ModelConfig`` (never the Hugging Face config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from allmos.attention.context import ForwardContext, get_forward_context
from allmos.kernels import fused_layers as fused  # None without Triton
from allmos.kernels import fused_qk_rope_store  # None without Triton
from allmos.layers.activation import SiluAndMul
from allmos.layers.attention import Attention
from allmos.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from allmos.layers.fused_linear import norm_then_linear
from allmos.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from allmos.layers.norm import RMSNorm
from allmos.layers.rotary import CachedRotaryEmbedding, RopeTables, RotaryEmbedding, get_rope, rotate_with
from allmos.layers.tp import SINGLE, TPGroup
from allmos.models.model_config import ModelConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from allmos.kernels.gemv_tuning import GemvSignature, GemvTable

    # (layer, positions, x, residual, rope) -> (x, residual): how DecoderModel.forward runs one layer
    LayerForward = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, RopeTables | None],
                            tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DecoderSpec:
    """What distinguishes one family's decoder from another's."""

    qk_norm: bool  # RMSNorm over each q and k head before RoPE (Qwen3)
    qkv_bias: bool  # bias on q/k/v projections
    o_bias: bool  # bias on the output projection
    mlp_bias: bool = False


class DecoderAttention(nn.Module):
    fuse_kv_store: bool = False  # set by use_decode_kernels: q/k-norm + RoPE + K/V store in one kernel

    def __init__(self, cfg: ModelConfig, spec: DecoderSpec, layer_idx: int, tp: TPGroup,
                 rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
                                          bias=spec.qkv_bias, tp=tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * head_dim, cfg.hidden_size, bias=spec.o_bias, tp=tp)
        if spec.qk_norm:
            self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.rotary_emb = rotary_emb  # shared by every layer
        self.rms_norm_eps = cfg.rms_norm_eps
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, head_dim, scale=head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # positions [num_tokens]; x [num_tokens, hidden]
        return self.attend(positions, self.qkv_proj(x))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        """Everything after the q/k/v projection: q/k norm, RoPE, K/V store, attention, o_proj.
        qkv [num_tokens, q_size + 2 * kv_size] -> [num_tokens, hidden]. ``rope``: this step's cos/sin tables
        (``RotaryEmbedding.tables``), or None to look them up here."""
        ctx = get_forward_context() if self.fuse_kv_store and self._rope_fusable() else None  # GPU only
        if ctx is not None and ctx.backend.accepts_stored_kv:
            o = self.attn(self._qk_rope_store(positions, qkv, ctx), None, None)  # K/V already in the cache
        else:
            o = self.attn(*self._qk_rope(positions, qkv, rope))  # [num_tokens, num_heads, head_dim]
        return self.o_proj(o.flatten(1))

    def _rope_fusable(self) -> bool:
        """Whether the fused kernels can apply this layer's RoPE (a cos/sin cache over the whole head)."""
        rope = self.rotary_emb
        return isinstance(rope, CachedRotaryEmbedding) and rope.cfg.rotary_dim == self.head_dim

    def _qk_rope_store(self, positions: torch.Tensor, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim]; k and v go straight into this layer's cache slots."""
        k_cache, v_cache = ctx.kv_caches[self.attn.layer_idx]
        rope = self.rotary_emb
        return fused_qk_rope_store.qk_norm_rope_store(
            qkv, self.num_heads, self.num_kv_heads, self.head_dim,
            self.q_norm.weight if self.qk_norm else None, self.k_norm.weight if self.qk_norm else None,
            self.rms_norm_eps, rope.cos_cache, rope.sin_cache, positions, k_cache, v_cache,
            ctx.metadata.slot_mapping, self.attn.kv_scales)

    def _qk_rope(self, positions: torch.Tensor, qkv: torch.Tensor, rope: RopeTables | None = None):
        """(q, k, v) with q/k normed and rotated: [num_tokens, heads, head_dim] each."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        v = qkv[:, q_size + kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        if fused is not None and qkv.is_cuda and self._rope_fusable():
            rope = self.rotary_emb
            q, k = fused.qk_norm_rope(
                qkv, self.num_heads, self.num_kv_heads, self.head_dim,
                self.q_norm.weight if self.qk_norm else None, self.k_norm.weight if self.qk_norm else None,
                self.rms_norm_eps, rope.cos_cache, rope.sin_cache, positions)
        else:
            q, k = self._qk_reference(positions, qkv[:, :q_size + kv_size], rope)
        return q, k, v

    def _qk_reference(self, positions: torch.Tensor, qk: torch.Tensor, rope: RopeTables | None = None):
        """qk [num_tokens, q_size + kv_size] -> (q, k) normed (Qwen3) and rotated, [num_tokens, heads, head_dim],
        through this step's ``rope`` tables (looked up here when the caller has none)."""
        qk = qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        if rope is None:
            seq_lens = get_forward_context().rope_seq_lens if self.rotary_emb.needs_seq_lens else None
            rope = self.rotary_emb.tables(positions, qk.dtype, seq_lens)
        if not self.qk_norm:  # q and k side by side: one rotation over all their heads
            qk = rotate_with(qk, rope)
            return qk[:, :self.num_heads], qk[:, self.num_heads:]
        q, k = self.q_norm(qk[:, :self.num_heads]), self.k_norm(qk[:, self.num_heads:])
        return rotate_with(q, rope), rotate_with(k, rope)


class DecoderMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: DecoderSpec, tp: TPGroup) -> None:
        super().__init__()
        act = cfg.hidden_act
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2,
                                                       bias=spec.mlp_bias, tp=tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=spec.mlp_bias, tp=tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: DecoderSpec, layer_idx: int, tp: TPGroup,
                 rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(cfg, spec, layer_idx, tp, rotary_emb)
        self.mlp = DecoderMLP(cfg, spec, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                rope: RopeTables | None = None):
        # x, residual [num_tokens, hidden]: norm -> attention -> add & norm -> MLP; each norm may run inside
        # the projection after it, and SiLU-mul inside gate_up (layers.fused_linear)
        qkv, residual = norm_then_linear(self.input_layernorm, self.self_attn.qkv_proj, x, residual)
        x = self.self_attn.attend(positions, qkv, rope)
        act, residual = norm_then_linear(self.post_attention_layernorm, self.mlp.gate_up_proj, x, residual,
                                         act=self.mlp.act_fn)
        return self.mlp.down_proj(act), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: DecoderSpec, tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary_emb = get_rope(cfg.rope)  # shared by every layer
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec, i, tp, self.rotary_emb)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                layer_forward: LayerForward | None = None) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden]. ``layer_forward(layer, positions, x, residual, rope)`` runs
        each layer in place of ``layer(positions, x, residual, rope)`` (the CPU's compiled layer,
        ``allmos.engine.cpu_compile``); the first layer then gets a zero residual instead of None (the same
        values), so that every layer is called with the same kinds of inputs."""
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        rope = self._rope_tables(positions, x.dtype)
        residual = None if layer_forward is None else torch.zeros_like(x)
        for layer in self.layers:
            if layer_forward is None:
                x, residual = layer(positions, x, residual, rope)
            else:
                x, residual = layer_forward(layer, positions, x, residual, rope)
        x, _ = self.norm(x, residual)
        return x

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables | None:
        """On the CPU, this step's cos/sin tables, looked up once for every layer; None elsewhere (CUDA's
        fused kernels read the cos/sin caches themselves, the reference path looks them up per layer)."""
        if positions.device.type != "cpu":
            return None
        rope = self.rotary_emb
        seq_lens = get_forward_context().rope_seq_lens if rope.needs_seq_lens else None
        return rope.tables(positions, dtype, seq_lens)


class DecoderForCausalLM(nn.Module):
    """``forward`` returns final hidden states; ``compute_logits`` projects the rows to sample."""

    spec: DecoderSpec
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, self.make_spec(cfg), tp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        self.tie_word_embeddings = cfg.tie_word_embeddings
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def make_spec(cls, cfg: ModelConfig) -> DecoderSpec:
        """This family's ``DecoderSpec`` for ``cfg``; ValueError for settings the family does not support."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                layer_forward: LayerForward | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, layer_forward)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [num_seqs, hidden] -> [num_seqs, vocab]
        return self.lm_head(hidden)

    def gemv_sites(self) -> dict[str, tuple[GemvSignature, list[nn.Module]]]:
        """The projections of a step by role: what each computes (``GemvSignature``) and its modules."""
        from allmos.kernels.gemv_tuning import GemvSignature

        layers = self.model.layers
        qkv, gate_up = layers[0].self_attn.qkv_proj, layers[0].mlp.gate_up_proj
        # row-parallel o_proj / down_proj add their bias after the all-reduce: their GEMVs have none
        roles = {
            "qkv_proj": ([layer.self_attn.qkv_proj for layer in layers],
                         dict(norm=True, has_bias=qkv.bias is not None)),
            "o_proj": ([layer.self_attn.o_proj for layer in layers], {}),
            "gate_up_proj": ([layer.mlp.gate_up_proj for layer in layers],
                             dict(norm=True, silu_mul=True, has_bias=gate_up.bias is not None)),
            "down_proj": ([layer.mlp.down_proj for layer in layers], {}),
            "lm_head": ([self.lm_head], {}),
        }
        sites = {}
        for role, (modules, fused_around) in roles.items():
            w = modules[0].weight  # [out_features, in_features]
            n = w.shape[0] // 2 if fused_around.get("silu_mul") else w.shape[0]
            sites[role] = (GemvSignature(n, w.shape[1], w.dtype, **fused_around), modules)
        return sites

    def use_decode_kernels(self, tables: dict[str, GemvTable | None], fuse_kv_store: bool = True) -> None:
        """Run small batches through the Triton GEMV as ``tables`` (per ``gemv_sites`` role) chose, and
        (``fuse_kv_store``) q/k-norm + RoPE + K/V store in one kernel where the backend accepts it.
        A table of None (and ``fuse_kv_store=False``) puts a role back on the torch path."""
        sites = self.gemv_sites()
        for role, table in tables.items():
            for module in sites[role][1]:
                module.gemv_table = table
        self.use_fused_kv_store(fuse_kv_store)

    def use_fused_kv_store(self, on: bool = True) -> None:
        """Run q/k-norm + RoPE + K/V store as one kernel (where Triton is installed and the attention backend
        accepts K/V stored by the caller), or (``on=False``) as separate q/k-norm + RoPE and store kernels."""
        for layer in self.model.layers:
            layer.self_attn.fuse_kv_store = on and fused_qk_rope_store is not None
