"""Public behaviour of LLM.generate / LLM.chat on a tiny random Llama with the byte-level tokenizer."""

import json
import math
import re
import shutil

import numpy as np
import pytest

from jaxllm import LLM, RequestOutput, SamplingParams
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

RNG = np.random.default_rng(20250611)
MAX_MODEL_LEN = 64
PROMPTS = [
    "Hello, world",
    "The quick brown fox",
    "def greet(name):",
    "for index in range(10):",
    "The model reads",
]


def greedy(max_tokens=16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def tokens_of(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("api") / "llama", seed=int(RNG.integers(1, 2**31)))


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, dtype="float32", max_model_len=MAX_MODEL_LEN, progress=False)


@pytest.fixture(scope="module")
def greedy_runs(llm):
    """Greedy 32-token continuations of PROMPTS, eos ignored."""
    return llm.generate(PROMPTS, greedy(32), use_tqdm=False)


def _random_ids(n: int) -> list[int]:
    return [int(t) for t in RNG.integers(0, 256, size=n)]  # byte tokens: never special


# -- prompts ---------------------------------------------------------------------------------


def test_string_and_list_prompts(llm):
    tok = llm.get_tokenizer()
    one = llm.generate(PROMPTS[1], greedy(), use_tqdm=False)
    many = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert len(one) == 1 and len(many) == len(PROMPTS)
    assert one[0].prompt == PROMPTS[1]
    assert one[0].prompt_token_ids == tok.encode(PROMPTS[1])
    for prompt, out in zip(PROMPTS, many):  # prompt order
        assert out.prompt == prompt
        assert out.prompt_token_ids == tok.encode(prompt)
        c = out.outputs[0]
        assert len(c.token_ids) == 16 and c.finish_reason == "length"
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    assert one[0].outputs[0].token_ids == many[1].outputs[0].token_ids
    assert len({o.request_id for o in many}) == len(PROMPTS)


def test_prompt_token_ids_dicts(llm):
    tok = llm.get_tokenizer()
    ids = [_random_ids(int(n)) for n in RNG.integers(3, 14, size=3)]
    as_dicts = llm.generate([{"prompt_token_ids": x} for x in ids], greedy(), use_tqdm=False)
    for x, out in zip(ids, as_dicts):
        assert out.prompt_token_ids == x
        assert len(out.outputs[0].token_ids) == 16
    # Token ids and the text that encodes to them give the same result; numpy ids are accepted.
    text = llm.generate(PROMPTS[2], greedy(), use_tqdm=False)[0]
    arr = np.asarray(tok.encode(PROMPTS[2]), np.int64)
    from_ids = llm.generate({"prompt_token_ids": arr}, greedy(), use_tqdm=False)[0]
    assert from_ids.prompt_token_ids == text.prompt_token_ids
    assert from_ids.outputs[0].token_ids == text.outputs[0].token_ids
    # A dict with "prompt" text behaves like the string.
    as_prompt = llm.generate({"prompt": PROMPTS[2]}, greedy(), use_tqdm=False)[0]
    assert as_prompt.outputs[0].token_ids == text.outputs[0].token_ids


