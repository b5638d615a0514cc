"""CPU decode throughput of allmos vs transformers' generate (same machine, dtype, threads).

A random Qwen3 of about 100M parameters; decode time = time(prompt + N tokens) - time(prompt + 1 token),
so prefill cancels out. Usage: python benchmarks/bench_cpu.py [--batches 1 32] [--new 64] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers

from allmos import LLM, SamplingParams


def make_model(folder: Path) -> int:
    cfg = transformers.Qwen3Config(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                                   max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).float()
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def time_hf(model, prompts: torch.Tensor, new: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def time_allmos(llm: LLM, prompts: list[list[int]], new: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="for both engines")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        num_params = make_model(folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, a.dtype)).eval()
        llm = LLM(str(folder), dtype=a.dtype, kvcache_block_size=16)
        print(f"random Qwen3, {num_params / 1e6:.0f}M parameters, {a.dtype}, {a.threads} threads, "
              f"prompt {a.prompt_len} tokens, {a.new} new tokens")
        print("| batch | allmos decode tok/s | transformers decode tok/s | ratio |")
        print("| --- | --- | --- | --- |")
        for batch in a.batches:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(3, 32000, (batch, a.prompt_len), generator=g)
            lists = prompts.tolist()
            time_allmos(llm, lists, 2)  # warm-up
            ours = (time_allmos(llm, lists, a.new) - time_allmos(llm, lists, 1)) / (batch * (a.new - 1))
            theirs = (time_hf(hf, prompts, a.new) - time_hf(hf, prompts, 1)) / (batch * (a.new - 1))
            print(f"| {batch} | {1 / ours:.1f} | {1 / theirs:.1f} | {theirs / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
