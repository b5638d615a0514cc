"""ModelConfig against transformers: every derived fact is checked against the Hugging Face config's own
values or against what transformers' model classes build from the same config."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from allmos.engine.kv_cache import KVCacheSpec, cpu_num_blocks, gpu_num_blocks
from allmos.layers.linear import QKVParallelLinear
from allmos.layers.rotary import get_rope, rope_config_from_hf
from allmos.layers.tp import TPGroup
from allmos.models.loader import build_model
from allmos.models.model_config import ModelConfig, load_model_config
from allmos.models.registry import model_class_for
from allmos.models.resolve import ModelSource

ALLMOS = Path(__file__).resolve().parent.parent / "allmos"

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
            architectures=["LlamaForCausalLM"])

# (config class, model class, family-specific settings)
FAMILIES = {
    "qwen3": (Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(head_dim=24, attention_bias=True, eos_token_id=[5, 7], dtype="bfloat16")),
    "qwen2": (Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True, eos_token_id=3)),
    "llama": (LlamaConfig, transformers.LlamaForCausalLM,
              dict(mlp_bias=True, num_key_value_heads=1, dtype="float16",
                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})),
    "mistral": (MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None, num_key_value_heads=4)),
}


def _hf_pair(family: str):
    config_cls, model_cls, extra = FAMILIES[family]
    hf_config = config_cls(**{**TINY, **copy.deepcopy(extra), "architectures": [model_cls.__name__]})
    torch.manual_seed(0)
    return hf_config, model_cls(hf_config)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_facts_match_transformers_model(family):
    hf_config, hf_model = _hf_pair(family)
    mc = ModelConfig.from_hf(hf_config)
    attn, mlp = hf_model.model.layers[0].self_attn, hf_model.model.layers[0].mlp
    assert mc.head_dim == attn.head_dim
    assert mc.num_attention_heads * mc.head_dim == attn.q_proj.out_features
    assert mc.num_key_value_heads * mc.head_dim == attn.k_proj.out_features
    assert mc.hidden_size == hf_model.model.embed_tokens.embedding_dim == attn.o_proj.out_features
    assert mc.vocab_size == hf_model.model.embed_tokens.num_embeddings == hf_model.lm_head.out_features
    assert mc.intermediate_size == mlp.gate_proj.out_features
    assert mc.num_hidden_layers == len(hf_model.model.layers)
    assert mc.rms_norm_eps == hf_model.model.norm.variance_epsilon
    assert mc.hidden_act == hf_config.hidden_act == "silu"
    assert mc.max_position_embeddings == hf_config.max_position_embeddings
    tied = hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    assert mc.tie_word_embeddings == tied
    eos = hf_config.eos_token_id
    assert mc.eos_token_ids == tuple(eos if isinstance(eos, list) else [eos])
    assert mc.checkpoint_dtype == {"qwen3": torch.bfloat16, "llama": torch.float16}.get(family)
    assert mc.architectures == (type(hf_model).__name__,)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_spec_matches_transformers_modules(family):
    """Biases and q/k norms of our family spec are the ones transformers' model has."""
    hf_config, hf_model = _hf_pair(family)
    mc = ModelConfig.from_hf(hf_config)
    spec = model_class_for(mc).make_spec(mc)
    attn, mlp = hf_model.model.layers[0].self_attn, hf_model.model.layers[0].mlp
    assert spec.qkv_bias == (attn.q_proj.bias is not None) == (attn.k_proj.bias is not None)
    assert spec.o_bias == (attn.o_proj.bias is not None)
    assert spec.mlp_bias == (mlp.gate_proj.bias is not None)
    assert spec.qk_norm == hasattr(attn, "q_norm")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_our_model_has_transformers_parameter_shapes(family):
    """The model built from the ModelConfig holds every checkpoint tensor at transformers' shape."""
    hf_config, hf_model = _hf_pair(family)
    ours = build_model(ModelConfig.from_hf(hf_config), torch.float32, torch.device("meta"))
    assert ours.config == ModelConfig.from_hf(hf_config)
    shapes = {name: tuple(p.shape) for name, p in ours.named_parameters()}
    for name in hf_model.state_dict():
        if name == "lm_head.weight" and ours.tie_word_embeddings:
            continue
        for original, (packed, _) in ours.packed_modules_mapping.items():
            name = name.replace(f".{original}.", f".{packed}.")
        assert name in shapes, name
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf_model.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rope_matches_transformers_rotary(family):
    hf_config, hf_model = _hf_pair(family)
    mc = ModelConfig.from_hf(hf_config)
    assert mc.rope == rope_config_from_hf(hf_config)
    positions = torch.arange(0, 200, 7)
    x = torch.zeros(1, len(positions), mc.head_dim)
    hf_cos, hf_sin = hf_model.model.rotary_emb(x, positions[None])  # [1, T, head_dim]
    cos, sin = get_rope(mc.rope).cos_sin(positions, None)  # [T, head_dim // 2]
    half = mc.head_dim // 2
    torch.testing.assert_close(cos, hf_cos[0, :, :half])
    torch.testing.assert_close(sin, hf_sin[0, :, :half])


