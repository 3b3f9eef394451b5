"""scripts/train_demo_model.py at a tiny size: reproducible, learning, and loadable by jaxllm."""

import importlib.util
import json
from pathlib import Path

import pytest

from jaxllm import LLM, SamplingParams

# In a child process: the jax 0.10.2 CPU compiler crashed (SIGSEGV) in the full suite's process as
# its compiled-program count grew, here; see conftest.py.
pytestmark = pytest.mark.isolated_module(seconds=40)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_model.py"
TINY = ["--max-files", "40", "--steps", "30", "--steps-per-call", "10", "--warmup", "5", "--batch", "4",
        "--seq-len", "64", "--vocab-size", "600", "--d-model", "32", "--layers", "2", "--heads", "4",
        "--kv-heads", "2", "--ffn", "64", "--eval-windows", "8", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_is_by_file_and_fixed(train):
    assert train.is_heldout("json/decoder.py", 5) == train.is_heldout("json/decoder.py", 5)
    picks = [train.is_heldout(f"pkg/module_{i}.py", 5) for i in range(2000)]
    assert 0.03 < sum(picks) / len(picks) < 0.07


def test_same_seed_same_curve_and_model_loads(train, tmp_path):
    a = train.main(TINY + ["--out", str(tmp_path / "a"), "--seed", "3"])
    b = train.main(TINY + ["--out", str(tmp_path / "b"), "--seed", "3"])
    c = train.main(TINY + ["--out", str(tmp_path / "c"), "--seed", "4"])
    losses = lambda s: [row["train_loss"] for row in s["curve"]]
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)
    assert losses(a)[-1] < losses(a)[0] - 0.3  # it learns
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"]
    saved = json.loads((tmp_path / "a" / "training.json").read_text())
    assert saved["heldout_files"] and saved["curve"] == a["curve"]
    llm = LLM(tmp_path / "a", progress=False)
    assert llm.config.dtype == "bfloat16" and llm.config.tie_word_embeddings
    out = llm.generate("import os\n", SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= 1
