"""Executes every notebooks/*.ipynb in a fresh kernel and checks what its cells printed.

The kernel is this interpreter's (kernel "python3" resolves to the ipykernel of the running venv) and
imports jaxllm from this checkout. JAXLLM_SAVE_NOTEBOOKS=1 writes the executed notebooks back, to
refresh their committed outputs.
"""

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120
MAX_NOTEBOOK_BYTES = 300_000
MAX_IMAGE_BYTES = 150_000  # base64 text of one PNG output


def kernel_env() -> dict[str, str]:
    """This process's environment, with the checkout importable and without conftest's fake devices
    or its unoptimised, fast-compiling XLA: the notebook runs as a user runs it (and its perplexity
    arithmetic runs faster optimised)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+|--xla_backend_optimization_level=0|"
                   r"--xla_cpu_use_fusion_emitters=false", "", env.get("XLA_FLAGS", ""))
    flags = " ".join(flags.split())
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def run_notebook(path: Path) -> tuple[nbformat.NotebookNode, str]:
    """The notebook executed top to bottom in its own folder, and the kernel's sys.prefix."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=kernel_env())  # raises CellExecutionError at a cell's error
    probe = nb.cells.pop()
    if os.environ.get("JAXLLM_SAVE_NOTEBOOKS") == "1":
        nbformat.write(nb, path)
    return nb, stream_text(probe).strip()


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def printed(nb, marker: str) -> str:
    """The stdout of the one code cell whose output contains `marker`."""
    texts = [stream_text(c) for c in nb.cells if c.cell_type == "code" and marker in stream_text(c)]
    assert len(texts) == 1, f"{len(texts)} cells printed {marker!r}"
    return texts[0]


def number(text: str, label: str) -> float:
    match = re.search(re.escape(label) + r"\s*([\d,]+(?:\.\d+)?)", text)
    assert match, f"no {label!r} in {text!r}"
    return float(match.group(1).replace(",", ""))


def check_quickstart(nb) -> None:
    training = json.loads((ROOT / "jaxllm" / "demo_model" / "training.json").read_text())
    config = printed(nb, "parameters")
    vocab = number(config, "vocabulary")
    assert number(config, "parameters") == training["parameters"]
    assert number(config, "layers") == training["args"]["layers"]

    seeds = printed(nb, "same seed, same tokens:")
    assert "same seed, same tokens: True" in seeds
    assert "other seed, same tokens: False" in seeds

    stream = printed(nb, "finished:")
    counts = [int(n) for n in re.findall(r"^\s*(\d+) tokens  \+", stream, re.M)]
    assert len(counts) >= 3 and counts == sorted(set(counts)), counts
    assert "finished: True" in stream

    table = printed(nb, "cumulative logprob")
    rows = [line for line in table.splitlines() if re.match(r"\s+\d+\s+'", line)]
    assert len(rows) == 6, table
    for row in rows:
        probs = [float(p) for p in re.findall(r"(\d+\.\d)%", row)]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 100.5, row
        chosen, rank1 = re.findall(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", row)[:2]
        assert chosen == rank1, row  # greedy takes the most likely token

    ppl = printed(nb, "perplexity trained:")
    trained, unigram, random = (number(ppl, f"perplexity {name}:")
                                for name in ("trained", "unigram", "random weights"))
    assert 1 < trained < unigram / 10, (trained, unigram)
    assert unigram < random / 2, (unigram, random)
    assert vocab / 2 < random < vocab * 2, (random, vocab)  # small random weights: near uniform

    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2
    assert all(len(o.data["image/png"]) < MAX_IMAGE_BYTES for o in images)


CHECKS = {"01_quickstart.ipynb": check_quickstart}


def test_notebooks_exist():
    assert "01_quickstart.ipynb" in {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_outputs(path):
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        "commit the notebook executed top to bottom (JAXLLM_SAVE_NOTEBOOKS=1)"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    nb, kernel_prefix = run_notebook(path)
    assert kernel_prefix == sys.prefix, f"the kernel ran {kernel_prefix}, not this venv {sys.prefix}"
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    if path.name in CHECKS:
        CHECKS[path.name](nb)
