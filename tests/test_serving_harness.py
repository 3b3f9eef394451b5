"""benchmarks/serving.py's child runner: output echoed as it comes, a run past its deadline killed."""

import sys

from benchmarks.serving import run_streaming


def test_child_output_is_echoed_and_its_exit_code_returned(capsys):
    code, err = run_streaming([sys.executable, "-c", "import sys; print('one'); print('two'); "
                               "sys.stderr.write('oops'); sys.exit(3)"], timeout=60, prefix="[x] ")
    assert code == 3 and err == "oops"
    assert capsys.readouterr().out == "[x] one\n[x] two\n"


def test_child_past_its_deadline_is_killed_after_its_lines_show(capsys):
    code, _ = run_streaming([sys.executable, "-u", "-c", "import time; print('warm-up done'); time.sleep(60)"],
                            timeout=3)
    assert code is None
    assert capsys.readouterr().out == "warm-up done\n"
