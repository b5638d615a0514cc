"""Weight-only int8/int4 on the CPU (allmos.layers.quantization): the packed kernels against float64
matmuls of the dequantized weights, GGUF-style 4-bit blocks kept exactly, engine outputs against float32
transformers, and the automatic CPU weight format."""

from __future__ import annotations

import pytest
import torch

from allmos import LLM, SamplingParams
from allmos.config import EngineConfig, cpu_has_native_bf16
from allmos.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from allmos.layers.quantization import (
    INT4_GROUP_SIZE,
    Int4WeightOnly,
    Int8WeightOnly,
    cpu_weight_format,
    dequantize_int4,
    quantization_for_gguf,
    quantize_int4,
    quantize_int8,
    quantize_model,
)


def _linear(cls, in_features: int, out_features: int, dtype=torch.bfloat16, seed: int = 0):
    torch.manual_seed(seed)
    if cls is MergedColumnParallelLinear:
        layer = cls(in_features, [out_features // 2, out_features // 2])
    else:
        layer = cls(in_features, out_features)
    layer.weight.data = (torch.randn(out_features, in_features) * 0.05).to(dtype)
    return layer


def test_int8_quantize_round_trip_error_is_half_a_step():
    w = torch.randn(96, 160) * torch.rand(96, 1)  # rows of different ranges
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())


def test_int8_layer_matches_float64_matmul_of_dequantized_weight():
    layer = _linear(RowParallelLinear, 192, 80)
    w = layer.weight.data.float()
    Int8WeightOnly().process_weights_after_loading(layer)
    layer.quant_method = Int8WeightOnly()
    assert layer.weight is None and layer.qweight.dtype == torch.int8
    x = torch.randn(5, 192).to(torch.bfloat16)
    ref = x.double() @ (layer.qweight.double() * layer.weight_scale.double()[:, None]).t()
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 80)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    # and the quantization itself stays close to the float weight
    torch.testing.assert_close(x.double() @ w.double().t(), ref, rtol=0.05, atol=0.05)


def _q4_1_blocks(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Weights built like a GGUF Q4_1 tensor: per block of 32 inputs, w = d * q + m with q in 0..15 (both ends
    present); d and m exact in bfloat16, and so is m + 8 d."""
    g = torch.Generator().manual_seed(seed)
    blocks = in_features // 32
    q = torch.randint(0, 16, (out_features, blocks, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = 2.0 ** -torch.randint(6, 9, (out_features, blocks, 1), generator=g).float()
    m = -8 * d + torch.randint(-4, 5, (out_features, blocks, 1), generator=g).float() * 2**-8
    return (d * q + m).view(out_features, in_features)


def test_int4_keeps_q4_1_style_blocks_exactly():
    w = _q4_1_blocks(48, 128)
    q, sz = quantize_int4(w, INT4_GROUP_SIZE, torch.bfloat16)
    assert sz.shape == (128 // INT4_GROUP_SIZE, 48, 2)
    assert torch.equal(dequantize_int4(q, sz, INT4_GROUP_SIZE), w)


def test_int4_layer_matches_float64_matmul_of_its_grid():
    layer = _linear(MergedColumnParallelLinear, 256, 96)
    w = layer.weight.data.float()
    method = Int4WeightOnly()
    assert method.supports(layer.weight)
    q, sz = quantize_int4(w, method.group_size, torch.bfloat16)
    method.process_weights_after_loading(layer)
    layer.quant_method = method
    x = torch.randn(3, 256).to(torch.bfloat16)
    ref = x.double() @ dequantize_int4(q, sz, method.group_size).double().t()
    torch.testing.assert_close(layer(x).double(), ref, rtol=2e-2, atol=2e-2)
    # the 4-bit grid of random weights: within a step of the float weight
    step = (w.view(96, -1, 32).amax(2) - w.view(96, -1, 32).amin(2)) / 15
    err = (dequantize_int4(q, sz, 32) - w).view(96, -1, 32).abs().amax(2)
    assert bool((err <= step * 0.5 + 2e-3).all())


def test_int4_falls_back_to_int8_where_the_kernel_cannot_take_the_shape():
    layer = _linear(RowParallelLinear, 48, 64)  # 48 input features: not a multiple of 32
    assert not Int4WeightOnly().supports(layer.weight)
    model = torch.nn.Module()
    model.proj = layer
    assert quantize_model(model, "int4") == {"int8": 1, "int4": 0}
    assert isinstance(layer.quant_method, Int8WeightOnly)


def _hf_logits(folder, prompt: list[int]) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1]


def _on_q4_grid(folder, tmp_path):
    """A copy of the checkpoint whose block linear weights are Q4_1-style blocks (exact in bfloat16), as a
    GGUF Q4_1 file dequantizes: int4 must then reproduce them, leaving only bfloat16 activation rounding."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "q4grid"
    shutil.copytree(folder, out)
    weights = load_file(out / "model.safetensors")
    for i, (name, w) in enumerate(sorted(weights.items())):
        if w.dim() == 2 and "proj" in name:
            weights[name] = _q4_1_blocks(*w.shape, seed=i)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("tie", [False, True])
def test_engine_logprobs_close_to_float32_transformers(tiny_model_factory, tmp_path, method, tie):
    folder = _on_q4_grid(tiny_model_factory("llama", tie=tie, hidden_size=128, intermediate_size=256), tmp_path)
    prompt = [5, 17, 99, 3, 250, 42, 7]
    llm = LLM(str(folder), quantization=method, kvcache_block_size=16, device="cpu")
    runner = llm.engine.runner
    assert runner.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    lm_head = runner.model.lm_head
    assert lm_head.quant_method.name == "int8" and lm_head.weight is None
    embed = runner.model.model.embed_tokens
    assert embed.weight is not None and embed.weight.dtype == runner.dtype  # lookups keep the float table
    methods = {type(m.quant_method).__name__ for m in runner.model.model.layers.modules() if hasattr(m, "qweight")}
    assert methods == {"Int8WeightOnly" if method == "int8" else "Int4WeightOnly"}
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)[0]
    ref = torch.log_softmax(_hf_logits(folder, prompt).double(), -1)
    diffs = []
    for token, logprob in out.outputs[0].logprobs[0].items():
        value = logprob.logprob if hasattr(logprob, "logprob") else logprob
        diffs.append(abs(value - float(ref[token])))
    assert max(diffs) < 0.1
    assert float(ref.max() - ref[out.token_ids[0]]) < 0.1  # greedy picks transformers' top token or a near tie


