"""Benchmarks reject bad arguments by name before any model is built or kernel run."""

import pytest

from benchmarks import fp8_activation_quant, generate_timeline, profile_decode


@pytest.mark.parametrize("main, argv, named", [
    (profile_decode.main, ["--quantization", "int8", "int9"], "'int9'"),
    (generate_timeline.main, ["--lengths", "2", "0"], "[2, 0]"),
    (fp8_activation_quant.main, ["--ffn", "100"], "100"),
])
def test_bad_argument_is_named(main, argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err


def test_profile_decode_lists_the_methods_it_takes(capsys):
    with pytest.raises(SystemExit):
        profile_decode.main(["--quantization", "int3"])
    err = capsys.readouterr().err
    assert "choose none or one of" in err and "'int4'" in err and "'fp8'" in err
