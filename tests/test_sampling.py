"""Tests for jaxllm.sampling against independent numpy / transformers references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from jaxllm.sampling import (
    SamplingTensors,
    apply_penalties,
    make_sampling_tensors,
    sample,
    token_logprobs,
)
from jaxllm.sampling_params import SamplingParams

V = 50
ALPHA = 1e-3


# ---------------------------------------------------------------- numpy references


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_target(logits, temperature, top_k=0, top_p=1.0, min_p=0.0, wrong=None):
    """Target distribution of one row, in float64; `wrong` selects a deliberately broken variant."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x)
    ps = np_softmax(x)[order]
    n = len(x)
    keep = np.arange(n) < (n if top_k <= 0 else min(top_k, n))
    if wrong == "no_filter":
        keep[:] = True
    pk = np.where(keep, ps, 0.0)
    if wrong != "topp_no_renorm":
        pk = pk / pk.sum()
    before = np.concatenate([[0.0], np.cumsum(pk)[:-1]])
    if top_p < 1.0 and wrong != "no_filter":
        if wrong == "topp_inclusive":  # off by one: drops the token that crosses top_p
            keep &= np.cumsum(pk) < top_p
        elif wrong == "topp_one_extra":  # off by one: keeps one token past the crossing one
            keep &= np.concatenate([[0.0, 0.0], np.cumsum(pk)[:-2]]) < top_p
        else:
            keep &= before < top_p
    if wrong != "no_filter":
        keep &= ps >= min_p * ps[0]
    keep[0] = True
    out = np.zeros(n)
    out[order[keep]] = ps[keep]
    return out / out.sum()


def chi2_pvalue(counts, probs):
    """Pearson chi-square p-value, pooling bins with expected count < 5; 0 if an impossible bin is hit."""
    n = counts.sum()
    expected = probs * n
    if np.any((expected == 0) & (counts > 0)):
        return 0.0
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    rest_e, rest_o = expected[~big].sum(), counts[~big].sum()
    if rest_e > 0:
        if rest_e < 5 and exp:
            i = int(np.argmin(exp))
            obs[i] += rest_o
            exp[i] += rest_e
        else:
            obs.append(rest_o)
            exp.append(rest_e)
    obs, exp = np.asarray(obs, float), np.asarray(exp, float)
    if len(exp) < 2:
        return 1.0
    stat = np.sum((obs - exp) ** 2 / exp)
    return float(stats.chi2.sf(stat, len(exp) - 1))


def np_penalties(logits, prompt_mask, counts, rep, presence, frequency):
    out = logits.astype(np.float64).copy()
    seen = prompt_mask | (counts > 0)
    for b in range(out.shape[0]):
        for j in range(out.shape[1]):
            if seen[b, j]:
                out[b, j] = out[b, j] / rep[b] if out[b, j] > 0 else out[b, j] * rep[b]
    # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    return out - counts * frequency[:, None] - (counts > 0) * presence[:, None]


def random_logits(rng, b, v=V, scale=2.0):
    x = rng.normal(size=(b, v)) * scale
    assert np.all(x != 0)
    return x.astype(np.float32)


def no_history(b, v=V):
    return jnp.zeros((b, v), bool), jnp.zeros((b, v), jnp.int32)


# ---------------------------------------------------------------- filtered sampling


def mid(a, b):
    return float((a + b) / 2)


@functools.lru_cache(maxsize=1)
def filtered_rows():
    """Six rows with different params; top_p / min_p sit halfway between float64 boundaries."""
    rng = np.random.default_rng(1234)
    logits = random_logits(rng, 6)

    def sorted_probs(row, temp, k=0):
        ps = np.sort(np_softmax(logits[row].astype(np.float64) / temp))[::-1]
        if k:
            ps = ps[:k] / ps[:k].sum()
        return ps

    params = [SamplingParams(temperature=0.8, top_k=6)]
    cum = np.cumsum(sorted_probs(1, 1.3))
    params.append(SamplingParams(temperature=1.3, top_p=mid(cum[6], cum[7])))  # keeps 8
    ps = sorted_probs(2, 0.7)
    params.append(SamplingParams(temperature=0.7, min_p=mid(ps[9], ps[10]) / ps[0]))  # keeps 10
    cumk = np.cumsum(sorted_probs(3, 1.1, k=12))
    params.append(SamplingParams(temperature=1.1, top_k=12, top_p=mid(cumk[7], cumk[8])))  # keeps 9
    cumk = np.cumsum(sorted_probs(4, 0.9, k=20))
    ps = sorted_probs(4, 0.9)
    params.append(
        SamplingParams(
            temperature=0.9,
            top_k=20,
            top_p=mid(cumk[13], cumk[14]),  # keeps 15
            min_p=mid(ps[10], ps[11]) / ps[0],  # then keeps 11
        )
    )
    params.append(SamplingParams(temperature=1.0))
    targets = np.stack(
        [np_target(logits[i], p.temperature, p.top_k, p.top_p, p.min_p) for i, p in enumerate(params)]
    )
    return logits, params, targets


