"""Diagnostic: do a captured decode graph and the same forward run eagerly give identical logits?"""
import random

import torch

from allmos import LLM, SamplingParams
from allmos.benchmark import DEFAULT_BENCH_MODEL

llm = LLM(str(DEFAULT_BENCH_MODEL), load_format="dummy", max_model_len=2048, num_kvcache_blocks=256,
          max_num_seqs=64, kvcache_block_size=16)
rng = random.Random(0)
engine = llm.engine
for _ in range(21):
    engine.add_request(None, [rng.randrange(10000) for _ in range(rng.randint(5, 300))],
                       SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
for _ in range(6):
    engine.step()
g = engine.runner.graphs
torch.cuda.synchronize()
bs = 32
with torch.inference_mode():
    g.graphs[bs].replay()
    replayed = g.outputs[bs].clone()
    eager = g._forward(bs).clone()
    eager2 = g._forward(bs).clone()
    torch.cuda.synchronize()
    # per-layer: run the eager forward and compare hidden states of a graph-free second eager run
print("graph vs eager max |diff|:", (replayed.float() - eager.float()).abs().max().item(),
      "eager vs eager:", (eager.float() - eager2.float()).abs().max().item())
x = torch.randn(32, 1024, device="cuda", dtype=torch.bfloat16)
w = torch.randn(3072, 1024, device="cuda", dtype=torch.bfloat16)
out_eager = torch.nn.functional.linear(x, w)
graph = torch.cuda.CUDAGraph()
out_buf = torch.empty_like(out_eager)
torch.nn.functional.linear(x, w)
with torch.cuda.graph(graph):
    out_buf.copy_(torch.nn.functional.linear(x, w))
graph.replay()
torch.cuda.synchronize()
print("plain GEMM graph vs eager max |diff|:", (out_buf.float() - out_eager.float()).abs().max().item())
