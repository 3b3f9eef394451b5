"""benchmarks/prefix_reuse.py at its CPU size: with reuse, only the suffixes are computed."""

import json
import math

from benchmarks import prefix_reuse


def test_prefix_reuse_benchmark_counts_and_writes_json(tmp_path):
    out = tmp_path / "prefix.json"
    assert prefix_reuse.main(["--small", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    w = result["workload"]
    off, on = result["rows"]
    assert (off["prefix_caching"], on["prefix_caching"]) == (False, True)
    assert off["prompt_tokens_computed"] == w["num"] * (w["prefix_len"] + w["suffix_len"])
    assert on["prompt_tokens_computed"] == w["num"] * w["suffix_len"]
    assert (off["prefix_cache_hits"], on["prefix_cache_hits"]) == (0, w["num"] * w["prefix_len"])
    for row in (off, on):
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] <= row["total_s"] and math.isfinite(row["ttft_mean_s"])
    assert result["ttft_mean_ratio"] == off["ttft_mean_s"] / on["ttft_mean_s"]
