"""Triton kernels. ``fused_layers`` is None where Triton is not installed (a CPU-only install); the layers
then run their torch code."""

try:
    from allmos.kernels import fused_layers
except ImportError:
    fused_layers = None

__all__ = ["fused_layers"]
