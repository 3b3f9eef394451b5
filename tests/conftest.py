"""Test setup: eight fake CPU devices (for tensor parallelism) and XLA's LLVM at -O0 with its older
fusion emitters (both compile faster), before anything imports jax; and two markers that run tests
in a fresh interpreter:

- `isolated`: the test alone, in its own process;
- `isolated_module`: the test's whole module, in one process, once (results read from its JUnit XML);
  `seconds=` its measured time (for ordering), `optimize=True` to compile it at XLA's default -O level.

Why: on jax 0.10.2's CPU backend, after the suite's few hundred compilations, XLA crashed the
process (SIGSEGV / abort in `backend_compile_and_load`) in a later, unrelated compilation: at the
first tensor-parallel test (twice) and in a sampling test (once), each time after the Pallas
interpret-mode kernel tests had run in the same process; compiling fp8 code did the same before. The
affected tests pass alone and after any one other file. A crash loses every later test's result,
so the kernels' interpret tests, the fp8 tests and the multi-device tests run in their own processes.

The isolated modules' processes start as soon as collection ends, one at a time beside the main
process (CI has two cores), most expensive first (`isolated_module(seconds=...)`), and their tests
are moved to the end of the run, so the main process works through the other tests meanwhile, then,
from the cheapest module up, runs the modules not yet started itself (in one run it had waited ~400 s
on modules running in the background while later ones had not started).
JAXLLM_TEST_SERIAL=1 runs each module's process only when its first test is reached.
JAXLLM_TEST_XML_DIR=DIR keeps each module process's JUnit XML in DIR (its tests' own durations: the
main process's `--durations` counts only the wait for a module's results).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

# LLVM at -O0: the suite is mostly XLA compilation of small programs on two cores, and -O0 compiles
# them faster than they then run slower. In one clean-clone run against the one before it: the decode
# kernel's module 305 -> 214 s, the engine's 306 -> 190 s, the main process's own tests 949 -> 732 s;
# but the quantization module, heavy in calibration and perplexity arithmetic, 343 -> 665 s, so a
# module can ask for optimized code (`isolated_module(optimize=True)`).
# With -O0, XLA's older fusion emitters (`--xla_cpu_use_fusion_emitters=false`: LLVM IR written
# directly): the default MLIR-based ones took about twice the CPU time to compile the same programs.
# Alone on two cores, against -O0 with the default emitters: the engine module 170 -> 131 s (240 ->
# 126 s of CPU), the decode kernel's 219 -> 137 s (315 -> 155 s of CPU), test_evaluate,
# test_models_vs_hf, test_sampling and test_llm_api together 137 -> 94 s (180 -> 104 s of CPU); the
# whole suite, 765 tests, 13 min 48 s (20-21.5 min in the runs before). The bundled model's
# perplexity arithmetic at the default -O level scored slower with them (int8: 21 -> 29 s of CPU),
# so `optimize=True` drops both flags. Only on jaxlib 0.10, where the flag is known to exist (XLA
# aborts on an unknown flag).
_O0 = "--xla_backend_optimization_level=0"
_LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _jaxlib_minor() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(x) for x in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return ()


_FAST_COMPILE = (_O0, _LEGACY_EMITTERS) if _jaxlib_minor() == (0, 10) else (_O0,)
os.environ.setdefault("XLA_FLAGS", " ".join(["--xla_force_host_platform_device_count=8", *_FAST_COMPILE]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_CHILD = os.environ.get("JAXLLM_TEST_ISOLATED") == "1"
_BESIDE = not _CHILD and os.environ.get("JAXLLM_TEST_SERIAL") != "1"  # module processes beside this one
_module_results: dict[str, dict[str, str | None]] = {}
_module_futures: dict[str, Future] = {}
_background: ThreadPoolExecutor | None = None
_live_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()


def pytest_configure(config):
    config.addinivalue_line("markers", "isolated: run this test in a fresh Python process")
    config.addinivalue_line("markers", "isolated_module: run this test's module in one fresh Python process")


def _child(args: list[str], rootpath, optimize: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAXLLM_TEST_ISOLATED": "1"}
    if optimize:
        flags = env.get("XLA_FLAGS", "")
        for flag in _FAST_COMPILE:
            flags = flags.replace(flag, "")
        env["XLA_FLAGS"] = " ".join(flags.split())
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    with subprocess.Popen(cmd, cwd=str(rootpath), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        with _children_lock:
            _live_children.add(proc)
        try:
            out, err = proc.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n(killed after 1800 s)"
        finally:
            with _children_lock:
                _live_children.discard(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _run_module(path: str, rootpath, optimize: bool = False) -> dict[str, str | None]:
    """{test name: None if it passed, else the failure text}, from one process over the module."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "results.xml")
        proc = _child([path, f"--junitxml={xml}"], rootpath, optimize)
        outcomes = {}
        if os.path.exists(xml):
            for case in ET.parse(xml).iter("testcase"):
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                skipped = case.find("skipped")
                outcomes[case.get("name")] = (None if bad is None and skipped is None else
                                              (bad if bad is not None else skipped).get("message", "failed"))
        outcomes["__output__"] = proc.stdout[-4000:] + proc.stderr[-2000:]
        keep = os.environ.get("JAXLLM_TEST_XML_DIR")  # for timing the module processes' tests
        if keep and os.path.exists(xml):
            os.makedirs(keep, exist_ok=True)
            shutil.copy(xml, os.path.join(keep, os.path.basename(path) + ".xml"))
        return outcomes