def test_quantization_option_errors_name_the_field():
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig.from_kwargs(None, quantization="int3")
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig.from_kwargs(None, quantization="int8", device="cuda")
    with pytest.raises(ValueError, match="compilation_config"):
        EngineConfig.from_kwargs(None, compilation_config=1)


def test_gguf_types_to_method():
    assert quantization_for_gguf(frozenset({"Q4_1"})) == "int4"
    assert quantization_for_gguf(frozenset({"Q4_0", "Q4_K"})) == "int4"
    assert quantization_for_gguf(frozenset({"Q4_K", "Q6_K"})) == "int8"
    assert quantization_for_gguf(frozenset({"Q8_0"})) == "int8"
    assert quantization_for_gguf(frozenset({"F16"})) is None
    assert quantization_for_gguf(frozenset({"Q4_1", "F32"})) is None
    assert quantization_for_gguf(frozenset()) is None


def _format(*args) -> tuple:
    fmt = cpu_weight_format(*args)
    return fmt.dtype, fmt.quantization


def test_cpu_weight_format_decisions(default_model_dir):
    from allmos.models.default_model import default_gguf_path

    gguf = default_gguf_path()  # SmolLM2 Q4_1: its block linears are Q4_1
    f32, bf16 = torch.float32, torch.bfloat16
    assert _format(f32, None, None, gguf, True) == (f32, None)  # explicit dtype: the oracle
    assert _format(None, None, f32, gguf, True) == (bf16, "int4")  # GGUF blocks kept quantized
    assert _format(None, None, f32, gguf, False) == (f32, None)  # no native bf16: as before
    assert _format(None, "int8", f32, None, True) == (bf16, "int8")
    assert _format(None, None, bf16, None, True) == (bf16, None)
    assert _format(None, None, f32, None, True) == (f32, None)
    assert _format(bf16, "int4", f32, None, False) == (bf16, "int4")


@pytest.mark.parametrize("method", [Int8WeightOnly(), Int4WeightOnly()], ids=["int8", "int4"])
def test_strided_and_3d_inputs(method):
    layer = _linear(RowParallelLinear, 64, 32)
    method.process_weights_after_loading(layer)
    layer.quant_method = method
    x = torch.randn(3, 5, 128).to(torch.bfloat16)[..., ::2]  # [3, 5, 64], not contiguous
    out = layer(x)
    assert out.shape == (3, 5, 32)
    torch.testing.assert_close(out, layer(x.contiguous().view(15, 64)).view(3, 5, 32))
    torch.testing.assert_close(layer(x[0]), out[0])


def test_gguf_header_tensor_types_match_gguf_reader(tmp_path):
    import gguf
    import numpy as np

    from allmos.models.gguf_header import gguf_tensor_types

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"] * 50)  # string arrays are skipped, not read
    writer.add_array("some.ints", [1, 2, 3])
    writer.add_string("general.name", "tiny")
    writer.add_float32("some.float", 0.5)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    assert gguf_tensor_types(path) == {t.name: int(t.tensor_type) for t in reader.tensors}
    other = tmp_path / "x.bin"
    other.write_bytes(b"NOPE" + bytes(32))
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_tensor_types(other)
