"""Speculative decoding: n-gram, draft model and Medusa give plain decoding's outputs (greedy: the
same tokens; sampled: the same distribution), the acceptance rules are exact, and bad input fails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxllm import LLM, SamplingParams
from jaxllm.speculative import acceptance
from jaxllm.speculative.config import SpeculativeConfig
from jaxllm.speculative.medusa import MedusaConfig, build_tree, init_medusa_heads, save_medusa_heads
from jaxllm.speculative.ngram import propose_ngram
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

# Run in a child process: in the full suite, jax 0.10.2's CPU compiler crashed (SIGSEGV) compiling
# this module's loops after the rest of the suite had run in the same process (conftest.py says more).
pytestmark = pytest.mark.isolated_module(seconds=120)

RNG = np.random.default_rng(7)
ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"]


def greedy(n, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def repetitive_prompts(vocab, lengths):
    """Prompts that repeat a short random motif, so n-gram lookup and trained-like heads find matches."""
    out = []
    for n in lengths:
        motif = RNG.integers(3, vocab, size=int(RNG.integers(2, 6))).tolist()
        out.append({"prompt_token_ids": (motif * n)[:n]})
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    return {a: write_tiny_checkpoint(root / a, a, seed=int(RNG.integers(1, 2**31))) for a in ARCHS}


@pytest.fixture(scope="module")
def draft_ckpt(tmp_path_factory, ckpts):
    """A smaller random model with the target's tokenizer (a different network: low acceptance)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("draft") / "d", "LlamaForCausalLM", seed=3,
                                 hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)


def medusa_dir(tmp_path, llm, num_heads=3, seed=0, scale=0.0):
    """Medusa heads starting from the model's lm_head (head k then guesses the next token again)."""
    cfg = llm.config
    mc = MedusaConfig(num_heads, 1, cfg.hidden_size, cfg.vocab_size)
    lm_head = llm.params["lm_head"] if "lm_head" in llm.params else llm.params["embed"].T
    heads = init_medusa_heads(jax.random.PRNGKey(seed), mc, "float32", lm_head=np.asarray(lm_head))
    if scale:
        heads["w_res"] = scale * jax.random.normal(jax.random.PRNGKey(seed + 1), heads["w_res"].shape)
    save_medusa_heads(tmp_path, mc, heads)
    return str(tmp_path)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


