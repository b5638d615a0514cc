"""Engine configuration: user keys (docs/api.md) plus the model's Hugging Face config, frozen and
validated once. Values discovered at run time (KV block count, EOS ids) live elsewhere."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_BACKENDS = ("auto", "torch", "triton")
_KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


@dataclass(frozen=True)
class EngineConfig:
    """User-facing engine settings; names, defaults and meanings in docs/api.md."""

    model: str | None = None
    max_model_len: int = 4096
    max_num_seqs: int = 512
    max_num_batched_tokens: int = 16384
    gpu_memory_utilization: float = 0.9
    kvcache_block_size: int = 256
    enable_cuda_graphs: bool = True
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    device: str = "auto"
    dtype: str | torch.dtype = "auto"
    load_format: str = "auto"
    num_kvcache_blocks: int | None = None
    attention_backend: str = "auto"
    seed: int = 0
    tokenizer: str | None = None
    trust_remote_code: bool = False  # accepted for vLLM compatibility; True is refused (no remote code runs)
    quantization: str | None = None  # None | "int8" | "int4": weight-only, CPU (allmos.layers.quantization)
    # torch.compile the CPU forward at start-up (engine.cpu_compile): 3 one decoder layer, 2 the whole forward;
    # 0: eager
    compilation_config: int = 0
    enable_cascade_attention: bool = True  # shared-prefix decode attention (Triton backend; docs/cascade_attention.md)
    kv_cache_dtype: str = "auto"  # "auto": the model dtype; "fp8" (alias "fp8_e4m3"): float8_e4m3fn with scales

    @classmethod
    def from_kwargs(cls, model: str | None, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"Unknown engine option(s) {unknown}; known options: {sorted(known - {'model'})}")
        cfg = cls(model=model, **kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _positive(self, "max_model_len", "max_num_seqs", "max_num_batched_tokens", "kvcache_block_size",
                  "tensor_parallel_size")
        if self.kvcache_block_size & (self.kvcache_block_size - 1):
            raise ValueError(f"kvcache_block_size must be a power of two, got {self.kvcache_block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kvcache_blocks is not None and self.num_kvcache_blocks < 1:
            raise ValueError(f"num_kvcache_blocks must be >= 1, got {self.num_kvcache_blocks}")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        if self.attention_backend not in _BACKENDS:
            raise ValueError(f"attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}")
        if self.quantization is not None and str(self.device).startswith("cuda"):
            raise ValueError(f"quantization={self.quantization!r} is implemented for the CPU only "
                             f"(device={self.device!r}); leave quantization=None on a GPU")
        _check_device(self.device)
        from allmos.layers.quantization import check_quantization
        check_quantization(self.quantization, self.resolved_device())
        if self.trust_remote_code is not False:
            raise ValueError(f"trust_remote_code={self.trust_remote_code!r} is not supported: allmos never runs code "
                             "shipped with a model; it loads the architectures it implements itself "
                             "(leave trust_remote_code unset or False)")
        if isinstance(self.dtype, str) and self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.enable_cascade_attention, bool):
            raise ValueError(f"enable_cascade_attention must be True or False, got {self.enable_cascade_attention!r}")
        _check_kv_cache_dtype(self)
        if self.compilation_config not in (0, 2, 3):
            raise ValueError(f"compilation_config must be 0 (eager), 2 (compile the whole CPU forward at start-up) "
                             f"or 3 (compile one decoder layer at start-up), got {self.compilation_config!r}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, checkpoint_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
        """Explicit dtype wins; 'auto' on a GPU is the checkpoint's dtype, on the CPU see ``resolved_weight_format``."""
        return self.resolved_weight_format(checkpoint_dtype, device).dtype

    def resolved_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """dtype of the KV cache: the model's for 'auto', float8_e4m3fn for 'fp8' (allmos.engine.kv_cache)."""
        return _KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype

    def resolved_weight_format(self, checkpoint_dtype: torch.dtype | None, device: torch.device):
        """dtype and quantization the engine runs with (``allmos.layers.quantization.WeightFormat``)."""
        from allmos.layers.quantization import WeightFormat, cpu_weight_format
        requested = self.dtype if isinstance(self.dtype, torch.dtype) else _DTYPES.get(self.dtype)
        if device.type == "cpu":
            return cpu_weight_format(requested, self.quantization, checkpoint_dtype, self.gguf_source(),
                                     cpu_has_native_bf16())
        dtype = requested or checkpoint_dtype or torch.bfloat16
        return WeightFormat(dtype, self.quantization, "dtype given" if requested else "checkpoint dtype")

    def gguf_source(self) -> Path | None:
        """The .gguf file the model comes from (the embedded default model included), else None."""
        if self.model is None:
            from allmos.models.default_model import default_gguf_path
            try:
                return default_gguf_path()
            except RuntimeError:  # not installed: loading the model reports it
                return None
        path = Path(self.model).expanduser()
        return path if path.suffix == ".gguf" and path.is_file() else None

    @property
    def compile_cpu_forward(self) -> bool:
        """Whether the CPU forward is compiled at start-up (``compilation_config`` level 2 or 3, not
        enforce_eager)."""
        return self.compilation_config in (2, 3) and not self.enforce_eager

    def resolved_backend(self, device: torch.device) -> str:
        if self.attention_backend == "auto":
            return "triton" if device.type == "cuda" else "torch"
        if self.attention_backend == "triton" and device.type != "cuda" and not triton_interpreted():
            raise ValueError("attention_backend='triton' needs a CUDA device (or TRITON_INTERPRET=1, for tests); "
                             "use 'torch' on the CPU")
        return self.attention_backend

    @property
    def use_cuda_graphs(self) -> bool:
        return self.enable_cuda_graphs and not self.enforce_eager


