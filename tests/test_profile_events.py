"""`benchmarks.profile_decode.gpu_events`: kernels of a profiler trace counted once, also when a
machine's trace lists them under two GPU processes (seen on the H200 machines)."""

from benchmarks.profile_decode import gpu_events, per_name


def _trace(processes: dict[int, str], events: list[tuple[int, str, float, float]]) -> dict:
    meta = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}} for pid, name in processes.items()]
    return {"traceEvents": meta + [{"ph": "X", "pid": pid, "name": n, "ts": ts, "dur": dur}
                                   for pid, n, ts, dur in events]}


def test_a_process_repeating_another_is_dropped_and_host_events_ignored():
    kernels = [("gemm", 0.0, 5.0), ("add", 6.0, 1.0), ("gemm", 8.0, 5.0)]
    trace = _trace({1: "/device:GPU:0", 2: "/device:GPU:0 (copy)", 3: "/host:CPU"},
                   [(1, *k) for k in kernels] + [(2, n, ts + 0.5, d) for n, ts, d in kernels] + [(3, "python", 0.0, 50.0)])
    assert dict(per_name(gpu_events(trace))) == {"gemm": [10.0, 2], "add": [1.0, 1]}


def test_distinct_gpu_processes_are_both_kept():
    trace = _trace({1: "/device:GPU:0", 2: "/device:GPU:1"}, [(1, "gemm", 0.0, 5.0), (2, "attention", 0.0, 3.0)])
    assert sorted(e["name"] for e in gpu_events(trace)) == ["attention", "gemm"]
