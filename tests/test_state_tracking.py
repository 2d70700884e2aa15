"""The state-tracking benchmark: task generators against brute-force definitions, buckets, metric, sizes, CLI.
The models' scoring runs on the test device (`--device`); the rest stays on the CPU: the task generators draw with CPU
`torch.Generator`s and the benchmark's CLI trains and evaluates on the CPU (it has no device option)."""

import json

import pytest
import torch

from modeling_slstm import state_tracking as st


def brute_parity(symbols):
    return sum(symbols) % 2


def brute_even_pairs(symbols):
    text = "".join("ab"[s] for s in symbols)
    pairs = sum(text[k : k + 2] in ("ab", "ba") for k in range(len(text) - 1))
    return int(pairs % 2 == 0)


def brute_cycle_navigation(symbols):
    position = 0
    for move in symbols:
        position = (position + {0: 0, 1: 1, 2: -1}[move]) % 5
    return position


def brute_modular_arithmetic(symbols):
    text = "".join(str(s) if s < 5 else "+-*"[s - 5] for s in symbols)
    return eval(text) % 5  # Python's precedence: * before + and -, as the paper


BRUTE = {
    "parity": brute_parity,
    "even_pairs": brute_even_pairs,
    "cycle_navigation": brute_cycle_navigation,
    "modular_arithmetic": brute_modular_arithmetic,
}


@pytest.mark.parametrize("name", list(st.TASKS))
def test_generator_labels_match_brute_force(name):
    task = st.TASKS[name]
    gen = torch.Generator().manual_seed(0)
    for length in (1, 2, 3, 4, 7, 40, 101):
        if name == "modular_arithmetic" and length < 3:
            continue
        symbols, labels = task.generate(length, 50, gen)
        expected_len = length - (1 - length % 2) if name == "modular_arithmetic" else length
        assert symbols.shape == (50, expected_len) and labels.shape == (50,)
        assert int(symbols.min()) >= 0 and int(symbols.max()) < task.num_symbols
        for row, label in zip(symbols.tolist(), labels.tolist()):
            assert label == BRUTE[name](row), (name, row)
            assert 0 <= label < task.num_classes


def test_modular_arithmetic_alternates_numbers_and_operators():
    symbols, _ = st.modular_arithmetic(9, 20, torch.Generator().manual_seed(1))
    assert bool((symbols[:, ::2] < 5).all()) and bool((symbols[:, 1::2] >= 5).all())


def test_modular_arithmetic_known_values():
    # the paper's examples: 1 + 2 * 3 = 2, 1 - 1 - 1 = 4, 0 * 1 + 4 * 3 - 2 = 0 (mod 5)
    for text, value in (("1+2*3", 2), ("1-1-1", 4), ("0*1+4*3-2", 0)):
        symbols = [int(c) if c.isdigit() else 5 + "+-*".index(c) for c in text]
        assert brute_modular_arithmetic(symbols) == value