# -- exactness of greedy output, end to end ---------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_ngram_greedy_equals_plain(ckpts, arch):
    plain = LLM(ckpts[arch], dtype="float32", progress=False)
    spec = LLM(ckpts[arch], dtype="float32", progress=False,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
    prompts = repetitive_prompts(plain.config.vocab_size, [5, 23, 40, 9])
    params = [greedy(n) for n in (30, 17, 40, 1)]  # ragged lengths, and a single-token request
    want, got = plain.generate(prompts, params, use_tqdm=False), spec.generate(prompts, params, use_tqdm=False)
    assert token_ids(got) == token_ids(want)
    stats_ = [o.outputs[0].spec_decode for o in got]
    assert sum(s.num_accepted_tokens for s in stats_) > 0  # the speculative path was exercised
    assert all(len(o.outputs[0].token_ids) == p.max_tokens for o, p in zip(got, params))
    for s in stats_:
        assert all(a <= p for a, p in zip(s.accepted_per_position, s.proposed_per_position))


@pytest.mark.parametrize("skip", [True, False])
def test_ngram_skipping_or_always_verifying_equals_plain(ckpts, skip):
    """Steps with no proposal in any row run the plain forward (large models) or verify anyway (small
    ones, the default for this tiny model): greedy output is plain decoding's either way."""
    import dataclasses

    from jaxllm.speculative.speculator import AUTO_LARGE_MODEL_BYTES, Speculator

    path = ckpts["LlamaForCausalLM"]
    plain = LLM(path, dtype="float32", progress=False)
    spec = LLM(path, dtype="float32", progress=False,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
    assert spec.speculator.plan.skip_when_empty is False
    large = Speculator(SpeculativeConfig("ngram", 3), plain.config, plain.mesh, weight_bytes=AUTO_LARGE_MODEL_BYTES)
    assert large.plan.skip_when_empty is True
    spec.speculator.plan = dataclasses.replace(spec.speculator.plan, skip_when_empty=skip)
    # a repetitive prompt (proposals) beside a random one (steps where no row may have any)
    prompts = repetitive_prompts(plain.config.vocab_size, [21]) + \
        [{"prompt_token_ids": RNG.integers(3, plain.config.vocab_size, 6).tolist()}]
    params = [greedy(25), greedy(14)]
    want, got = plain.generate(prompts, params, use_tqdm=False), spec.generate(prompts, params, use_tqdm=False)
    assert token_ids(got) == token_ids(want)
    assert sum(o.outputs[0].spec_decode.num_draft_tokens for o in got) > 0


def test_draft_model_greedy_equals_plain(ckpts, draft_ckpt):
    target = ckpts["LlamaForCausalLM"]
    plain = LLM(target, dtype="float32", progress=False)
    prompts = repetitive_prompts(plain.config.vocab_size, [7, 30, 12])
    params = greedy(24)
    want = token_ids(plain.generate(prompts, params, use_tqdm=False))
    for draft, full in ((draft_ckpt, False), (target, True)):  # another model, then the target itself
        spec = LLM(target, dtype="float32", progress=False,
                   speculative_config={"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3})
        got = spec.generate(prompts, params, use_tqdm=False)
        assert token_ids(got) == want
        s = [o.outputs[0].spec_decode for o in got]
        if full:  # the target drafting for itself is always right: every step keeps all 3 proposals
            assert all(x.accepted_per_position == x.proposed_per_position for x in s)
            assert all(x.mean_accepted_length > 3.0 for x in s)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
@pytest.mark.parametrize("accept", ["rejection", "typical"])
def test_medusa_greedy_equals_plain(ckpts, tmp_path, arch, accept):
    plain = LLM(ckpts[arch], dtype="float32", progress=False)
    heads = medusa_dir(tmp_path, plain, scale=0.02)
    spec = LLM(ckpts[arch], dtype="float32", progress=False,
               speculative_config={"method": "medusa", "model": heads, "acceptance": accept})
    prompts = repetitive_prompts(plain.config.vocab_size, [6, 31, 14])
    params = [greedy(n) for n in (33, 20, 12)]
    got = spec.generate(prompts, params, use_tqdm=False)
    assert token_ids(got) == token_ids(plain.generate(prompts, params, use_tqdm=False))
    assert sum(o.outputs[0].spec_decode.num_accepted_tokens for o in got) > 0
    for o in got:  # rows that finished early stop counting
        s = o.outputs[0].spec_decode
        assert all(a <= p for a, p in zip(s.accepted_per_position, s.proposed_per_position))
        assert s.num_steps <= len(o.outputs[0].token_ids)


def test_stop_tokens_penalties_and_logprobs_match_plain(ckpts, tmp_path):
    path = ckpts["LlamaForCausalLM"]
    plain = LLM(path, dtype="float32", progress=False)
    prompts = repetitive_prompts(plain.config.vocab_size, [12, 25])
    base = token_ids(plain.generate(prompts, greedy(20), use_tqdm=False))
    stop = base[0][7]  # a token the first row produces: it must end there, mid-acceptance or not
    params = [greedy(20, stop_token_ids=[stop], logprobs=2),
              greedy(20, repetition_penalty=1.4, frequency_penalty=0.3, logprobs=2)]
    want = plain.generate(prompts, params, use_tqdm=False)
    for spec_config in ({"method": "ngram", "num_speculative_tokens": 4},
                        {"method": "medusa", "model": medusa_dir(tmp_path, plain, scale=0.02)}):
        got = LLM(path, dtype="float32", progress=False, speculative_config=spec_config).generate(
            prompts, params, use_tqdm=False)
        assert token_ids(got) == token_ids(want)
        assert got[0].outputs[0].token_ids[-1] == stop and got[0].outputs[0].finish_reason == "stop"
        for g, w in zip(got, want):
            a = [d[t].logprob for d, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)]
            b = [d[t].logprob for d, t in zip(w.outputs[0].logprobs, w.outputs[0].token_ids)]
            np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("limit, off_at", [(3, 3), ("auto", 8)])  # "auto": 8 for a model under 1 GB
def test_disable_by_batch_size(ckpts, limit, off_at):
    spec = LLM(ckpts["LlamaForCausalLM"], dtype="float32", progress=False,
               speculative_config={"method": "ngram", "disable_by_batch_size": limit})
    prompts = repetitive_prompts(spec.config.vocab_size, list(range(8, 8 + off_at)))
    assert all(o.outputs[0].spec_decode is None for o in spec.generate(prompts, greedy(5), use_tqdm=False))
    on = spec.generate(prompts[:off_at - 1], greedy(5), use_tqdm=False)
    assert all(o.outputs[0].spec_decode is not None for o in on)


# -- sampled output keeps the target distribution -----------------------------------------------------

def _two_sample_p(a, b, vocab):
    table = np.stack([np.bincount(a, minlength=vocab), np.bincount(b, minlength=vocab)])
    table = table[:, table.sum(0) > 0]
    return stats.chi2_contingency(table)[1]


@pytest.fixture(scope="module")
def small_vocab_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("v8") / "m", seed=11, init_std=0.5,
                                 config_overrides={"vocab_size": 8}, with_tokenizer=False)


@pytest.mark.parametrize("method", ["ngram", "medusa"])
def test_sampled_tokens_follow_plain_distribution(small_vocab_ckpt, tmp_path, method):
    n = 600
    kw = dict(dtype="float32", progress=False, skip_tokenizer_init=True, max_num_seqs=n)
    plain = LLM(small_vocab_ckpt, **kw)
    config = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2} if method == "ngram"
              else {"method": "medusa", "model": medusa_dir(tmp_path, plain, scale=0.3),
                    "medusa_choices": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]})
    config["disable_by_batch_size"] = None  # a tiny model would stop speculating at batch 8 otherwise
    spec = LLM(small_vocab_ckpt, speculative_config=config, **kw)
    base = [1, 2, 3, 1, 2, 3, 1, 2]
    if method == "ngram":  # the prompt again after the model's own continuation: lookup finds what follows
        greedy_ids = plain.generate([{"prompt_token_ids": base}], SamplingParams(temperature=0.0, max_tokens=5),
                                    use_tqdm=False)[0].outputs[0].token_ids
        base = base + list(greedy_ids) + base
    prompt = {"prompt_token_ids": base}
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=5, ignore_eos=True, seed=s) for s in range(n)]
    a = np.array(token_ids(plain.generate([prompt] * n, params, use_tqdm=False)))
    outs = spec.generate([prompt] * n, [SamplingParams(**{**p.__dict__, "seed": p.seed + n}) for p in params],
                         use_tqdm=False)
    assert sum(o.outputs[0].spec_decode.num_accepted_tokens for o in outs) > n // 4  # it did speculate
    b = np.array(token_ids(outs))
    for t in range(1, 5):  # the first token comes from prefill; later ones from speculative steps
        assert _two_sample_p(a[:, t], b[:, t], 8) > 1e-3, t
    # the pair (token 1, token 2) jointly
    assert _two_sample_p(a[:, 1] * 8 + a[:, 2], b[:, 1] * 8 + b[:, 2], 64) > 1e-3


