"""The fp8 KV cache (``kv_cache_dtype="fp8"``): the option, the sizing, the torch reference's rounding, and
every Triton kernel that writes or reads the cache against the torch path on the same fp8 cache.

CPU cases run the kernels through the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest.py
without CUDA); ``@pytest.mark.gpu`` cases run them natively on realistic shapes. Caches start as NaN (fp8's
NaN bit pattern) so a kernel that writes a slot it must not touch, or reads one it must not read, fails.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
from test_kernels import make_block_tables, slots_of

from allmos.attention.torch_ref import (
    FP8_E4M3_MAX,
    FP8_KV_DTYPE,
    KVScales,
    dequantize_kv,
    paged_attention_ref,
    quantize_kv,
    store_kv_cache_ref,
)
from allmos.config import EngineConfig
from allmos.engine.kv_cache import KVCacheSpec, cpu_num_blocks, gpu_num_blocks

F8 = FP8_KV_DTYPE
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                       reason="CPU tensors run Triton kernels only under TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_scales(k: float, v: float, num_kv_heads: int = 0, head_dim: int = 0, seed: int = 0,
                device: str = DEVICE) -> KVScales:
    """Scales k and v; with head counts, also a random K center (as calibration would set one)."""
    center = None
    if num_kv_heads:
        center = torch.randn(num_kv_heads, head_dim, generator=torch.Generator().manual_seed(seed)) * 3
    one = {"dtype": torch.float32, "device": device}
    return KVScales(torch.tensor([k], **one), torch.tensor([v], **one),
                    None if center is None else center.to(device))


def nan_cache(shape, device: str = DEVICE) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=device).to(F8)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def wide_values(shape, gen: torch.Generator) -> torch.Tensor:
    """Normal values spread over 1e-4 .. 1e3 in magnitude: subnormal fp8, normal, and saturating ones."""
    return torch.randn(shape, generator=gen) * torch.exp(torch.empty(shape).uniform_(-9, 7, generator=gen))


# ---------------------------------------------------------------- the option and the sizing

@pytest.mark.parametrize("name", ["fp8", "fp8_e4m3"])
def test_kv_cache_dtype_fp8_resolves_to_e4m3(name):
    cfg = EngineConfig.from_kwargs(None, kv_cache_dtype=name, device="cpu")
    assert cfg.resolved_kv_cache_dtype(torch.bfloat16) == F8
    assert EngineConfig.from_kwargs(None, device="cpu").resolved_kv_cache_dtype(torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("bad", ["fp8_e5m2", "int8", "bfloat16", "FP8", "", None, 8, torch.float8_e4m3fn])
def test_bad_kv_cache_dtype_is_a_value_error_naming_the_field(bad):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig.from_kwargs(None, kv_cache_dtype=bad, device="cpu")


@pytest.mark.parametrize("capability,backend,ok", [((8, 0), "auto", False), ((8, 0), "torch", True),
                                                    ((8, 9), "auto", True), ((9, 0), "triton", True)])
def test_fp8_with_triton_kernels_needs_compute_capability_8_9(monkeypatch, capability, backend, ok):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if ok:
        EngineConfig.from_kwargs(None, kv_cache_dtype="fp8", device="cuda", attention_backend=backend)
    else:
        with pytest.raises(ValueError, match="kv_cache_dtype='fp8'.*8.9"):
            EngineConfig.from_kwargs(None, kv_cache_dtype="fp8", device="cuda", attention_backend=backend)
    EngineConfig.from_kwargs(None, device="cuda", attention_backend=backend)  # the 16-bit cache runs anywhere


def test_fp8_cache_holds_twice_the_tokens_of_bf16_in_the_same_memory():
    bf16 = KVCacheSpec(num_layers=28, num_kv_heads=8, head_dim=128, block_size=256, dtype=torch.bfloat16)
    fp8 = KVCacheSpec(num_layers=28, num_kv_heads=8, head_dim=128, block_size=256, dtype=F8)
    assert fp8.bytes_per_token == 2 * 28 * 8 * 128  # K and V, one byte an element
    assert bf16.bytes_per_block == 2 * fp8.bytes_per_block
    gib = 1 << 30
    gpu = [gpu_num_blocks(s, 80 * gib, 70 * gib, 2 * gib, 0.9) for s in (bf16, fp8)]
    cpu = [cpu_num_blocks(s, max_model_len=4096, max_num_seqs=512, budget_bytes=gib) for s in (bf16, fp8)]
    for blocks in (gpu, cpu):  # the same bytes, floored to whole blocks
        assert blocks[1] in (2 * blocks[0], 2 * blocks[0] + 1)
    cache = fp8.allocate(3, torch.device("cpu"))
    assert cache[0][0].dtype == F8 and cache[0][0].shape == (3, 256, 8, 128)


# ---------------------------------------------------------------- the reference rounding (torch_ref)

def test_quantize_rounds_to_nearest_even_and_saturates():
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # +0 .. 448, every finite positive e4m3 value, ascending
    grid = codes.view(F8).float()
    mid = (grid[1:] + grid[:-1]) / 2  # exact ties in float32
    q = quantize_kv(mid, F8, None)
    lower_even = (codes[:-1] % 2 == 0)  # ties go to the even code
    assert torch.equal(bits(q), torch.where(lower_even, codes[:-1], codes[1:]))
    assert torch.equal(bits(quantize_kv(-mid, F8, None)), bits(quantize_kv(mid, F8, None)) | 0x80)
    big = torch.tensor([448.0, 463.9, 464.0, 1e6, float("inf")])
    assert torch.equal(quantize_kv(big, F8, None).float(), torch.full((5,), FP8_E4M3_MAX))
    assert torch.equal(quantize_kv(-big, F8, None).float(), torch.full((5,), -FP8_E4M3_MAX))


@pytest.mark.parametrize("scale", [1.0, 0.0123, 7.5])
def test_store_then_read_round_trip_within_half_an_fp8_step(scale):
    """``store_kv_cache_ref`` then ``dequantize_kv`` of the gathered slots: K less its center and V, within half
    a step of e4m3 (2^-4 relative, 2^-10 * scale absolute below the normal range), saturating at 448 * scale."""
    gen = torch.Generator().manual_seed(1)
    key, value = wide_values((40, 2, 16), gen) * scale, wide_values((40, 2, 16), gen) * scale
    k_cache, v_cache = nan_cache((8, 8, 2, 16), "cpu"), nan_cache((8, 8, 2, 16), "cpu")
    slots = torch.randperm(64, generator=gen)[:40]
    kv_scales = make_scales(scale, 2 * scale, 2, 16, device="cpu")
    store_kv_cache_ref(key, value, k_cache, v_cache, slots, kv_scales)
    for x, cache, s in ((key - kv_scales.k_center, k_cache, scale), (value, v_cache, 2 * scale)):
        read = dequantize_kv(cache.view(-1, 2, 16)[slots], torch.tensor([s]))
        target = x.clamp(-FP8_E4M3_MAX * s, FP8_E4M3_MAX * s)
        err = (read - target).abs()
        bound = torch.maximum(target.abs() * 2**-4, torch.full_like(target, 2**-10 * s)) * (1 + 1e-6)
        assert (err <= bound).all(), float((err / bound).max())
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert k_cache.view(-1, 2, 16)[untouched].float().isnan().all()


def test_dequantize_equals_conversion_times_scale_for_every_code():
    stored = torch.arange(256, dtype=torch.uint8).view(F8).view(4, 64)
    for scale in (None, torch.tensor([0.37])):
        expected = stored.float() if scale is None else stored.float() * scale
        torch.testing.assert_close(dequantize_kv(stored, scale), expected, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(dequantize_kv(stored.t(), scale), expected.t(), rtol=0, atol=0, equal_nan=True)


def test_non_fp8_caches_ignore_the_scales():
    x = torch.randn(5, 2, 8)
    assert torch.equal(quantize_kv(x, torch.bfloat16, torch.tensor([3.0])), x.to(torch.bfloat16))
    assert torch.equal(dequantize_kv(x.to(torch.bfloat16), torch.tensor([3.0])), x.to(torch.bfloat16).float())


def test_attention_ignores_the_k_center():
    """Softmax cancels the center's constant shift of each query's scores: attention over K and over K less a
    center agree (float32 caches, so only the center differs)."""
    gen = torch.Generator().manual_seed(3)
    seq_lens, q_lens, block = [9, 20], [9, 4], 8
    k_cache, v_cache = torch.randn(6, block, 2, 16, generator=gen), torch.randn(6, block, 2, 16, generator=gen)
    tables = torch.tensor([[0, 2, 4], [1, 3, 5]], dtype=torch.int32)
    query = torch.randn(sum(q_lens), 4, 16, generator=gen)
    center = torch.randn(2, 16, generator=gen) * 10
    args = ([0, 9, 13], seq_lens, tables, 0.25)
    torch.testing.assert_close(paged_attention_ref(query, k_cache - center, v_cache, *args),
                               paged_attention_ref(query, k_cache, v_cache, *args), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- Triton kernels on an fp8 cache

def fp8_case(seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, kv_scales: KVScales,
             seed: int):
    """An fp8 paged cache holding random K/V of every context token, stored by the torch reference; free slots
    and spare blocks are NaN; block tables shuffled, padded with an id that must never be read."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(n / block_size) for n in seq_lens) + 2
    tables = make_block_tables(seq_lens, block_size, num_blocks, random.Random(seed))
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = nan_cache(shape, "cpu"), nan_cache(shape, "cpu")
    slots = slots_of(tables, [(s, t) for s, n in enumerate(seq_lens) for t in range(n)], block_size)
    keys = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen) * 4 + 6  # offset: the center matters
    values = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
    cpu_scales = KVScales(kv_scales.k_scale.cpu(), kv_scales.v_scale.cpu(),
                          None if kv_scales.k_center is None else kv_scales.k_center.cpu())
    store_kv_cache_ref(keys, values, k_cache, v_cache, slots, cpu_scales)
    return k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE)


