"""Engine: KV page allocation with prefix reuse, request scheduling, the stepping engine and its asyncio front end."""

from jaxllm.engine.async_llm import AsyncLLM
from jaxllm.engine.engine import Engine, EngineConfig
from jaxllm.engine.kv_cache_manager import KVCacheManager, PrefixStats
from jaxllm.engine.metrics import EngineMetrics
from jaxllm.engine.scheduler import Scheduler, ScheduledSeq, SchedulerOutput, Sequence, Status

__all__ = ["AsyncLLM", "Engine", "EngineConfig", "EngineMetrics", "KVCacheManager", "PrefixStats", "ScheduledSeq",
           "Scheduler", "SchedulerOutput", "Sequence", "Status"]
