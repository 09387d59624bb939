"""docs/BENCHMARKS.md from the runs' figures: tables, plots, the hand-written text kept."""

from __future__ import annotations

import json

import pytest

from benchmarks.compare import sample_rows
from benchmarks.report import END, START, main
from fwdfed.errors import UserError


def arm(accuracies, method="mezo", sent=2000):
    rounds = [{"round": i + 1, "version": i + 1, "seconds": 60.0, "updates": 3, "method": method,
               "forward_passes": 480, "sent_bytes_per_device": sent, "received_bytes_per_device": 301_000,
               "peak_rss_bytes": 500 * 2**20, "heldout_accuracy": a} for i, a in enumerate(accuracies)]
    return {"start": {"heldout_accuracy": 0.25}, "rounds": rounds, "job_seconds": 130.0, "flags": ["--method", method],
            "test_accuracy": accuracies[-1] - 0.01, "test_rows": 800}


@pytest.fixture
def runs(tmp_path):
    folder = tmp_path / "agnews"
    folder.mkdir()
    results = {"task": "agnews", "split": "iid", "alpha": 0.5, "devices": 3,
               "commands": ["python -m benchmarks.compare"],
               "arms": {"mezo": arm([0.86, 0.87]), "backprop": arm([0.86, 0.89], "backprop", sent=301_100)}}
    (folder / "results.json").write_text(json.dumps(results))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "BENCHMARKS.md").write_text(f"# Benchmarks\n\nWhat we found.\n\n{START}\nold\n{END}\n\nLimits.\n")
    return folder, docs


def test_the_generated_block_is_rewritten_and_the_text_around_it_kept(runs):
    folder, docs = runs
    assert main(["--compare", str(folder), "--docs", str(docs)]) == 0
    text = (docs / "BENCHMARKS.md").read_text()
    assert text.startswith("# Benchmarks\n\nWhat we found.") and text.endswith("Limits.\n")
    assert "old" not in text
    mezo = next(line for line in text.splitlines() if line.startswith("| mezo |"))
    assert "| 0.2500 | 0.8700 | 0.8700 | 0.8600 (800 rows) | 960 | 2.2 | 2,000 | 301,000 | 500 |" in mezo
    assert (docs / "benchmarks" / "agnews.png").stat().st_size > 10_000
    assert json.loads((docs / "benchmarks" / "agnews.json").read_text())["task"] == "agnews"


def test_a_missing_run_or_block_is_a_clear_error(runs, tmp_path):
    folder, docs = runs
    with pytest.raises(UserError, match="run the benchmark"):
        main(["--compare", str(tmp_path / "nowhere"), "--docs", str(docs)])
    (docs / "BENCHMARKS.md").write_text("# Benchmarks, hand-written only\n")
    with pytest.raises(UserError, match="no generated block"):
        main(["--compare", str(folder), "--docs", str(docs)])


def test_a_sample_keeps_the_header_and_whole_lines(tmp_path):
    source = tmp_path / "train.tsv"
    source.write_text("label\tsentence\n" + "".join(f"{i % 2}\tline \"{i}\" here\n" for i in range(100)))
    sample = sample_rows(source, tmp_path / "sample.tsv", 10, seed=3)
    lines = sample.read_text().splitlines()
    assert lines[0] == "label\tsentence" and len(lines) == 11
    assert set(lines[1:]) <= set(source.read_text().splitlines()[1:])
    assert sample_rows(source, tmp_path / "again.tsv", 10, seed=3).read_text() == sample.read_text()


def test_the_fedkd_run_gets_its_arms_teacher_and_both_memory_phases(runs, tmp_path):
    _, docs = runs
    folder = tmp_path / "fedkd"
    folder.mkdir()
    mib = 2**20
    fedkd = arm([0.80, 0.81], "fedkd") | {"teacher_passes": 69}
    results = {"device_rows": 1200, "devices": 3, "commands": ["python -m benchmarks.fedkd --out X"],
               "teacher": {"rows": 2000, "epochs": 1, "lr": 5e-5, "train_seconds": 120.0, "test_accuracy": 0.84,
                           "test_rows": 872},
               "memory": {"teacher": {"step_seconds": 0.2}, "teacher_labelling_peak_bytes": 500 * mib,
                          "students": [{"student_training_peak_bytes": 600 * mib, "device_peak_bytes": 600 * mib,
                                        "sum_of_phases_bytes": 1100 * mib}],
                          "modes": [{"mode": "fedkd", "peak_bytes": 600 * mib, "step_seconds": 1.5}]},
               "arms": {"mezo": arm([0.80, 0.80]), "fedkd": fedkd}}
    (folder / "results.json").write_text(json.dumps(results))
    assert main(["--fedkd", str(folder), "--docs", str(docs)]) == 0
    text = (docs / "BENCHMARKS.md").read_text()
    assert "0.8400 on GLUE dev (872 rows)" in text and "`fedkd` 69 teacher passes" in text
    assert "| teacher labelling (predict, P = 1) | 500 | 0.20 |" in text
    assert "**600** (the two peaks added: 1100" in text and (docs / "benchmarks" / "fedkd-fedkd.json").is_file()
    assert next(line for line in text.splitlines() if line.startswith("| fedkd |")).count("0.8100") == 2


def test_the_prompt_learning_run_gets_a_row_per_adapter_against_chance(runs, tmp_path):
    _, docs = runs
    folder = tmp_path / "prompt-learning"
    folder.mkdir()
    training = ["--method", "mezo", "--lr", "1e-2", "--eps", "1e-2", "--local-steps", "20", "--directions", "4"]
    case = {"adapter_flags": ["--adapter", "prefix-tuning"], "training": training, "shape": ["--batch-size", "4"],
            "adapter_dim": 640, "verification": {"loss_max_abs_diff": 2e-6, "logits_max_abs_diff": 3e-5},
            "peft_type": "PREFIX_TUNING",
            "figures": arm([0.8, 0.8]) | {"job_seconds": 90.0},
            "scores": {"heldout_loss_start": 2.0, "heldout_loss_final": 1.95, "gain": 0.05, "step_norm": 0.3,
                       "random_step_gains": [-0.01, 0.002], "chance_bar": 0.02, "beats_chance": True}}
    (folder / "results.json").write_text(json.dumps({"cases": {"prefix-tuning": case}, "commands": ["python -m x"]}))
    assert main(["--prompt-learning", str(folder), "--docs", str(docs)]) == 0
    row = next(line for line in (docs / "BENCHMARKS.md").read_text().splitlines() if line.startswith("| prefix"))
    assert "2.0000 → 1.9500 | **+0.0500** | -0.0100 … +0.0020 | 0.0200 | 2 × 3 × 20 | 1.5 | PREFIX_TUNING |" in row
    assert (docs / "benchmarks" / "prompt-learning.json").is_file()