# ---------------------------------------------------------------------------------------------- rope dialects
SCALINGS = [  # (rope dict, context limit for max_position_embeddings=256)
    (None, 256),
    ({"rope_type": "linear", "factor": 4.0}, 1024),
    ({"rope_type": "dynamic", "factor": 2.0}, 512),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, 512),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 256),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, 256),
]


def _dialects(scaling: dict | None, theta: float = 123456.0) -> dict[str, dict]:
    """config.json keys in both dialects: top-level rope_theta / rope_scaling ('type' key, as published
    checkpoints write it) and transformers 5's rope_parameters."""
    legacy_scaling = None if scaling is None else {
        **{k: v for k, v in scaling.items() if k != "rope_type"}, "type": scaling["rope_type"]}
    return {
        "legacy": {"rope_theta": theta, "rope_scaling": legacy_scaling},
        "params": {"rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta}},
    }


@pytest.mark.parametrize(("scaling", "limit"), SCALINGS)
def test_rope_dialects_and_context_limit(tmp_path, scaling, limit):
    configs = []
    for name, rope_keys in _dialects(scaling).items():
        raw = {**TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama", **rope_keys}
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(raw))  # as a published checkpoint ships it
        configs.append(load_model_config(folder))
        configs.append(ModelConfig.from_hf(LlamaConfig(**{**TINY, **copy.deepcopy(rope_keys)})))
    for mc in configs:
        assert mc.rope.theta == 123456.0
        assert mc.rope.rope_type == (scaling or {"rope_type": "default"})["rope_type"]
        assert mc.rope == configs[0].rope
        assert mc.context_limit == limit
        assert mc.effective_max_model_len(100) == 100
        assert mc.effective_max_model_len(10**6) == limit
        assert mc.effective_max_model_len(limit) == limit


def test_yarn_without_factor_keeps_max_position():
    """DeepSeek-style yarn states no factor: it is max_position / original, so the limit stays max_position."""
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 64}
    mc = ModelConfig.from_hf(_llama(rope_parameters=rope))
    assert mc.context_limit == TINY["max_position_embeddings"] == get_rope(mc.rope).cache_len


def test_checkpoint_dtype_survives_save_and_load(tmp_path):
    hf_config, _ = _hf_pair("qwen3")
    hf_config.save_pretrained(tmp_path)
    assert load_model_config(tmp_path).checkpoint_dtype == torch.bfloat16
    assert load_model_config(tmp_path) == ModelConfig.from_hf(hf_config)


# ---------------------------------------------------------------------------------------------- tensor parallel
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("tp_size", [1, 2, 3, 4, 8, 16])
def test_heads_per_rank_match_qkv_layer(num_kv_heads, tp_size):
    """Per-rank head counts are what QKVParallelLinear holds on every rank, and both reject the same sizes."""
    mc = ModelConfig.from_hf(LlamaConfig(**{**TINY, "num_attention_heads": 8, "num_key_value_heads": num_kv_heads,
                                            "head_dim": 8}))
    layers = []
    try:
        with torch.device("meta"):
            layers = [QKVParallelLinear(mc.hidden_size, mc.head_dim, mc.num_attention_heads, mc.num_key_value_heads,
                                        tp=TPGroup(rank, tp_size)) for rank in range(tp_size)]
    except ValueError:
        assert _rejects(mc.num_heads_per_rank, tp_size) or _rejects(mc.num_kv_heads_per_rank, tp_size)
        return
    for layer in layers:
        assert mc.num_heads_per_rank(tp_size) == layer.num_heads
        assert mc.num_kv_heads_per_rank(tp_size) == layer.num_kv_heads
    if tp_size > num_kv_heads:  # each KV head replicated on tp_size // num_kv_heads ranks
        assert mc.num_kv_heads_per_rank(tp_size) == 1
        assert sorted({layer.kv_head_start() for layer in layers}) == list(range(num_kv_heads))


def _rejects(helper, tp_size: int) -> bool:
    try:
        helper(tp_size)
    except ValueError as exc:
        assert f"tensor_parallel_size={tp_size}" in str(exc)
        return True
    return False


def test_verify_tensor_parallel_size_names_the_field():
    mc = ModelConfig.from_hf(LlamaConfig(**{**TINY, "intermediate_size": 90}))
    mc.verify_tensor_parallel_size(2)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 .*num_attention_heads=4"):
        mc.verify_tensor_parallel_size(3)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 .*intermediate_size=90"):
        mc.verify_tensor_parallel_size(4)
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        six_heads = ModelConfig.from_hf(LlamaConfig(**{**TINY, "hidden_size": 48, "num_attention_heads": 6}))
        six_heads.num_kv_heads_per_rank(3)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
            mc.num_heads_per_rank(bad)


