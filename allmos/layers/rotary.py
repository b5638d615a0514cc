"""Rotary position embeddings (neox style, as Llama/Qwen in Hugging Face transformers).

Invariant: for every supported rope type, ``RotaryEmbedding.forward`` returns the same rotated query/key as
transformers' ``*RotaryEmbedding`` + ``apply_rotary_pos_emb`` would for the same positions. To get there the
inverse frequencies are computed with the same float32 tensor ops as ``transformers.modeling_rope_utils``,
cos/sin are computed in float32 (times the yarn attention factor), cast to the activation dtype, and the
rotation uses the same multiply/add sequence in the activation dtype as transformers does.

Only the first ``rotary_dim`` channels of each head are rotated (``partial_rotary_factor``); the rest pass
through unchanged.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")

# Keys each scaled rope type must carry in ``RopeConfig.scaling`` (yarn's factor may be derived).
_REQUIRED_KEYS = MappingProxyType(
    {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "yarn": ("original_max_position_embeddings",),
        "dynamic": ("factor",),
    }
)

# Keys of a Hugging Face rope dict that RopeConfig stores in its own fields (or that are aliases).
_LIFTED_KEYS = ("type", "rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class RopeConfig:
    """Normalized rotary settings of one model.

    ``scaling`` is the Hugging Face rope dict with ``rope_type`` (never the legacy ``type``), without
    ``rope_theta`` / ``partial_rotary_factor``; ``None`` (or ``{"rope_type": "default"}``) means plain RoPE.
    For llama3/yarn it holds ``original_max_position_embeddings``; 'dynamic' uses ``max_position`` as the
    original length, as transformers does.
    """

    head_dim: int
    rotary_dim: int
    max_position: int
    theta: float
    scaling: dict | None = field(hash=False)

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(
                f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}"
            )
        if self.max_position <= 0:
            raise ValueError(f"max_position must be positive, got {self.max_position}")
        if self.theta <= 0:
            raise ValueError(f"theta must be positive, got {self.theta}")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        missing = [k for k in _REQUIRED_KEYS.get(rope_type, ()) if self.scaling.get(k) is None]
        if missing:
            raise ValueError(f"rope_scaling of type {rope_type!r} is missing {', '.join(missing)}")

    @property
    def rope_type(self) -> str:
        """The rope variant: one of ``SUPPORTED_ROPE_TYPES`` after validation."""
        if not self.scaling:
            return "default"
        return self.scaling.get("rope_type", "default")


def _read(hf_config: Any, key: str) -> Any:
    """``key`` of a config object or a config.json dict; None when absent."""
    if isinstance(hf_config, Mapping):
        return hf_config.get(key)
    return getattr(hf_config, key, None)


def _raw_rope_dict(hf_config: Any) -> dict:
    """Copy of the rope dict, preferring ``rope_scaling`` over ``rope_parameters`` as transformers does."""
    raw = _read(hf_config, "rope_scaling") or _read(hf_config, "rope_parameters") or {}
    if not isinstance(raw, Mapping):
        raise TypeError(f"rope_scaling / rope_parameters must be a dict, got {type(raw).__name__}")
    if any(isinstance(v, Mapping) for v in raw.values()):
        raise ValueError("per-layer-type rope_parameters (nested dicts) are not supported")
    return dict(raw)


def _head_dim(hf_config: Any) -> int:
    head_dim = _read(hf_config, "head_dim")
    if head_dim:
        return int(head_dim)
    hidden_size, num_heads = _read(hf_config, "hidden_size"), _read(hf_config, "num_attention_heads")
    if not hidden_size or not num_heads:
        raise ValueError("config needs head_dim or hidden_size and num_attention_heads")
    return hidden_size // num_heads


def _first_not_none(*values: Any, default: Any) -> Any:
    return next((v for v in values if v is not None), default)


def _normalize_scaling(raw: dict, hf_config: Any, max_position: int) -> dict | None:
    """HF rope dict -> ``RopeConfig.scaling``: canonical ``rope_type``, lifted keys removed."""
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return None
    scaling = {k: v for k, v in raw.items() if k not in _LIFTED_KEYS}
    scaling["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn"):
        # transformers gives a top-level original_max_position_embeddings (Phi-3 style) priority.
        top_level = _read(hf_config, "original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = _first_not_none(
            top_level, scaling.get("original_max_position_embeddings"), default=max_position
        )
    return scaling


def rope_config_from_hf(hf_config: Any) -> RopeConfig:
    """Build a RopeConfig from a transformers config object or a config.json dict.

    Reads both dialects: top-level ``rope_theta`` / ``rope_scaling`` (published checkpoints; the type under
    ``type`` or ``rope_type``) and transformers 5 ``rope_parameters`` (``rope_type``, ``rope_theta``, ...).
    Raises ValueError for rope types other than ``SUPPORTED_ROPE_TYPES``.
    """
    raw = _raw_rope_dict(hf_config)
    max_position = _read(hf_config, "max_position_embeddings")
    if not max_position:
        raise ValueError("config needs max_position_embeddings")
    theta = _first_not_none(raw.get("rope_theta"), _read(hf_config, "rope_theta"), default=10000.0)
    partial = _first_not_none(
        raw.get("partial_rotary_factor"), _read(hf_config, "partial_rotary_factor"), default=1.0
    )
    head_dim = _head_dim(hf_config)
    return RopeConfig(
        head_dim=head_dim,
        rotary_dim=int(head_dim * partial),
        max_position=int(max_position),
        theta=float(theta),
        scaling=_normalize_scaling(raw, hf_config, int(max_position)),
    )


# ---------------------------------------------------------------------------------------------------------
# Inverse frequencies: the same float32 tensor ops as transformers.modeling_rope_utils, so results are equal.


def _exponents(dim: int, device: torch.device | None = None) -> torch.Tensor:
    """``2i / dim`` for i in [0, dim/2), float32.  # [dim // 2]"""
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def _plain_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """``1 / theta^(2i/dim)``.  # [dim // 2]"""
    return 1.0 / (theta ** _exponents(dim))


