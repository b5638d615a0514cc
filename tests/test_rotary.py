"""allmos.layers.rotary against transformers' own rotary embedding classes (the reference)."""

import copy
import json

import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.llama import modeling_llama

from allmos.layers.rotary import RopeConfig, get_rope, rope_config_from_hf, rotate_with

THETA = 10000.0
MAX_POS = 512  # small, so that dynamic NTK scales beyond it
STATIC_MAX_POS = 4096  # positions up to 3000 are tested; the cos/sin cache covers max_position
HEAD_DIM = 32
NUM_HEADS, NUM_KV_HEADS = 4, 2

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 16,
        "beta_slow": 2,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "truncate": False,
    },
    "yarn_attention_factor": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "attention_factor": 1.3,
    },
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


def _legacy_scaling(scaling: dict | None) -> dict | None:
    """The published-checkpoint form: the type under the old 'type' key."""
    if scaling is None:
        return None
    legacy = {k: v for k, v in scaling.items() if k != "rope_type"}
    legacy["type"] = scaling["rope_type"]
    return legacy


def _llama_kwargs(head_dim: int, max_pos: int) -> dict:
    return {
        "hidden_size": head_dim * NUM_HEADS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": head_dim,
        "max_position_embeddings": max_pos,
        "num_hidden_layers": 1,
        "intermediate_size": 64,
        "vocab_size": 32,
    }


def _config_dicts(
    scaling: dict | None, head_dim: int = HEAD_DIM, theta: float = THETA, max_pos: int = MAX_POS
) -> dict[str, dict]:
    """config.json contents in both dialects: legacy rope_theta/rope_scaling and transformers-5 rope_parameters."""
    base = _llama_kwargs(head_dim, max_pos)
    legacy = {**base, "rope_theta": theta, "rope_scaling": _legacy_scaling(scaling)}
    params = {**base, "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta}}
    return {"legacy": legacy, "params": params}


def _llama_config(config_dict: dict) -> LlamaConfig:
    return LlamaConfig(**copy.deepcopy(config_dict))


def _random_qk(num_tokens: int, head_dim: int, gen: torch.Generator, dtype=torch.float32):
    # [num_tokens, num_heads, head_dim], [num_tokens, num_kv_heads, head_dim]
    q = torch.randn(num_tokens, NUM_HEADS, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens, NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
    return q, k


def _hf_rotate(hf_rope, apply_fn, positions, q, k):
    """transformers' path: cos/sin from its rotary module, then apply_rotary_pos_emb in [b, h, t, d] layout."""
    cos, sin = hf_rope(q, positions[None, :])  # [1, num_tokens, rotary_dim]
    q_hf, k_hf = apply_fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1)


def _check_static(config_dict: dict, num_tokens: int = 256, max_position: int = 3000, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    hf_config = _llama_config(config_dict)
    ours = get_rope(rope_config_from_hf(config_dict))
    hf_rope = modeling_llama.LlamaRotaryEmbedding(hf_config)
    max_position = min(max_position, ours.cache_len)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen)
    positions[:3] = torch.tensor([0, 1, max_position - 1])
    q, k = _random_qk(num_tokens, hf_config.head_dim, gen, dtype)
    q_ours, k_ours = ours(positions, q, k)
    q_ref, k_ref = _hf_rotate(hf_rope, modeling_llama.apply_rotary_pos_emb, positions, q, k)
    assert q_ours.dtype == dtype and k_ours.dtype == dtype
    return (q_ours, k_ours), (q_ref, k_ref)


STATIC_VARIANTS = ["default", "linear", "llama3", "yarn", "yarn_mscale", "yarn_attention_factor"]


@pytest.mark.parametrize("dialect", ["legacy", "params"])
@pytest.mark.parametrize("variant", STATIC_VARIANTS)
def test_static_variants_match_transformers(variant, dialect):
    config_dict = _config_dicts(SCALINGS[variant], max_pos=STATIC_MAX_POS)[dialect]
    (q, k), (q_ref, k_ref) = _check_static(config_dict)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head_dim", [16, 64])
def test_head_dims(head_dim):
    config_dict = _config_dicts(SCALINGS["yarn"], head_dim=head_dim, max_pos=STATIC_MAX_POS)["params"]
    (q, k), (q_ref, k_ref) = _check_static(config_dict)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=0)


def test_qwen3_style_plain():
    config_dict = _config_dicts(None, head_dim=128, theta=1e6, max_pos=40960)["legacy"]
    (q, k), (q_ref, k_ref) = _check_static(config_dict, num_tokens=128, max_position=40960)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["default", "yarn"])
