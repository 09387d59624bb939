"""One real job through the benchmark runner: the figures it reads back from the job's database."""

from __future__ import annotations

from benchmarks.job import JobSpec, run_job
from tests.conftest import TINYSTORIES


def test_a_job_on_stories_reports_what_its_database_holds(stories_bundle, tmp_path):
    spec = JobSpec(bundle=stories_bundle, data=TINYSTORIES, rounds=2, devices=2, eval_examples=32,
                   training=["--method", "mezo", "--lr", "1e-3", "--eps", "1e-2", "--local-steps", "3",
                             "--directions", "2"])
    figures = run_job(spec, tmp_path)

    assert [r["round"] for r in figures["rounds"]] == [1, 2]
    for r in figures["rounds"]:
        assert r["updates"] == 2 and r["method"] == "mezo"
        assert r["forward_passes"] == 2 * (2 * 3 * 2)  # devices x (+/- x steps x directions)
        # seed form: a few dozen bytes a pair up; down, the devices keep their adapter, so each task carries the
        # versions since their last one (none in round 1, round 1's 12 sums in round 2), not d float32 values
        assert 18 * 6 < r["sent_bytes_per_device"] < 18 * 6 + 400
        assert r["tasks_sent"] == r["tasks_in_seed_form"] == 2 and r["dense_task_bytes"] > 4 * figures["adapter_dim"]
        assert r["received_bytes_per_device"] <= 4 * r["sent_bytes_per_device"] < r["dense_task_bytes"] / 10
        assert r["peak_rss_bytes"] > 0 and r["seconds"] > 0 and "heldout_loss" in r
        # each device's own: its task (down, in seed form) and its update (up)
        assert sorted(r["devices"]) == ["emu-0", "emu-1"] and all(d["seed_form"] for d in r["devices"].values())
        assert max(d["down"] for d in r["devices"].values()) == r["received_bytes_per_device"]
        assert max(d["up"] for d in r["devices"].values()) == r["sent_bytes_per_device"]
    assert "heldout_loss" in figures["start"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "best_adapter" / "adapter_config.json").is_file()
    assert "best version" in (tmp_path / "status.txt").read_text()


def test_earlier_results_are_read_before_any_work_and_a_damaged_file_is_refused(tmp_path):
    import json

    import pytest

    from benchmarks.job import earlier_results
    from fwdfed.errors import UserError

    assert earlier_results(tmp_path) == {}
    (tmp_path / "results.json").write_text(json.dumps({"arms": {"mezo": {}}}))
    assert earlier_results(tmp_path) == {"arms": {"mezo": {}}}
    for damaged in ("{ not json", "[1, 2]"):
        (tmp_path / "results.json").write_text(damaged)
        with pytest.raises(UserError, match="is not a results file"):
            earlier_results(tmp_path)
