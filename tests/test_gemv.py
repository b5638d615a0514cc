"""The small-batch GEMV kernels (``allmos.kernels.gemv``) against the torch reference layers.

CPU cases run the kernels through the Triton interpreter (CI) on small shapes, in float32 and float16
(the interpreter's bfloat16 ``tl.dot`` is not usable); ``@pytest.mark.gpu`` cases run the benchmark
model's shapes natively in float32, bfloat16 and float16, the start-up tuning, and a CUDA-graph replay.
Every case draws fresh random inputs and poisons the outputs with NaN before the kernel writes them.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from allmos.kernels.gemv import GemvConfig, candidate_configs, default_gemv_config, gemv, rms_norm_gemv
from allmos.kernels.gemv_tuning import GemvChoice, GemvTable, fixed_table, row_kernel_config, tuning_sizes
from allmos.layers.norm import RMSNorm

# CPU tensors need the interpreter (conftest sets it where there is no CUDA)
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="CPU tensors run Triton kernels only under TRITON_INTERPRET=1")
CPU_CASES = [pytest.param("cpu", torch.float32, marks=needs_interpreter),
             pytest.param("cpu", torch.float16, marks=needs_interpreter)]
GPU_CASES = [pytest.param("cuda", dt, marks=pytest.mark.gpu) for dt in (torch.float32, torch.bfloat16, torch.float16)]
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def operands(m: int, n_rows: int, k: int, dtype: torch.dtype, device: str, bias: bool, seed: int):
    """x [m, k], weight [n_rows, k] (outputs of order 1), optional bias, all random and in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n_rows, k, generator=gen) * k**-0.5
    b = torch.randn(n_rows, generator=gen) if bias else None
    to = dict(dtype=dtype, device=device)
    return x.to(**to), w.to(**to), (b.to(**to) if b is not None else None)


def linear_ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    """float32 products and sums, each stored value rounded to the input dtype as the torch layers store it."""
    y = F.linear(x.float(), w.float(), b.float() if b is not None else None).to(x.dtype)
    if not silu_mul:
        return y
    gate, up = y.chunk(2, dim=-1)
    return (F.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype)


def poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def configs_for(m: int) -> list[GemvConfig]:
    return list(dict.fromkeys([default_gemv_config(m)] + candidate_configs(m)))


@pytest.mark.parametrize("DEVICE,dtype", CPU_CASES)
@pytest.mark.parametrize("m", [1, 3, 17, 70])
@pytest.mark.parametrize("silu_mul", [False, True])
def test_gemv_small_shapes(DEVICE, dtype, m, silu_mul):
    n, k = 40, 96  # k not a multiple of any block_k: masked tail
    for i, config in enumerate(configs_for(m)):
        x, w, b = operands(m, 2 * n if silu_mul else n, k, dtype, DEVICE, bias=i % 2 == 0, seed=i)
        out = poisoned((m, n), dtype, DEVICE)
        y = gemv(x, w, b, config, silu_mul=silu_mul, out=out)
        assert y is out
        close(y, linear_ref(x, w, b, silu_mul), dtype)


@pytest.mark.parametrize("DEVICE,dtype", CPU_CASES)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_row_gemv_rows_and_k_tiles(DEVICE, dtype, m, silu_mul, bias):
    """The row kernel over several rows: the whole K in one tile (weights loaded once for all rows), and past
    its first K tile (several tiles, a masked tail); N not a multiple of BLOCK_N."""
    n, k = 22, 100
    for config in (GemvConfig(1, 4, 128, 4, 1), GemvConfig(1, 4, 32, 4, 1), GemvConfig(1, 8, 64, 4, 1),
                   GemvConfig(1, 2, 128, 4, 1)):
        x, w, b = operands(m, 2 * n if silu_mul else n, k, dtype, DEVICE, bias=bias, seed=config.block_k + m)
        y = gemv(x, w, b, config, silu_mul=silu_mul, out=poisoned((m, n), dtype, DEVICE))
        close(y, linear_ref(x, w, b, silu_mul), dtype)


