"""allmos: a compact, fast LLM inference engine with a vLLM-compatible offline API."""

from allmos.engine.llm import LLM
from allmos.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from allmos.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics", "Logprob"]
__version__ = "0.1.0"
