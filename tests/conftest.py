"""Test setup: eight fake CPU devices (for tensor parallelism), before anything imports jax; and
the `isolated` marker, which runs a test in a fresh interpreter.

Why `isolated`: on jax 0.10.2's CPU backend, after the whole suite's few hundred compilations a
multi-device (tensor-parallel) compilation crashed the process inside XLA (SIGSEGV / abort in
`backend_compile_and_load`, twice, always at the first tensor-parallel test); the same tests pass
alone and after any one other test file. A crash would lose every later test's result, so those
tests run in their own process.
"""

import os
import subprocess
import sys

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_CHILD = os.environ.get("JAXLLM_TEST_ISOLATED") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "isolated: run this test in a fresh Python process")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if _CHILD or item.get_closest_marker("isolated") is None:
        return
    env = {**os.environ, "JAXLLM_TEST_ISOLATED": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", item.nodeid],
                          cwd=str(item.config.rootpath), env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or " passed" not in proc.stdout:
        pytest.fail(f"isolated run of {item.nodeid} failed (exit {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}", pytrace=False)
    item.runtest = lambda: None  # the child ran it