def draw(logits, st, keys, steps):
    """Draws[i, b] = sample with keys[i] and step steps[i], jitted and vmapped over draws."""
    b = logits.shape[0]
    pm, oc = no_history(b)

    def one(key_rows, s):
        return sample(jnp.asarray(logits), st._replace(keys=key_rows), jnp.full((b,), s), pm, oc)

    return np.asarray(jax.jit(jax.vmap(one))(keys, steps))


def test_filters_never_emit_disallowed_tokens_over_many_seeds():
    logits, params, targets = filtered_rows()
    assert [int((t > 0).sum()) for t in targets] == [6, 8, 10, 9, 11, V]
    n = 2000
    st = make_sampling_tensors(params, [0] * len(params), len(params), V)
    seeds = np.arange(n * len(params)).reshape(n, len(params))
    keys = np.stack([np.zeros_like(seeds), seeds], axis=-1)  # == jax.random.PRNGKey(seed) for seed < 2**32
    tokens = draw(logits, st, jnp.asarray(keys, jnp.uint32), jnp.zeros((n,), jnp.int32))
    for b in range(len(params)):
        allowed = set(np.flatnonzero(targets[b] > 0).tolist())
        emitted = set(np.unique(tokens[:, b]).tolist())
        assert emitted <= allowed, (b, emitted - allowed)
        if b < 5:  # the filtered rows see most of their small allowed set
            assert len(emitted) >= len(allowed) - 2


def test_frequencies_match_target_and_reject_wrong_targets():
    logits, params, targets = filtered_rows()
    n = 4000
    st = make_sampling_tensors(params, [11 + i for i in range(len(params))], len(params), V)
    keys = jnp.broadcast_to(jnp.asarray(st.keys), (n, len(params), 2))
    tokens = draw(logits, st, keys, jnp.arange(n, dtype=jnp.int32))
    counts = np.stack([np.bincount(tokens[:, b], minlength=V) for b in range(len(params))])

    for b in range(len(params)):
        assert chi2_pvalue(counts[b], targets[b]) > ALPHA, b

    wrong_variants = {
        0: ["no_filter"],
        1: ["topp_inclusive", "topp_one_extra", "no_filter"],
        2: ["no_filter"],
        3: ["topp_no_renorm", "topp_inclusive", "topp_one_extra"],
        4: ["no_filter"],  # its min_p cut hides top-p details
    }
    for b, variants in wrong_variants.items():
        p = params[b]
        for wrong in variants:
            bad = np_target(logits[b], p.temperature, p.top_k, p.top_p, p.min_p, wrong=wrong)
            assert not np.allclose(bad, targets[b]), (b, wrong)  # the negative check is not vacuous
            assert chi2_pvalue(counts[b], bad) < ALPHA, (b, wrong)


