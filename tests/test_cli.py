"""The `jaxllm` command line against LLM.generate on a tiny random checkpoint."""

import json
import os
import subprocess
import sys

import pytest

from jaxllm import LLM, SamplingParams
from jaxllm import cli, evaluate
from jaxllm.default_model import bundled_model_dir
from jaxllm.outputs import CompletionOutput, RequestOutput
from jaxllm.tiny_checkpoint import write_tiny_checkpoint

PROMPTS = ["def fibonacci(n):", "The quick brown fox"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", "LlamaForCausalLM", seed=11)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, progress=False)


@pytest.fixture(scope="module")
def greedy(llm):
    """LLM.generate's greedy outputs (with top-2 logprobs) for PROMPTS."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=2)
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert all(len(o.token_ids) == MAX_TOKENS and o.text for o in outs), "pick prompts that run to length"
    assert outs[0].text != outs[1].text
    return outs


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_prompt_then_llm_completion(capsys, model_dir, greedy):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPTS[0],
                         "--prompt", PROMPTS[1], "--max-tokens", MAX_TOKENS, "--temperature", 0)
    assert code == 0, err
    first = out.index(PROMPTS[0] + greedy[0].text)
    second = out.index(PROMPTS[1] + greedy[1].text)
    assert first < second
    assert "Traceback" not in err


def test_speculative_config_flag_keeps_greedy_output(capsys, model_dir, greedy):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPTS[0], "--max-tokens",
                         MAX_TOKENS, "--temperature", 0, "--json", "--speculative-config",
                         '{"method": "ngram", "num_speculative_tokens": 3}')
    assert code == 0, err
    record = json.loads(out)
    assert record["token_ids"] == greedy[0].token_ids
    assert record["spec_decode"]["num_steps"] >= 1
    assert len(record["spec_decode"]["acceptance_rate_per_position"]) == 3
    code, _, err = run(capsys, "generate", "--model", model_dir, "--prompt", "x", "--speculative-config", "[1]")
    assert code == 2 and "must be a JSON object" in err
    code, _, err = run(capsys, "generate", "--model", model_dir, "--prompt", "x", "--speculative-config",
                       '{"method": "lookahead"}')
    assert code == 2 and "'lookahead' not supported" in err


def test_json_mode_matches_llm(capsys, model_dir, greedy):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPTS[0],
                         "--prompt", PROMPTS[1], "--max-tokens", MAX_TOKENS, "--temperature", 0,
                         "--logprobs", 2, "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    for r, want in zip(records, greedy):
        assert len(r["token_ids"]) == MAX_TOKENS
        assert r["token_ids"] == want.token_ids
        assert r["text"] == want.text
        assert r["finish_reason"] == want.finish_reason == "length"
        assert len(r["logprobs"]) == MAX_TOKENS
        for step, token, want_step in zip(r["logprobs"], r["token_ids"], want.logprobs):
            assert [e["rank"] for e in step] == sorted(e["rank"] for e in step)
            assert {e["token_id"]: e["logprob"] for e in step} == pytest.approx(
                {t: lp.logprob for t, lp in want_step.items()})
            assert token in {e["token_id"] for e in step}
        assert r["cumulative_logprob"] == pytest.approx(want.cumulative_logprob)


def test_stop_string_ends_generation(capsys, model_dir, llm, greedy):
    text = greedy[0].text
    stop = next(ch for ch in text[1:] if ch.isprintable() and ch != "\ufffd" and not ch.isspace())
    want = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=[stop]),
                        use_tqdm=False)[0].outputs[0]
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPTS[0],
                         "--max-tokens", MAX_TOKENS, "--temperature", 0, "--stop", stop, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["finish_reason"] == "stop" and record["stop_reason"] == stop
    assert record["text"] == want.text == text[:text.index(stop)]


def test_chat_matches_llm_chat(capsys, model_dir, llm):
    message = "Write a haiku."
    want = llm.chat([{"role": "user", "content": message}], SamplingParams(max_tokens=4, temperature=0.0),
                    use_tqdm=False)[0].outputs[0]
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", message, "--chat",
                         "--max-tokens", 4, "--temperature", 0, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["token_ids"] == want.token_ids and record["text"] == want.text


def test_options_reach_llm_and_sampling_params(capsys, monkeypatch, tmp_path):
    calls = {}

    class FakeLLM:
        def __init__(self, model, **kwargs):
            calls["init"] = (model, kwargs)

        def get_default_sampling_params(self):
            return SamplingParams(top_p=0.5, repetition_penalty=1.1)

        def generate(self, prompts, params, use_tqdm):
            calls["generate"] = (prompts, params)
            return [RequestOutput(str(i), p, [1], None, [CompletionOutput(0, f"<{i}>", [5], None, None, "length")])
                    for i, p in enumerate(prompts)]

    monkeypatch.setattr(cli, "LLM", FakeLLM)
    code, out, err = run(capsys, "generate", "--model", tmp_path, "--prompt", "a", "--prompt", "b",
                         "--max-tokens", 7, "--temperature", 0.7, "--top-p", 0.8, "--top-k", 9, "--min-p", 0.05,
                         "--seed", 42, "--stop", "x", "yz", "--dtype", "bfloat16", "--max-model-len", 128,
                         "--tensor-parallel-size", 2, "--logprobs", 3, "--allow-pickle", "--quantization", "int8",
                         "--attention-backend", "xla")
    assert code == 0, err
    assert calls["init"] == (str(tmp_path), dict(dtype="bfloat16", max_model_len=128, tensor_parallel_size=2,
                                                 seed=42, progress=False, allow_pickle=True, quantization="int8",
                                                 attention_backend="xla"))
    # flags win over the model's defaults; the defaults fill in the rest (repetition_penalty)
    assert calls["generate"] == (["a", "b"], SamplingParams(max_tokens=7, temperature=0.7, top_p=0.8, top_k=9,
                                                            min_p=0.05, stop=["x", "yz"], logprobs=3,
                                                            repetition_penalty=1.1))
    assert out == "a<0>\n\nb<1>\n"


def test_default_model_is_the_bundled_one_and_announced_once(capsys):
    code, out, err = run(capsys, "generate", "--prompt", PROMPTS[0], "--max-tokens", 3, "--temperature", 0,
                         "--json")
    assert code == 0, err
    path = bundled_model_dir()
    notes = [line for line in err.splitlines() if "no --model given" in line]
    assert len(notes) == 1 and notes[0].startswith("jaxllm: no --model given") and str(path) in notes[0]
    want = LLM(path, progress=False).generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0.0),
                                              use_tqdm=False)[0].outputs[0]
    assert json.loads(out)["token_ids"] == want.token_ids


@pytest.mark.parametrize("args, named", [
    (["--max-tokens", "-3"], "-3"),
    (["--max-tokens", "abc"], "abc"),
    (["--top-p", "1.5"], "1.5"),
    (["--temperature", "-0.5"], "-0.5"),
    (["--min-p", "2"], "2"),
    (["--logprobs", "99"], "99"),
    (["--seed", "-1"], "-1"),
    (["--dtype", "int3"], "int3"),
    (["--max-model-len", "100000"], "100000"),
    (["--tensor-parallel-size", "0"], "tensor_parallel_size"),
    (["--stop"], "--stop"),
])
def test_bad_input_exits_2_naming_the_value(capsys, model_dir, args, named):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", "hi", *args)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxllm: error: ") and named in lines[0], err


def test_missing_model_and_prompt_exit_2(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    code, _, err = run(capsys, "generate", "--model", missing, "--prompt", "hi")
    assert code == 2 and err.startswith("jaxllm: error: ") and str(missing) in err
    code, _, err = run(capsys, "generate", "--model", missing)
    assert code == 2 and "--prompt" in err and len(err.splitlines()) == 1


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"jaxllm {__import__('jaxllm').__version__}"


def test_tiny_checkpoint_command_matches_library(capsys, tmp_path):
    code, out, err = run(capsys, "tiny-checkpoint", tmp_path / "cli", "--architecture", "Qwen3ForCausalLM",
                         "--dtype", "bfloat16", "--seed", 5)
    assert code == 0, err
    assert out.strip() == str(tmp_path / "cli")
    write_tiny_checkpoint(tmp_path / "lib", "Qwen3ForCausalLM", dtype="bfloat16", seed=5)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes()
    code, _, err = run(capsys, "tiny-checkpoint", tmp_path / "bad", "--architecture", "GPT2LMHeadModel")
    assert code == 2 and "GPT2LMHeadModel" in err


def _write_texts(directory, seed):
    """Two files of random words (UTF-8, one with non-ASCII text), longer than a 24-token window."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog naïve café déjà vu".split()
    paths = []
    for i, n in enumerate((40, 25)):
        path = directory / f"text{i}.txt"
        path.write_text(" ".join(rng.choice(words, n)) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def test_perplexity_matches_evaluate(capsys, model_dir, llm, tmp_path):
    paths = _write_texts(tmp_path, 3)
    texts = [p.read_text(encoding="utf-8") for p in paths]
    want = evaluate.perplexity(llm, texts, window=24, stride=10)
    counts = [len(llm.tokenizer.encode(t, add_special_tokens=False)) - 1 for t in texts]
    assert min(counts) > 24

    code, out, err = run(capsys, "perplexity", "--model", model_dir, *paths, "--window", 24, "--stride", 10,
                         "--json")
    assert code == 0, err
    record = json.loads(out)
    assert [f["file"] for f in record["files"]] == [str(p) for p in paths]
    assert [f["tokens"] for f in record["files"]] == counts
    assert [f["perplexity"] for f in record["files"]] == pytest.approx(want.per_text, rel=1e-6)
    assert record["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    assert record["nll"] == pytest.approx(want.nll, rel=1e-6)
    assert record["tokens"] == want.num_tokens == sum(counts)
    assert record["tokens_per_s"] == pytest.approx(record["tokens"] / record["seconds"])

    code, out, err = run(capsys, "perplexity", "--model", model_dir, *paths, "--window", 24, "--stride", 10)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    for line, path, ppl, n in zip(lines, paths, want.per_text, counts):
        assert line.startswith(f"{path}: ") and line.endswith(f"({n} tokens)")
        assert float(line.split("perplexity ")[1].split()[0]) == pytest.approx(ppl, abs=1e-4, rel=1e-6)
    total = lines[-1]
    assert total.startswith("total: ") and f"{want.num_tokens} tokens" in total and "tokens/s" in total
    assert float(total.split("perplexity ")[1].split(",")[0]) == pytest.approx(want.perplexity, rel=1e-6)


def test_perplexity_default_model(capsys, tmp_path):
    paths = _write_texts(tmp_path, 4)
    code, out, err = run(capsys, "perplexity", *paths, "--json")
    assert code == 0, err
    path = bundled_model_dir()
    assert [line for line in err.splitlines() if "no --model given" in line and str(path) in line]
    want = evaluate.perplexity(LLM(path, progress=False), [p.read_text(encoding="utf-8") for p in paths])
    assert json.loads(out)["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "cannot read"),
    ("empty.txt", b"", "is empty"),
    ("latin1.txt", "café au lait".encode("latin-1"), "is not UTF-8"),
    ("one.txt", b"a", "has 1 token; perplexity needs at least 2"),
])
def test_perplexity_bad_file_exits_2_naming_it(capsys, model_dir, tmp_path, name, content, message):
    good = _write_texts(tmp_path, 5)[0]
    bad = tmp_path / name
    if content is not None:
        bad.write_bytes(content)
    code, out, err = run(capsys, "perplexity", "--model", model_dir, good, bad)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxllm: error: ") and str(bad) in lines[0], err
    assert message in lines[0] and str(good) not in lines[0]


@pytest.mark.parametrize("args, named", [
    (["--window", "1"], "window"),
    (["--window", "600"], "600"),
    (["--window", "16", "--stride", "17"], "17"),
    (["--batch-size", "0"], "batch_size"),
    (["--window", "x"], "x"),
])
def test_perplexity_bad_option_exits_2(capsys, model_dir, tmp_path, args, named):
    code, out, err = run(capsys, "perplexity", "--model", model_dir, _write_texts(tmp_path, 6)[0], *args)
    assert code == 2 and out == ""
    assert err.startswith("jaxllm: error: ") and named in err and len(err.splitlines()) == 1, err


def _python_m(*args, env_extra=None):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "jaxllm", *map(str, args)], capture_output=True, env=env,
                          timeout=300)


def test_python_m_jaxllm_subprocess(model_dir, greedy, tmp_path):
    proc = _python_m("generate", "--model", model_dir, "--prompt", PROMPTS[1], "--max-tokens", MAX_TOKENS,
                     "--temperature", 0)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert PROMPTS[1] + greedy[1].text in proc.stdout.decode("utf-8")
    assert "Traceback" not in err

    proc = _python_m("generate", "--model", model_dir, "--prompt", "hi", "--top-p", "1.5")
    assert proc.returncode == 2
    err = proc.stderr.decode().strip()
    assert err.startswith("jaxllm: error: ") and "top_p" in err and "1.5" in err and "\n" not in err
