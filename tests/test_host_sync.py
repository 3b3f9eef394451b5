"""Device programs keep their control flow on the device: sampling paths chosen on the host, the
engine's decode loop with a fixed trip count (XLA's GPU runtime copies a `lax.cond` predicate and a
while-loop predicate of unknown trip count to the host, which makes every dispatch synchronous)."""

import re

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams, runner
from jaxllm.engine.engine import Engine, EngineConfig
from jaxllm.kv_cache import contiguous_page_table, init_cache
from jaxllm.sampling import make_sampling_tensors
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.isolated_module(seconds=57)  # compiles many programs (see conftest.py)

RNG = np.random.default_rng(11)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sync"), "LlamaForCausalLM", seed=3)


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, dtype="float32", max_model_len=64, skip_tokenizer_init=True, progress=False)


def _round_trips(hlo: str) -> list[str]:
    """Instructions of an optimized HLO module that make XLA's GPU runtime read a predicate back."""
    lines = [ln for ln in hlo.splitlines() if " conditional(" in ln]
    return lines + [ln for ln in hlo.splitlines() if " while(" in ln and "known_trip_count" not in ln]


def test_round_trip_finder_sees_conds_and_open_loops():
    """The helper the tests below rely on flags what it should (so its silence means something)."""
    x = jax.numpy.ones(3)
    cond = jax.jit(lambda x: jax.lax.cond(x[0] > 0, lambda: x + 1, lambda: x)).lower(x).compile().as_text()
    open_loop = jax.jit(lambda x, n: jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 2),
                                                        (0, x))[1]).lower(x, 3).compile().as_text()
    fixed = jax.jit(lambda x: jax.lax.fori_loop(0, 4, lambda i, c: c * 2, x)).lower(x).compile().as_text()
    assert len(_round_trips(cond)) == 1 and len(_round_trips(open_loop)) == 1
    assert _round_trips(fixed) == [] and " while(" in fixed


def test_engine_device_calls_have_no_host_round_trips(llm, monkeypatch):
    engine = Engine(llm, EngineConfig(num_pages=64, page_size=8, max_num_seqs=4, max_num_batched_tokens=32,
                                      num_decode_steps=4))
    seen = {}
    real = engine._device

    def spy(fn, *args, **kwargs):
        if hasattr(fn, "lower"):
            key = (fn.__name__, kwargs.get("sampling_mode"))
            if key not in seen:
                seen[key] = _round_trips(fn.lower(*args, **kwargs).compile().as_text())
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(engine, "_device", spy)
    prompts = [{"prompt_token_ids": RNG.integers(0, 256, n).tolist()} for n in (5, 11, 7)]
    plain = [SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
             SamplingParams(max_tokens=9, temperature=0.8, seed=1, ignore_eos=True)]
    filtered = SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=2, ignore_eos=True)
    engine.generate(prompts[:2], plain)
    engine.generate(prompts, plain + [filtered])
    want = {(f, m) for f in ("engine_step", "decode") for m in ("unsorted", "sorted")}
    assert set(seen) == want | {("next_decode_state", None)}  # async scheduling chained visits too
    assert all(found == [] for found in seen.values()), seen


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=1.1, top_k=7, seed=5, ignore_eos=True),
])
def test_fixed_trip_count_decodes_what_the_while_loop_decodes(llm, params):
    """num_steps below trip_count or not a multiple of check_every, rows with other length limits,
    a padding row: the fixed loop and the loop checked every 4 steps leave each row exactly where
    the loop checked every step does."""
    cfg, rows, pages = llm.config, 4, 8
    prompt_lens = np.array([5, 9, 3, 0], np.int32)  # the last row is padding
    tokens = np.zeros((rows, 16), np.int32)
    for i, n in enumerate(prompt_lens):
        tokens[i, :n] = RNG.integers(0, 256, n)
    stop_ids = np.full((rows, 4), -1, np.int32)
    limits = runner.Limits(stop_ids, np.array([20, 3, 20, 1], np.int32), np.int32(64))
    st = make_sampling_tensors([params] * 3, [4, 5, 6], rows, cfg.vocab_size)
    mode = "greedy" if params.greedy else "sorted"
    results = []
    for trip_count, check_every in ((None, 1), (9, 1), (None, 4)):
        cache = init_cache(cfg, rows * pages + 1, 8, cfg.dtype)
        state, _ = runner.prefill(llm.params, cache, tokens, prompt_lens, contiguous_page_table(rows, pages), st,
                                  limits, config=cfg, max_new=32, logprobs_k=2, prompt_logprobs_k=None,
                                  sampling_mode=mode)
        state = runner.decode(llm.params, state, st, limits, np.int32(6), config=cfg, logprobs_k=2,
                              sampling_mode=mode, trip_count=trip_count)
        state = runner.decode(llm.params, state, st, limits, np.int32(5), config=cfg, logprobs_k=2,
                              sampling_mode=mode, trip_count=trip_count)
        results.append(jax.device_get(state._replace(cache=None, prompt_mask=None)))
    while_loop = results[0]
    assert list(while_loop.num_generated) == [12, 3, 12, 0]
    for other in results[1:]:
        for name in ("tokens", "num_generated", "done", "finish", "rank", "top_ids", "output_counts"):
            np.testing.assert_array_equal(getattr(other, name), getattr(while_loop, name), err_msg=name)
        np.testing.assert_allclose(other.logprob, while_loop.logprob, rtol=1e-6, atol=1e-6)


