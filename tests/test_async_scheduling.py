"""Async scheduling: a decode visit dispatched before the one before it is recorded changes no output
(sampling, penalties, logprobs, stop tokens), and an abort while a visit runs ahead loses nothing
of another request and leaks no page."""

import dataclasses

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine.engine import Engine, EngineConfig
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.isolated_module(seconds=45)  # compiles many programs (see conftest.py)

RNG = np.random.default_rng(23)
PROMPTS = [RNG.integers(0, 256, n).tolist() for n in (5, 17, 9, 12)]
CONFIG = EngineConfig(num_pages=96, page_size=4, max_num_seqs=4, max_num_batched_tokens=64, num_decode_steps=3)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("async"), "LlamaForCausalLM", seed=8)
    return LLM(path, dtype="float32", max_model_len=96, skip_tokenizer_init=True, progress=False)


def serve(llm, params, async_scheduling: bool):
    engine = Engine(llm, dataclasses.replace(CONFIG, async_scheduling=async_scheduling))
    outs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    engine.kv.check_invariants()
    assert engine.kv.num_free_pages() == CONFIG.num_pages - 1 and not engine.has_unfinished_requests()
    return [o.outputs[0] for o in outs], engine.metrics()


def test_async_scheduling_changes_no_output(llm):
    params = [
        SamplingParams(max_tokens=23, temperature=0.0, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=19, temperature=0.9, top_p=0.8, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=26, temperature=0.7, seed=4, ignore_eos=True, repetition_penalty=1.3,
                       presence_penalty=0.4),
        SamplingParams(max_tokens=30, temperature=1.1, seed=5, ignore_eos=True),
    ]
    first, _ = serve(llm, params, False)
    # a stop token in the middle of a later visit of row 3, and one in row 0's output
    params[3] = dataclasses.replace(params[3], stop_token_ids=[first[3].token_ids[13]])
    params[0] = dataclasses.replace(params[0], stop_token_ids=[first[0].token_ids[8]])
    (sync, sync_metrics), (chained, metrics) = serve(llm, params, False), serve(llm, params, True)
    assert sync_metrics.chained_visits == 0 < metrics.chained_visits
    assert [c.finish_reason for c in chained][::3] == ["stop", "stop"]
    assert len(chained[3].token_ids) <= 14 and len(chained[0].token_ids) <= 9
    for got, want in zip(chained, sync):
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)
    np.testing.assert_allclose([lp[t].logprob for lp, t in zip(chained[0].logprobs, chained[0].token_ids)],
                               [lp[t].logprob for lp, t in zip(sync[0].logprobs, sync[0].token_ids)], atol=1e-6)


def test_abort_while_a_visit_runs_ahead(llm):
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    alone = Engine(llm, CONFIG).generate([{"prompt_token_ids": PROMPTS[1]}], params)[0].outputs[0].token_ids
    engine = Engine(llm, CONFIG)
    engine.add_request("a", {"prompt_token_ids": PROMPTS[0]}, params)
    engine.add_request("b", {"prompt_token_ids": PROMPTS[1]}, params)
    seen, steps = {"a": [], "b": []}, 0
    while engine._inflight is None:
        for o in engine.step():
            seen[o.request_id].append(o)
        steps += 1
        assert steps < 20, "no visit was dispatched ahead"
    engine.abort("a")
    after_abort = len(seen["a"])
    while engine.has_unfinished_requests():
        for o in engine.step():
            seen[o.request_id].append(o)
    assert len(seen["a"]) == after_abort  # nothing more of the aborted request
    assert seen["b"][-1].finished and seen["b"][-1].outputs[0].token_ids == alone
    engine.kv.check_invariants()
    assert engine.kv.num_free_pages() == CONFIG.num_pages - 1
    # aborting every request while a visit runs ahead settles it: the engine is idle again
    engine.add_request("c", {"prompt_token_ids": PROMPTS[2]}, params)
    while engine._inflight is None:
        engine.step()
    engine.abort("c")
    assert not engine.has_unfinished_requests() and engine._inflight is None
    assert engine.kv.num_free_pages() == CONFIG.num_pages - 1


def test_async_scheduling_must_be_a_bool():
    with pytest.raises(ValueError, match="async_scheduling must be True or False, got 1"):
        EngineConfig(async_scheduling=1)
