"""IncrementalDetokenizer: the streamed text grows into exactly what a whole decode gives."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxllm.default_model import default_model_dir
from jaxllm.detokenize import IncrementalDetokenizer, decode
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

TEXT = "naïve café — 東京タワー 🙂🙂 def f(x):\n    return x ** 2  # ünïcödé\n"


@pytest.fixture(scope="module", params=["demo", "byte-level"])
def tokenizer(request, tmp_path_factory):
    if request.param == "demo":
        return AutoTokenizer.from_pretrained(default_model_dir())
    return AutoTokenizer.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("detok"), seed=3))


@pytest.mark.parametrize("chunks", [1, 3])
def test_incremental_text_is_the_whole_decode(tokenizer, chunks):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > 20
    detok = IncrementalDetokenizer(tokenizer)
    held_back = 0
    for n in list(range(chunks, len(ids), chunks)) + [len(ids)]:
        text, whole = detok.update(ids[:n]), decode(tokenizer, ids[:n])
        assert whole.startswith(text), n
        if not whole.endswith("\ufffd"):
            assert text == whole, n
        held_back += text != whole
    assert detok.text == decode(tokenizer, ids) == TEXT
    if chunks == 1 and len(ids) > len(TEXT.encode()) // 2:  # byte-level: a character can span tokens
        assert held_back > 0  # the test saw a held-back character


def test_random_tokens_and_special_tokens(tokenizer):
    rng = np.random.default_rng(0)
    special = tokenizer.eos_token_id
    ids = rng.integers(0, min(tokenizer.vocab_size, 4000), 200).tolist()
    ids[50:50] = [special]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
        for n in range(1, len(ids) + 1):
            text, whole = detok.update(ids[:n]), decode(tokenizer, ids[:n], skip)
            assert whole.startswith(text), (skip, n)
        assert decode(tokenizer, ids, skip).startswith(detok.text)
        assert (tokenizer.eos_token in detok.text) == (not skip)


def test_without_a_tokenizer_the_text_is_empty():
    detok = IncrementalDetokenizer(None)
    assert detok.update([1, 2, 3]) == ""
