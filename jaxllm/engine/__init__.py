"""Engine host side: KV page allocation with prefix reuse, and request scheduling."""

from jaxllm.engine.kv_cache_manager import KVCacheManager, PrefixStats
from jaxllm.engine.scheduler import Scheduler, ScheduledSeq, SchedulerOutput, Sequence, Status

__all__ = ["KVCacheManager", "PrefixStats", "ScheduledSeq", "Scheduler", "SchedulerOutput", "Sequence", "Status"]