@pytest.mark.parametrize("name", list(st.TASKS))
def test_generators_are_deterministic_given_a_seed(name):
    task = st.TASKS[name]
    first = task.generate(21, 16, torch.Generator().manual_seed(7))
    again = task.generate(21, 16, torch.Generator().manual_seed(7))
    other = task.generate(21, 16, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("name", list(st.TASKS))
def test_labels_are_roughly_balanced(name):
    task = st.TASKS[name]
    _, labels = task.generate(31, 4000, torch.Generator().manual_seed(3))
    counts = torch.bincount(labels, minlength=task.num_classes).float() / labels.numel()
    assert float(counts.min()) > 0.5 * task.chance  # no class is rare: chance = 1 / num_classes is meaningful


def test_make_batch_layout():
    task = st.TASKS["cycle_navigation"]
    input_ids, labels = st.make_batch(task, 10, 4, torch.Generator().manual_seed(0))
    assert input_ids.shape == (4, 11)
    assert bool((input_ids[:, -1] == task.equals_token).all()) and bool((input_ids[:, :-1] < task.num_symbols).all())
    assert task.answer_tokens == list(range(task.num_symbols + 1, task.vocab_size))
    assert len(set(task.answer_tokens) | {task.equals_token} | set(range(task.num_symbols))) == task.vocab_size


def test_length_buckets():
    assert st.TRAIN_LENGTHS == (3, 40) and st.BUCKETS[0] == st.TRAIN_LENGTHS
    for (_, high), (low, _) in zip(st.BUCKETS, st.BUCKETS[1:]):
        assert low == high + 1  # contiguous, no overlap
    assert st.BUCKETS[-1][1] == 256
    assert any(high == 4 * st.TRAIN_LENGTHS[1] for _, high in st.BUCKETS)  # the goal's "up to 4x" edge
    lengths = st.bucket_lengths(41, 80, 8)
    assert lengths[0] == 41 and lengths[-1] == 80 and len(lengths) == 8 and lengths == sorted(set(lengths))
    assert st.bucket_lengths(41, 80, 1) == [80]
    assert st.bucket_lengths(3, 5, 10) == [3, 4, 5]
    assert [st.bucket_name(b) for b in st.BUCKETS] == ["3-40", "41-80", "81-160", "161-256"]


def test_scaled_accuracy():
    assert st.scaled_accuracy(0.5, 0.5) == 0.0
    assert st.scaled_accuracy(1.0, 0.2) == 1.0
    assert st.scaled_accuracy(0.75, 0.5) == pytest.approx(0.5)
    assert st.scaled_accuracy(0.6, 0.2) == pytest.approx(0.5)
    assert st.scaled_accuracy(0.0, 0.5) == pytest.approx(-1.0)


@pytest.mark.parametrize("name", list(st.TASKS))
def test_models_have_about_equal_size(name):
    task = st.TASKS[name]
    settings = st.Settings()
    counts = {m: st.count_parameters(st.BUILDERS[m](task.vocab_size, settings)) for m in st.MODELS}
    reference = counts["slstm"]
    for model_name, count in counts.items():
        assert abs(count - reference) <= 0.2 * reference, counts


@pytest.mark.parametrize("model_name", st.MODELS)
def test_models_score_the_answer_tokens(model_name, device):
    task = st.TASKS["modular_arithmetic"]
    torch.manual_seed(0)
    model = st.BUILDERS[model_name](task.vocab_size, st.Settings()).eval().to(device)
    input_ids, _ = st.make_batch(task, 9, 3, torch.Generator().manual_seed(0))  # drawn on the CPU
    input_ids = input_ids.to(device)
    assert st.class_logits(model, task, input_ids).shape == (3, task.num_classes)


def test_summary_means_and_per_seed():
    records = [
        {"task": "parity", "model": "lstm", "seed": s, "params": 1,
         "buckets": {"3-40": {"accuracy": a, "scaled_accuracy": 2 * a - 1}}}
        for s, a in ((0, 1.0), (1, 0.5))
    ]
    (row,) = st.summarize(records)
    assert row["seeds"] == [0, 1]
    assert row["scaled_accuracy"]["3-40"] == {"mean": 0.5, "per_seed": [1.0, 0.0]}


def test_quick_run_prints_a_table(capsys):
    assert st.main(["--quick", "--tasks", "parity"]) == 0
    out = capsys.readouterr().out
    assert "parity" in out and "161-256" in out
    for model_name in st.MODELS:
        assert any(line.startswith(model_name) for line in out.splitlines())


def test_quick_run_json_and_plot(capsys, tmp_path):
    plot_path = tmp_path / "plot.png"
    code = st.main(["--quick", "--tasks", "even_pairs", "--models", "slstm,lstm", "--seeds", "0,1", "--steps", "3",
                    "--json", "--plot", str(plot_path)])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["seeds"] == [0, 1] and payload["settings"]["steps"] == 3
    assert {(r["model"], r["seed"]) for r in payload["runs"]} == {("slstm", 0), ("slstm", 1), ("lstm", 0), ("lstm", 1)}
    for row in payload["summary"]:
        assert list(row["scaled_accuracy"]) == payload["buckets"]
        for cell in row["scaled_accuracy"].values():
            assert len(cell["per_seed"]) == 2 and -1.0 <= cell["mean"] <= 1.0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv",
    [["--tasks", "sorting"], ["--models", "gpt"], ["--steps", "0"], ["--seeds", "a,b"], ["--lr", "-1"],
     ["--workers", "0"], ["--slstm-conv", "-1"]],
)
def test_bad_arguments_exit_2(argv, capsys):
    assert st.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_seed_argument_forms():
    parser = st.build_parser()
    assert st.settings_from_args(parser.parse_args(["--seeds", "3"]))[1] == [0, 1, 2]
    assert st.settings_from_args(parser.parse_args(["--seeds", "5,2"]))[1] == [5, 2]
    assert st.settings_from_args(parser.parse_args(["--seeds", "4,"]))[1] == [4]