def _gof_p(samples, probs):
    """Chi-square goodness-of-fit p-value of integer samples against a distribution."""
    counts = np.bincount(samples, minlength=len(probs))
    probs = np.asarray(probs, np.float64)
    return stats.chisquare(counts, probs / probs.sum() * counts.sum())[1]


def _chain_inputs(n, vocab, k, seed, one_hot):
    rng = np.random.default_rng(seed)
    target = rng.dirichlet(np.full(vocab, 0.7), size=(k + 1,)).astype(np.float32)
    q = rng.dirichlet(np.full(vocab, 0.7), size=(k,)).astype(np.float32)
    drafts = np.stack([rng.choice(vocab, size=n, p=q[i] / q[i].sum()) for i in range(k)], 1).astype(np.int32)
    if one_hot:  # a deterministic proposer (n-gram): always the same tokens
        drafts[:] = rng.integers(0, vocab, size=k)
    keys = np.stack([np.zeros(n, np.uint32), np.arange(n, dtype=np.uint32)], 1)
    return target, q, drafts, keys


def _first_token(verdict, drafts):
    acc = np.asarray(verdict.num_accepted)
    return np.where(acc > 0, drafts[:, 0], np.asarray(verdict.next_token))


@pytest.mark.parametrize("one_hot", [False, True])
def test_accept_chain_first_token_is_target_distributed(one_hot):
    n, vocab, k = 40000, 6, 3
    target, q, drafts, keys = _chain_inputs(n, vocab, k, 1, one_hot)
    t = jnp.broadcast_to(target, (n, k + 1, vocab))
    qb = None if one_hot else jnp.broadcast_to(q, (n, k, vocab))
    v = acceptance.accept_chain(t, jnp.asarray(drafts), jnp.full((n,), k), keys, jnp.zeros(n, jnp.int32), qb)
    assert _gof_p(_first_token(v, drafts), target[0]) > 1e-3
    # negative control: drawing the correction from p instead of the residual max(p - q, 0) is biased
    wrong = np.where(np.asarray(v.num_accepted) > 0, drafts[:, 0],
                     np.asarray(jax.vmap(jax.random.categorical)(
                         jax.random.split(jax.random.PRNGKey(0), n), jnp.log(t[:, 0]))))
    assert _gof_p(wrong, target[0]) < 1e-6


