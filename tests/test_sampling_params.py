"""Tests for SamplingParams validation and normalisation."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 16, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.logprobs is None and p.prompt_logprobs is None
    assert p.stop == () and p.stop_token_ids == ()
    assert (p.ignore_eos, p.include_stop_str_in_output, p.skip_special_tokens) == (False, False, True)
    assert not p.greedy


BAD_VALUES = [
    ("n", 0),
    ("n", -3),
    ("n", 1.5),
    ("n", True),
    ("max_tokens", 0),
    ("max_tokens", -7),
    ("max_tokens", 2.0),
    ("max_tokens", False),
    ("temperature", -0.1),
    ("temperature", math.inf),
    ("temperature", math.nan),
    ("temperature", True),
    ("temperature", "1.0"),
    ("top_p", 0.0),
    ("top_p", 1.0001),
    ("top_p", -0.5),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 3.0),
    ("top_k", True),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.2),
    ("repetition_penalty", math.inf),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -9.0),
    ("seed", 1.5),
    ("seed", True),
    ("seed", "7"),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", True),
    ("logprobs", 2.0),
    ("prompt_logprobs", -2),
    ("prompt_logprobs", 100),
    ("ignore_eos", 1),
    ("include_stop_str_in_output", "yes"),
    ("skip_special_tokens", None),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_value_raises_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    msg = str(err.value)
    assert field in msg and repr(value) in msg, msg


def test_max_tokens_message_is_exact():
    with pytest.raises(ValueError, match=r"^max_tokens must be at least 1, got 0$"):
        SamplingParams(max_tokens=0)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("stop", "", "''"),
        ("stop", ["ok", ""], "''"),
        ("stop", ["ok", 3], "3"),
        ("stop", 5, "5"),
        ("stop_token_ids", [1, -4], "-4"),
        ("stop_token_ids", [1, 2.0], "2.0"),
        ("stop_token_ids", [True], "True"),
        ("stop_token_ids", "12", "'12'"),
        ("stop_token_ids", 7, "7"),
    ],
)
def test_bad_stop_values(field, value, fragment):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and fragment in str(err.value)


def test_stop_normalisation():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=("x",)).stop == ("x",)
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop_token_ids=[3, 9]).stop_token_ids == (3, 9)
    ids = SamplingParams(stop_token_ids=[np.int64(4), 5]).stop_token_ids
    assert ids == (4, 5) and all(type(t) is int for t in ids)
    p = SamplingParams(stop=["a"])
    assert hash(p) == hash(SamplingParams(stop=("a",)))  # tuples keep the dataclass hashable


def test_numeric_normalisation_and_frozen():
    p = SamplingParams(temperature=1, top_p=np.float32(0.5), top_k=np.int64(7), seed=np.int32(3))
    assert type(p.temperature) is float and type(p.top_p) is float
    assert type(p.top_k) is int and p.top_k == 7 and type(p.seed) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("temperature", "greedy"), [(0.0, True), (9.9e-6, True), (1e-5, False), (0.7, False)]
)
def test_greedy_property(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


def test_edges_accepted():
    SamplingParams(top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0)
    SamplingParams(top_k=0, min_p=0.0, logprobs=0, prompt_logprobs=MAX_LOGPROBS, seed=-(2**63))
    SamplingParams(seed=2**64 - 1, repetition_penalty=1e-3, temperature=0.0)


def test_validate_against_vocab():
    p = SamplingParams(stop_token_ids=[3, 49], top_k=1000, logprobs=5)
    p.validate_against_vocab(50)  # top_k > vocab is clamped later, not an error
    with pytest.raises(ValueError, match=r"stop_token_ids must be < vocab_size=49, got \[49\]"):
        p.validate_against_vocab(49)
    with pytest.raises(ValueError, match=r"logprobs must be at most vocab_size=4, got 5"):
        SamplingParams(logprobs=5).validate_against_vocab(4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"vocab_size must be .*got {bad!r}"):
            p.validate_against_vocab(bad)


@settings(max_examples=200, deadline=None)
@given(
    temperature=st.floats(0, 100),
    top_p=st.floats(0, 1, exclude_min=True),
    top_k=st.integers(-1, 10**6),
    min_p=st.floats(0, 1),
    rep=st.floats(1e-6, 100),
    presence=st.floats(-2, 2),
    frequency=st.floats(-2, 2),
)
def test_valid_values_roundtrip(temperature, top_p, top_k, min_p, rep, presence, frequency):
    p = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=rep,
        presence_penalty=presence,
        frequency_penalty=frequency,
    )
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (temperature, top_p, top_k, min_p)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (rep, presence, frequency)
    assert p.greedy == (temperature < 1e-5)
