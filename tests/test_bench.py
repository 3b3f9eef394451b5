"""`jaxllm bench`: statistics helpers against numpy, seeded workloads and arrivals, and throughput and
latency runs through the CLI on a tiny checkpoint (counts, JSON keys, arrival order, bad input)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, bench, cli
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

RNG = np.random.default_rng(23)
MAX_MODEL_LEN = 64
# Small engine sizes so the tiny model compiles few, small shapes.
ENGINE = ["--page-size", 4, "--num-pages", 96, "--max-num-seqs", 4, "--max-num-batched-tokens", 32, "--num-decode-steps", 3]
THROUGHPUT_KEYS = {"benchmark", "config", "backend", "num_requests", "input_tokens", "output_tokens", "elapsed_s",
                   "requests_per_s", "output_tokens_per_s", "total_tokens_per_s", "engine_metrics",
                   "compiles_while_timed", "compile_s_while_timed"}
LATENCY_KEYS = {"benchmark", "config", "request_rate", "num_requests", "input_tokens", "output_tokens", "elapsed_s",
                "requests_per_s", "output_tokens_per_s", "ttft_ms", "tpot_ms", "itl_ms", "engine_metrics",
                "compiles_while_timed", "compile_s_while_timed", "requests"}
STAT_KEYS = {"count", "mean", "p50", "p90", "p99"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", "LlamaForCausalLM", seed=5)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, progress=False)


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def bench_cli(capsys, model_dir, tmp_path, kind, *args):
    """Runs `jaxllm bench KIND` on the tiny model; returns (stdout, the JSON record, stderr)."""
    path = tmp_path / f"{kind}.json"
    code, out, err = run(capsys, "bench", kind, "--model", model_dir, "--dtype", "float32", "--max-model-len",
                         MAX_MODEL_LEN, "--json", path, *args)
    assert code == 0, err
    return out, json.loads(path.read_text()), err


def random_yields(n_yields):
    """Non-decreasing yield times and strictly growing token counts, several tokens in some yields."""
    times = np.cumsum(RNG.exponential(0.05, n_yields)) + RNG.uniform(0, 1)
    counts = np.cumsum(RNG.integers(1, 4, n_yields))
    return times.tolist(), counts.tolist()


# -- statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_and_summary_match_numpy(n):
    values = RNG.lognormal(3.0, 1.0, n)
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100, *RNG.uniform(0, 100, 5)):
        assert bench.percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)
    s = bench.summarize(values)
    assert s.count == n
    assert s.mean == pytest.approx(values.mean(), rel=1e-12)
    assert [s.p50, s.p90, s.p99] == pytest.approx(np.percentile(values, [50, 90, 99]), rel=1e-12)
    assert bench.summarize([]) == bench.Summary(0, None, None, None, None)
    with pytest.raises(ValueError, match="101"):
        bench.percentile(values, 101)


@pytest.mark.parametrize("n_yields", [1, 2, 5, 30])
def test_itl_splitting_and_tpot_match_numpy(n_yields):
    times, counts = random_yields(n_yields)
    n = counts[-1]
    # Token m (1-based) lies on the line between the yields around it; the first yield's tokens at its time.
    want = np.interp(np.arange(1, n + 1), counts, times)
    np.testing.assert_allclose(bench.token_times(times, counts), want, rtol=1e-12)
    itls = bench.inter_token_latencies(times, counts)
    np.testing.assert_allclose(itls, np.diff(want), rtol=1e-9, atol=1e-15)
    assert len(itls) == n - 1
    tpot = bench.time_per_output_token(times, counts)
    if n == 1:
        assert tpot is None
    else:
        assert tpot == pytest.approx((times[-1] - times[0]) / (n - 1), rel=1e-12)
        assert tpot == pytest.approx(np.mean(itls), rel=1e-9)  # the gaps add up to last - first token
    trace = bench.RequestTrace(7, 0.0, times[0] - 0.3, tuple(times), tuple(counts))
    assert trace.ttft == pytest.approx(0.3) and trace.output_len == n and trace.tpot == tpot


def test_one_yield_of_k_tokens_splits_its_gap_evenly():
    t0, gap, k = RNG.uniform(0, 5), RNG.uniform(0.01, 1), int(RNG.integers(2, 9))
    itls = bench.inter_token_latencies([t0, t0 + gap], [1, 1 + k])
    np.testing.assert_allclose(itls, np.full(k, gap / k), rtol=1e-9)


@pytest.mark.parametrize("times, counts, named", [
    ([0.1, 0.2], [2, 2], "[2, 2]"),
    ([0.1, 0.2], [0, 3], "[0, 3]"),
    ([0.3, 0.2], [1, 2], "0.2"),
    ([0.1], [1, 2], "(1,)"),
])
def test_token_times_rejects_bad_sequences(times, counts, named):
    with pytest.raises(ValueError) as err:
        bench.token_times(times, counts)
    assert named in str(err.value)


# -- workloads and arrivals ---------------------------------------------------------------------


def test_random_workload_lengths_in_range_and_seeded():
    num, in_len, out_len, ratio = 300, int(RNG.integers(10, 40)), int(RNG.integers(5, 20)), 0.3
    vocab, special = 200, (0, 1, 199)
    seed = int(RNG.integers(1000))
    w = bench.RandomWorkload(num, in_len, out_len, ratio, seed=seed)
    reqs = w.sample(vocab, special, max_model_len=1000)
    assert len(reqs) == num
    ins = np.array([r.input_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    for lens, n in ((ins, in_len), (outs, out_len)):
        assert lens.min() >= math.ceil(n * (1 - ratio) - 1e-9) and lens.max() <= math.floor(n * (1 + ratio) + 1e-9)
        assert lens.max() > lens.min()
    tokens = np.concatenate([r.prompt_token_ids for r in reqs])
    assert tokens.min() >= 0 and tokens.max() < vocab and not np.isin(tokens, special).any()
    assert len(np.unique(tokens)) > 150  # spread over the vocabulary
    assert w.sample(vocab, special) == reqs
    assert bench.RandomWorkload(num, in_len, out_len, ratio, seed=seed + 1).sample(vocab, special) != reqs
    fixed = bench.RandomWorkload(5, in_len, out_len, seed=seed).sample(vocab)
    assert [(r.input_len, r.output_len) for r in fixed] == [(in_len, out_len)] * 5


def test_arrivals_are_a_seeded_poisson_process():
    rate, seed = float(RNG.uniform(2, 50)), int(RNG.integers(1000))
    offsets = bench.arrival_offsets(4000, rate, seed)
    assert offsets[0] == 0 and np.all(np.diff(offsets) >= 0)
    gaps = np.diff(offsets)
    assert np.mean(gaps) == pytest.approx(1 / rate, rel=0.06)
    assert np.std(gaps) == pytest.approx(1 / rate, rel=0.08)  # exponential: std == mean
    np.testing.assert_array_equal(bench.arrival_offsets(4000, rate, seed), offsets)
    assert not np.array_equal(bench.arrival_offsets(4000, rate, seed + 1), offsets)
    np.testing.assert_array_equal(bench.arrival_offsets(3, math.inf), np.zeros(3))
    for bad in (0, -1.5, math.nan):
        with pytest.raises(ValueError, match="request_rate"):
            bench.arrival_offsets(3, bad)


# -- runs through the CLI -----------------------------------------------------------------------


@pytest.mark.parametrize("backend, warmup", [("engine", True), ("llm", False)])
def test_throughput_produces_every_output_token(capsys, model_dir, tmp_path, backend, warmup):
    num, in_len, out_len = int(RNG.integers(3, 7)), int(RNG.integers(5, 20)), int(RNG.integers(3, 9))
    engine = ENGINE if backend == "engine" else ENGINE[:2] + ENGINE[4:6]  # llm: page size and batch only
    out, record, err = bench_cli(capsys, model_dir, tmp_path, "throughput", "--backend", backend, "--num-prompts",
                                 num, "--input-len", in_len, "--output-len", out_len, *engine,
                                 *([] if warmup else ["--no-warmup"]))
    assert set(record) == THROUGHPUT_KEYS
    assert record["benchmark"] == "throughput" and record["backend"] == record["config"]["backend"] == backend
    assert record["num_requests"] == num
    assert record["output_tokens"] == num * out_len
    assert record["input_tokens"] == num * in_len
    for key in ("elapsed_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
        assert record[key] > 0 and math.isfinite(record[key])
    assert record["output_tokens_per_s"] == pytest.approx(num * out_len / record["elapsed_s"])
    assert record["total_tokens_per_s"] == pytest.approx(num * (in_len + out_len) / record["elapsed_s"])
    cfg = record["config"]
    assert (cfg["num_prompts"], cfg["input_len"], cfg["output_len"], cfg["warmup"]) == (num, in_len, out_len, warmup)
    assert cfg["engine"]["page_size"] == 4 and cfg["max_model_len"] == MAX_MODEL_LEN
    if backend == "engine":
        assert cfg["engine"]["num_pages"] == 96 and cfg["engine"]["num_decode_steps"] == 3
        metrics = record["engine_metrics"]
        assert metrics["multi_step_visits"] > 0
        assert metrics["generation_tokens"] == num * out_len  # the warmup is not counted
        assert metrics["num_preemptions"] >= 0 and 0 <= metrics["prefix_cache_hit_rate"] <= 1
        assert 0 < metrics["device_s"] < metrics["step_s"] <= record["elapsed_s"] * 1.5
    else:
        assert record["engine_metrics"] is None
    assert f"throughput ({backend})" in out and "output tokens/s" in out
    assert f"{num * out_len:,}" in out
    assert ("warm-up: " in err) == warmup  # on stderr, beside the table: seconds and compilations


def test_latency_respects_arrivals_and_counts(capsys, model_dir, tmp_path, llm):
    num, in_len, out_len, ratio, seed = 6, 12, 6, 0.5, int(RNG.integers(1000))
    rate = 40.0
    out, record, err = bench_cli(capsys, model_dir, tmp_path, "latency", "--request-rate", rate, "--num-prompts",
                                 num, "--input-len", in_len, "--output-len", out_len, "--range-ratio", ratio, "--seed",
                                 seed, *ENGINE)
    assert set(record) == LATENCY_KEYS
    assert "warm-up: " in err
    assert record["request_rate"] == record["config"]["request_rate"] == rate
    want = bench.RandomWorkload(num, in_len, out_len, ratio, seed=seed).sample(*bench.vocabulary(llm))
    reqs = record["requests"]
    assert [(r["input_len"], r["output_len"]) for r in reqs] == [(w.input_len, w.output_len) for w in want]
    np.testing.assert_allclose([r["scheduled_s"] for r in reqs], bench.arrival_offsets(num, rate, seed))
    arrivals = [r["arrival_s"] for r in reqs]
    assert arrivals == sorted(arrivals)
    for r in reqs:
        assert r["arrival_s"] >= r["scheduled_s"] - 1e-3
        assert r["arrival_s"] < r["first_token_s"] <= r["last_token_s"] <= record["elapsed_s"]
        assert r["ttft_ms"] == pytest.approx(1e3 * (r["first_token_s"] - r["arrival_s"]))
    outs = [w.output_len for w in want]
    assert record["output_tokens"] == sum(outs) == record["engine_metrics"]["generation_tokens"]
    assert record["input_tokens"] == sum(w.input_len for w in want)
    assert record["num_requests"] == record["ttft_ms"]["count"] == num
    assert record["tpot_ms"]["count"] == sum(o > 1 for o in outs)
    assert record["itl_ms"]["count"] == sum(o - 1 for o in outs)
    for name in ("ttft_ms", "tpot_ms", "itl_ms"):
        stats = record[name]
        assert set(stats) == STAT_KEYS and 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    ttfts = [r["ttft_ms"] for r in reqs]
    assert record["ttft_ms"]["mean"] == pytest.approx(np.mean(ttfts))
    assert record["ttft_ms"]["p90"] == pytest.approx(np.percentile(ttfts, 90))
    # Every request's ITLs sum to its last - first token time, so the ITL mean weighs them by token.
    gaps = sum(1e3 * (r["last_token_s"] - r["first_token_s"]) for r in reqs)
    assert record["itl_ms"]["mean"] == pytest.approx(gaps / sum(o - 1 for o in outs))
    assert record["output_tokens_per_s"] == pytest.approx(sum(outs) / record["elapsed_s"])
    assert record["elapsed_s"] == pytest.approx(max(r["last_token_s"] for r in reqs))
    for line in ("TTFT", "TPOT", "ITL", "prefix cache hit rate", "preemptions", "latency (40 req/s)"):
        assert line in out


def test_jsonl_dataset_with_text_and_token_prompts(capsys, model_dir, tmp_path, llm):
    texts = ["def add(a, b):", "The quick brown fox jumps"]
    token_prompts = [RNG.integers(3, 250, n).tolist() for n in (7, 13)]
    lines = [{"prompt": texts[0], "output_len": 3}, {"prompt_token_ids": token_prompts[0]},
             {"prompt": texts[1]}, {"prompt_token_ids": token_prompts[1], "output_len": 7}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")  # a trailing blank line is skipped
    default_out = 5
    _, record, _ = bench_cli(capsys, model_dir, tmp_path, "throughput", "--dataset", path, "--output-len", default_out,
                          "--no-warmup", *ENGINE)
    in_lens = [len(llm.tokenizer.encode(texts[0])), len(token_prompts[0]), len(llm.tokenizer.encode(texts[1])),
               len(token_prompts[1])]
    assert record["num_requests"] == 4 and record["config"]["dataset"] == str(path)
    assert record["input_tokens"] == sum(in_lens)
    assert record["output_tokens"] == 3 + default_out + default_out + 7

    _, record, _ = bench_cli(capsys, model_dir, tmp_path, "latency", "--dataset", path, "--num-prompts", 2,
                          "--output-len", default_out + 1, "--no-warmup", *ENGINE)
    assert [(r["input_len"], r["output_len"]) for r in record["requests"]] == [(in_lens[0], 3),
                                                                               (in_lens[1], default_out + 1)]


@pytest.mark.parametrize("args, named", [
    (["throughput", "--num-prompts", "0"], "num_prompts must be an integer >= 1, got 0"),
    (["throughput", "--input-len", "0"], "input_len must be an integer >= 1, got 0"),
    (["latency", "--output-len", "-2"], "output_len must be an integer >= 1, got -2"),
    (["throughput", "--input-len", "50", "--output-len", "20"], "input_len 50 + output_len 20 = 70 exceeds "
                                                                "max_model_len 64"),
    (["throughput", "--input-len", "40", "--output-len", "10", "--range-ratio", "0.5"], "max_model_len 64"),
    (["latency", "--request-rate", "0"], "request_rate must be > 0"),
    (["latency", "--request-rate", "-3"], "-3"),
    (["latency", "--request-rate", "nan"], "nan"),
    (["throughput", "--range-ratio", "1"], "range_ratio must be in [0, 1), got 1.0"),
    (["throughput", "--range-ratio", "-0.1"], "-0.1"),
    (["throughput", "--num-prompts", "x"], "'x'"),
    (["throughput", "--backend", "llm", "--num-pages", "8"], "--num-pages applies to --backend engine only"),
    (["throughput", "--backend", "gpu"], "'gpu'"),
    (["throughput", "--max-num-seqs", "0"], "max_num_seqs must be an integer >= 1, got 0"),
    (["latency", "--num-pages", "1"], "num_pages must be an integer >= 2, got 1"),
    (["latency", "--gpu-memory-utilization", "1.5"], "1.5"),
    (["throughput", "--num-decode-steps", "0"], "num_decode_steps must be an integer >= 1, got 0"),
    (["throughput", "--backend", "llm", "--num-decode-steps", "4"], "--num-decode-steps applies to --backend engine"),
    (["throughput", "--num-pages", "4", "--page-size", "4", "--input-len", "20", "--output-len", "5",
      "--no-warmup"], "needs 25 tokens"),
    (["latency", "--json", "/no/such/dir/out.json"], "/no/such/dir"),
])
def test_bad_input_exits_2_naming_the_value(capsys, model_dir, args, named):
    extra = [a for flag, value in (("--num-prompts", 2), ("--input-len", 8), ("--output-len", 4))
             if flag not in args for a in (flag, value)]
    code, out, err = run(capsys, "bench", *args, "--model", model_dir, "--max-model-len", MAX_MODEL_LEN, *extra)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxllm: error: ") and named in lines[0], err


@pytest.mark.parametrize("content, message", [
    (None, "cannot read dataset"),
    ('{"prompt": "a"}\n\n{"prompt": "b"\n', "line 3: not valid JSON"),
    ('{"prompt": "a"}\n[1, 2]\n', "line 2: expected a JSON object, got list"),
    ('{"text": "a"}\n', "line 1: needs \"prompt\" (text) or \"prompt_token_ids\""),
    ('{"prompt": "a"}\n{"prompt": ""}\n', "line 2: prompt must be a non-empty string"),
    ('{"prompt_token_ids": [1, -4]}\n', "line 1: prompt_token_ids must be a non-empty list"),
    ('{"prompt_token_ids": [1, 2], "output_len": 0}\n', "line 1: output_len must be an integer >= 1, got 0"),
    ('{"prompt_token_ids": [1, 99999]}\n', "line 1: token id 99999 is outside the vocabulary"),
    ('{"prompt": "x"}\n{"prompt_token_ids": [5, 6, 7], "output_len": 62}\n', "line 2: prompt of 3 tokens + "
                                                                             "output_len 62 = 65 exceeds"),
    ("\n \n", "has no requests"),
])
def test_bad_dataset_exits_2_naming_file_and_line(capsys, model_dir, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    code, out, err = run(capsys, "bench", "throughput", "--dataset", path, "--model", model_dir, "--max-model-len",
                         MAX_MODEL_LEN, "--output-len", 4, "--no-warmup")
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxllm: error: ") and str(path) in lines[0], err
    assert message in lines[0], err


def test_dataset_rejects_random_only_flags(capsys, model_dir, tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"prompt": "hello"}\n')
    for flag, value in (("--input-len", 8), ("--range-ratio", 0.2), ("--num-prompts", 3)):
        code, _, err = run(capsys, "bench", "latency", "--dataset", path, "--model", model_dir, flag, value)
        assert code == 2 and flag.lstrip("-").replace("-", "_") in err.replace("-", "_"), err


def test_compile_count_counts_new_compilations_only():
    from jaxllm.bench import compile_count

    scale = float(RNG.normal())  # a constant no earlier test compiled
    f = jax.jit(lambda x: x * scale + 1.0)
    x, y, z = (jnp.asarray(RNG.normal(size=(n, 5)), jnp.float32) for n in (3, 3, 2))
    n0, s0 = compile_count()
    f(x).block_until_ready()
    n1, s1 = compile_count()
    f(y).block_until_ready()  # same shape: the cached executable
    assert (n1 - n0, compile_count()[0] - n1) == (1, 0) and s1 > s0
    f(z).block_until_ready()  # a new shape compiles again
    assert compile_count()[0] == n1 + 1