def test_bad_trip_count_or_check_interval_is_refused(llm):
    cfg, rows = llm.config, 1
    st = make_sampling_tensors([SamplingParams(temperature=0.0)], [0], rows, cfg.vocab_size)
    limits = runner.Limits(np.full((rows, 4), -1, np.int32), np.array([4], np.int32), np.int32(64))
    cache = init_cache(cfg, 5, 8, cfg.dtype)
    state, _ = runner.prefill(llm.params, cache, np.ones((rows, 16), np.int32), np.array([4], np.int32),
                              contiguous_page_table(rows, 4), st, limits, config=cfg, max_new=16,
                              logprobs_k=None, prompt_logprobs_k=None)
    with pytest.raises(ValueError, match=re.escape("trip_count must be in [1, 15]")):
        runner.decode(llm.params, state, st, limits, np.int32(4), config=cfg, logprobs_k=None, trip_count=16)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=f"check_every must be an integer >= 1, got {bad!r}"):
            runner.decode(llm.params, state, st, limits, np.int32(4), config=cfg, logprobs_k=None, check_every=bad)


def test_speculative_loop_refuses_a_bad_check_interval(ckpt):
    spec = LLM(ckpt, dtype="float32", max_model_len=64, skip_tokenizer_init=True, progress=False,
               speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="check_every must be an integer >= 1, got 0"):
        spec.speculator.decode(spec.params, None, None, None, None, np.int32(4), config=spec.config,
                               logprobs_k=None, check_every=0)


@pytest.mark.parametrize("speculative", [None, {"method": "ngram", "num_speculative_tokens": 3}])
def test_checking_every_few_steps_changes_no_output(ckpt, monkeypatch, speculative):
    """LLM.generate with the done-check every step and every 4 steps: the same tokens (sampled with
    seeds, ragged lengths, a stop token) and, speculating, the same per-position statistics."""
    import jaxllm.llm as llm_module

    motif = RNG.integers(0, 256, 6).tolist()
    prompts = [{"prompt_token_ids": (motif * 4)[:n]} for n in (7, 19, 12)]
    first = LLM(ckpt, dtype="float32", max_model_len=64, skip_tokenizer_init=True, progress=False,
                speculative_config=speculative)
    params = [SamplingParams(max_tokens=n, temperature=t, seed=i, ignore_eos=True, stop_token_ids=stop)
              for i, (n, t, stop) in enumerate(((13, 0.9, []), (40, 0.0, [motif[2]]), (44, 0.0, [])))]
    runs = []
    for every in (1, 4):
        monkeypatch.setattr(llm_module, "DECODE_CHECK_EVERY", every)
        runs.append(first.generate(prompts, params, use_tqdm=False))
    one, four = ([(o.outputs[0].token_ids, o.outputs[0].spec_decode) for o in run] for run in runs)
    assert one == four
    assert len({len(ids) for ids, _ in one}) > 1  # ragged
    if speculative:
        assert sum(stats.num_draft_tokens for _, stats in one) > 0  # the verify path ran


def test_engine_warmup_takes_only_the_engines_sampling_modes(llm):
    engine = Engine(llm, EngineConfig(num_pages=16, page_size=8, max_num_seqs=2))
    with pytest.raises(ValueError, match="the engine samples in modes 'unsorted' and 'sorted', got 'greedy'"):
        engine.warmup([8], sampling_modes=["greedy"])