def query_start_loc(q_lens: list[int]) -> list[int]:
    return [0] + [sum(q_lens[: i + 1]) for i in range(len(q_lens))]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.03, 2.5)])
def test_store_kernel_writes_the_reference_bits(dtype, k_scale, v_scale):
    from allmos.kernels.store_kv import store_kv_cache

    gen = torch.Generator().manual_seed(int(k_scale * 100))
    num_tokens, kv_heads, head_dim, block = 13, 2, 32, 16
    qkv = wide_values((num_tokens, 3 * kv_heads, head_dim), gen).to(dtype).to(DEVICE)
    key, value = qkv[:, :kv_heads], qkv[:, kv_heads:2 * kv_heads]  # strided views
    slots = torch.randperm(3 * block, generator=gen)[:num_tokens]
    slots[[2, 7]] = -1
    kv_scales = make_scales(k_scale, v_scale, kv_heads, head_dim, seed=1)
    k_cache, v_cache = nan_cache((3, block, kv_heads, head_dim)), nan_cache((3, block, kv_heads, head_dim))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache_ref(key, value, k_ref, v_ref, slots.to(DEVICE), kv_scales)
    store_kv_cache(key, value, k_cache, v_cache, slots.to(DEVICE), kv_scales)
    assert torch.equal(bits(k_cache), bits(k_ref)) and torch.equal(bits(v_cache), bits(v_ref))
    assert bits(k_cache).eq(0x7F).sum() == (3 * block - (num_tokens - 2)) * kv_heads * head_dim  # the rest: NaN