def test_one_sampling_params_per_prompt(llm, greedy_runs):
    lengths = [int(n) for n in RNG.choice(np.arange(1, 16), size=3, replace=False)]
    prompts = PROMPTS[:3]
    outs = llm.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)
    for n, full, out in zip(lengths, greedy_runs, outs):
        c = out.outputs[0]
        assert len(c.token_ids) == n
        assert c.finish_reason == "length" and c.stop_reason is None
        assert c.token_ids == full.outputs[0].token_ids[:n]
    # Mixed greedy and sampled rows: the greedy row is unaffected by its neighbour.
    mixed = llm.generate(prompts[:2], [greedy(16), SamplingParams(temperature=1.0, seed=5, max_tokens=4)],
                         use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == greedy_runs[0].outputs[0].token_ids[:16]
    assert len(mixed[1].outputs[0].token_ids) == 4


# -- stopping --------------------------------------------------------------------------------


def _pick_stop_string(greedy_runs):
    """(prompt index, stop string, index of its first occurrence) from the greedy texts."""
    for i, out in enumerate(greedy_runs):
        text = out.outputs[0].text
        for start in range(2, len(text) - 2):
            stop = text[start:start + 2]
            if stop.isascii() and stop.isprintable() and text.find(stop) == start:
                return i, stop, start
    raise AssertionError("no printable two-character stop string in the greedy outputs")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_text(llm, greedy_runs, include):
    i, stop, index = _pick_stop_string(greedy_runs)
    full = greedy_runs[i].outputs[0]
    c = llm.generate(PROMPTS[i], greedy(32, stop=[stop, "\x00never\x00"], include_stop_str_in_output=include),
                     use_tqdm=False)[0].outputs[0]
    assert c.text == full.text[:index + (len(stop) if include else 0)]
    assert c.finish_reason == "stop"
    assert c.stop_reason == stop
    assert c.token_ids == full.token_ids[:len(c.token_ids)]
    assert len(c.token_ids) < len(full.token_ids)
    # The kept tokens are the shortest prefix whose text holds the stop string.
    tok = llm.get_tokenizer()
    assert stop in tok.decode(c.token_ids) and stop not in tok.decode(c.token_ids[:-1])


def test_stop_token_ids(llm, greedy_runs):
    full = greedy_runs[3].outputs[0].token_ids
    firsts = [j for j, t in enumerate(full) if full.index(t) == j and j > 0]
    j = int(RNG.choice(firsts))
    c = llm.generate(PROMPTS[3], greedy(32, stop_token_ids=[full[j]]), use_tqdm=False)[0].outputs[0]
    assert c.token_ids == full[:j + 1]
    assert c.finish_reason == "stop"
    assert c.stop_reason == full[j]
    assert c.text == llm.get_tokenizer().decode(full[:j + 1])


def test_stop_token_at_first_token(llm, greedy_runs):
    """A row whose prefill's token is a stop token keeps only it, alone (the decode loop then runs no
    step) and beside a row that goes on."""
    full = [greedy_runs[i].outputs[0].token_ids for i in (3, 1)]
    stop_first = greedy(32, stop_token_ids=[full[0][0]])
    alone = llm.generate(PROMPTS[3], stop_first, use_tqdm=False)[0].outputs[0]
    assert alone.token_ids == full[0][:1]
    assert alone.finish_reason == "stop" and alone.stop_reason == full[0][0]
    both = llm.generate([PROMPTS[3], PROMPTS[1]], [stop_first, greedy(32)], use_tqdm=False)
    assert tokens_of(both) == [full[0][:1], full[1]]
    assert [o.outputs[0].finish_reason for o in both] == ["stop", "length"]


def _eos_checkpoint(ckpt, dest, token: int, where: str):
    path = shutil.copytree(ckpt, dest)
    file = path / where
    cfg = json.loads(file.read_text())
    cfg["eos_token_id"] = [cfg["eos_token_id"], token] if where == "generation_config.json" else token
    file.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_eos_ends_generation_unless_ignore_eos(ckpt, greedy_runs, tmp_path, where):
    full = greedy_runs[0].outputs[0].token_ids[:16]
    firsts = [j for j, t in enumerate(full) if full.index(t) == j and 0 < j < 15]
    j = int(RNG.choice(firsts))
    path = _eos_checkpoint(ckpt, tmp_path / "eos", full[j], where)
    llm = LLM(path, dtype="float32", max_model_len=MAX_MODEL_LEN, progress=False)
    stopped = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    c = stopped[0].outputs[0]
    assert c.token_ids == full[:j + 1]
    assert c.finish_reason == "stop" and c.stop_reason is None
    ignored = llm.generate(PROMPTS[0], greedy(16), use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == full and ignored.finish_reason == "length"


def test_max_model_len_caps_output(llm):
    ids = [_random_ids(int(n)) for n in RNG.choice(np.arange(4, 16), size=2, replace=False)]
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], greedy(10_000), use_tqdm=False)
    for x, out in zip(ids, outs):
        c = out.outputs[0]
        assert len(c.token_ids) == MAX_MODEL_LEN - len(x)
        assert c.finish_reason == "length"
    # The longest allowed prompt still yields one token.
    longest = llm.generate({"prompt_token_ids": _random_ids(MAX_MODEL_LEN - 1)}, greedy(5), use_tqdm=False)
    assert len(longest[0].outputs[0].token_ids) == 1
    assert longest[0].outputs[0].finish_reason == "length"


