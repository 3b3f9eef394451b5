"""Benchmarks reject bad arguments by name before any model is built or kernel run, and their
trace summaries read synthetic traces right."""

import pytest

from benchmarks import (attention, decode_attention_timeline, fp8_activation_quant, generate_timeline, int4_determinism,
                        kmajor_block_timeline, product_chain, profile_decode, quant_decode, quant_matmul_kernels,
                        stages_ab, upcast_ab)


@pytest.mark.parametrize("main, argv, named", [
    (profile_decode.main, ["--quantization", "int8", "int9"], "'int9'"),
    (profile_decode.main, ["--timeline", "-1"], "-1"),
    (generate_timeline.main, ["--lengths", "2", "0"], "[2, 0]"),
    (fp8_activation_quant.main, ["--ffn", "100"], "100"),
    (quant_decode.main, ["--methods", "none", "int9"], "'int9'"),
    (quant_decode.main, ["--methods", "int8/kmajor"], "'int8/kmajor'"),
    (product_chain.main, ["--configs", "default", "128:5"], "'128:5'"),
    (product_chain.main, ["--configs", "96:0:0"], "block_n=96"),
    (product_chain.main, ["--layers", "0"], "--layers 0"),
    (product_chain.main, ["--repeats", "0"], "--repeats 0"),
    (product_chain.main, ["--m", "65"], "--m 65"),
    (kmajor_block_timeline.main, ["--m", "0"], "--m 0"),
    (kmajor_block_timeline.main, ["--skip-kernel-time", "--skip-profile"], "nothing to measure"),
    (kmajor_block_timeline.main, ["--shapes", "4096by4096"], "'4096by4096'"),
    (kmajor_block_timeline.main, ["--configs", "x:1:1"], "'x:1:1'"),
    (upcast_ab.main, ["int4=1", "fp8=1"], "'fp8=1'"),
    (upcast_ab.main, ["int8=yes"], "'int8=yes'"),
    (upcast_ab.main, ["int8=2"], "'int8=2'"),
    (upcast_ab.main, ["int4=3"], "'int4=3'"),
    (stages_ab.main, ["int4:9"], "'int4:9'"),
    (stages_ab.main, ["fp8:4"], "'fp8:4'"),
    (int4_determinism.main, ["--stages", "8", "9"], "--stages"),
    (decode_attention_timeline.main, ["--case", "64x4096"], "'64x4096'"),
    (decode_attention_timeline.main, ["--kinds", "bf16"], "'bf16'"),
    (quant_matmul_kernels.main, ["--timing", "cupti"], "'cupti'"),
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


def test_parse_config_reads_defaults_as_none():
    assert product_chain.parse_config("default") is None
    config = product_chain.parse_config("256:6:0")
    assert (config.block_n, config.num_stages, config.num_splits) == (256, 6, None)


def _scope(events, tid, sm, name, begin, end):
    events.append(dict(name=name, ph="B", ts=begin, tid=tid, pid=sm + 1))
    events.append(dict(name=name, ph="E", ts=end, tid=tid, pid=sm + 1))


def test_block_timeline_summary_of_a_synthetic_launch():
    """Two warpgroups of three steps: a 2.0 first wait then 0.1 waits, 0.9 products, a 0.5 epilogue;
    the second starts 1.0 later."""
    events = []
    for tid, sm, t0 in ((1, 0, 10.0), (4, 3, 11.0)):
        t = t0
        for i in range(3):
            wait = 2.0 if i == 0 else 0.1
            _scope(events, tid, sm, "wait_ready", t, t + wait)
            _scope(events, tid, sm, "wgmma", t + wait, t + wait + 0.9)
            t += wait + 0.9
        _scope(events, tid, sm, "epilogue", t, t + 0.5)
    out = kmajor_block_timeline.summarise(dict(traceEvents=events))
    assert out["warpgroups"] == 2
    assert out["span_us"] == pytest.approx(6.4)  # 1.0 late start + 2.0 + 0.9 + 2 x 1.0 + 0.5
    assert out["start_us"]["max"] == pytest.approx(1.0)
    assert out["first_wait_us"]["p50"] == pytest.approx(2.0)
    assert out["step_us"]["p50"] == pytest.approx(2.9 / 3)  # first product end to last, over the steps
    assert out["epilogue_us"]["max"] == pytest.approx(0.5)
    assert out["end_us"]["min"] == pytest.approx(5.4)
    assert [row[:2] for row in out["per_warpgroup"]] == [[0, 0], [3, 3]]


def test_decode_timeline_orders_kernels_and_measures_gaps():
    events = [dict(name="b", ts=20.0, dur=5.0), dict(name="a", ts=10.0, dur=4.0, args={"grid": "1,1,1"}),
              dict(name="c", ts=24.0, dur=2.0)]
    out = profile_decode.timeline(events, 3)
    assert [e["name"] for e in out] == ["a", "b", "c"]
    assert [e["t"] for e in out] == [0.0, 10.0, 14.0]
    assert out[0]["gap"] is None and out[1]["gap"] == pytest.approx(6.0)
    assert out[2]["gap"] == pytest.approx(-1.0)  # started before b ended: overlapping kernels
    assert out[0]["args"] == {"grid": "1,1,1"}


def test_attention_decode_configs_read_block_and_stages():
    config = attention.parse_config("128x2")
    assert (config.block_kv, config.num_stages) == (128, 2)
    assert attention.config_key(attention.DecodeConfig(), quantized=True) == "ours_kv64_st3"
    assert attention.config_key(attention.DecodeConfig(), quantized=False) == "ours_kv64_st4"
    with pytest.raises(ValueError, match="'64x4x2'"):  # the old BLOCKxSTAGESxWARPGROUPS form
        attention.parse_config("64x4x2")


def test_quant_matmul_device_times_read_a_trace():
    """Kernel time per product: summed durations (gaps left out) and the span (gaps in)."""
    events = [dict(ts=100.0, dur=10.0), dict(ts=112.0, dur=4.0), dict(ts=120.0, dur=6.0)]
    busy, span = quant_matmul_kernels.device_times(events, products=2)
    assert (busy, span) == (10.0, 13.0)
    with pytest.raises(ValueError, match="needs a GPU"):
        quant_matmul_kernels.device_times([], products=2)