@needs_interpreter
@pytest.mark.parametrize("qk_norm", [True, False])
def test_fused_qk_rope_store_writes_the_reference_bits(qk_norm):
    """The fused q/k-norm + RoPE + store kernel into an fp8 cache: the same bits as the reference store of the
    k and v it writes into a float32 cache."""
    from allmos.kernels.fused_qk_rope_store import qk_norm_rope_store
    from allmos.layers.rotary import RopeConfig, get_rope

    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim, tokens, block = 4, 2, 32, 7, 16
    rope = get_rope(RopeConfig(head_dim=head_dim, rotary_dim=head_dim, max_position=512, theta=10000.0,
                               scaling=None), device=DEVICE)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen) * 5).to(DEVICE)
    positions = torch.randint(0, 512, (tokens,), generator=gen).to(DEVICE)
    weights = [torch.randn(head_dim, generator=gen).to(DEVICE) if qk_norm else None for _ in range(2)]
    slots = torch.randperm(2 * block, generator=gen)[:tokens].to(DEVICE)
    slots[3] = -1
    kv_scales = make_scales(0.5, 0.25, kv_heads, head_dim, seed=2)
    shape = (2, block, kv_heads, head_dim)
    k32, v32 = torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE)
    q32 = qk_norm_rope_store(qkv, heads, kv_heads, head_dim, *weights, 1e-6, rope.cos_cache, rope.sin_cache,
                             positions, k32, v32, slots)
    k8, v8 = nan_cache(shape), nan_cache(shape)
    q8 = qk_norm_rope_store(qkv, heads, kv_heads, head_dim, *weights, 1e-6, rope.cos_cache, rope.sin_cache,
                            positions, k8, v8, slots, kv_scales)
    k_ref, v_ref = nan_cache(shape), nan_cache(shape)
    valid = slots >= 0
    flat = slots[valid]
    store_kv_cache_ref(k32.view(-1, kv_heads, head_dim)[flat], v32.view(-1, kv_heads, head_dim)[flat], k_ref, v_ref,
                       flat, kv_scales)
    assert torch.equal(q8, q32)
    assert torch.equal(bits(k8), bits(k_ref)) and torch.equal(bits(v8), bits(v_ref))


