"""RoPE base frequencies and scalings through the whole engine, against transformers.

Every tiny model elsewhere uses rope_theta = 10000, so a model that ignored the configured theta would pass
there; here each case uses another theta (with and without scaling), written in both config.json dialects:
top-level ``rope_theta`` / ``rope_scaling`` (published checkpoints) and transformers 5's ``rope_parameters``.
Greedy tokens and the top-5 logprobs of every step must match transformers' ``generate`` on the same folder.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from hf_reference import hf_greedy_with_logits

from allmos import LLM, SamplingParams

MAX_NEW = 8
TOP_LOGPROBS = 5
LOGPROB_ATOL = 2e-4

CASES = {
    # name: (arch, make_tiny_model overrides)
    "qwen3_theta_1e6": ("qwen3", dict(rope_theta=1e6)),
    "llama_theta_100": ("llama", dict(rope_theta=100.0)),
    "llama3_theta_5e5": ("llama", dict(rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "linear_theta_1000": ("llama", dict(rope_theta=1000.0, max_position_embeddings=128,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "dynamic_theta_2000": ("llama", dict(rope_theta=2000.0, max_position_embeddings=128,
                                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "yarn_theta_50000": ("llama", dict(rope_theta=5e4, max_position_embeddings=256, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
}


def prompts(seed: int = 0, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (7, 150)]  # 150 + 8 passes 128


def legacy_copy(folder: Path, dest: Path) -> Path:
    """The same checkpoint with config.json in the published-checkpoint dialect: top-level ``rope_theta`` and
    ``rope_scaling`` whose type sits under the old ``type`` key."""
    shutil.copytree(folder, dest)
    cfg = json.loads((dest / "config.json").read_text())
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type", "default")
    if rope_type != "default":
        cfg["rope_scaling"] = {"type": rope_type, **params}
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def model_folder(tiny_model_factory, tmp_path: Path, case: str, dialect: str) -> Path:
    arch, overrides = CASES[case]
    folder = tiny_model_factory(arch, **overrides)
    params = json.loads((folder / "config.json").read_text())["rope_parameters"]
    assert params["rope_theta"] == overrides["rope_theta"]  # the fixture wrote the theta asked for
    return legacy_copy(folder, tmp_path / "legacy") if dialect == "legacy" else folder


def assert_matches_transformers(llm: LLM, folder: Path, prompt: list[int], fresh_model: bool) -> None:
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=TOP_LOGPROBS)
    completion = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    ref_tokens, ref_logits = hf_greedy_with_logits(folder, prompt, MAX_NEW, fresh_model=fresh_model)
    assert completion.token_ids == ref_tokens, f"prompt of {len(prompt)} tokens"
    ref = torch.log_softmax(ref_logits, dim=-1)  # [MAX_NEW, vocab]
    for step, entry in enumerate(completion.logprobs):
        assert set(torch.topk(ref[step], TOP_LOGPROBS).indices.tolist()) <= set(entry)
        for token_id, logprob in entry.items():
            assert abs(logprob.logprob - ref[step, token_id].item()) < LOGPROB_ATOL, (len(prompt), step, token_id)


@pytest.mark.parametrize("dialect", ["rope_parameters", "legacy"])
@pytest.mark.parametrize("case", list(CASES))
def test_rope_theta_and_scaling_match_transformers(tiny_model_factory, tmp_path, case, dialect):
    folder = model_folder(tiny_model_factory, tmp_path, case, dialect)
    llm = LLM(str(folder), kvcache_block_size=16, num_kvcache_blocks=32)
    for prompt in prompts():
        # transformers' dynamic NTK rope remembers the longest sequence seen: one fresh model per prompt
        assert_matches_transformers(llm, folder, prompt, fresh_model=case.startswith("dynamic"))


def test_theta_changes_the_output(tiny_model_factory):
    """The cases above are only meaningful if theta matters at these lengths: the same weights (same seed)
    under theta 100 and theta 10000 must give different greedy tokens."""
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = []
    for theta in (100.0, 10000.0):
        llm = LLM(str(tiny_model_factory("llama", rope_theta=theta)), kvcache_block_size=16, num_kvcache_blocks=32)
        outs.append([o.token_ids for o in llm.generate(prompts(), params, use_tqdm=False)])
    assert outs[0] != outs[1]


@pytest.mark.parametrize("dialect", ["rope_parameters", "legacy"])
def test_unsupported_rope_type_is_rejected(tiny_model_factory, tmp_path, dialect):
    folder = tmp_path / "longrope"
    shutil.copytree(tiny_model_factory("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    half = 16 // 2  # head_dim 16
    longrope = {"short_factor": [1.0] * half, "long_factor": [2.0] * half, "original_max_position_embeddings": 512}
    cfg.pop("rope_parameters")
    if dialect == "legacy":
        cfg["rope_theta"] = 10000.0
        cfg["rope_scaling"] = {"type": "longrope", **longrope}
    else:
        cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, **longrope}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape("unsupported rope_type 'longrope'; supported: default, linear, "
                                                   "llama3, yarn, dynamic")):
        LLM(str(folder))
