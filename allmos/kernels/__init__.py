"""Triton kernels. Each module below is None where Triton is not installed (a CPU-only install); the
layers then run their torch code."""

try:
    from allmos.kernels import fused_layers, fused_qk_rope_store, gemv
except ImportError:
    fused_layers = fused_qk_rope_store = gemv = None

__all__ = ["fused_layers", "fused_qk_rope_store", "gemv"]
