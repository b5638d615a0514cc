"""The whole model with the decode kernels switched on (small-batch GEMVs with their fused norm and SiLU-mul,
fused q/k-norm + RoPE + K/V store, Triton attention) against the same model on the torch path.

Runs on the CPU through the Triton interpreter (tables fixed by rule instead of timed), and natively on
a GPU (``-m gpu``): a decode step and a small prefill step over a cache holding earlier context, for a
Qwen3 (q/k norm) and a Qwen2 (q/k/v bias) tiny model, in float32. Both logits and the K/V written into
the cache must agree.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from allmos.attention.context import ForwardContext, forward_context
from allmos.attention.metadata import AttentionMetadata
from allmos.attention.torch_backend import TorchAttentionBackend
from allmos.attention.triton_backend import TritonAttentionBackend
from allmos.kernels import fused_qk_rope_store
from allmos.kernels import gemv as gemv_module
from allmos.kernels.gemv_tuning import fixed_table
from allmos.models.loader import build_model, load_weights, safetensors_files
from allmos.models.model_config import load_model_config

BLOCK_SIZE, NUM_BLOCKS = 16, 12
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                        reason="CPU tensors need TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=pytest.mark.gpu)]


def load(folder, device: str) -> torch.nn.Module:
    model = build_model(load_model_config(folder), torch.float32, torch.device(device))
    load_weights(model, safetensors_files(folder))
    return model


def step_inputs(context_lens: list[int], q_lens: list[int], seed: int, device: str):
    """Token ids, positions and metadata of one step: sequence s has context_lens[s] cached tokens and
    q_lens[s] new ones; block tables are shuffled."""
    rng = random.Random(seed)
    ids = list(range(NUM_BLOCKS))
    rng.shuffle(ids)
    seq_lens = [c + q for c, q in zip(context_lens, q_lens)]
    tables = torch.zeros(len(seq_lens), NUM_BLOCKS // len(seq_lens), dtype=torch.int32)
    for s in range(len(seq_lens)):
        tables[s] = torch.tensor(ids[s * tables.shape[1]:(s + 1) * tables.shape[1]])
    positions = [p for c, n in zip(context_lens, seq_lens) for p in range(c, n)]
    seq_of = [s for s, q in enumerate(q_lens) for _ in range(q)]
    slots = torch.tensor([int(tables[s, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE
                          for s, p in zip(seq_of, positions)])
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    md = AttentionMetadata(
        slot_mapping=slots.to(device), query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=tables.to(device),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), is_decode=max(q_lens) == 1,
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    input_ids = torch.tensor([rng.randrange(3, 512) for _ in positions], device=device)
    return input_ids, torch.tensor(positions, device=device), md


def forward(model, backend, caches, input_ids, positions, md) -> torch.Tensor:
    ctx = ForwardContext(backend.prepare(md), caches, backend)
    with forward_context(ctx), torch.inference_mode():
        return model.compute_logits(model(input_ids, positions))  # [num_tokens, vocab]


def random_caches(model, seed: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK_SIZE, attn.num_kv_heads, attn.head_dim)
    return [(torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device))
            for _ in model.model.layers]


def counting(monkeypatch, module, name: str) -> list[int]:
    calls = [0]
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
@pytest.mark.parametrize("fuse_norm", [True, False])
@pytest.mark.parametrize("context_lens,q_lens", [([5, 17, 30], [1, 1, 1]), ([0, 20], [3, 4])])
def test_decode_kernels_match_torch_path(tiny_model_factory, monkeypatch, device, arch, fuse_norm, context_lens,
                                         q_lens):
    model = load(tiny_model_factory(arch), device)
    input_ids, positions, md = step_inputs(context_lens, q_lens, seed=len(q_lens), device=device)
    caches_ref = random_caches(model, seed=1, device=device)
    caches_new = [(k.clone(), v.clone()) for k, v in caches_ref]
    logits_ref = forward(model, TorchAttentionBackend(), caches_ref, input_ids, positions, md)

    backend = TritonAttentionBackend(model.config, 1, max_num_seqs=8, max_model_len=NUM_BLOCKS * BLOCK_SIZE,
                                     device=torch.device(device))
    backend.fold_split_merge = True
    assert md.is_decode is False or backend.prepare(md).num_splits > 1  # decode: split, merged in one launch
    model.use_decode_kernels({role: fixed_table((1, 2, 4, 8), fuse_norm) for role in model.gemv_sites()})
    fused_gemvs = counting(monkeypatch, gemv_module, "rms_norm_gemv")
    plain_gemvs = counting(monkeypatch, gemv_module, "gemv")
    stores = counting(monkeypatch, fused_qk_rope_store, "qk_norm_rope_store")
    logits_new = forward(model, backend, caches_new, input_ids, positions, md)

    num_layers = len(model.model.layers)
    assert stores[0] == num_layers
    # per layer: qkv and gate_up (fused norm, or norm kernel + GEMV), o_proj, down_proj; plus the LM head
    assert (fused_gemvs[0], plain_gemvs[0]) == ((2 * num_layers, 2 * num_layers + 1) if fuse_norm
                                                else (0, 4 * num_layers + 1))
    torch.testing.assert_close(logits_new, logits_ref, atol=1e-4, rtol=1e-4)
    for (k_new, v_new), (k_ref, v_ref) in zip(caches_new, caches_ref):
        torch.testing.assert_close(k_new, k_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_new, v_ref, atol=1e-5, rtol=1e-5)


def test_batches_above_the_table_take_the_torch_path(tiny_model_factory, monkeypatch):
    model = load(tiny_model_factory("qwen3"), "cpu")
    model.use_decode_kernels({role: fixed_table((1, 2)) for role in model.gemv_sites()}, fuse_kv_store=False)
    input_ids, positions, md = step_inputs([4, 9, 2], [1, 1, 1], seed=5, device="cpu")  # 3 rows > 2
    calls = counting(monkeypatch, gemv_module, "gemv")
    fused = counting(monkeypatch, gemv_module, "rms_norm_gemv")
    forward(model, TorchAttentionBackend(), random_caches(model, seed=2, device="cpu"), input_ids, positions, md)
    assert calls[0] == fused[0] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("context_lens,q_lens", [([5, 17, 30], [1, 1, 1]), ([0, 20], [3, 4])])
def test_fp8_cache_decode_kernels_match_torch_path(tiny_model_factory, device, context_lens, q_lens):
    """An fp8 cache (kv_cache_dtype="fp8") with calibrated-looking scales and K centers: the fused store and the
    Triton attention against the torch backend on copies of the same cache. The stored bytes agree except where
    the two paths' float32 K (fused RoPE against the reference rotary) round to neighbouring fp8 values."""
    from allmos.attention.torch_ref import FP8_KV_DTYPE, dequantize_kv
    from allmos.layers.attention import Attention

    model = load(tiny_model_factory("qwen3"), device)
    gen = torch.Generator().manual_seed(3)
    for layer in (m for m in model.modules() if isinstance(m, Attention)):
        layer.k_center.copy_(torch.randn(layer.k_center.shape, generator=gen))
        layer.k_scale.fill_(0.5)
        layer.v_scale.fill_(0.25)
    input_ids, positions, md = step_inputs(context_lens, q_lens, seed=len(q_lens), device=device)
    caches_ref = [(k.to(FP8_KV_DTYPE), v.to(FP8_KV_DTYPE)) for k, v in random_caches(model, seed=1, device=device)]
    caches_new = [(k.clone(), v.clone()) for k, v in caches_ref]
    logits_ref = forward(model, TorchAttentionBackend(), caches_ref, input_ids, positions, md)
    backend = TritonAttentionBackend(model.config, 1, max_num_seqs=8, max_model_len=NUM_BLOCKS * BLOCK_SIZE,
                                     device=torch.device(device))
    backend.fold_split_merge = True
    model.use_decode_kernels({role: fixed_table((1, 2, 4, 8)) for role in model.gemv_sites()})
    logits_new = forward(model, backend, caches_new, input_ids, positions, md)

    torch.testing.assert_close(logits_new, logits_ref, atol=1e-4, rtol=1e-4)
    for new, ref in zip((c for pair in caches_new for c in pair), (c for pair in caches_ref for c in pair)):
        differ = new.view(torch.uint8) != ref.view(torch.uint8)
        assert differ.float().mean() < 0.01
        step = dequantize_kv(ref, None).abs() * 2**-3 + 2**-9  # one e4m3 step, at most
        assert ((dequantize_kv(new, None) - dequantize_kv(ref, None)).abs() <= step).all()