def test_accept_tree_first_token_is_target_distributed():
    n, vocab = 40000, 7
    tree = build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0]], 2)
    rng = np.random.default_rng(3)
    target = rng.dirichlet(np.full(vocab, 0.8), size=(tree.num_nodes,)).astype(np.float32)
    tokens = np.zeros((n, tree.num_nodes), np.int32)
    for i in range(1, tree.num_nodes):  # siblings distinct, as top-k candidates are
        tokens[:, i] = tree.rank[i] + (0 if tree.depth[i] == 1 else 3)
    keys = np.stack([np.ones(n, np.uint32), np.arange(n, dtype=np.uint32)], 1)
    v = acceptance.accept_tree(jnp.broadcast_to(target, (n, *target.shape)), jnp.asarray(tokens), tree.parent,
                               tree.rank, tree.max_depth, keys, jnp.zeros(n, jnp.int32))
    path, num = np.asarray(v.path), np.asarray(v.num_accepted)
    first = np.where(num > 0, tokens[np.arange(n), path[:, 1]], np.asarray(v.next_token))
    assert _gof_p(first, target[0]) > 1e-3
    # the token after an accepted first node follows that node's distribution
    node = 1
    rows = (num > 0) & (path[:, 1] == node)
    second = np.where(num[rows] > 1, tokens[rows][np.arange(rows.sum()), path[rows, 2]], np.asarray(v.next_token)[rows])
    assert _gof_p(second, target[node]) > 1e-3
    # negative control: accepting the first child with probability p(child), without renormalising after
    # rejected siblings, under-weights later siblings
    u = np.random.default_rng(5).random((n, 3))
    wrong = np.full(n, -1)
    for c in range(3):
        tok = tokens[0, 1 + c]
        wrong = np.where((wrong < 0) & (u[:, c] < target[0, tok]), tok, wrong)
    rest = target[0].copy()
    rest[tokens[0, 1:4]] = 0
    fill = np.random.default_rng(6).choice(vocab, size=n, p=rest / rest.sum())
    wrong = np.where(wrong < 0, fill, wrong)
    assert _gof_p(wrong, target[0]) < 1e-6


def test_greedy_acceptance_keeps_the_argmax_chain():
    target = jnp.asarray(np.eye(5, dtype=np.float32)[[2, 4, 1, 0]])[None]  # argmax 2, 4, 1, then 0
    keys = np.zeros((1, 2), np.uint32)
    for drafts, want_n, want_next in (([2, 4, 3], 2, 1), ([2, 4, 1], 3, 0), ([0, 4, 1], 0, 2)):
        v = acceptance.accept_chain(target, jnp.asarray([drafts]), jnp.array([3]), keys, jnp.zeros(1, jnp.int32))
        assert (int(v.num_accepted[0]), int(v.next_token[0])) == (want_n, want_next)
    v = acceptance.accept_chain(target, jnp.asarray([[2, 4, 1]]), jnp.array([1]), keys, jnp.zeros(1, jnp.int32))
    assert (int(v.num_accepted[0]), int(v.next_token[0])) == (1, 4)  # only one real proposal


# -- n-gram proposals ------------------------------------------------------------------------------

def _ngram_reference(seq, k, n_max, n_min):
    for n in range(n_max, n_min - 1, -1):
        if len(seq) < n + 1:
            continue
        suffix = seq[-n:]
        for s in reversed(range(len(seq) - n)):  # the latest earlier occurrence
            if seq[s:s + n] == suffix:
                text = list(seq)
                for j in range(k):  # an overlapping copy: past the end it copies what it proposed
                    text.append(text[s + n + j])
                return text[len(seq):]
    return []


def test_ngram_proposals_match_reference():
    rng = np.random.default_rng(0)
    batch, size, k = 32, 40, 4
    hist = rng.integers(0, 4, size=(batch, size)).astype(np.int32)
    lengths = rng.integers(1, size + 1, size=batch).astype(np.int32)
    drafts, count = propose_ngram(jnp.asarray(hist), jnp.asarray(lengths), k=k, n_max=3, n_min=1)
    drafts, count = np.asarray(drafts), np.asarray(count)
    for b in range(batch):
        want = _ngram_reference(hist[b, :lengths[b]].tolist(), k, 3, 1)
        assert count[b] == len(want)
        assert drafts[b, :count[b]].tolist() == want