# ---------------------------------------------------------------------------------------------- KV cache sizing
@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_kv_cache_spec_matches_model_and_allocation(tp_size):
    mc = ModelConfig.from_hf(Qwen3Config(**{**TINY, "head_dim": 24, "architectures": ["Qwen3ForCausalLM"]}))
    spec = KVCacheSpec.for_model(mc, block_size=16, dtype=torch.bfloat16, tp_size=tp_size)
    model = build_model(mc, torch.bfloat16, torch.device("meta"), TPGroup(0, tp_size))
    attn = model.model.layers[0].self_attn
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (len(model.model.layers), attn.num_kv_heads,
                                                                   attn.head_dim)
    caches = spec.allocate(3, torch.device("cpu"))
    assert len(caches) == mc.num_hidden_layers
    assert all(k.shape == v.shape == (3, 16, attn.num_kv_heads, 24) for k, v in caches)
    assert sum(k.nbytes + v.nbytes for k, v in caches) == 3 * spec.bytes_per_block
    assert spec.bytes_per_block == 16 * spec.bytes_per_token
    assert spec.blocks_for(16) == 1 and spec.blocks_for(17) == 2


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_triton_backend_sized_from_model_config(monkeypatch, tp_size):
    """The runner's backend gets this rank's heads from the ModelConfig; they are the model layers' own."""
    from allmos.config import EngineConfig
    from allmos.engine.model_runner import make_backend

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=8))
    mc = ModelConfig.from_hf(Qwen3Config(**{**TINY, "head_dim": 24, "architectures": ["Qwen3ForCausalLM"]}))
    backend = make_backend("triton", mc, tp_size, EngineConfig(max_num_seqs=5, max_model_len=64), torch.device("cpu"))
    attn = build_model(mc, torch.float32, torch.device("meta"), TPGroup(0, tp_size)).model.layers[0].self_attn
    assert backend.num_kv_heads == attn.num_kv_heads
    max_seqs, num_heads, _, head_dim = backend.workspace.partial_out.shape
    assert (max_seqs, num_heads, head_dim) == (5, attn.num_heads, attn.head_dim)


def test_kv_block_counts():
    mc = ModelConfig.from_hf(LlamaConfig(**TINY))
    spec = KVCacheSpec.for_model(mc, block_size=16, dtype=torch.float32)
    per_seq = spec.blocks_for(100)  # 7 blocks of 16 tokens
    assert cpu_num_blocks(spec, 100, 4, budget_bytes=1) == per_seq  # at least one sequence
    assert cpu_num_blocks(spec, 100, 4, budget_bytes=10 * spec.bytes_per_block) == 10
    assert cpu_num_blocks(spec, 100, 4, budget_bytes=1 << 40) == 4 * per_seq  # no more than max_num_seqs need
    gib = 1 << 30
    assert gpu_num_blocks(spec, total_bytes=10 * gib, free_bytes=6 * gib, activation_peak_bytes=gib,
                          gpu_memory_utilization=0.9) == int(4 * gib // spec.bytes_per_block)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        gpu_num_blocks(spec, total_bytes=10 * gib, free_bytes=gib, activation_peak_bytes=gib,
                       gpu_memory_utilization=0.9)


def test_engine_sizes_kv_cache_from_model_config(qwen3_dir):
    from allmos import LLM

    llm = LLM(str(qwen3_dir), max_model_len=300, max_num_seqs=3, kvcache_block_size=16)
    runner = llm.engine.runner
    assert runner.model_config == llm.engine.source.model_config == runner.model.config
    expected = KVCacheSpec.for_model(runner.model_config, 16, llm.engine.info.dtype)
    assert runner.kv_spec == expected
    assert runner.num_kv_blocks == cpu_num_blocks(expected, 300, 3) == 3 * 19
    assert runner.kv_caches[0][0].shape == (runner.num_kv_blocks, 16, expected.num_kv_heads, expected.head_dim)


