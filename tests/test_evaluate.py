"""Perplexity (jaxllm.evaluate) against LLM.generate's prompt logprobs and against transformers."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from jaxllm import LLM, SamplingParams, evaluate
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

WINDOW = 24  # not a power of two: the row length bucket is capped at the window
WORDS = "the model reads a prompt and writes tokens def return class value index print even odd".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ppl") / "tiny", "LlamaForCausalLM", seed=5)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, progress=False)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def random_text(rng, num_words):
    words = rng.choice(WORDS, num_words)
    marks = rng.choice(["", "", ",", ".", "\n"], num_words)
    return " ".join(w + m for w, m in zip(words, marks))


def random_ids(rng, lengths, vocab):
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def hf_token_nll(model, ids):
    """-log p(ids[t] | ids[:t]) for t >= 1, from one transformers forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def hf_guide_nll(model, ids, window, stride):
    """The Hugging Face perplexity guide's sliding-window loop: (summed NLL, tokens scored)."""
    seq = torch.tensor([ids])
    length = seq.shape[1]
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        trg_len = end - prev_end  # may be larger than stride on the last window
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        # The model shifts labels left, so a label on the window's first token is never scored:
        # the loss averages over the labels that remain.
        scored = int((target_ids[:, 1:] != -100).sum())
        nll += float(loss) * scored
        count += scored
        prev_end = end
        if end == length:
            break
    return nll, count