DECODE_CASES = [  # (block_size, num_kv_heads, group, seq_lens)
    (16, 2, 2, [1, 15, 17, 64, 100]),
    (32, 2, 3, [33, 7]),
]


# float32 queries: exact dots (the oracle's dtype); bfloat16 ones: the dots run in float16 (fp16_dots)
QUERY_DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


@needs_interpreter
@pytest.mark.parametrize("query_dtype,tol", QUERY_DTYPES)
@pytest.mark.parametrize("num_splits,fold", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("block_size,num_kv_heads,group,seq_lens", DECODE_CASES)
def test_decode_kernel_on_fp8_cache_matches_reference(block_size, num_kv_heads, group, seq_lens, num_splits, fold,
                                                     query_dtype, tol):
    from allmos.kernels.decode_attention import DecodeWorkspace, paged_decode_attention

    head_dim = 32
    kv_scales = make_scales(0.7, 0.2, num_kv_heads, head_dim, seed=block_size)
    k_cache, v_cache, tables = fp8_case(seq_lens, num_kv_heads, head_dim, block_size, kv_scales, seed=group)
    gen = torch.Generator().manual_seed(num_splits)
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(DEVICE, query_dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(query, float("nan"))
    workspace = DecodeWorkspace.allocate(len(seq_lens), query.shape[1], head_dim, num_splits, DEVICE,
                                         num_kv_heads=num_kv_heads if fold else None)
    paged_decode_attention(query, k_cache, v_cache, lens, tables, head_dim ** -0.5, num_splits=num_splits, out=out,
                           workspace=workspace, fold_merge=fold, kv_scales=kv_scales)
    ref = paged_attention_ref(query, k_cache, v_cache, list(range(len(seq_lens) + 1)), seq_lens, tables,
                              head_dim ** -0.5, kv_scales)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@needs_interpreter
@pytest.mark.parametrize("query_dtype,tol", QUERY_DTYPES)
@pytest.mark.parametrize("block_size,num_kv_heads,group,seq_lens,q_lens", [
    (16, 2, 1, [17, 64], [17, 64]),  # fresh prompts
    (32, 2, 2, [37, 90, 48], [5, 33, 1]),  # after cached context (prefix hits, later chunks), one decode row
])
def test_prefill_kernel_on_fp8_cache_matches_reference(block_size, num_kv_heads, group, seq_lens, q_lens,
                                                      query_dtype, tol):
    from allmos.kernels.prefill_attention import paged_prefill_attention

    head_dim = 32
    kv_scales = make_scales(1.3, 0.6, num_kv_heads, head_dim, seed=7)
    k_cache, v_cache, tables = fp8_case(seq_lens, num_kv_heads, head_dim, block_size, kv_scales, seed=len(q_lens))
    gen = torch.Generator().manual_seed(11)
    query = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(DEVICE, query_dtype)
    qsl = query_start_loc(q_lens)
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(query, k_cache, v_cache, torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
                            torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), tables, head_dim ** -0.5,
                            max(q_lens), out=out, kv_scales=kv_scales)
    ref = paged_attention_ref(query, k_cache, v_cache, qsl, seq_lens, tables, head_dim ** -0.5, kv_scales)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@needs_interpreter
def test_kernels_refuse_bad_scales():
    from allmos.kernels.decode_attention import paged_decode_attention
    from allmos.kernels.store_kv import store_kv_cache

    k_cache, v_cache, tables = fp8_case([5], 2, 16, 16, make_scales(1.0, 1.0), seed=0)
    query, lens = torch.randn(1, 2, 16, device=DEVICE), torch.tensor([5], dtype=torch.int32, device=DEVICE)
    bad_scale = KVScales(torch.ones(2, device=DEVICE), torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match="k_scale"):
        paged_decode_attention(query, k_cache, v_cache, lens, tables, 0.25, kv_scales=bad_scale)
    bad_center = KVScales(torch.ones(1, device=DEVICE), torch.ones(1, device=DEVICE), torch.zeros(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="k_center"):
        store_kv_cache(torch.randn(1, 2, 16, device=DEVICE), torch.randn(1, 2, 16, device=DEVICE), k_cache, v_cache,
                       torch.tensor([0], device=DEVICE), bad_center)
    with pytest.raises(ValueError, match="k_cache dtype"):
        paged_decode_attention(query, k_cache.to(torch.bfloat16), v_cache.to(torch.bfloat16), lens, tables, 0.25)


# ---------------------------------------------------------------- calibration and the engine

def test_calibration_centers_k_and_keeps_scales_at_one_unless_values_near_the_limit():
    from allmos.engine.kv_calibration import HEADROOM, set_kv_scales
    from allmos.layers.attention import Attention

    gen = torch.Generator().manual_seed(0)
    layer = Attention(0, num_heads=4, num_kv_heads=2, head_dim=8, scale=0.3)
    key = torch.randn(50, 2, 8, generator=gen) + torch.arange(16.0).view(2, 8)  # per-channel offsets
    value = torch.randn(50, 2, 8, generator=gen)
    set_kv_scales(layer, key, value)
    torch.testing.assert_close(layer.k_center, key.mean(0))
    assert layer.k_scale.item() == 1.0 and layer.v_scale.item() == 1.0
    set_kv_scales(layer, key * 100, value * 1000)  # beyond 448 / HEADROOM: scaled down to it
    limit = FP8_E4M3_MAX / HEADROOM
    assert layer.k_scale.item() == pytest.approx(float((key * 100 - layer.k_center).abs().max()) / limit)
    assert layer.v_scale.item() == pytest.approx(float((value * 1000).abs().max()) / limit)


def engine(model_dir, kv_cache_dtype: str, **kwargs):
    from allmos import LLM

    options = dict(kvcache_block_size=16, dtype="float32", device="cpu", num_kvcache_blocks=96)
    return LLM(str(model_dir), kv_cache_dtype=kv_cache_dtype, **{**options, **kwargs})


def test_engine_calibrates_every_layer_at_start_up(qwen3_dir):
    from allmos.layers.attention import Attention

    llm = engine(qwen3_dir, "fp8")
    runner = llm.engine.runner
    assert runner.kv_spec.dtype == F8 and all(k.dtype == F8 and v.dtype == F8 for k, v in runner.kv_caches)
    layers = [m for m in runner.model.modules() if isinstance(m, Attention)]
    assert len(layers) == 2 and all(layer.k_center.abs().sum() > 0 for layer in layers)
    again = [m for m in engine(qwen3_dir, "fp8").engine.runner.model.modules() if isinstance(m, Attention)]
    assert all(torch.equal(a.k_center, b.k_center) for a, b in zip(layers, again))  # seeded: every start alike
    auto = [m for m in engine(qwen3_dir, "auto").engine.runner.model.modules() if isinstance(m, Attention)]
    assert all(layer.k_center.abs().sum() == 0 for layer in auto)  # only fp8 caches are calibrated


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_engine_fp8_close_to_model_dtype_cache(tiny_model_factory, arch):
    """Teacher-forced logprobs within fp8's error; greedy continuations equal, or parting only where the
    model-dtype engine's top two tokens nearly tie and the fp8 engine took the second."""
    from allmos import SamplingParams
    from allmos.quality import token_logprobs

    folder = tiny_model_factory(arch)
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, 500, (200,), generator=gen).tolist()
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 17, 40, 90, 3, 60)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    ref, fp8 = engine(folder, "auto"), engine(folder, "fp8")
    diff = (token_logprobs(fp8, text) - token_logprobs(ref, text)).abs()
    assert diff.mean() < 0.06 and diff.max() < 0.3, (float(diff.mean()), float(diff.max()))
    identical = 0
    for a, b in zip(fp8.generate(prompts, params, use_tqdm=False), ref.generate(prompts, params, use_tqdm=False)):
        first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        identical += first is None
        if first is not None:
            top = b.outputs[0].logprobs[first]
            mine = a.token_ids[first]
            assert mine in top and top[b.token_ids[first]].logprob - top[mine].logprob < 0.2, (first, top, mine)
    assert identical >= 1