# -- sampling --------------------------------------------------------------------------------


def test_seeds(llm):
    seeds = [int(s) for s in RNG.choice(2**31, size=4, replace=False)]
    run = lambda s: llm.generate(PROMPTS[4], SamplingParams(temperature=1.0, seed=s, max_tokens=16),
                                 use_tqdm=False)[0].outputs[0].token_ids
    first = [run(s) for s in seeds]
    assert run(seeds[0]) == first[0]
    assert len({tuple(t) for t in first}) == len(seeds)
    # Unseeded requests draw fresh seeds: two calls differ.
    unseeded = [llm.generate(PROMPTS[4], SamplingParams(temperature=1.0), use_tqdm=False)[0]
                .outputs[0].token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_seeded_request_same_alone_or_batched(llm):
    seed = int(RNG.integers(2**31))
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=seed, max_tokens=16)
    alone = llm.generate(PROMPTS[1], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=5), sp, greedy(), SamplingParams(temperature=0.7)]
    batch = llm.generate([PROMPTS[3], PROMPTS[1], PROMPTS[0], PROMPTS[2]], others, use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_temperature_zero_is_greedy_whatever_top_k_top_p(llm, greedy_runs):
    top_k = int(RNG.integers(2, 10))
    top_p = float(RNG.uniform(0.1, 0.9))
    outs = llm.generate(PROMPTS, greedy(16, top_k=top_k, top_p=top_p, min_p=0.3), use_tqdm=False)
    assert tokens_of(outs) == [o.outputs[0].token_ids[:16] for o in greedy_runs]


def test_n_samples(llm, greedy_runs):
    seed = int(RNG.integers(2**31))
    out = llm.generate(PROMPTS[:2], SamplingParams(n=2, temperature=1.0, seed=seed, max_tokens=16),
                       use_tqdm=False)
    assert len(out) == 2
    for o in out:
        assert [c.index for c in o.outputs] == [0, 1]
        assert all(len(c.token_ids) == 16 for c in o.outputs)
        assert o.outputs[0].token_ids != o.outputs[1].token_ids
    g = llm.generate(PROMPTS[0], greedy(16, n=2), use_tqdm=False)[0]
    expected = greedy_runs[0].outputs[0].token_ids[:16]
    assert [c.token_ids for c in g.outputs] == [expected, expected]


def _check_logprobs(c, k: int, greedy_rank: bool):
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
    for token, entry in zip(c.token_ids, c.logprobs):
        assert token in entry and len(entry) >= k
        assert all(lp.logprob <= 0.0 and lp.rank >= 1 for lp in entry.values())
        by_rank = sorted(entry.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in by_rank[:k]] == list(range(1, k + 1))
        assert all(a.logprob >= b.logprob for a, b in zip(by_rank, by_rank[1:]))
        if greedy_rank:
            assert entry[token].rank == 1
            assert entry[token].logprob == max(lp.logprob for lp in entry.values())
    total = sum(entry[t].logprob for t, entry in zip(c.token_ids, c.logprobs))
    assert math.isclose(c.cumulative_logprob, total, rel_tol=1e-5, abs_tol=1e-5)


def test_logprobs(llm):
    k = int(RNG.integers(1, 6))
    g = llm.generate(PROMPTS[:2], greedy(16, logprobs=k), use_tqdm=False)
    for o in g:
        _check_logprobs(o.outputs[0], k, greedy_rank=True)
    s = llm.generate(PROMPTS[:2], SamplingParams(temperature=1.5, seed=3, max_tokens=16, logprobs=k),
                     use_tqdm=False)
    for o in s:
        _check_logprobs(o.outputs[0], k, greedy_rank=False)
    # Sampling at a high temperature picks a token outside the top 1 somewhere.
    assert any(e[t].rank > 1 for o in s for t, e in zip(o.outputs[0].token_ids, o.outputs[0].logprobs))
    assert g[0].outputs[0].logprobs[0][g[0].outputs[0].token_ids[0]].decoded_token is not None
    none = llm.generate(PROMPTS[0], greedy(4), use_tqdm=False)[0].outputs[0]
    assert none.logprobs is None and none.cumulative_logprob is None


def test_prompt_logprobs(llm):
    k = int(RNG.integers(1, 6))
    sp = SamplingParams(temperature=1.0, seed=11, max_tokens=6, logprobs=1, prompt_logprobs=k)
    out = llm.generate(PROMPTS[1], sp, use_tqdm=False)[0]
    plp = out.prompt_logprobs
    assert len(plp) == len(out.prompt_token_ids) and plp[0] is None
    for token, entry in zip(out.prompt_token_ids[1:], plp[1:]):
        assert token in entry and len(entry) >= k
        assert all(lp.logprob <= 0.0 and lp.rank >= 1 for lp in entry.values())
    # Re-feeding prompt + output: prompt logprobs of the output tokens equal their generation logprobs.
    c = out.outputs[0]
    refed = llm.generate({"prompt_token_ids": out.prompt_token_ids + c.token_ids},
                         SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    n = len(out.prompt_token_ids)
    for j, token in enumerate(c.token_ids):
        got = refed.prompt_logprobs[n + j][token]
        want = c.logprobs[j][token]
        assert math.isclose(got.logprob, want.logprob, abs_tol=2e-4)
        assert got.rank == want.rank


# -- chat and batching -----------------------------------------------------------------------


def test_chat_matches_generate_on_template_ids(llm):
    tok = llm.get_tokenizer()
    convs = [
        [{"role": "user", "content": "hi there"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count to 3"}],
    ]
    ids = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in convs]
    ids = [list(x["input_ids"] if hasattr(x, "keys") else x) for x in ids]
    want = llm.generate([{"prompt_token_ids": x} for x in ids], greedy(), use_tqdm=False)
    single = llm.chat(convs[0], greedy(), use_tqdm=False)
    both = llm.chat(convs, greedy(), use_tqdm=False)
    assert len(single) == 1 and len(both) == 2
    assert single[0].prompt_token_ids == ids[0]
    assert [o.prompt_token_ids for o in both] == ids
    assert tokens_of(single) == tokens_of(want)[:1]
    assert tokens_of(both) == tokens_of(want)


def test_more_prompts_than_max_num_seqs(ckpt, llm):
    small = LLM(ckpt, dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=2, progress=False)
    prompts = [PROMPTS[i] for i in RNG.permutation(len(PROMPTS))]
    batched = small.generate(prompts, greedy(), use_tqdm=False)
    one_by_one = [llm.generate(p, greedy(), use_tqdm=False)[0] for p in prompts]
    assert [o.prompt for o in batched] == prompts
    assert tokens_of(batched) == tokens_of(one_by_one)


def test_generation_config_gives_default_sampling_params(ckpt, greedy_runs, tmp_path):
    path = shutil.copytree(ckpt, tmp_path / "defaults")
    cfg = json.loads((path / "generation_config.json").read_text())
    cfg.update(temperature=0.0, top_p=0.9, max_new_tokens=7)
    (path / "generation_config.json").write_text(json.dumps(cfg))
    llm = LLM(path, dtype="float32", max_model_len=MAX_MODEL_LEN, progress=False)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens) == (0.0, 0.9, 7)
    out = llm.generate(PROMPTS[0], use_tqdm=False)[0].outputs[0]  # no SamplingParams: the model's
    assert len(out.token_ids) <= 7
    assert out.token_ids == greedy_runs[0].outputs[0].token_ids[:len(out.token_ids)]


def test_from_params_generates_alike_and_checks_its_arguments(llm, greedy_runs):
    same = LLM.from_params(llm.config, llm.params, llm.mesh, tokenizer=llm.tokenizer, max_model_len=MAX_MODEL_LEN)
    out = same.generate(PROMPTS[:2], greedy(32), use_tqdm=False)
    assert tokens_of(out) == tokens_of(greedy_runs[:2])
    limit = llm.config.max_position_embeddings
    for kwargs, named in [(dict(max_model_len=limit + 1), f"got {limit + 1}"),
                          (dict(page_size=0), "page_size must be a positive integer, got 0"),
                          (dict(max_num_seqs=True), "max_num_seqs must be a positive integer, got True"),
                          (dict(kv_cache_dtype="fp4"), "kv_cache_dtype 'fp4'")]:
        with pytest.raises(ValueError, match=re.escape(named)):
            LLM.from_params(llm.config, llm.params, llm.mesh, **kwargs)


def test_prefill_in_row_slices_gives_the_same_outputs(llm, greedy_runs):
    """A batch prefilled in several calls (max_num_batched_tokens below rows x prompt length)
    gives the tokens, logprobs and prompt logprobs of one call."""
    from jaxllm.llm import rows_per_prefill

    assert [rows_per_prefill(8, 32, n) for n in (256, 255, 64, 16)] == [8, 4, 2, 1]
    sliced = LLM.from_params(llm.config, llm.params, llm.mesh, tokenizer=llm.tokenizer, max_model_len=MAX_MODEL_LEN,
                             max_num_batched_tokens=64)  # 5 prompts -> 8 rows of 32: four calls of 2 rows
    assert tokens_of(sliced.generate(PROMPTS, greedy(32), use_tqdm=False)) == tokens_of(greedy_runs)
    sp = SamplingParams(temperature=1.2, seed=5, max_tokens=8, logprobs=2, prompt_logprobs=1)
    got, want = (x.generate(PROMPTS[:3], sp, use_tqdm=False) for x in (sliced, llm))
    assert tokens_of(got) == tokens_of(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose([e[t].logprob for e, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)],
                                   [e[t].logprob for e, t in zip(w.outputs[0].logprobs, w.outputs[0].token_ids)],
                                   atol=1e-5)
        np.testing.assert_allclose([e[t].logprob for e, t in zip(g.prompt_logprobs[1:], g.prompt_token_ids[1:])],
                                   [e[t].logprob for e, t in zip(w.prompt_logprobs[1:], w.prompt_token_ids[1:])],
                                   atol=1e-5)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be a positive integer, got 0"):
        LLM.from_params(llm.config, llm.params, llm.mesh, max_num_batched_tokens=0)


def test_static_batches_shrink_to_the_free_memory(llm, greedy_runs, monkeypatch):
    """Where a device reports its free memory, a static batch holds only as many requests as its
    KV cache fits in (a power of two), with the same outputs; none fitting is a clear error."""
    import jaxllm.llm as llm_module
    from jaxllm.kv_cache import bytes_per_page

    requests = llm._requests(PROMPTS, greedy(32))
    per_row = llm._pages_per_row(requests, 5) * bytes_per_page(llm.config, llm.page_size, llm.config.dtype)
    seen = []
    real = LLM._run_batch

    def spy(self, batch, interval=None):
        seen.append(len(batch))
        return real(self, batch, interval)

    monkeypatch.setattr(LLM, "_run_batch", spy)
    monkeypatch.setattr(llm_module, "free_device_bytes", lambda devices, share: 3.5 * per_row)
    assert tokens_of(llm.generate(PROMPTS, greedy(32), use_tqdm=False)) == tokens_of(greedy_runs)
    assert seen == [2, 2, 1]  # 3.5 rows of memory, less the scratch page: 2 rows, batches of 2
    monkeypatch.setattr(llm_module, "free_device_bytes", lambda devices, share: 1.5 * per_row)
    with pytest.raises(ValueError, match=r"the KV cache of one request of up to \d+ tokens needs .* GiB per device"):
        llm.generate(PROMPTS, greedy(32), use_tqdm=False)