def test_unwindowed_nll_matches_prompt_logprobs_and_transformers(llm, hf_model):
    text = random_text(np.random.default_rng(1), 60)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    assert WINDOW < len(ids) < llm.max_model_len

    result = evaluate.perplexity(llm, [text], return_token_nll=True)

    out = llm.generate([text], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids
    from_generate = np.array([-step[t].logprob for t, step in zip(ids[1:], out.prompt_logprobs[1:])])
    from_hf = hf_token_nll(hf_model, ids)
    assert result.num_tokens == len(ids) - 1 == len(result.token_nll[0])
    np.testing.assert_allclose(result.token_nll[0], from_generate, atol=1e-4)
    np.testing.assert_allclose(result.token_nll[0], from_hf, atol=1e-4)
    assert result.nll == pytest.approx(from_generate.sum(), abs=1e-4)
    assert result.nll == pytest.approx(from_hf.sum(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(from_hf.mean()), rel=1e-5)  # float32 rounding
    assert result.per_text == (pytest.approx(result.perplexity, rel=1e-12),)


@pytest.mark.parametrize("stride", [WINDOW // 2, 5, WINDOW - 1])
def test_sliding_window_matches_hf_guide(llm, hf_model, stride):
    lengths = [131, 42, WINDOW + 1, WINDOW, 9]  # 131 - WINDOW is a multiple of none of the strides
    texts = random_ids(np.random.default_rng(stride), lengths, llm.config.vocab_size)
    result = evaluate.perplexity(llm, texts, window=WINDOW, stride=stride, return_token_nll=True)

    nlls = []
    for ids, ppl, token_nll in zip(texts, result.per_text, result.token_nll):
        want, count = hf_guide_nll(hf_model, ids, WINDOW, stride)
        assert count == len(ids) - 1 == len(token_nll)
        assert token_nll.sum() == pytest.approx(want, rel=1e-5)
        assert ppl == pytest.approx(math.exp(want / count), rel=1e-4)
        nlls.append(want)
    assert result.num_tokens == sum(lengths) - len(lengths)
    assert result.nll == pytest.approx(sum(nlls), rel=1e-5)


def test_sliding_differs_from_full_context_only_past_the_first_window(llm):
    ids = random_ids(np.random.default_rng(2), [80], llm.config.vocab_size)[0]
    full = evaluate.token_nll(llm, ids)
    slid = evaluate.token_nll(llm, ids, window=WINDOW, stride=7)
    np.testing.assert_allclose(slid[:WINDOW - 1], full[:WINDOW - 1], atol=1e-4)
    assert not np.allclose(slid[WINDOW:], full[WINDOW:], atol=1e-3)


def test_stride_equal_to_window_scores_every_token_once(llm):
    texts = random_ids(np.random.default_rng(3), [70, 30], llm.config.vocab_size)
    same = evaluate.perplexity(llm, texts, window=WINDOW, stride=WINDOW)
    assert same.num_tokens == 70 - 1 + 30 - 1
    assert same.nll == pytest.approx(evaluate.perplexity(llm, texts, window=WINDOW, stride=WINDOW - 1).nll,
                                     rel=1e-6)


@settings(max_examples=200, deadline=None)
@given(num_tokens=st.integers(1, 300), window=st.integers(2, 64), data=st.data())
def test_windows_score_each_token_once_with_context(num_tokens, window, data):
    stride = data.draw(st.integers(1, window))
    spans = evaluate.windows(num_tokens, window, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, num_tokens))
    for k, (begin, end, first) in enumerate(spans):
        assert begin < first < end <= num_tokens and end - begin <= window
        assert begin == k * min(stride, window - 1)
        if end < num_tokens:
            assert end - begin == window


def test_batch_size_does_not_change_the_result(llm):
    texts = random_ids(np.random.default_rng(4), [90, 33, 50], llm.config.vocab_size)
    results = [evaluate.perplexity(llm, texts, window=WINDOW, stride=9, batch_size=b, return_token_nll=True)
               for b in (1, 3, 8)]
    for other in results[1:]:
        assert other.num_tokens == results[0].num_tokens
        for a, b in zip(results[0].token_nll, other.token_nll):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert other.nll == pytest.approx(results[0].nll, rel=1e-6)


def test_per_text_total_and_token_nll_agree(llm):
    rng = np.random.default_rng(5)
    texts = [random_text(rng, n) for n in (30, 7, 45)]
    result = evaluate.perplexity(llm, texts, window=WINDOW, stride=10, return_token_nll=True)
    counts = [len(llm.tokenizer.encode(t, add_special_tokens=False)) - 1 for t in texts]
    assert result.num_tokens == sum(counts)
    pooled = sum(n * math.log(p) for n, p in zip(counts, result.per_text)) / sum(counts)
    assert result.perplexity == pytest.approx(math.exp(pooled), rel=1e-9)
    assert result.perplexity == pytest.approx(math.exp(result.nll / result.num_tokens), rel=1e-12)
    assert result.seconds > 0 and result.tokens_per_s == pytest.approx(result.num_tokens / result.seconds)
    assert len(set(result.per_text)) == 3
    for text, nll in zip(texts, result.token_nll):
        np.testing.assert_allclose(evaluate.token_nll(llm, text, window=WINDOW, stride=10), nll, rtol=1e-5)
    ids = [llm.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    as_ids = evaluate.perplexity(llm, ids, window=WINDOW, stride=10)
    assert as_ids.nll == result.nll and as_ids.per_text == result.per_text
    assert evaluate.perplexity(llm, texts, window=WINDOW, stride=10, return_token_nll=False).token_nll is None


def test_add_bos_puts_bos_first_as_context(llm):
    ids = random_ids(np.random.default_rng(6), [40], llm.config.vocab_size)[0]
    bos = llm.tokenizer.bos_token_id
    with_bos = evaluate.perplexity(llm, [ids], window=WINDOW, add_bos=True)
    assert with_bos.num_tokens == len(ids)
    assert with_bos.nll == evaluate.perplexity(llm, [[bos] + ids], window=WINDOW).nll
    assert with_bos.nll != pytest.approx(evaluate.perplexity(llm, [ids], window=WINDOW).nll, rel=1e-3)


@pytest.mark.parametrize("texts, kwargs, message", [
    ([], {}, "texts is empty"),
    (["the model", ""], {}, "text 1 is empty"),
    (["the model", "a"], {}, "text 1 has 1 token; perplexity needs at least 2"),
    ([[7, 8], [9]], {}, "text 1 has 1 token; perplexity needs at least 2"),
    ([[7, 8, -1]], {}, "-1 outside the vocabulary"),
    ([[7, 8, "VOCAB"]], {}, "VOCAB outside the vocabulary"),
    ([[7, 8, 1.5]], {}, "1.5 outside the vocabulary"),
    (["the model"], {"window": 1}, "window must be an integer in [2, 512]"),
    (["the model"], {"window": 513}, "got 513"),
    (["the model"], {"window": 16, "stride": 0}, "stride must be an integer in [1, 16]"),
    (["the model"], {"window": 16, "stride": 17}, "got 17"),
    (["the model"], {"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ([3.5], {}, "text 0 has type float"),
])
def test_bad_input_raises_value_error_naming_it(llm, texts, kwargs, message):
    vocab = llm.config.vocab_size
    texts = [[vocab if t == "VOCAB" else t for t in x] if isinstance(x, list) else x for x in texts]
    message = message.replace("VOCAB", str(vocab))
    with pytest.raises(ValueError) as info:
        evaluate.perplexity(llm, texts, **kwargs)
    assert message in str(info.value)


def test_text_without_tokenizer_raises(llm):
    bare = LLM.from_params(llm.config, llm.params, llm.mesh)
    with pytest.raises(ValueError, match="text 0 is a string but the LLM has no tokenizer"):
        evaluate.perplexity(bare, ["the model"])
    ids = random_ids(np.random.default_rng(7), [20], llm.config.vocab_size)
    assert evaluate.perplexity(bare, ids).nll == evaluate.perplexity(llm, ids).nll
