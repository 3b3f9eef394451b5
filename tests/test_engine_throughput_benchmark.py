"""benchmarks/engine_throughput.py at a CPU size: every backend serves every token and writes its row."""

import json

import pytest

from benchmarks import engine_throughput

# In a child process: it compiles four serving paths, and the jax 0.10.2 CPU compiler crashes
# (SIGSEGV) more often as the full suite's process compiles more programs; see conftest.py.
pytestmark = pytest.mark.isolated_module(seconds=60)


def test_engine_throughput_benchmark_rows(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    argv = ["--small", "--workloads", "24x6", "--num-prompts", "6", "--max-num-seqs", "4", "--num-decode-steps", "1",
            "4", "--max-num-batched-tokens", "32", "--out", str(out)]
    assert engine_throughput.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["backend"], r["num_decode_steps"]) for r in rows] == [
        ("engine", 1), ("engine", 4), ("llm", None), ("llm-inflight", None)]
    for r in rows:
        assert (r["input_tokens"], r["output_tokens"]) == (6 * 24, 6 * 6)
        assert r["output_tokens_per_s"] > 0
    one, four = rows[0]["engine_metrics"], rows[1]["engine_metrics"]
    assert one["multi_step_visits"] == 0 < four["multi_step_visits"]
    assert rows[0]["max_num_batched_tokens"] == 32 and rows[2]["max_num_batched_tokens"] is None
    warmups = [line for line in capsys.readouterr().out.splitlines() if ": warm-up " in line]
    assert [line.split(": warm-up")[0] for line in warmups] == [
        "24x6 engine (decode steps a visit: 1)", "24x6 engine (decode steps a visit: 4)",
        "24x6 llm (decode steps a visit: None)", "24x6 llm-inflight (decode steps a visit: None)"]
    assert "compilations" in warmups[0] and not warmups[0].endswith(" 0 compilations (0 s)")


def test_engine_host_profile_benchmark(tmp_path):
    """The synchronous-engine profile: its timed and profiled passes serve the same schedule as the
    compiling pass, without compiling, and the profile names the engine's own functions."""
    from benchmarks import engine_host_profile

    out = tmp_path / "profile.json"
    argv = ["--small", "--workload", "20x6", "--num-prompts", "6", "--max-num-seqs", "4",
            "--max-num-batched-tokens", "32", "--out", str(out)]
    assert engine_host_profile.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["compile"]["compiles"] > 0 and r["timed"]["compiles"] == r["profiled"]["compiles"] == 0
    assert r["compile"]["steps"] == r["timed"]["steps"] == r["profiled"]["steps"] > 6
    for run in ("timed", "profiled"):
        assert 0 < r[run]["device_s"] < r[run]["step_s"] <= r[run]["elapsed_s"]
    assert any("engine.py" in row["function"] and "_step" in row["function"] for row in r["top_cumulative"])


def test_engine_throughput_passes_quantization_and_kv_dtype(monkeypatch, tmp_path):
    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("captured")

    monkeypatch.setattr(engine_throughput.LLM, "from_params", capture)
    with pytest.raises(RuntimeError, match="captured"):
        engine_throughput.main(["--small", "--quantization", "fp8", "--kv-cache-dtype", "int8",
                                "--out", str(tmp_path / "x.json")])
    assert (seen["quantization"], seen["kv_cache_dtype"]) == ("fp8", "int8")
