"""`LLM(..., batching="inflight")`: LLM.generate through the engine gives what static batches give."""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

RNG = np.random.default_rng(17)
PROMPTS = [{"prompt_token_ids": RNG.integers(0, 256, int(n)).tolist()} for n in RNG.integers(2, 30, 11)]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("inflight"), "Qwen2ForCausalLM", seed=4)


@pytest.fixture(scope="module")
def pair(path):
    make = lambda batching: LLM(path, dtype="float32", max_model_len=80, max_num_seqs=4, page_size=4,
                                progress=False, seed=3, batching=batching)
    return make("static"), make("inflight")


def _mixed():
    """Different lengths (so slots free up at different steps), greedy and seeded sampling,
    penalties, logprobs, n = 2."""
    lengths = RNG.integers(1, 25, len(PROMPTS))
    params = []
    for i, m in enumerate(lengths):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(max_tokens=int(m), temperature=0.0, ignore_eos=True, logprobs=2))
        elif kind == 1:
            params.append(SamplingParams(max_tokens=int(m), temperature=0.9, top_p=0.9, seed=i, ignore_eos=True))
        elif kind == 2:
            params.append(SamplingParams(max_tokens=int(m), temperature=0.0, ignore_eos=True, repetition_penalty=1.3))
        else:
            params.append(SamplingParams(n=2, max_tokens=int(m), temperature=1.0, ignore_eos=True))
    return params


def _summary(outs):
    return [[(c.index, c.token_ids, c.finish_reason, c.text, c.logprobs is None) for c in o.outputs] for o in outs]


def _assert_same(got, want):
    """Tokens, finish reasons and texts equal; the chosen tokens' logprobs within 1e-4 (two programs
    need not round alike: rounding them to 4 decimals flipped one under XLA's -O0)."""
    assert _summary(got) == _summary(want)
    for g, w in zip(got, want):
        for a, b in zip(g.outputs, w.outputs):
            if a.logprobs is not None:
                np.testing.assert_allclose([lp[t].logprob for lp, t in zip(a.logprobs, a.token_ids)],
                                           [lp[t].logprob for lp, t in zip(b.logprobs, b.token_ids)], atol=1e-4)


def test_inflight_equals_static_batches(pair, monkeypatch):
    from jaxllm.engine.engine import Engine

    static, inflight = pair
    params = _mixed()
    want = static.generate(PROMPTS, params, use_tqdm=False)
    schedules, step = [], Engine.step

    def counted(self):
        schedules.append([t.seq.num_tokens - t.seq.num_computed_tokens for t in self._tracked.values()
                          if t.seq.status.name == "RUNNING"])
        return step(self)

    monkeypatch.setattr(Engine, "step", counted)
    got = inflight.generate(PROMPTS, params, use_tqdm=False)
    assert len(schedules) > 4  # the engine ran: 14 sequences through 4 slots
    assert [o.request_id for o in got] == [o.request_id for o in want]
    _assert_same(got, want)
    assert sum(len(c.token_ids) for o in got for c in o.outputs) > 100


def test_inflight_stop_strings_and_fallback_for_prompt_logprobs(pair):
    static, inflight = pair
    text = static.generate(PROMPTS[:1], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].text
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].isprintable()
                and text.find(text[i:i + 2]) == i)
    params = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop]),
              SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, prompt_logprobs=1)]
    for p in params:
        want = static.generate(PROMPTS[:3], p, use_tqdm=False)
        got = inflight.generate(PROMPTS[:3], p, use_tqdm=False)
        _assert_same(got, want)
        assert [o.prompt_logprobs is None for o in got] == [p.prompt_logprobs is None] * 3
    assert got[0].prompt_logprobs is not None  # prompt_logprobs came from the static path


def test_batching_must_be_known(path):
    with pytest.raises(ValueError, match=r"batching='continuous' is not supported; choose one of \('static', 'inflight'\)"):
        LLM(path, batching="continuous", progress=False)


def test_inflight_pool_shrinks_to_free_memory_and_stays_exact(pair, monkeypatch):
    """Where the device reports little free memory, the engine's pool holds fewer pages than every
    row at once: requests queue and get preempted, and outputs still equal static batches'."""
    import jaxllm.llm as llm_module
    from jaxllm.engine.engine import Engine
    from jaxllm.kv_cache import bytes_per_page

    static, inflight = pair
    params = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)] * len(PROMPTS)
    want = static.generate(PROMPTS, params, use_tqdm=False)
    per_page = bytes_per_page(inflight.config, inflight.page_size, inflight.config.dtype)
    monkeypatch.setattr(llm_module, "free_device_bytes", lambda devices, share: 24.5 * per_page)
    engines = []
    init = Engine.__init__

    def spy(self, llm, config):
        init(self, llm, config)
        engines.append(self)

    monkeypatch.setattr(Engine, "__init__", spy)
    got = inflight.generate(PROMPTS, params, use_tqdm=False)
    _assert_same(got, want)
    (engine,) = engines
    assert engine.config.num_pages == 24  # not the 4 x 16 + 1 that four rows of up to 64 tokens take
    assert engine.metrics().num_preemptions > 0



def test_inflight_prefill_steps_stay_within_max_num_batched_tokens(path, pair, monkeypatch):
    """LLM(max_num_batched_tokens) bounds the engine's prefill steps too (prompts then go in
    chunks), with the same outputs."""
    from jaxllm.engine.engine import Engine

    static, _ = pair
    small = LLM(path, dtype="float32", max_model_len=80, max_num_seqs=4, page_size=4, progress=False, seed=3,
                batching="inflight", max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    budgets, init = [], Engine.__init__

    def spy(self, llm, config):
        init(self, llm, config)
        budgets.append(self.config.max_num_batched_tokens)

    monkeypatch.setattr(Engine, "__init__", spy)
    got = small.generate(PROMPTS, params, use_tqdm=False)
    assert budgets == [16]  # not 4 rows x 32 prompt tokens
    _assert_same(got, static.generate(PROMPTS, params, use_tqdm=False))