@pytest.mark.parametrize("DEVICE,dtype", CPU_CASES)
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_gemv_small_shapes(DEVICE, dtype, m, silu_mul, with_residual):
    n, k = 24, 64
    norm = RMSNorm(k, eps=1e-6)
    norm.weight.data = torch.randn(k)
    norm = norm.to(device=DEVICE, dtype=dtype)
    # one-row-at-a-time tiles with the norm: the whole row in one tile (64 of 64, 64 of 128) and past one tile
    row_configs = [GemvConfig(1, 4, 64, 4, 1), GemvConfig(1, 4, 128, 4, 1), GemvConfig(1, 8, 32, 4, 1)]
    for i, config in enumerate(configs_for(m)[:3] + row_configs):
        x, w, b = operands(m, 2 * n if silu_mul else n, k, dtype, DEVICE, bias=i == 1, seed=10 + i)
        r = torch.randn(m, k).to(device=DEVICE, dtype=dtype) if with_residual else None
        out, res_out = poisoned((m, n), dtype, DEVICE), poisoned((m, k), dtype, DEVICE)
        y, s = rms_norm_gemv(x, r, norm.weight, norm.eps, w, b, config, silu_mul=silu_mul, out=out,
                             residual_out=res_out)
        s_ref = x + r if with_residual else x
        assert torch.equal(s, s_ref)  # the residual sum is stored exactly as torch rounds it
        assert s is (res_out if with_residual else x)
        close(y, linear_ref(norm._norm(s_ref), w, b, silu_mul), dtype)


@needs_interpreter
def test_bad_arguments_raise_value_error():
    x, w, _ = operands(2, 32, 64, torch.float32, "cpu", bias=False, seed=0)
    with pytest.raises(ValueError, match="block_m"):
        GemvConfig(block_m=8, block_n=16, block_k=64)
    with pytest.raises(ValueError, match="power of two"):
        GemvConfig(block_m=16, block_n=24, block_k=64)
    with pytest.raises(ValueError, match="M=17"):
        gemv(torch.zeros(17, 64), w, None, GemvConfig(1, 16, 64))
    with pytest.raises(ValueError, match=r"x \[M, K\]"):
        gemv(x, w[:, :32], None, default_gemv_config(2))
    with pytest.raises(ValueError, match="even rows"):
        gemv(x, w[:31], None, default_gemv_config(2), silu_mul=True)
    with pytest.raises(ValueError, match="out must be"):
        gemv(x, w, None, default_gemv_config(2), out=torch.empty(2, 31))
    with pytest.raises(ValueError, match="norm weight"):
        rms_norm_gemv(x, None, torch.ones(63), 1e-6, w, None, default_gemv_config(2))


def test_table_lookup_takes_the_smallest_size_that_holds_the_batch():
    a, b = GemvChoice(default_gemv_config(1)), GemvChoice(None)
    table = GemvTable((1, 4, 16), (a, b, a))
    assert [table.lookup(m) for m in (1, 2, 4, 5, 16)] == [a, b, b, a, a]
    assert table.lookup(17) is None  # above the tuned sizes: the torch path
    assert fixed_table((1, 2)).lookup(2).config == default_gemv_config(2)
    with pytest.raises(ValueError, match="ascending"):
        GemvTable((4, 1), (a, a))


def test_tuning_sizes_cover_every_captured_size_up_to_256():
    from allmos.engine.cuda_graphs import capture_sizes

    for max_num_seqs in (1, 5, 64, 100, 256, 512):
        captured = capture_sizes(max_num_seqs)
        timed = tuning_sizes(captured)
        table = GemvTable(timed, tuple(GemvChoice(None) for _ in timed))
        assert all(s in timed for s in captured if s <= 64)
        assert all((table.lookup(s) is not None) == (s <= 256) for s in captured)


# ----------------------------------------------------------------------------------------------- GPU

# Qwen3-0.6B: q/k/v packed (norm before), o_proj, gate|up packed (norm before, SiLU-mul after), down_proj,
# and the LM head (151,936 rows)
SITES = [(4096, 1024, True, False), (1024, 2048, False, False), (3072, 1024, True, True),
         (1024, 3072, False, False), (151936, 1024, False, False)]