def test_bfloat16_matches_transformers_bitwise(variant):
    config_dict = _config_dicts(SCALINGS[variant], max_pos=STATIC_MAX_POS)["params"]
    (q, k), (q_ref, k_ref) = _check_static(config_dict, dtype=torch.bfloat16)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


def _dynamic_sequences(gen: torch.Generator):
    """(seq_len, positions in this forward) per sequence: prefill, chunk and decode, below/at/above max_pos."""
    seqs = []
    for seq_len in (100, MAX_POS, MAX_POS + 1, 700, 2500):
        seqs.append((seq_len, torch.arange(seq_len)))  # full prefill
        start = int(torch.randint(0, seq_len, (1,), generator=gen))
        seqs.append((seq_len, torch.arange(start, seq_len)))  # chunked prefill ending at seq_len - 1
        seqs.append((seq_len, torch.tensor([seq_len - 1])))  # decode
    return seqs


@pytest.mark.parametrize("dialect", ["legacy", "params"])
def test_dynamic_matches_fresh_transformers_per_sequence(dialect):
    gen = torch.Generator().manual_seed(1)
    config_dict = _config_dicts(SCALINGS["dynamic"])[dialect]
    ours = get_rope(rope_config_from_hf(config_dict))
    assert ours.needs_seq_lens
    seqs = _dynamic_sequences(gen)
    positions = torch.cat([p for _, p in seqs])
    seq_lens = torch.cat([torch.full_like(p, n) for n, p in seqs])
    q, k = _random_qk(positions.numel(), HEAD_DIM, gen)
    q_ours, k_ours = ours(positions, q, k, seq_lens=seq_lens)
    offset = 0
    for _, pos in seqs:
        rows = slice(offset, offset + pos.numel())
        offset += pos.numel()
        # transformers keeps state across calls, so one fresh module per sequence (batch of one).
        hf_rope = modeling_llama.LlamaRotaryEmbedding(_llama_config(config_dict))
        q_ref, k_ref = _hf_rotate(hf_rope, modeling_llama.apply_rotary_pos_emb, pos, q[rows], k[rows])
        torch.testing.assert_close(q_ours[rows], q_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(k_ours[rows], k_ref, atol=1e-5, rtol=0)


def test_dynamic_requires_seq_lens():
    ours = get_rope(rope_config_from_hf(_config_dicts(SCALINGS["dynamic"])["params"]))
    q, k = _random_qk(2, HEAD_DIM, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="seq_lens"):
        ours(torch.tensor([0, 1]), q, k)


@pytest.mark.parametrize("variant", ["default", "linear", "dynamic"])
def test_partial_rotary_matches_gpt_neox(variant):
    gen = torch.Generator().manual_seed(2)
    head_dim, num_tokens = 64, 64
    seq_len = 1500 if variant == "dynamic" else MAX_POS  # static types cache max_position positions
    hf_config = GPTNeoXConfig(
        hidden_size=head_dim * NUM_HEADS,
        num_attention_heads=NUM_HEADS,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=32,
        max_position_embeddings=MAX_POS,
        rope_parameters={**(SCALINGS[variant] or {"rope_type": "default"}), "rope_theta": THETA},
        partial_rotary_factor=0.25,
    )
    cfg = rope_config_from_hf(hf_config)
    assert (cfg.head_dim, cfg.rotary_dim) == (head_dim, 16)
    positions = torch.arange(seq_len - num_tokens, seq_len)
    q = torch.randn(num_tokens, NUM_HEADS, head_dim, generator=gen)
    k = torch.randn(num_tokens, NUM_HEADS, head_dim, generator=gen)
    seq_lens = torch.full_like(positions, seq_len)
    q_ours, k_ours = get_rope(cfg)(positions, q, k, seq_lens=seq_lens)
    hf_rope = modeling_gpt_neox.GPTNeoXRotaryEmbedding(hf_config)
    q_ref, k_ref = _hf_rotate(hf_rope, modeling_gpt_neox.apply_rotary_pos_emb, positions, q, k)
    torch.testing.assert_close(q_ours, q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(k_ours, k_ref, atol=1e-5, rtol=0)
    assert torch.equal(q_ours[..., 16:], q[..., 16:])


@pytest.mark.parametrize("variant", ["default", "linear", "llama3", "yarn_mscale", "dynamic"])
def test_config_forms_agree(variant, tmp_path):
    """A config object, its saved config.json, and both hand-written dialects give one RopeConfig."""
    dicts = _config_dicts(SCALINGS[variant])
    hf_config = _llama_config(dicts["legacy"])
    hf_config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    forms = [hf_config, saved, dicts["legacy"], dicts["params"], _llama_config(dicts["params"])]
    cfgs = [rope_config_from_hf(form) for form in forms]
    assert all(c == cfgs[0] and c.scaling == cfgs[0].scaling for c in cfgs)
    assert cfgs[0].rope_type == variant.split("_")[0]
    assert (cfgs[0].head_dim, cfgs[0].rotary_dim, cfgs[0].theta) == (HEAD_DIM, HEAD_DIM, THETA)


def test_top_level_original_max_position_has_priority():
    config_dict = _config_dicts(SCALINGS["yarn"])["legacy"]
    config_dict["original_max_position_embeddings"] = 64
    assert rope_config_from_hf(config_dict).scaling["original_max_position_embeddings"] == 64


def test_head_dim_defaults_to_hidden_over_heads():
    config_dict = _config_dicts(None)["legacy"]
    del config_dict["head_dim"]
    config_dict.pop("rope_theta")
    cfg = rope_config_from_hf(config_dict)
    assert (cfg.head_dim, cfg.theta, cfg.scaling) == (HEAD_DIM, 10000.0, None)


@pytest.mark.parametrize("dialect", ["legacy", "params"])
def test_unknown_rope_type_raises(dialect):
    scaling = {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0], "long_factor": [1.0]}
    with pytest.raises(ValueError, match="default, linear, llama3, yarn, dynamic"):
        rope_config_from_hf(_config_dicts(scaling)[dialect])


def test_invalid_rope_config_raises():
    with pytest.raises(ValueError, match="low_freq_factor"):
        RopeConfig(32, 32, 512, 1e4, {"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="rotary_dim"):
        RopeConfig(32, 31, 512, 1e4, None)
    with pytest.raises(ValueError, match="supported"):
        RopeConfig(32, 32, 512, 1e4, {"rope_type": "su"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("partial", [1.0, 0.25])
@pytest.mark.parametrize("variant", ["default", "yarn", "dynamic"])
def test_step_tables_rotate_bitwise_like_forward(variant, partial, dtype):
    """``rotate_with`` over ``tables`` (the decoder's reference path) equals ``forward`` bit for bit, on packed
    q/k views with the strides of a fused q/k/v output too."""
    gen = torch.Generator().manual_seed(4)
    head_dim = 64
    cfg = RopeConfig(head_dim, int(head_dim * partial), MAX_POS, THETA,
                     None if variant == "default" else dict(SCALINGS[variant]))
    ours = get_rope(cfg)
    positions = torch.randint(0, MAX_POS, (37,), generator=gen)
    seq_lens = positions + torch.randint(1, 2 * MAX_POS, (37,), generator=gen)  # dynamic: below and above
    qkv = torch.randn(37, (NUM_HEADS + 2 * NUM_KV_HEADS) * head_dim, generator=gen).to(dtype)
    qk = qkv[:, :(NUM_HEADS + NUM_KV_HEADS) * head_dim].view(37, NUM_HEADS + NUM_KV_HEADS, head_dim)
    tables = ours.tables(positions, dtype, seq_lens)
    rotated = rotate_with(qk, tables)
    q, k = qk[:, :NUM_HEADS].contiguous(), qk[:, NUM_HEADS:].contiguous()
    q_fwd, k_fwd = ours(positions, q, k, seq_lens)
    assert rotated.dtype == dtype
    assert torch.equal(rotated[:, :NUM_HEADS], q_fwd) and torch.equal(rotated[:, NUM_HEADS:], k_fwd)
    assert torch.equal(rotate_with(q, tables), q_fwd) and torch.equal(rotate_with(k, tables), k_fwd)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["default", "yarn", "dynamic"])
def test_cuda_matches_transformers_on_cuda(variant):
    gen = torch.Generator().manual_seed(3)
    config_dict = _config_dicts(SCALINGS[variant])["params"]
    ours = get_rope(rope_config_from_hf(config_dict), device="cuda")
    hf_rope = modeling_llama.LlamaRotaryEmbedding(_llama_config(config_dict)).cuda()
    seq_len = min(1800, getattr(ours, "cache_len", 1800))  # cached tables cover max_position only
    positions = torch.arange(seq_len).cuda()
    q, k = (t.cuda() for t in _random_qk(seq_len, HEAD_DIM, gen))
    q_ours, k_ours = ours(positions, q, k, seq_lens=torch.full_like(positions, seq_len))
    q_ref, k_ref = _hf_rotate(hf_rope, modeling_llama.apply_rotary_pos_emb, positions, q, k)
    # Loose: CUDA pow/cos are not correctly rounded, and an ulp of frequency grows with position.
    torch.testing.assert_close(q_ours, q_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(k_ours, k_ref, atol=1e-4, rtol=0)
