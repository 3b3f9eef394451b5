"""The persistent compilation cache: on by default, respects the user's setting, can be turned off."""

import os
import subprocess
import sys

import jax

from jaxllm import compile_cache

SCRIPT = """
import time, jax
t = time.perf_counter()
from jaxllm import LLM, SamplingParams
llm = LLM("{model}", dtype="float32", max_model_len=64, skip_tokenizer_init=True, progress=False)
out = llm.generate([{{"prompt_token_ids": [1, 2, 3]}}], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
print(jax.config.jax_compilation_cache_dir, out[0].outputs[0].token_ids, time.perf_counter() - t)
"""


def test_second_process_reads_the_cache(tmp_path):
    from jaxllm.tiny_checkpoint import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "m", "LlamaForCausalLM", seed=2)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
           "JAXLLM_COMPILATION_CACHE": "1", "XLA_FLAGS": ""}  # on the CPU only when asked
    runs = [subprocess.run([sys.executable, "-c", SCRIPT.format(model=model)], capture_output=True, text=True,
                           env=env, timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    (dir1, *_), (dir2, *_) = (r.stdout.split() for r in runs)
    cache = tmp_path / "cache" / "jaxllm" / "xla"
    assert dir1 == dir2 == str(cache)
    assert len(list(cache.iterdir())) >= 2  # prefill and decode executables were written
    assert runs[0].stdout.split()[1:-1] == runs[1].stdout.split()[1:-1]  # same tokens from cached code


def test_user_setting_wins_and_off_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLLM_COMPILATION_CACHE", "0")
    assert compile_cache.enable_compilation_cache(tmp_path / "a") is None
    monkeypatch.delenv("JAXLLM_COMPILATION_CACHE")
    assert jax.default_backend() == "cpu"
    assert compile_cache.enable_compilation_cache(tmp_path / "a") is None  # off on the CPU by default
    assert not (tmp_path / "a").exists()
    monkeypatch.setenv("JAXLLM_COMPILATION_CACHE", "1")
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
        assert compile_cache.enable_compilation_cache(tmp_path / "b") == tmp_path / "mine"
        assert not (tmp_path / "b").exists()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