def _linear_inv_freq(cfg: RopeConfig) -> torch.Tensor:
    """Position interpolation: positions / factor, applied to the frequencies."""
    return _plain_inv_freq(cfg.theta, cfg.rotary_dim) / cfg.scaling["factor"]


def _llama3_inv_freq(cfg: RopeConfig) -> torch.Tensor:
    """Llama 3.1: low frequencies divided by factor, high ones kept, a smooth blend in between."""
    s = cfg.scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    inv_freq = _plain_inv_freq(cfg.theta, cfg.rotary_dim)
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_attention_factor(cfg: RopeConfig) -> float:
    """YaRN magnitude scale applied to cos and sin (``attention_factor``, else from factor / mscale)."""
    s = cfg.scaling
    if s.get("attention_factor") is not None:
        return s["attention_factor"]
    factor = _yarn_factor(cfg)
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_factor(cfg: RopeConfig) -> float:
    factor = cfg.scaling.get("factor")
    if factor is None:  # DeepSeek-V3 style: implied by the two lengths
        return cfg.max_position / cfg.scaling["original_max_position_embeddings"]
    return factor


def _yarn_correction_range(cfg: RopeConfig) -> tuple[float, float]:
    """Channel range [low, high] over which YaRN blends interpolation into extrapolation."""
    s, dim = cfg.scaling, cfg.rotary_dim
    original_max = s["original_max_position_embeddings"]

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(cfg.theta))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn_inv_freq(cfg: RopeConfig) -> torch.Tensor:
    """YaRN: interpolated frequencies below the correction range, extrapolated above, linear ramp between."""
    factor, dim = _yarn_factor(cfg), cfg.rotary_dim
    pos_freqs = cfg.theta ** _exponents(dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    low, high = _yarn_correction_range(cfg)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def _dynamic_unscaled_inv_freq(cfg: RopeConfig) -> torch.Tensor:
    """transformers' dynamic NTK frequencies at seq_len = max_position (its init-time value)."""
    factor, dim, length = cfg.scaling["factor"], cfg.rotary_dim, cfg.max_position
    base = cfg.theta * ((factor * length / length) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _exponents(dim))


def _dynamic_inv_freq(cfg: RopeConfig, seq_lens: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK frequencies for each sequence length, in float32 like transformers' tensor path.

    seq_lens: [n] int64, each > max_position. Returns [n, rotary_dim // 2].
    """
    factor, dim = cfg.scaling["factor"], cfg.rotary_dim
    growth = (factor * seq_lens / cfg.max_position) - (factor - 1)  # [n] float32
    # transformers raises a 0-dim tensor to this power, which takes torch's correctly rounded scalar path;
    # a vectorized float32 pow can be 1-2 ulp off, so round the float64 power instead.
    base = cfg.theta * (growth.double() ** (dim / (dim - 2))).float()  # [n]
    return 1.0 / (base[:, None] ** _exponents(dim, seq_lens.device))


_STATIC_INV_FREQ = MappingProxyType(
    {
        "default": lambda cfg: _plain_inv_freq(cfg.theta, cfg.rotary_dim),
        "linear": _linear_inv_freq,
        "llama3": _llama3_inv_freq,
        "yarn": _yarn_inv_freq,
    }
)


def _cache_len(cfg: RopeConfig) -> int:
    """Positions covered by the cos/sin cache of a static rope type."""
    rope_type = cfg.rope_type
    if rope_type == "linear":
        return int(cfg.max_position * cfg.scaling["factor"])
    if rope_type == "yarn":
        original = cfg.scaling["original_max_position_embeddings"]
        return max(cfg.max_position, int(original * _yarn_factor(cfg)))
    return cfg.max_position


# ---------------------------------------------------------------------------------------------------------
# Modules


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotation of the first 2 * cos.shape[-1] channels of each head.

    x: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, rotary_dim // 2], already in x.dtype.
    Per element this is transformers' ``x * cos + rotate_half(x) * sin`` (same products, same sum order).
    """
    half = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [num_tokens, 1, rotary_dim // 2]
    x1, x2, x_pass = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass), dim=-1)


@dataclass(frozen=True)
class RopeTables:
    """One forward's cos/sin laid out for ``rotate_with``: computed once per step (``RotaryEmbedding.tables``)
    and shared by every layer, so a layer's rotation is four elementwise ops with no lookups or casts."""

    cos: torch.Tensor  # [num_tokens, 1, rotary_dim] activation dtype: (cos, cos)
    sin: torch.Tensor  # [num_tokens, 1, rotary_dim] activation dtype: (-sin, sin)


def rotate_with(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """``_rotate`` with per-step tables: ``x * (cos, cos) + (x2, x1) * (-sin, sin)`` over the rotated channels.

    x: [num_tokens, num_heads, head_dim] in the tables' dtype (any strides). Bitwise equal to ``_rotate``: each
    product is the same product (negating a rounded product is exact) and ``a + (-b)`` is ``a - b``.
    """
    rotary_dim = tables.cos.shape[-1]
    x_rot = x if rotary_dim == x.shape[-1] else x[..., :rotary_dim]
    out = x_rot * tables.cos
    out.add_(x_rot.roll(rotary_dim // 2, -1).mul_(tables.sin))  # roll: (x2, x1); in place on temporaries
    return out if x_rot is x else torch.cat((out, x[..., rotary_dim:]), dim=-1)


class RotaryEmbedding(torch.nn.Module):
    """Applies rotary embeddings to flattened query/key tokens; subclasses say where cos/sin come from."""

    needs_seq_lens: bool = False

    def __init__(self, cfg: RopeConfig):
        super().__init__()
        self.cfg = cfg

    def cos_sin(
        self, positions: torch.Tensor, seq_lens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin per token, each [num_tokens, rotary_dim // 2], attention factor included."""
        raise NotImplementedError

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens] int64, absolute positions
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        seq_lens: torch.Tensor | None = None,  # [num_tokens] int64, only for 'dynamic'
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (query, key) rotated, in their own dtypes.

        ``seq_lens`` (dynamic NTK only): per token, the length of its sequence as seen by this forward,
        i.e. the last position of that sequence in this forward + 1.
        """
        cos, sin = self.cos_sin(positions, seq_lens)
        # Cast once: transformers casts its float32 cos/sin to the activation dtype before rotating.
        cos, sin = cos.to(query.dtype), sin.to(query.dtype)
        return _rotate(query, cos, sin), _rotate(key, cos.to(key.dtype), sin.to(key.dtype))

    def tables(
        self, positions: torch.Tensor, dtype: torch.dtype, seq_lens: torch.Tensor | None = None
    ) -> RopeTables:
        """cos/sin of ``positions`` (``seq_lens`` as in ``forward``) cast to ``dtype`` once, as ``forward`` casts
        them, for ``rotate_with``."""
        cos, sin = self.cos_sin(positions, seq_lens)  # [num_tokens, rotary_dim // 2] each
        cos, sin = cos.to(dtype), sin.to(dtype)
        return RopeTables(torch.cat((cos, cos), dim=-1)[:, None], torch.cat((-sin, sin), dim=-1)[:, None])

    def extra_repr(self) -> str:
        c = self.cfg
        return f"type={c.rope_type}, head_dim={c.head_dim}, rotary_dim={c.rotary_dim}, theta={c.theta}"


class CachedRotaryEmbedding(RotaryEmbedding):
    """default / linear / llama3 / yarn: fixed frequencies, cos/sin precomputed for positions < cache_len."""

    def __init__(self, cfg: RopeConfig, dtype: torch.dtype, device: torch.device | None):
        super().__init__(cfg)
        # Frequencies on the CPU, as transformers computes them at init; cos/sin on the target device.
        inv_freq = _STATIC_INV_FREQ[cfg.rope_type](cfg)  # [rotary_dim // 2]
        scale = yarn_attention_factor(cfg) if cfg.rope_type == "yarn" else 1.0
        self.cache_len = _cache_len(cfg)
        positions = torch.arange(self.cache_len, dtype=torch.int64, device=device)
        freqs = positions[:, None].float() * inv_freq.to(device)  # [cache_len, rotary_dim // 2]
        self.cos_cache = torch.nn.Buffer((freqs.cos() * scale).to(dtype), persistent=False)
        self.sin_cache = torch.nn.Buffer((freqs.sin() * scale).to(dtype), persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache lookup; positions must be < ``cache_len``."""
        return self.cos_cache[positions], self.sin_cache[positions]


class DynamicNTKRotaryEmbedding(RotaryEmbedding):
    """Dynamic NTK: frequencies depend on each token's sequence length, so cos/sin are computed per call.

    Tokens of sequences no longer than ``max_position`` use the unscaled frequencies; longer ones use
    base' = theta * (factor * seq_len / max_position - (factor - 1)) ** (dim / (dim - 2)). This equals a fresh
    transformers module run on that one sequence (transformers itself keeps the longest length it has seen).
    """

    needs_seq_lens = True

    def __init__(self, cfg: RopeConfig, device: torch.device | None):
        super().__init__(cfg)
        self.inv_freq = torch.nn.Buffer(_dynamic_unscaled_inv_freq(cfg).to(device), persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, seq_lens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_lens is None:
            raise ValueError("seq_lens is required for dynamic rope scaling")
        scaled = seq_lens > self.cfg.max_position  # [num_tokens]
        # The clamp keeps unscaled rows finite; torch.where then discards them.
        scaled_inv_freq = _dynamic_inv_freq(self.cfg, seq_lens.clamp(min=self.cfg.max_position))
        # [num_tokens, rotary_dim // 2]
        inv_freq = torch.where(scaled[:, None], scaled_inv_freq, self.inv_freq)
        freqs = positions[:, None].float() * inv_freq
        return freqs.cos(), freqs.sin()


def get_rope(
    cfg: RopeConfig, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> RotaryEmbedding:
    """Build the rotary module for ``cfg``.

    ``dtype`` is the storage dtype of the cos/sin cache (cos/sin are always computed in float32; they are
    cast to the activation dtype in forward, so the activation dtype here loses nothing for that dtype).
    Static types cache positions < ``module.cache_len``: max_position (x factor for linear; at least
    original_max_position_embeddings x factor for yarn).
    """
    if cfg.rope_type == "dynamic":
        return DynamicNTKRotaryEmbedding(cfg, device)
    return CachedRotaryEmbedding(cfg, dtype, device)
