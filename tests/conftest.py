"""Test setup: eight fake CPU devices (for tensor parallelism), before anything imports jax; and
two markers that run tests in a fresh interpreter:

- `isolated`: the test alone, in its own process;
- `isolated_module`: the test's whole module, in one process, once (results read from its JUnit XML).

Why: on jax 0.10.2's CPU backend, after the suite's few hundred compilations, XLA crashed the
process (SIGSEGV / abort in `backend_compile_and_load`) in a later, unrelated compilation: at the
first tensor-parallel test (twice) and in a sampling test (once), each time after the Pallas
interpret-mode kernel tests had run in the same process; compiling fp8 code did the same before. The
affected tests pass alone and after any one other file. A crash loses every later test's result,
so the kernels' interpret tests, the fp8 tests and the multi-device tests run in their own processes.
"""

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_CHILD = os.environ.get("JAXLLM_TEST_ISOLATED") == "1"
_module_results: dict[str, dict[str, str | None]] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "isolated: run this test in a fresh Python process")
    config.addinivalue_line("markers", "isolated_module: run this test's module in one fresh Python process")


def _child(args: list[str], rootpath) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAXLLM_TEST_ISOLATED": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=str(rootpath), env=env, capture_output=True, text=True, timeout=1800)


def _module_outcomes(item) -> dict[str, str | None]:
    """{test name: None if it passed, else the failure text} for the item's module, run once."""
    path = str(item.path)
    if path not in _module_results:
        with tempfile.TemporaryDirectory() as tmp:
            xml = os.path.join(tmp, "results.xml")
            proc = _child([path, f"--junitxml={xml}"], item.config.rootpath)
            outcomes = {}
            if os.path.exists(xml):
                for case in ET.parse(xml).iter("testcase"):
                    bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                    skipped = case.find("skipped")
                    outcomes[case.get("name")] = (None if bad is None and skipped is None else
                                                  (bad if bad is not None else skipped).get("message", "failed"))
            outcomes["__output__"] = proc.stdout[-4000:] + proc.stderr[-2000:]
            _module_results[path] = outcomes
    return _module_results[path]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if _CHILD:
        return
    if item.get_closest_marker("isolated_module") is not None:
        outcomes = _module_outcomes(item)
        if item.name not in outcomes:
            pytest.fail(f"{item.nodeid} did not run in its module's process:\n{outcomes['__output__']}",
                        pytrace=False)
        if outcomes[item.name] is not None:
            pytest.fail(f"{item.nodeid} failed in its module's process: {outcomes[item.name]}", pytrace=False)
        item.runtest = lambda: None
    elif item.get_closest_marker("isolated") is not None:
        proc = _child([item.nodeid], item.config.rootpath)
        if proc.returncode != 0 or " passed" not in proc.stdout:
            pytest.fail(f"isolated run of {item.nodeid} failed (exit {proc.returncode}):\n"
                        f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}", pytrace=False)
        item.runtest = lambda: None  # the child ran it