def test_row_kernel_config_reads_the_whole_row_up_to_4096():
    from allmos.kernels.gemv_tuning import row_kernel_config

    sizes = (1024, 2048, 3072, 100, 9000)
    assert [(c.block_m, c.block_n, c.block_k, c.num_warps) for c in map(row_kernel_config, sizes)] \
        == [(1, 4, 1024, 4), (1, 4, 2048, 8), (1, 4, 4096, 8), (1, 4, 128, 4), (1, 4, 4096, 8)]


@pytest.mark.parametrize("device", DEVICES)
def test_default_row_kernel_gemvs_match_torch_path(tiny_model_factory, monkeypatch, device):
    """The default CUDA tables (``row_kernel_tables``): decode steps of 1 to 4 rows run every decoder projection
    through the GEMV (the LM head stays on torch), 5 rows run none; all match the torch path (bfloat16)."""
    from allmos.kernels.gemv_tuning import row_kernel_tables

    folder = tiny_model_factory("qwen3")
    model = build_model(load_model_config(folder), torch.bfloat16, torch.device(device))
    load_weights(model, safetensors_files(folder))
    tables = row_kernel_tables(model.gemv_sites())
    assert set(tables) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    per_step = 4 * len(model.model.layers)
    for context_lens, q_lens, expected_calls in (([9], [1], per_step), ([5, 17], [1, 1], per_step),
                                                 (list(range(3, 7)), [1] * 4, per_step),
                                                 (list(range(3, 8)), [1] * 5, 0)):
        input_ids, positions, md = step_inputs(context_lens, q_lens, seed=3, device=device)
        caches = random_caches(model, seed=1, device=device)
        caches = [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in caches]
        model.use_decode_kernels({role: None for role in model.gemv_sites()}, fuse_kv_store=False)
        ref = forward(model, TorchAttentionBackend(), [(k.clone(), v.clone()) for k, v in caches], input_ids,
                      positions, md)
        model.use_decode_kernels(tables, fuse_kv_store=False)
        calls = counting(monkeypatch, gemv_module, "gemv")
        new = forward(model, TorchAttentionBackend(), caches, input_ids, positions, md)
        monkeypatch.undo()
        assert calls[0] == expected_calls
        # bf16: another float32 summation order flips a rounding now and then, and two layers carry it on
        # (logits of order 1; a wrong kernel is off by that much)
        torch.testing.assert_close(new.float(), ref.float(), atol=5e-2, rtol=3e-2)