@pytest.mark.parametrize("mine", [
    SamplingParams(temperature=1.5, top_k=30, top_p=0.95, repetition_penalty=1.2, seed=4321),
    SamplingParams(temperature=1.3, min_p=0.05, repetition_penalty=1.2, seed=4321),  # drawn without a sort
])
def test_same_seed_same_tokens_whatever_the_batch(mine):
    """A row's draws depend on its seed and step only, not on its neighbours (greedy, filtered rows
    that sort the vocabulary, unfiltered rows that do not)."""
    rng = np.random.default_rng(7)
    steps = 6
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, top_p=0.5),
        SamplingParams(temperature=2.0, min_p=0.2),
        SamplingParams(temperature=1.0, top_k=3),
    ]
    row_logits = random_logits(rng, steps)
    row_prompt = rng.random((steps, V)) < 0.2
    row_counts = rng.integers(0, 3, size=(steps, V))
    other_logits = random_logits(rng, steps * 5).reshape(steps, 5, V)
    fn = jax.jit(sample)

    def run(params, seeds, row, seed_for_mine):
        b = len(params)
        seeds = list(seeds)
        seeds[row] = seed_for_mine
        st = make_sampling_tensors(params, seeds, b, V)
        out = []
        for s in range(steps):
            lg = other_logits[s, :b].copy()
            lg[row] = row_logits[s]
            pm = np.zeros((b, V), bool)
            pm[row] = row_prompt[s]
            oc = np.zeros((b, V), np.int32)
            oc[row] = row_counts[s]
            out.append(int(fn(lg, st, jnp.full((b,), s, jnp.int32), pm, oc)[row]))
        return out

    alone = run([mine], [0], 0, 4321)
    in_batch = run(others[:3] + [mine] + others[3:], [1, 2, 3, 0, 5], 3, 4321)
    assert alone == in_batch
    assert len(set(alone)) > 1  # the step changes the draw
    assert run([mine], [0], 0, 4322) != alone  # the seed changes the draws