def _check_device(device: object) -> None:
    """'auto', 'cpu', 'cuda' or 'cuda:N' (or a torch.device); a CUDA device must exist here (checked before
    anything loads)."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in ("auto", "cpu"):
        return
    if not isinstance(device, str) or not (device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    index_text = device.partition(":")[2]
    if device != "cuda" and not index_text.isdigit():
        raise ValueError(f"device {device!r}: the index after 'cuda:' must be a non-negative integer")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available on this machine "
                         "(use device='cpu' or 'auto')")
    count = torch.cuda.device_count()
    if index_text and int(index_text) >= count:
        raise ValueError(f"device={device!r} but only {count} CUDA device(s) are available "
                         f"(cuda:0..cuda:{count - 1})")


def _check_kv_cache_dtype(cfg: EngineConfig) -> None:
    """A known name; fp8 through the Triton kernels needs a GPU with e4m3 conversions (compute capability 8.9+)."""
    if not isinstance(cfg.kv_cache_dtype, str) or cfg.kv_cache_dtype not in _KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {sorted(_KV_CACHE_DTYPES)}, got {cfg.kv_cache_dtype!r}")
    device = cfg.resolved_device()
    if _KV_CACHE_DTYPES[cfg.kv_cache_dtype] is None or device.type != "cuda" or cfg.attention_backend == "torch":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"kv_cache_dtype={cfg.kv_cache_dtype!r} with the Triton kernels needs a GPU of compute "
                         f"capability 8.9 or newer (this one: {capability[0]}.{capability[1]}); use "
                         "attention_backend='torch' or kv_cache_dtype='auto'")


def _positive(cfg: EngineConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def triton_interpreted() -> bool:
    """Whether Triton kernels run on CPU tensors through its interpreter (``TRITON_INTERPRET=1``: slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), as oneDNN and torch's packed
    weight kernels use it; elsewhere bfloat16 is emulated and float32 is the faster CPU dtype."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """torch dtype of a config.json ``torch_dtype`` / ``dtype`` string (None when absent or unknown)."""
    return _DTYPES.get(str(name).replace("torch.", "")) if name else None
