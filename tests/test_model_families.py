"""Model families and RoPE variants through the whole engine, against transformers (float32 greedy)."""

from __future__ import annotations

import json
import random

import pytest
from hf_reference import hf_greedy

from allmos import LLM, SamplingParams

MAX_NEW = 10
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": LLAMA3,
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


def prompts(seed=0, vocab=512):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 9, 40, 70, 150)]


def check(folder, **engine_kwargs):
    ps = prompts()
    llm = LLM(str(folder), kvcache_block_size=16, **engine_kwargs)
    ours = llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in ours] == hf_greedy(folder, ps, MAX_NEW)


@pytest.mark.parametrize("arch,kwargs", [
    ("llama", dict(rope_scaling=LLAMA3)),
    ("qwen2", dict(tie=True)),
    ("mistral", dict()),
    ("llama", dict(num_kv_heads=4, attention_bias=True)),
])
def test_family_greedy_parity(tiny_model_factory, arch, kwargs):
    kwargs = dict(kwargs)
    if "rope_scaling" in kwargs:
        kwargs["rope_scaling"] = dict(kwargs["rope_scaling"], rope_theta=10000.0)
    check(tiny_model_factory(arch, **kwargs))


@pytest.mark.parametrize("variant", list(ROPES))
def test_rope_variant_greedy_parity(tiny_model_factory, variant):
    # max_position 128 < prompt + output for the longest prompt, so dynamic NTK scaling is exercised
    scaling = dict(ROPES[variant], rope_theta=10000.0)
    # a small max_position (or original_max_position_embeddings) so the scaled range is exercised;
    # llama3 configs keep the full context in max_position_embeddings
    folder = tiny_model_factory("llama", rope_scaling=scaling,
                                max_position_embeddings=2048 if variant == "llama3" else 128)
    if variant == "dynamic":
        # transformers' dynamic rope depends on the longest sequence seen by the module: compare one at a time
        ps = prompts()
        llm = LLM(str(folder), kvcache_block_size=16, max_model_len=4096)
        for p in ps:
            ours = llm.generate([p], SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True),
                                use_tqdm=False)[0].token_ids
            assert ours == hf_greedy(folder, [p], MAX_NEW)[0]
        return
    check(folder)


def test_rope_parameters_dialect(tiny_model_factory, tmp_path):
    """A transformers-5 style config.json (rope_parameters) and the older top-level keys load the same."""
    import shutil

    folder = tiny_model_factory("llama", rope_scaling=dict(LLAMA3, rope_theta=10000.0))
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    cfg = json.loads((old / "config.json").read_text())
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.pop("rope_theta", 10000.0)
    cfg["rope_scaling"] = params
    (old / "config.json").write_text(json.dumps(cfg))
    p = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    a = LLM(str(folder)).generate(prompts(), p, use_tqdm=False)
    b = LLM(str(old)).generate(prompts(), p, use_tqdm=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_mistral_sliding_window_rejected(tiny_model_factory, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_factory("mistral"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sliding_window"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sliding_window"):
        LLM(str(folder))


def test_generation_config_defaults_apply(qwen3_dir, tmp_path):
    import shutil

    folder = tmp_path / "g"
    shutil.copytree(qwen3_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 7], "do_sample": False, "max_new_tokens": 5}))
    llm = LLM(str(folder))
    assert llm.engine.info.eos_token_ids >= {2, 7}
    out = llm.generate([[5, 6, 7]], use_tqdm=False)[0]  # no SamplingParams: generation_config applies
    greedy = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert out.token_ids == greedy.token_ids and len(out.token_ids) <= 5


def test_hub_id_offline_error_names_the_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="someone/not-a-real-model.*download"):
        LLM("someone/not-a-real-model")


def test_local_folder_wins_over_hub_id(qwen3_dir, tmp_path, monkeypatch):
    import shutil

    (tmp_path / "Qwen").mkdir()
    shutil.copytree(qwen3_dir, tmp_path / "Qwen" / "Qwen3-0.6B")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llm = LLM("Qwen/Qwen3-0.6B")
    assert llm.engine.source.folder.resolve() == (tmp_path / "Qwen" / "Qwen3-0.6B").resolve()