def test_engine_fp8_prefix_cache_hit_gives_the_same_tokens(qwen3_dir):
    from allmos import SamplingParams

    llm = engine(qwen3_dir, "fp8")
    prompt = torch.randint(3, 500, (70,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    second = llm.generate([prompt], params, use_tqdm=False)[0]
    assert second.num_cached_tokens >= 64 and second.token_ids == first.token_ids


@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["one KV head per rank", "KV head replicated"])
def test_engine_fp8_tensor_parallel_matches_one_rank(tiny_model_factory, num_kv_heads):
    """Each rank calibrates the KV heads it holds from the same calibration prefill: tp=2 gives tp=1's tokens."""
    from allmos import SamplingParams

    folder = tiny_model_factory("qwen3", num_kv_heads=num_kv_heads)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 40, 90)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in engine(folder, "fp8").generate(prompts, params, use_tqdm=False)]
    tp = engine(folder, "fp8", tensor_parallel_size=2)
    try:
        assert [o.token_ids for o in tp.generate(prompts, params, use_tqdm=False)] == want
    finally:
        tp.shutdown()


def test_engine_fp8_cache_holds_twice_the_tokens_of_bf16(qwen3_dir, caplog):
    import logging

    budget = 1 << 20  # a small CPU budget, so that it (not max_num_seqs) bounds the cache
    specs = []
    for kv in ("auto", "fp8"):
        with caplog.at_level(logging.INFO, logger="allmos"):
            llm = engine(qwen3_dir, kv, dtype="bfloat16", num_kvcache_blocks=None, max_model_len=64)
        spec = llm.engine.runner.kv_spec
        specs.append(spec)
        assert llm.engine.runner.num_kv_blocks == cpu_num_blocks(spec, 64, 512, budget_bytes=1 << 30)
    assert specs[0].dtype == torch.bfloat16 and specs[1].dtype == F8
    assert specs[0].bytes_per_block == 2 * specs[1].bytes_per_block
    assert cpu_num_blocks(specs[1], 64, 10**6, budget) == 2 * cpu_num_blocks(specs[0], 64, 10**6, budget)
    assert any("KV cache float8_e4m3fn" in r.getMessage() for r in caplog.records)