# ---------------------------------------------------------------------------------------------- bad configs
def _llama(**overrides) -> SimpleNamespace:
    """A LlamaConfig's attributes with ``overrides`` (transformers' strict config classes refuse most bad
    values themselves; configs saved by other tools or older versions need not); None deletes a key."""
    values = {**LlamaConfig(**TINY).to_dict(), **overrides}
    return SimpleNamespace(**{k: v for k, v in values.items() if v is not None})


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(vocab_size=None), "no vocab_size"),
    (dict(hidden_size=None), "no hidden_size"),
    (dict(intermediate_size=None), "no intermediate_size"),
    (dict(num_hidden_layers=None), "no num_hidden_layers"),
    (dict(num_attention_heads=None), "no num_attention_heads"),
    (dict(max_position_embeddings=None), "no max_position_embeddings"),
    (dict(rms_norm_eps=None), "no rms_norm_eps"),
    (dict(num_attention_heads=0), "num_attention_heads must be a positive integer, got 0"),
    (dict(intermediate_size=-5), "intermediate_size must be a positive integer"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers must be a positive integer"),
    (dict(vocab_size=True), "vocab_size must be a positive integer"),
    (dict(head_dim=0), "head_dim must be a positive integer"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3 must divide num_attention_heads=4"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be a positive number"),
    (dict(eos_token_id=-1), "eos_token_id"),
    (dict(eos_token_id=[2, "x"]), "eos_token_id"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "missing factor"),
    (dict(architectures=["GPT2LMHeadModel"]), "Unsupported model architecture .*supported: .*LlamaForCausalLM"),
])
def test_bad_config_raises_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(_llama(**{"architectures": ["LlamaForCausalLM"], **overrides}))


def test_heads_must_divide_hidden_without_head_dim():
    cfg = Qwen2Config(**{**TINY, "hidden_size": 66, "architectures": ["Qwen2ForCausalLM"]})
    assert getattr(cfg, "head_dim", None) is None
    with pytest.raises(ValueError, match="no head_dim and hidden_size=66 is not divisible by num_attention_heads=4"):
        ModelConfig.from_hf(cfg)
    # an explicit head_dim need not divide anything (Qwen3 uses head_dim * heads != hidden)
    qwen3 = ModelConfig.from_hf(Qwen3Config(**{**TINY, "hidden_size": 66, "head_dim": 24}))
    assert (qwen3.head_dim, qwen3.hidden_size) == (24, 66)


def test_defaults_follow_transformers():
    """Keys a config.json may leave out get transformers' defaults."""
    mc = ModelConfig.from_hf(_llama(num_key_value_heads=None, head_dim=None, hidden_act=None, eos_token_id=None,
                                    tie_word_embeddings=None, attention_bias=None, mlp_bias=None, dtype=None))
    assert mc.num_key_value_heads == mc.num_attention_heads == 4
    assert mc.head_dim == 64 // 4
    assert mc.hidden_act == "silu" and mc.eos_token_ids == () and mc.checkpoint_dtype is None
    assert not (mc.tie_word_embeddings or mc.attention_bias or mc.mlp_bias)
    assert ModelConfig.from_hf(_llama(dtype=None, torch_dtype="bfloat16")).checkpoint_dtype == torch.bfloat16


def test_unsupported_rope_type_and_frozen():
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.from_hf(LlamaConfig(**TINY, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                                  "short_factor": [1.0], "long_factor": [1.0]}))
    mc = ModelConfig.from_hf(LlamaConfig(**TINY))
    with pytest.raises(dataclasses.FrozenInstanceError):
        mc.head_dim = 8  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- one reader
ALLOWED_READERS = {
    "models/model_config.py",  # ModelConfig.from_hf
    "layers/rotary.py",  # rope_config_from_hf, called once by from_hf
    "models/gguf_loader.py",  # writes config.json files
}
HF_KEYS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
           "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "attention_bias", "mlp_bias",
           "tie_word_embeddings", "sliding_window", "use_sliding_window", "eos_token_id", "torch_dtype",
           "architectures", "model_type"}


def _raw_config_reads(tree: ast.AST) -> list[str]:
    """What in a module looks like reading a Hugging Face config: the name hf_config, transformers'
    config classes, getattr(x, "<config key>") and x["<config key>"]."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "hf_config":
            found.append("hf_config")
        elif isinstance(node, ast.arg) and node.arg == "hf_config":
            found.append("argument hf_config")
        elif isinstance(node, ast.Attribute) and node.attr == "hf_config":
            found.append(".hf_config")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
            found += [a.name for a in node.names if a.name.endswith("Config")]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in HF_KEYS:
            found.append(f"getattr(..., {node.args[1].value!r})")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in HF_KEYS:
            found.append(f"[{node.slice.value!r}]")
    return found


def test_only_model_config_reads_the_hf_config():
    offenders = {}
    for path in sorted(ALLMOS.rglob("*.py")):
        rel = path.relative_to(ALLMOS).as_posix()
        if rel not in ALLOWED_READERS:
            reads = _raw_config_reads(ast.parse(path.read_text(), str(path)))
            if reads:
                offenders[rel] = reads
    assert offenders == {}
    assert "hf_config" not in {f.name for f in dataclasses.fields(ModelSource)}
    # the scan does see such reads where they are allowed
    assert _raw_config_reads(ast.parse((ALLMOS / "models/model_config.py").read_text()))