@pytest.mark.parametrize("DEVICE,dtype", GPU_CASES)
@pytest.mark.parametrize("n,k,norm,silu_mul", SITES)
def test_gemv_model_shapes(DEVICE, dtype, n, k, norm, silu_mul):
    """Every candidate tile in bfloat16 (the engine's dtype), the fixed-rule tile in float32 and float16
    (each distinct tile compiles once per dtype: this keeps the visit's compile time down)."""
    norm_weight = torch.randn(k).to(device=DEVICE, dtype=dtype)
    ref_norm = RMSNorm(k, eps=1e-6).to(DEVICE)
    ref_norm.weight.data = norm_weight
    for m in (1, 2, 4, 16, 48, 96, 256):
        configs = configs_for(m) if dtype == torch.bfloat16 else [default_gemv_config(m)]
        if m <= 4:  # the default decode tile of 1-4 rows (norm inside where the site has one)
            configs = [row_kernel_config(k)] + configs
        for i, config in enumerate(configs):
            bias = i == 0 and n <= 4096  # q/k/v and gate/up carry biases in some families
            x, w, b = operands(m, 2 * n if silu_mul else n, k, dtype, DEVICE, bias=bias, seed=100 * m + i)
            out = poisoned((m, n), dtype, DEVICE)
            if norm:
                r = torch.randn(m, k, device=DEVICE).to(dtype)
                res_out = poisoned((m, k), dtype, DEVICE)
                y, s = rms_norm_gemv(x, r, norm_weight, 1e-6, w, b, config, silu_mul=silu_mul, out=out,
                                     residual_out=res_out)
                assert torch.equal(s, x + r)
                expected = linear_ref(ref_norm._norm(x + r), w, b, silu_mul)
            else:
                y = gemv(x, w, b, config, silu_mul=silu_mul, out=out)
                expected = linear_ref(x, w, b, silu_mul)
            close(y, expected, dtype)


@pytest.mark.gpu
def test_tuned_choice_runs_and_matches_reference():
    from allmos.kernels.gemv_tuning import GemvSignature, tune_gemv
    from allmos.layers.activation import SiluAndMul
    from allmos.layers.fused_linear import norm_then_linear
    from allmos.layers.linear import MergedColumnParallelLinear

    sizes = (1, 2, 4, 8, 16, 32, 48, 64, 96, 256)
    sig = GemvSignature(n=3072, k=1024, dtype=torch.bfloat16, norm=True, silu_mul=True)
    table = tune_gemv(sig, sizes, torch.device("cuda"))
    assert table.sizes == sizes and all(c.time_us > 0 for c in table.choices)
    assert tune_gemv(sig, sizes, torch.device("cuda")) is table  # memoized: every engine chooses alike
    linear = MergedColumnParallelLinear(1024, [3072, 3072]).to("cuda", torch.bfloat16)
    linear.weight.data.normal_(0, 1024**-0.5)
    norm = RMSNorm(1024).to("cuda", torch.bfloat16)
    linear.gemv_table = table
    for m in sizes:
        x, r = torch.randn(m, 1024, device="cuda").bfloat16(), torch.randn(m, 1024, device="cuda").bfloat16()
        act, s = norm_then_linear(norm, linear, x, r, act=SiluAndMul())
        assert torch.equal(s, x + r)
        close(act, linear_ref(norm._norm(x + r), linear.weight, None, True), torch.bfloat16)


@pytest.mark.gpu
def test_gemv_in_cuda_graph_replays_with_new_inputs():
    m, n, k = 8, 4096, 1024
    x, w, _ = operands(m, n, k, torch.bfloat16, "cuda", bias=False, seed=7)
    norm_weight = torch.randn(k, device="cuda").bfloat16()
    r = torch.randn(m, k, device="cuda").bfloat16()
    config = default_gemv_config(m)
    rms_norm_gemv(x, r, norm_weight, 1e-6, w, None, config)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, s = rms_norm_gemv(x, r, norm_weight, 1e-6, w, None, config)
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(m, k, device="cuda", generator=gen))
        r.copy_(torch.randn(m, k, device="cuda", generator=gen))
        y.fill_(float("nan"))
        graph.replay()
        y_eager, s_eager = rms_norm_gemv(x, r, norm_weight, 1e-6, w, None, config)
        assert torch.equal(y, y_eager) and torch.equal(s, s_eager)
