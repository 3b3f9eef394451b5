"""Engine.metrics() agrees with the scheduler's queues, the page pool and the work each step did."""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine import EngineMetrics
from jaxllm.engine.engine import Engine, EngineConfig
from jaxllm.engine.metrics import StepTotals, step_totals
from jaxllm.engine.scheduler import ScheduledSeq
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

RNG = np.random.default_rng(11)
PROMPTS = [RNG.integers(0, 256, n).tolist() for n in RNG.integers(5, 30, 3)]
MAX_TOKENS = RNG.integers(3, 9, 3).tolist()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("metrics"), "LlamaForCausalLM", seed=3)
    return LLM(path, dtype="float32", max_model_len=96, progress=False)


def greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_to_end(engine):
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        assert steps < 500, "engine made no progress"
    return steps


def test_queues_usage_and_totals(llm):
    cfg = EngineConfig(num_pages=64, page_size=4, max_num_seqs=1, max_num_batched_tokens=64, num_decode_steps=1,
                       enable_prefix_caching=False)
    engine = Engine(llm, cfg)
    for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        engine.add_request(str(i), {"prompt_token_ids": p}, greedy(m))
    m = engine.metrics()
    assert isinstance(m, EngineMetrics)
    assert (m.num_running, m.num_waiting, m.steps, m.generation_tokens) == (0, 3, 0, 0)
    assert (m.kv_cache_usage, m.num_free_pages) == (0.0, cfg.num_pages - 1)

    engine.step()  # max_num_seqs=1: the first prompt is prefilled whole, the others wait
    m = engine.metrics()
    assert (m.num_running, m.num_waiting, m.steps) == (1, 2, 1)
    assert m.prompt_tokens_computed == len(PROMPTS[0])
    assert m.generation_tokens == 1
    pages = -(-len(PROMPTS[0]) // cfg.page_size)
    assert m.num_free_pages == cfg.num_pages - 1 - pages
    assert m.kv_cache_usage == pytest.approx(pages / (cfg.num_pages - 1))
    assert m.kv_cache_usage > 0
    assert (m.prefix_cache_queries, m.prefix_cache_hits, m.prefix_cache_hit_rate) == (0, 0, 0.0)

    steps = 1 + run_to_end(engine)
    m = engine.metrics()
    assert (m.num_running, m.num_waiting, m.kv_cache_usage, m.num_free_pages) == (0, 0, 0.0, cfg.num_pages - 1)
    assert m.steps == steps == sum(MAX_TOKENS)  # one sequence at a time: one token per step
    assert m.prompt_tokens_computed == sum(map(len, PROMPTS))
    assert m.generation_tokens == sum(MAX_TOKENS)
    assert m.num_preemptions == 0


def test_prefix_hits_reduce_computed_prompt_tokens(llm):
    page_size = 4
    prefix = RNG.integers(0, 256, 3 * page_size).tolist()
    prompts = [prefix + RNG.integers(0, 256, n).tolist() for n in (1, 6, 3)]
    engine = Engine(llm, EngineConfig(num_pages=64, page_size=page_size, max_num_batched_tokens=64))
    for i, p in enumerate(prompts):  # one after another, so later ones find the prefix cached
        engine.add_request(str(i), {"prompt_token_ids": p}, greedy(4))
        run_to_end(engine)
    m = engine.metrics()
    assert m.prefix_cache_queries == sum(map(len, prompts))
    assert m.prefix_cache_hits >= 2 * len(prefix)  # the second and third prompts reuse the prefix
    assert m.prefix_cache_hits % page_size == 0
    assert m.prefix_cache_hit_rate == pytest.approx(m.prefix_cache_hits / m.prefix_cache_queries)
    assert 0 < m.prefix_cache_hit_rate < 1
    assert m.prompt_tokens_computed == sum(map(len, prompts)) - m.prefix_cache_hits
    assert m.kv_cache_usage == 0.0 and m.num_free_pages == 63


def test_preemptions_counted(llm):
    # The tiny-pool configuration of test_engine.py, with prompts arriving one per step.
    rng = np.random.default_rng(5)
    prefix = rng.integers(0, 256, 16).tolist()
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 21, 9, 40)] + \
              [prefix + rng.integers(0, 256, n).tolist() for n in (2, 7, 12)]
    max_tokens = [12, 5, 20, 9, 14, 6, 10]
    cfg = EngineConfig(num_pages=18, page_size=4, max_num_seqs=8, max_num_batched_tokens=64, num_decode_steps=1)
    engine = Engine(llm, cfg)
    pending, usage_seen, steps, seqs = list(range(len(prompts))), [], 0, {}
    while pending or engine.has_unfinished_requests():
        if pending:
            i = pending.pop(0)
            engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, greedy(max_tokens[i]))
            seqs.update({key: t.seq for key, t in engine._tracked.items()})
        engine.step()
        usage_seen.append(engine.metrics().kv_cache_usage)
        steps += 1
        assert steps < 2000, "engine made no progress"
    m = engine.metrics()
    assert m.num_preemptions > 0
    assert m.num_preemptions == sum(seq.num_preemptions for seq in seqs.values())
    assert m.generation_tokens == sum(max_tokens)
    assert m.steps == steps
    # preempted sequences compute their prompts again (minus what the prefix cache still holds)
    assert m.prompt_tokens_computed + m.prefix_cache_hits > sum(map(len, prompts))
    assert max(usage_seen) > 0.5 and m.kv_cache_usage == 0.0


def test_step_totals():
    scheduled = [ScheduledSeq("a", 0, 5), ScheduledSeq("b", 8, 4), ScheduledSeq("c", 12, 1)]
    t = step_totals(scheduled, [10, 10, 6], 2)  # b: prompt tokens 8, 9 then outputs; c: a decode
    assert t == StepTotals(steps=1, prompt_tokens_computed=5 + 2, generation_tokens=2)
    assert t + t == StepTotals(steps=2, prompt_tokens_computed=14, generation_tokens=4)
    with pytest.raises(ValueError, match="prompt_lens"):
        step_totals(scheduled, [10], 2)
    with pytest.raises(ValueError, match="num_sampled"):
        step_totals(scheduled, [10, 10, 6], -1)


def test_multi_step_visits_count_device_steps(llm):
    """One request of 10 tokens, 4 decode steps a visit: a prefill step, then visits of 4, 4 and 1."""
    engine = Engine(llm, EngineConfig(num_pages=64, page_size=4, num_decode_steps=4))
    engine.add_request("a", {"prompt_token_ids": PROMPTS[0]}, greedy(10))
    grown = []
    while engine.has_unfinished_requests():
        outs = engine.step()
        grown.append(len(outs[0].outputs[0].token_ids))
    m = engine.metrics()
    assert grown == [1, 5, 9, 10]
    assert (m.steps, m.multi_step_visits, m.generation_tokens) == (10, 3, 10)
    assert 0 < m.device_s < m.step_s  # one wait per visit, inside the steps' wall time