def test_llm_refuses_a_bad_kv_cache_dtype_and_the_cli_passes_it(qwen3_dir):
    from allmos import LLM
    from allmos.cli import _engine_kwargs, build_parser

    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(str(qwen3_dir), kv_cache_dtype="fp8_e5m2", device="cpu")
    args = build_parser().parse_args(["generate", "--kv-cache-dtype", "fp8", "hello"])
    assert _engine_kwargs(args)["kv_cache_dtype"] == "fp8"
    assert _engine_kwargs(build_parser().parse_args(["generate", "hi"]))["kv_cache_dtype"] == "auto"


# ---------------------------------------------------------------- GPU: realistic shapes, bf16, CUDA graphs

GPU_SHAPES = [  # (block_size, num_kv_heads, group, head_dim)
    (16, 4, 1, 128), (256, 8, 2, 128), (256, 2, 4, 64), (16, 2, 8, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("block_size,num_kv_heads,group,head_dim", GPU_SHAPES)
def test_gpu_kernels_on_fp8_cache_match_reference(block_size, num_kv_heads, group, head_dim):
    from allmos.kernels.decode_attention import DecodeWorkspace, paged_decode_attention
    from allmos.kernels.prefill_attention import paged_prefill_attention

    kv_scales = make_scales(0.05, 0.01, num_kv_heads, head_dim, seed=block_size)
    seq_lens = [1, 17, 255, 256, 257, 1000, 2048, 4096]
    k_cache, v_cache, tables = fp8_case(seq_lens, num_kv_heads, head_dim, block_size, kv_scales, seed=group)
    gen = torch.Generator().manual_seed(head_dim)
    scale = head_dim ** -0.5
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(DEVICE, torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    ref = paged_attention_ref(query, k_cache, v_cache, list(range(len(seq_lens) + 1)), seq_lens, tables, scale,
                              kv_scales)
    for num_splits, fold in ((1, False), (4, False), (4, True)):
        workspace = DecodeWorkspace.allocate(len(seq_lens), query.shape[1], head_dim, num_splits, DEVICE,
                                             num_kv_heads=num_kv_heads)
        out = paged_decode_attention(query, k_cache, v_cache, lens, tables, scale, num_splits=num_splits,
                                     workspace=workspace, fold_merge=fold, kv_scales=kv_scales)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    q_lens = [1, 17, 100, 256, 3, 1000, 2048, 4096]  # prefix hits and chunks after cached context, fresh prompts
    query = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(DEVICE, torch.bfloat16)
    qsl = query_start_loc(q_lens)
    out = paged_prefill_attention(query, k_cache, v_cache, torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
                                  lens, tables, scale, max(q_lens), kv_scales=kv_scales)
    torch.testing.assert_close(out, paged_attention_ref(query, k_cache, v_cache, qsl, seq_lens, tables, scale,
                                                        kv_scales), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_store_kernel_bf16_writes_the_reference_bits():
    from allmos.kernels.store_kv import store_kv_cache

    gen = torch.Generator().manual_seed(0)
    key = wide_values((3000, 8, 128), gen).to(DEVICE, torch.bfloat16)
    value = wide_values((3000, 8, 128), gen).to(DEVICE, torch.bfloat16)
    slots = torch.randperm(16 * 256, generator=gen)[:3000].to(DEVICE)
    kv_scales = make_scales(0.37, 1.9, 8, 128, seed=1)
    caches = [nan_cache((16, 256, 8, 128)) for _ in range(4)]
    store_kv_cache(key, value, caches[0], caches[1], slots, kv_scales)
    store_kv_cache_ref(key, value, caches[2], caches[3], slots, kv_scales)
    assert torch.equal(bits(caches[0]), bits(caches[2])) and torch.equal(bits(caches[1]), bits(caches[3]))


@pytest.fixture(scope="module")
def gpu_model_dir(tiny_model_factory):
    # head_dim 128, GQA 2: the benchmark model's attention shapes, fewer and narrower layers
    return tiny_model_factory("qwen3", num_kv_heads=4, vocab_size=2048, hidden_size=512, intermediate_size=1024,
                              num_attention_heads=8, num_hidden_layers=4, head_dim=128)


@pytest.mark.gpu
def test_gpu_engine_fp8_triton_with_graphs_matches_torch_backend(gpu_model_dir):
    """The whole engine on an fp8 cache: Triton backend with CUDA graphs (fused store, split decode) against the
    torch backend, float32 weights; both calibrate the same scales. Greedy tokens equal (or parting at a near
    tie), teacher-forced logprobs close."""
    from allmos import LLM, SamplingParams
    from allmos.quality import token_logprobs

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 2048) for _ in range(n)] for n in (1, 7, 64, 300, 1100, 257)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    common = dict(dtype="float32", kv_cache_dtype="fp8", kvcache_block_size=16, max_model_len=2048,
                  num_kvcache_blocks=1024, max_num_seqs=64)
    triton = LLM(str(gpu_model_dir), attention_backend="triton", **common)
    assert triton.engine.runner.graphs is not None and triton.engine.runner.graphs.capture
    reference = LLM(str(gpu_model_dir), attention_backend="torch", enforce_eager=True, **common)
    text = [rng.randrange(3, 2048) for _ in range(700)]
    diff = (token_logprobs(triton, text) - token_logprobs(reference, text)).abs()
    assert diff.max() < 2e-2, float(diff.max())
    same = 0
    outs = zip(triton.generate(prompts, params, use_tqdm=False), reference.generate(prompts, params, use_tqdm=False))
    for a, b in outs:
        first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        same += first is None
        if first is not None:
            top = b.outputs[0].logprobs[first]
            assert a.token_ids[first] in top and abs(top[b.token_ids[first]].logprob
                                                     - top[a.token_ids[first]].logprob) < 0.05
    assert same >= len(prompts) - 1