def _module_outcomes(item) -> dict[str, str | None]:
    """The outcomes of the item's module: from its background process, or run now (once) when the
    background has not started it (then both cores work on the isolated modules)."""
    path = str(item.path)
    if path not in _module_results:
        future = _module_futures.get(path)
        if future is not None and not future.cancel():
            _module_results[path] = future.result()
        else:
            _module_results[path] = _run_module(path, item.config.rootpath, _optimize(item))
    return _module_results[path]


def _optimize(item) -> bool:
    """The module's `isolated_module(optimize=True)`: its process compiles at XLA's default -O level."""
    return bool(item.get_closest_marker("isolated_module").kwargs.get("optimize", False))


def _isolated_module(item) -> bool:
    return item.get_closest_marker("isolated_module") is not None


def _module_seconds(items: list) -> float:
    """The module's `isolated_module(seconds=...)`: its measured run time on two cores, for ordering."""
    return float(items[0].get_closest_marker("isolated_module").kwargs.get("seconds", 60))


def pytest_collection_modifyitems(session, config, items):
    """Isolated modules' tests last (their processes run meanwhile), the modules cheapest first: the
    background starts them from the most expensive, the main process, once through the other tests,
    from the cheapest (running itself those not yet started), so both cores stay busy until the two
    meet, and the module one of them may be left waiting on at the end is a short one (replayed
    with one run's durations, file order ends ~95 s later). The order within each module is kept."""
    if not _BESIDE:
        return
    modules: dict[str, list] = {}
    for item in items:
        if _isolated_module(item):
            modules.setdefault(str(item.path), []).append(item)
    cheapest_first = sorted(modules.values(), key=_module_seconds)
    items[:] = [i for i in items if not _isolated_module(i)] + [i for m in cheapest_first for i in m]


def pytest_collection_finish(session):
    global _background
    if not _BESIDE:
        return
    # the items hold the modules cheapest first (see above): the background takes them the other way
    firsts = {}
    for item in session.items:
        if _isolated_module(item):
            firsts.setdefault(str(item.path), item)
    if firsts:
        _background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="isolated-modules")
        for path, item in reversed(firsts.items()):
            _module_futures[path] = _background.submit(_run_module, path, session.config.rootpath, _optimize(item))


def pytest_sessionfinish(session):
    """An interrupted or failing-fast run leaves no module process behind."""
    if _background is not None:
        _background.shutdown(wait=False, cancel_futures=True)
        with _children_lock:
            for proc in _live_children:
                proc.kill()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if _CHILD:
        return
    if _isolated_module(item):
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