def test_temperature_zero_is_argmax_of_penalised_logits():
    rng = np.random.default_rng(3)
    b = 6
    logits = random_logits(rng, b)
    prompt_mask = rng.random((b, V)) < 0.3
    counts = rng.integers(0, 4, size=(b, V)) * (rng.random((b, V)) < 0.3)
    prompt_mask[0, np.argmax(logits[0])] = True
    params = [
        SamplingParams(temperature=0.0, top_k=2, repetition_penalty=1.8, presence_penalty=0.5),
        SamplingParams(temperature=1.0, top_p=0.3),
        SamplingParams(temperature=5e-6, frequency_penalty=1.5, min_p=0.9),
        SamplingParams(temperature=0.0),
    ]
    st = make_sampling_tensors(params, [5, 6, 7, 8], b, V)
    tokens = np.asarray(
        jax.jit(sample)(logits, st, jnp.arange(b, dtype=jnp.int32), prompt_mask, counts.astype(np.int32))
    )
    ref = np_penalties(
        logits,
        prompt_mask,
        counts,
        np.asarray(st.repetition_penalty, np.float64),
        np.asarray(st.presence_penalty, np.float64),
        np.asarray(st.frequency_penalty, np.float64),
    )
    for row in (0, 2, 3, 4, 5):  # rows 4, 5 are padding, hence greedy
        assert tokens[row] == np.argmax(ref[row]), row
    assert np.argmax(ref[0]) != np.argmax(logits[0])  # the penalty mattered


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(11)
    b, prompt_len, out_len = 4, 12, 9
    logits = random_logits(rng, b)
    prompt = rng.integers(0, V, size=(b, prompt_len))
    output = rng.integers(0, V, size=(b, out_len))
    prompt_mask = np.zeros((b, V), bool)
    counts = np.zeros((b, V), np.int32)
    for i in range(b):
        prompt_mask[i, prompt[i]] = True
        np.add.at(counts[i], output[i], 1)
    penalties = [1.3, 0.7, 2.0, 1.0]
    st = make_sampling_tensors([SamplingParams(repetition_penalty=p) for p in penalties], [0] * b, b, V)
    got = np.asarray(jax.jit(apply_penalties)(logits, prompt_mask, counts, st))
    for i, p in enumerate(penalties):
        ids = torch.tensor(np.concatenate([prompt[i], output[i]])[None])
        ref = RepetitionPenaltyLogitsProcessor(penalty=p)(ids, torch.tensor(logits[i : i + 1]))
        np.testing.assert_allclose(got[i], ref[0].numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(got[0], logits[0])


def test_presence_frequency_penalties_match_openai_formula():
    rng = np.random.default_rng(12)
    b = 5
    logits = random_logits(rng, b)
    prompt_mask = rng.random((b, V)) < 0.4  # must not affect presence / frequency
    counts = (rng.integers(0, 5, size=(b, V)) * (rng.random((b, V)) < 0.4)).astype(np.int32)
    presence = rng.uniform(-2, 2, size=b)
    frequency = rng.uniform(-2, 2, size=b)
    params = [
        SamplingParams(presence_penalty=float(p), frequency_penalty=float(f))
        for p, f in zip(presence, frequency)
    ]
    st = make_sampling_tensors(params, [0] * b, b, V)
    got = np.asarray(apply_penalties(logits, prompt_mask, counts, st))
    ref = logits - counts * frequency[:, None] - (counts > 0) * presence[:, None]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_all_penalties_together_match_numpy():
    rng = np.random.default_rng(13)
    b = 4
    logits = random_logits(rng, b)
    prompt_mask = rng.random((b, V)) < 0.3
    counts = (rng.integers(0, 4, size=(b, V)) * (rng.random((b, V)) < 0.3)).astype(np.int32)
    rep = rng.uniform(0.5, 2.0, size=b)
    presence = rng.uniform(-2, 2, size=b)
    frequency = rng.uniform(-2, 2, size=b)
    params = [
        SamplingParams(repetition_penalty=float(r), presence_penalty=float(p), frequency_penalty=float(f))
        for r, p, f in zip(rep, presence, frequency)
    ]
    st = make_sampling_tensors(params, [0] * b, b + 2, V)
    pad = lambda x: np.concatenate([x, x[:2]])  # noqa: E731
    got = np.asarray(apply_penalties(pad(logits), pad(prompt_mask), pad(counts), st))
    ref = np_penalties(logits, prompt_mask, counts, rep, presence, frequency)
    np.testing.assert_allclose(got[:b], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[b:], logits[:2])  # padding rows are neutral


# ---------------------------------------------------------------- logprobs


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("k", [0, 1, 5, V])
def test_token_logprobs_match_numpy(k):
    rng = np.random.default_rng(20 + k)
    b = 7
    logits = random_logits(rng, b, scale=3.0)
    logits[1, 4] = logits[1, 9]  # a tie: both share one rank
    tokens = rng.integers(0, V, size=b).astype(np.int32)
    tokens[1] = 9
    lp, rank, top_ids, top_lps = jax.jit(token_logprobs, static_argnums=2)(logits, tokens, k)
    ref = np_log_softmax(logits)
    chosen = ref[np.arange(b), tokens]
    np.testing.assert_allclose(np.asarray(lp), chosen, rtol=1e-5, atol=1e-5)
    ref_rank = 1 + (logits > logits[np.arange(b), tokens][:, None]).sum(-1)
    np.testing.assert_array_equal(np.asarray(rank), ref_rank)
    assert top_ids.shape == (b, k) and top_lps.shape == (b, k)
    assert lp.dtype == jnp.float32 and top_lps.dtype == jnp.float32
    ref_ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    if k:
        # the tied pair may come in either order; compare values everywhere and ids away from the tie
        np.testing.assert_allclose(np.asarray(top_lps), np.take_along_axis(ref, ref_ids, -1), atol=1e-5)
        rows = [r for r in range(b) if r != 1]
        np.testing.assert_array_equal(np.asarray(top_ids)[rows], ref_ids[rows])
        assert np.all(np.diff(np.asarray(top_lps), axis=-1) <= 0)


def test_token_logprobs_bfloat16_input_and_bad_k():
    rng = np.random.default_rng(30)
    logits = jnp.asarray(random_logits(rng, 3), jnp.bfloat16)
    lp, rank, _, top = token_logprobs(logits, jnp.array([0, 1, 2]), 3)
    assert lp.dtype == jnp.float32 and top.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(lp), np_log_softmax(np.asarray(logits, np.float32))[np.arange(3), [0, 1, 2]], atol=1e-5
    )
    for bad in (-1, V + 1, 2.0, True):
        with pytest.raises(ValueError, match=f"k must be .*got {bad!r}"):
            token_logprobs(logits, jnp.array([0, 1, 2]), bad)
    with pytest.raises(ValueError, match="tokens must have shape"):
        token_logprobs(logits, jnp.array([0, 1]), 2)


# ---------------------------------------------------------------- host-side tensors and validation


