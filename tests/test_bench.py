"""`slstm bench`: the quick run end to end (valid JSON, the expected rows, positive numbers) and the statistics helpers.

Timings are never asserted: the machines are shared and noisy.
"""

import json
import math
import re

import pytest
import torch

from modeling_slstm import bench

from conftest import random_model


def test_paired_ratios_and_quartiles():
    assert bench.paired_ratios([2.0, 3.0, 8.0], [1.0, 3.0, 2.0]) == [2.0, 1.0, 4.0]
    assert bench.median_and_quartiles([4.0, 1.0, 2.0, 3.0, 5.0]) == (3.0, 2.0, 4.0)
    assert bench.median_and_quartiles([7.0]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        bench.paired_ratios([1.0], [1.0, 2.0])


def test_compare_takes_the_median_of_per_round_ratios():
    # Round 2 is slow for both programs (a load spike): the ratio of that round is still 0.5.
    times = {"ours": [0.010, 0.100, 0.012], "base": [0.020, 0.200, 0.024]}
    row = bench.compare(times, "k", "s", "m", "", "ours", "base", unit="ms")
    assert row.ours_value == pytest.approx(12.0) and row.baseline_value == pytest.approx(24.0)
    assert row.ratio == pytest.approx(0.5) and row.ratio_q1 == pytest.approx(0.5) and row.rounds == 3
    # tok/s: ours / baseline throughput, i.e. baseline time / our time per round.
    row = bench.compare(times, "k", "s", "m", "", "ours", "base", unit="tok/s", tokens=10)
    assert row.ratio == pytest.approx(2.0) and row.ours_value == pytest.approx(10 / 0.012)
    row = bench.compare(times, "k", "s", "m", "", "ours", "base", unit="ms/tok", tokens=4)
    assert row.ours_value == pytest.approx(3.0)


def test_interleave_alternates_the_order_and_warms_up():
    calls = []
    programs = {name: (lambda name=name: calls.append(name) or 1.0) for name in "ABC"}
    times = bench.interleave(programs, repeats=2, warmup=1)
    assert calls == list("ABC") + list("ABC") + list("CBA")
    assert times == {"A": [1.0, 1.0], "B": [1.0, 1.0], "C": [1.0, 1.0]}


def test_check_goals_bounds():
    def row(key, ratio):
        return bench.Row(key, "", "", "", "", 1.0, "", 1.0, "ms", ratio, ratio, ratio, 1)

    goals = bench.check_goals([row("layer.layer_fwd_bwd.vs_lstm", 0.9), row("train.step.vs_official", 4.0),
                               row("decode.b1.ctx64.generate_vs_official", 2.5), row("decode.b1.context_scaling", 1.2)])
    assert [(g["key"], g["met"]) for g in goals] == [
        ("layer.layer_fwd_bwd.vs_lstm", True), ("train.step.vs_official", False),
        ("decode.b1.ctx64.generate_vs_official", True), ("decode.b1.context_scaling", False),
    ]


def test_quick_json_end_to_end(capsys):
    assert bench.main(["--quick", "--json", "--threads", "1", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"machine", "settings", "rows", "skipped", "goals"}
    assert report["machine"]["threads"] == 1 and report["machine"]["backend"] in ("reference", "fused", "compiled")
    keys = {row["key"] for row in report["rows"]}
    expected = {"layer.op_fwd.vs_lstm", "layer.layer_fwd_bwd.vs_lstm", "layer.layer_fwd_bwd_reference.vs_lstm",
                "decode.b1.ctx8.generate_vs_gpt2", "decode.b2.context_scaling", "prefill.b2.vs_gpt2", "state.vs_gpt2"}
    if report["machine"]["xlstm"] is not None:
        expected |= {"layer.layer_fwd_bwd.vs_official", "train.step.vs_official", "decode.b1.ctx8.loop_vs_official",
                     "decode.b2.ctx32.generate_vs_official", "prefill.b1.vs_official", "state.vs_official"}
    assert expected <= keys
    for row in report["rows"]:
        for name in ("ours_value", "baseline_value", "ratio", "ratio_q1", "ratio_q3"):
            assert math.isfinite(row[name]) and row[name] > 0, (row["key"], name)
    assert {g["key"] for g in report["goals"]} <= keys


def test_table_output_and_bad_sections(capsys):
    assert bench.main(["--quick", "--sections", "state", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| state" in out and "load average" in out and "sLSTM backend" in out
    with pytest.raises(SystemExit):
        bench.main(["--sections", "layer,nope"])


@pytest.mark.allow_deprecation("Passing `generation_config` together with generation-related")
def test_speculative_section_with_a_draft(tmp_path, capsys):
    from modeling_slstm import SLSTMConfig, SLSTMForCausalLM

    draft = SLSTMForCausalLM(SLSTMConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_heads=2))
    draft.save_pretrained(tmp_path / "draft")
    assert bench.main(["--quick", "--json", "--threads", "1", "--sections", "speculative",
                       "--draft", str(tmp_path / "draft")]) == 0
    rows = {row["key"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {f"speculative.{text}.{kind}_vs_greedy" for text in ("code", "prose")
                         for kind in ("lookup", "draft")}
    for row in rows.values():
        assert "same output" in row["setting"] and "accepted" in row["setting"], row["setting"]
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0


def test_preset_section_on_the_tiny_preset(capsys, monkeypatch):
    orders = []  # each interleaved run's programs, in the order of its first round
    interleave = bench.interleave
    monkeypatch.setattr(bench, "interleave", lambda programs, *a, **k: orders.append(list(programs)) or
                        interleave(programs, *a, **k))
    assert bench.main(["--preset", "tiny", "--quick", "--json", "--threads", "1", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    preset = report["settings"]["preset_section"]
    assert preset["preset"] == "tiny" and (preset["hidden_size"], preset["vocab_size"]) == (128, 2048)
    rows = {row["key"]: row for row in report["rows"]}
    int8 = bench.torchao_error() is None  # torchao (the test extra) adds the int8 weight-only rows
    assert set(rows) == {"preset.fp32_step.vs_floor", "preset.bf16_step.vs_floor", "preset.bf16_logits.vs_fp32",
                         "preset.b2.vs_b1", "preset.ctx8.vs_gpt2", "preset.ctx32.vs_gpt2", "preset.prefill.vs_gpt2",
                         "preset.train.vs_gpt2"} | ({"preset.int8_step.vs_floor", "preset.int8_logits.vs_fp32"}
                                                    if int8 else set())
    for row in rows.values():
        for name in ("ours_value", "baseline_value", "ratio", "ratio_q1", "ratio_q3"):
            assert math.isfinite(row[name]) and row[name] > 0, (row["key"], name)
    # The floor reads the parameters' bytes: bfloat16 halves them.
    assert rows["preset.fp32_step.vs_floor"]["baseline"] == "read 2 MB fp32"
    assert rows["preset.bf16_step.vs_floor"]["baseline"] == "read 1 MB bf16"
    assert rows["preset.bf16_logits.vs_fp32"]["ratio"] < 0.05  # bfloat16 rounding, not a broken path
    assert not int8 or rows["preset.int8_logits.vs_fp32"]["ratio"] < 0.05  # int8 rounding too
    # Batch decoding needs arithmetic: the row says how much the threads had in the run (a shared core halves it).
    parallel = re.search(r"multiply-adds/s on 1 thread\(s\) vs 1: ([0-9.]+)x", rows["preset.b2.vs_b1"]["setting"])
    assert parallel and float(parallel.group(1)) > 0
    assert {g["key"] for g in report["goals"]} == set(rows) - {"preset.prefill.vs_gpt2", "preset.train.vs_gpt2"}
    # The host's memory changes speed every few tens of seconds: each decoding pair runs with at most one short
    # program between its two, and so does the thread probe beside batch 8.
    decoding = next(order for order in orders if "read 2 MB fp32" in order)
    pairs = [(row["ours"], row["baseline"]) for row in rows.values() if row["baseline"] in decoding]
    pairs.append(("fp32 B=2 ctx=8", "matmul 1 threads"))
    assert len(pairs) == 6 + int8 and all(abs(decoding.index(a) - decoding.index(b)) <= 2 for a, b in pairs), decoding


def test_the_floor_reads_what_a_step_reads():
    """A step reads every parameter once (a tied embedding as the LM head), not an input embedding of its own (one
    row), and int8 weight-only rows and their scales, not what they stand for."""
    model = random_model()
    assert model.lm_head.weight is model.model.embeddings.weight
    assert bench.step_nbytes(model) == sum(p.nbytes for p in model.parameters())
    untied = random_model(tie_word_embeddings=False)
    assert bench.step_nbytes(untied) == sum(p.nbytes for p in untied.parameters()) - 61 * 32 * 4
    if bench.torchao_error() is None:
        int8 = bench.int8_weight_only(model)
        linears = [m for m in int8.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 5  # two per block, and the head
        int8_bytes = sum(m.weight.qdata.nbytes + m.weight.scale.nbytes for m in linears)
        rest = sum(p.nbytes for name, p in model.named_parameters()
                   if "gate_up" not in name and "down" not in name and "embeddings" not in name)
        assert bench.step_nbytes(int8) == int8_bytes + rest
        data = torch.cat([t.reshape(-1).view(torch.uint8) for t in bench.step_tensors(int8)])
        assert data.numel() == int8_bytes + rest and bench.stream_program(int8, 1)() > 0
        from torchao.quantization import Int8WeightOnlyConfig, PerGroup, quantize_

        quantize_(model, Int8WeightOnlyConfig(granularity=PerGroup(16)))  # bytes that are not what they say
        with pytest.raises(ValueError, match="plain parameters and int8 weight-only rows; .*gate_up_proj.weight"):
            bench.step_nbytes(model)


def test_the_arithmetic_probe_puts_torchs_thread_count_back():
    """The preset section times the same products on one thread and on torch's threads; the decoding after it runs on
    torch's count again."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        programs = bench.arithmetic_programs(2)
        assert list(programs) == ["matmul 1 thread", "matmul 2 threads"]
        assert all(run() > 0 for run in reversed(programs.values()))  # the one-thread product last
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_preset_option_and_sections(capsys):
    assert bench.parse_args(["--preset", "tiny"]).sections == ["preset"]
    assert bench.parse_args(["--preset", "tiny", "--sections", "state"]).sections == ["state", "preset"]
    assert bench.parse_args([]).sections == list(bench.DEFAULT_SECTIONS)
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "7b"])
    assert "invalid choice: '7b'" in capsys.readouterr().err  # argparse lists the presets
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "preset"])
    assert "needs --preset NAME, among" in capsys.readouterr().err


def test_the_device_option(device, capsys):
    """`--device` moves the layer and training sections there; on CUDA they gain peak-memory rows."""
    assert bench.main(["--quick", "--json", "--threads", "1", "--repeats", "1", "--sections", "layer,train",
                       "--device", str(device)]) == 0
    report = json.loads(capsys.readouterr().out)
    keys = {row["key"] for row in report["rows"]}
    memory = {"layer.layer_memory.vs_lstm"} | ({"train.step.memory"} if report["machine"]["xlstm"] else set())
    if device.type == "cuda":
        assert memory <= keys and report["machine"]["backend"] == "triton"
    else:
        assert not memory & keys and report["machine"]["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_a_gpu_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_an_official_layer_that_cannot_run_on_the_device_is_reported_not_raised():
    pytest.importorskip("xlstm")
    from dataclasses import replace

    assert bench.official_device_error(bench.QUICK_SETTINGS, "cpu") is None
    if not torch.cuda.is_available():  # its CUDA kernels cannot build here: one line saying why
        assert bench.official_device_error(replace(bench.QUICK_SETTINGS, official_backend="cuda"), "cpu")
