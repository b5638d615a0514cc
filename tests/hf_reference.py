"""Greedy reference tokens from transformers' own ``generate`` (the independent oracle)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=8)
def _hf_model(folder: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt (EOS ignored: exactly ``max_new_tokens`` tokens)."""
    model = _hf_model(str(folder))
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
            outs.append(ids[0, len(p):].tolist())
    return outs


def hf_logits(folder: Path, token_ids: list[int]) -> torch.Tensor:
    """Float32 logits of every position of one sequence: [len, vocab]."""
    model = _hf_model(str(folder))
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def hf_greedy_with_logits(folder: Path, prompt: list[int], max_new_tokens: int,
                          fresh_model: bool = False) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation of one prompt and the raw logits of each generated step: [max_new_tokens, vocab].

    ``fresh_model`` loads a new model instead of the shared one: transformers' dynamic-NTK rope keeps the
    longest length it has seen, so only a fresh model gives a prompt's own result."""
    import transformers

    model = (transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
             if fresh_model else _hf_model(str(folder)))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float()