def test_ngram_proposal_repeats_a_cycle_that_reaches_the_end():
    hist = jnp.asarray([[5, 1, 2, 7, 7, 7, 0, 0], [5, 1, 2, 1, 2, 1, 2, 0]], jnp.int32)
    drafts, count = propose_ngram(hist, jnp.array([6, 7]), k=4, n_max=2, n_min=1)
    assert np.asarray(count).tolist() == [4, 4]
    assert np.asarray(drafts).tolist() == [[7, 7, 7, 7], [1, 2, 1, 2]]


# -- bad input -------------------------------------------------------------------------------------

def test_bad_arguments_of_the_loop_pieces():
    hist, lens = jnp.zeros((1, 8), jnp.int32), jnp.array([4])
    with pytest.raises(ValueError, match="prompt_lookup_min <= prompt_lookup_max"):
        propose_ngram(hist, lens, k=2, n_max=1, n_min=2)
    with pytest.raises(ValueError, match="k must be at least 1"):
        propose_ngram(hist, lens, k=0, n_max=2, n_min=1)
    keys = np.zeros((1, 2), np.uint32)
    with pytest.raises(ValueError, match=r"\(B, K\+1, V\) = \(1, 3, V\)"):
        acceptance.accept_chain(jnp.ones((1, 2, 5)), jnp.zeros((1, 2), jnp.int32), jnp.array([2]), keys,
                                jnp.zeros(1, jnp.int32))
    from jaxllm.kv_cache import KVCache
    from jaxllm.ops.tree_attention import paged_tree_attention

    cache = KVCache(jnp.zeros((1, 2, 4, 1, 8)), jnp.zeros((1, 2, 4, 1, 8)))
    tree_args = (cache, 0, jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 3), jnp.int32), jnp.zeros(1, jnp.int32))
    kv = jnp.zeros((1, 3, 1, 8))
    with pytest.raises(ValueError, match=r"tree_mask must be \[T, T\] = \[3, 3\]"):
        paged_tree_attention(jnp.zeros((1, 3, 1, 1, 8)), kv, kv, *tree_args, jnp.ones((2, 2), bool), scale=1.0)
    with pytest.raises(ValueError, match=r"must both hold the 3 tree tokens' K/V of 1 rows"):
        paged_tree_attention(jnp.zeros((1, 3, 1, 1, 8)), kv[:, :2], kv[:, :2], *tree_args, jnp.ones((3, 3), bool),
                             scale=1.0)


@pytest.mark.parametrize("config, match", [
    ({"method": "eagle"}, "not supported"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"method": "draft_model"}, "needs speculative_config model"),
    ({"method": "ngram", "acceptance": "typical"}, "typical"),
    ({"method": "ngram", "k": 2}, "unknown speculative_config keys"),
    ({"num_speculative_tokens": 2}, "needs 'method'"),
])
def test_bad_speculative_config(config, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.of(config)


def test_draft_with_other_vocabulary_or_tokenizer_is_refused(ckpts, tmp_path):
    target = ckpts["LlamaForCausalLM"]
    other = write_tiny_checkpoint(tmp_path / "v", seed=2, config_overrides={"vocab_size": 100}, with_tokenizer=False)
    with pytest.raises(ValueError, match="vocab_size 100"):
        LLM(target, progress=False, speculative_config={"method": "draft_model", "model": str(other)})
    from jaxllm.tiny_checkpoint import byte_tokenizer

    same_size = write_tiny_checkpoint(tmp_path / "t", seed=2)
    tok = byte_tokenizer()
    tok.add_tokens(["<|other|>"])  # one more token: another vocabulary at the same model size
    tok.save_pretrained(same_size)
    with pytest.raises(ValueError, match="another tokenizer"):
        LLM(target, progress=False, speculative_config={"method": "draft_model", "model": str(same_size)})


def test_medusa_heads_not_matching_the_model_are_refused(ckpts, tmp_path):
    llm = LLM(ckpts["LlamaForCausalLM"], dtype="float32", progress=False)
    mc = MedusaConfig(2, 1, llm.config.hidden_size * 2, llm.config.vocab_size)
    save_medusa_heads(tmp_path, mc, init_medusa_heads(jax.random.PRNGKey(0), mc))
    with pytest.raises(ValueError, match="hidden"):
        LLM(ckpts["LlamaForCausalLM"], progress=False, speculative_config={"method": "medusa", "model": str(tmp_path)})
    heads = medusa_dir(tmp_path / "ok", llm, num_heads=2)
    with pytest.raises(ValueError, match="3 deep|deeper|depth"):
        LLM(ckpts["LlamaForCausalLM"], progress=False, speculative_config={
            "method": "medusa", "model": heads, "medusa_choices": [[0], [0, 0], [0, 0, 0]]})