def test_make_sampling_tensors_values_and_padding():
    seeds = [0, 17, 2**32 - 1, 123456789]
    params = [
        SamplingParams(temperature=0.3, top_k=0, top_p=0.4, min_p=0.1),
        SamplingParams(top_k=-1, repetition_penalty=1.3, presence_penalty=-0.5, frequency_penalty=0.25),
        SamplingParams(top_k=7),
        SamplingParams(top_k=V + 100),
    ]
    st = make_sampling_tensors(params, seeds, 6, V)
    assert isinstance(st, SamplingTensors)
    assert all(isinstance(x, np.ndarray) for x in st)
    assert st.keys.dtype == np.uint32 and st.keys.shape == (6, 2)
    assert st.top_k.dtype == np.int32 and st.temperature.dtype == np.float32
    np.testing.assert_array_equal(st.top_k, [V, V, 7, V, V, V])
    np.testing.assert_allclose(st.temperature, [0.3, 1, 1, 1, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(st.top_p, [0.4, 1, 1, 1, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(st.min_p, [0.1, 0, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(st.repetition_penalty, [1, 1.3, 1, 1, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(st.presence_penalty, [0, -0.5, 0, 0, 0, 0])
    np.testing.assert_allclose(st.frequency_penalty, [0, 0.25, 0, 0, 0, 0])
    for i, s in enumerate(seeds):
        np.testing.assert_array_equal(st.keys[i], np.asarray(jax.random.PRNGKey(s)))
    np.testing.assert_array_equal(st.keys[4:], 0)
    # 64-bit seeds keep their high bits (jax's x64 PRNGKey layout)
    big = make_sampling_tensors([SamplingParams()], [(5 << 32) + 9], 1, V)
    np.testing.assert_array_equal(big.keys[0], [5, 9])
    neg = make_sampling_tensors([SamplingParams()], [-1], 1, V)
    np.testing.assert_array_equal(neg.keys[0], [2**32 - 1, 2**32 - 1])


def test_make_sampling_tensors_rejects_bad_input():
    p = SamplingParams()
    with pytest.raises(ValueError, match=r"len\(params\) must be at most batch_size=1, got 2"):
        make_sampling_tensors([p, p], [0, 1], 1, V)
    with pytest.raises(ValueError, match=r"len\(seeds\) must equal len\(params\)=2, got 1"):
        make_sampling_tensors([p, p], [0], 4, V)
    with pytest.raises(ValueError, match="vocab_size .*got 0"):
        make_sampling_tensors([p], [0], 4, 0)
    with pytest.raises(ValueError, match="batch_size .*got 0"):
        make_sampling_tensors([], [], 0, V)
    with pytest.raises(ValueError, match=r"seed must be .*got 1\.5"):
        make_sampling_tensors([p], [1.5], 2, V)
    with pytest.raises(ValueError, match=r"params\[0\] must be a SamplingParams, got dict"):
        make_sampling_tensors([{"temperature": 1.0}], [0], 2, V)
    with pytest.raises(ValueError, match=r"len\(step_offsets\) must equal len\(params\)=2, got 1"):
        make_sampling_tensors([p, p], [0, 1], 4, V, step_offsets=[3])


def test_step_offsets_shift_the_sampling_step():
    """A row sampled at step s with offset d draws what it draws at step s + d without one."""
    rng = np.random.default_rng(41)
    logits = random_logits(rng, 3)
    pm, oc = no_history(3)
    params = [SamplingParams(temperature=1.0)] * 3
    plain = make_sampling_tensors(params, [5, 6, 7], 3, V)
    shifted = make_sampling_tensors(params, [5, 6, 7], 3, V, step_offsets=[0, 4, 9])
    np.testing.assert_array_equal(plain.step_offset, 0)
    np.testing.assert_array_equal(shifted.step_offset, [0, 4, 9])
    draw = jax.jit(sample)  # one compilation for the 32 calls (eagerly, each call traces its conds anew)
    for step in range(6):
        got = draw(logits, shifted, jnp.full((3,), step, jnp.int32), pm, oc)
        want = draw(logits, plain, jnp.asarray([step, step + 4, step + 9], jnp.int32), pm, oc)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    draws = {int(draw(logits, plain, jnp.full((3,), t, jnp.int32), pm, oc)[1]) for t in range(20)}
    assert len(draws) > 1  # the step really changes the draw, so the comparison above can fail


def test_sample_rejects_mismatched_shapes():
    rng = np.random.default_rng(40)
    logits = random_logits(rng, 3)
    st = make_sampling_tensors([SamplingParams()], [0], 3, V)
    pm, oc = no_history(3)
    with pytest.raises(ValueError, match=r"step must have shape \(3,\), got shape \(2,\)"):
        sample(logits, st, jnp.zeros((2,), jnp.int32), pm, oc)
    with pytest.raises(ValueError, match=r"prompt_mask must have shape \(3, 50\)"):
        sample(logits, st, jnp.zeros((3,), jnp.int32), pm[:, :10], oc)
    st4 = make_sampling_tensors([SamplingParams()], [0], 4, V)
    msg = r"SamplingTensors.temperature must have shape \(3,\), got shape \(4,\)"
    with pytest.raises(ValueError, match=msg):
        sample(logits, st4, jnp.zeros((3,), jnp.int32), pm, oc)
    with pytest.raises(ValueError, match=r"logits must have shape \(B, V\)"):
        apply_penalties(logits[0], pm, oc, st)


def test_sampling_mode_is_the_cheapest_path_that_fits():
    from jaxllm.sampling import sampling_mode

    greedy, plain = SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, min_p=0.1)
    assert sampling_mode([greedy, greedy], V) == "greedy"
    assert sampling_mode([greedy], V, greedy=False) == "unsorted"
    assert sampling_mode([greedy, plain], V) == "unsorted"
    assert sampling_mode([plain, SamplingParams(temperature=0.7, top_k=V)], V) == "unsorted"  # top_k off
    assert sampling_mode([SamplingParams(temperature=0.0, top_p=0.5)], V) == "greedy"  # greedy ignores top-p
    assert sampling_mode([plain, SamplingParams(temperature=0.7, top_k=V - 1)], V) == "sorted"
    assert sampling_mode([greedy, SamplingParams(top_p=0.9)], V) == "sorted"
    with pytest.raises(ValueError, match="params\\[1\\] must be a SamplingParams, got dict"):
        sampling_mode([greedy, {}], V)


def test_host_chosen_modes_sample_what_the_device_choice_samples():
    """Every mode at least as wide as `sampling_mode`'s answer draws the tokens and gives the
    distribution that mode="auto" (lax.cond on the device) does; a narrower one does not."""
    from jaxllm.sampling import SAMPLING_MODES, sampling_mode, target_probs

    rng = np.random.default_rng(17)
    batches = [
        [SamplingParams(temperature=0.0)] * 3,
        [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, min_p=0.05), SamplingParams(temperature=2.0)],
        [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3), SamplingParams(temperature=0.9, top_p=0.8),
         SamplingParams(temperature=1.5, top_k=5, repetition_penalty=1.3)],
    ]
    fn = jax.jit(sample, static_argnames="mode")
    probs_fn = jax.jit(target_probs, static_argnames="mode")
    for params in batches:
        b = len(params)
        st = make_sampling_tensors(params, list(range(b)), b, V)
        needed = SAMPLING_MODES.index(sampling_mode(params, V))
        for step in range(8):
            logits = random_logits(rng, b)
            pm, oc = rng.random((b, V)) < 0.2, rng.integers(0, 3, (b, V)).astype(np.int32)
            steps = jnp.full((b,), step, jnp.int32)
            want = np.asarray(fn(logits, st, steps, pm, oc, mode="auto"))
            want_p = np.asarray(probs_fn(logits, st, mode="auto"))
            for mode in SAMPLING_MODES[needed:]:
                np.testing.assert_array_equal(fn(logits, st, steps, pm, oc, mode=mode), want, err_msg=mode)
                np.testing.assert_allclose(probs_fn(logits, st, mode=mode), want_p, atol=1e-6, err_msg=mode)
    # a narrower mode than the batch needs samples it wrongly (the choice matters)
    params = batches[2]
    st = make_sampling_tensors(params, [0, 1, 2, 3], 4, V)
    logits = random_logits(rng, 4)
    pm, oc = np.zeros((4, V), bool), np.zeros((4, V), np.int32)
    p_sorted = np.asarray(probs_fn(logits, st, mode="sorted"))
    assert not np.allclose(np.asarray(probs_fn(logits, st, mode="unsorted"))[2:], p_sorted[2:], atol=1e-3)
    assert np.count_nonzero(p_sorted[3]) <= 5
    draws = [fn(logits, st, jnp.full((4,), s, jnp.int32), pm, oc, mode="greedy")[1] for s in range(4)]
    assert len(set(int(d) for d in draws)) == 1  # greedy mode never draws the sampled row


def test_unknown_sampling_mode_is_refused():
    st = make_sampling_tensors([SamplingParams()], [0], 1, V)
    logits = np.zeros((1, V), np.float32) + np.arange(V)
    with pytest.raises(ValueError, match="sampling mode must be one of .*'greedy'.*got 'fast'"):
        sample(logits, st, jnp.zeros(1, jnp.int32), np.zeros((1, V), bool), np.zeros((1, V), np.int32), mode="fast")
