"""Bad input raises a ValueError a user can act on, and the next call still works."""

from __future__ import annotations

import pytest

from allmos import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return LLM(str(qwen3_dir), kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=128)


GOOD = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def assert_still_works(llm):
    out = llm.generate([[5, 6, 7]], GOOD, use_tqdm=False)
    assert len(out[0].token_ids) == 4
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_integrity()


@pytest.mark.parametrize("prompt,match", [
    ([], "empty"),
    ([1] * 128, "maximum context length is 128"),
    ([1] * 200, "maximum context length is 128"),
    ([5, 512], "outside the vocabulary"),
    ([5, -1], "outside the vocabulary"),
    ([5, 2**70], "outside the vocabulary"),  # past 64 bits: the fast range check refuses it too
    ([5, 6.0], "integer token ids, got float 6.0 at index 1"),
    ([5, True], "integer token ids, got bool True at index 1"),
])
def test_bad_prompts(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([[3, 4], prompt], GOOD, use_tqdm=False)  # a good prompt first: nothing may leak
    assert_still_works(llm)


def test_request_larger_than_kv_cache(llm):
    # 16 blocks of 16 = 256 tokens, but max_model_len 128 caps every request: make the cache smaller instead
    small = LLM(llm.config.model, kvcache_block_size=16, num_kvcache_blocks=2, max_model_len=128)
    with pytest.raises(ValueError, match="KV cache"):
        small.generate([[1] * 20], SamplingParams(max_tokens=30), use_tqdm=False)
    assert_still_works(small)


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2), "min_p"),
    (dict(n=0), "n"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(logprobs=-1), "logprobs"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_stop_token_outside_vocab(llm):
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate([[3, 4]], SamplingParams(stop_token_ids=[10_000]), use_tqdm=False)
    assert_still_works(llm)


def test_text_prompt_without_tokenizer(llm):
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello", GOOD, use_tqdm=False)
    assert_still_works(llm)


def test_unknown_option_and_bad_config(qwen3_dir):
    with pytest.raises(ValueError, match="Unknown engine option"):
        LLM(str(qwen3_dir), max_num_seq=3)
    with pytest.raises(ValueError, match="kvcache_block_size"):
        LLM(str(qwen3_dir), kvcache_block_size=12)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ValueError, match="supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(tmp_path), load_format="dummy")


def test_params_list_length_mismatch(llm):
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate([[3], [4]], [GOOD], use_tqdm=False)
    assert_still_works(llm)
