"""jaxllm: an LLM inference compiler and runtime in JAX and Pallas."""

from jaxllm.llm import LLM
from jaxllm.engine.async_llm import AsyncLLM
from jaxllm.outputs import CompletionOutput, Logprob, RequestOutput
from jaxllm.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
