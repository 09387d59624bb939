"""benchmarks.tune: a grid run on the training rows' own split, its figures on record."""

import json

import pytest

from benchmarks.tune import main, parse_grid, settings
from fwdfed.errors import UserError
from tests.conftest import SST2, TINYSTORIES


def test_the_grid_is_every_combination_of_the_values_given():
    grid = parse_grid(["lr=1e-3,3e-3", "directions=4,8", "schedule=linear"])
    assert grid == {"lr": [1e-3, 3e-3], "directions": [4, 8], "schedule": ["linear"]}
    assert len(settings(grid)) == 4 and {"directions": 8, "lr": 3e-3, "schedule": "linear"} in settings(grid)
    with pytest.raises(UserError, match="NAME=V1,V2"):
        parse_grid(["lr"])


@pytest.mark.parametrize("method, says", [("backprop", "tunes forward-only steps on labelled rows"),
                                          ("fedkd", "tunes forward-only steps on labelled rows"),
                                          ("nope", "unknown method 'nope'")])
def test_a_method_it_cannot_tune_is_refused_in_one_line(tmp_path, method, says):
    with pytest.raises(UserError, match=says):
        main(["--bundle", str(tmp_path / "none"), "--data", str(SST2), "--method", method, "--out",
              str(tmp_path / "t.json")])
    assert not (tmp_path / "t.json").exists()


def test_a_grid_runs_the_jobs_shape_and_records_each_settings_curve(tmp_path, split_bundle):
    out = tmp_path / "tune.json"
    assert main(["--bundle", str(split_bundle), "--data", str(SST2), "--method", "fzoo", "--grid", "lr=1e-3,1e-2",
                 "directions=4", "--rounds", "2", "--local-steps", "3", "--devices", "2", "--max-validation", "40",
                 "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["setting"] for r in record["results"]] == [{"directions": 4, "lr": 1e-3}, {"directions": 4, "lr": 1e-2}]
    for result in record["results"]:
        curve = result["curve"]
        assert [c["round"] for c in curve] == [1, 2]
        # 2 devices x 3 steps x (4 directions + the shared point) per round
        assert [c["forward_passes"] for c in curve] == [30, 60]
        assert all(0 <= c["accuracy"] <= 1 and c["loss"] > 0 for c in curve)
    assert record["best"] in [r["setting"] for r in record["results"]] and record["prefix_passes"] > 0


def test_a_causal_lm_is_tuned_from_its_initial_adapter_by_the_validation_loss(tmp_path, stories_split_bundle):
    out = tmp_path / "tune.json"
    assert main(["--bundle", str(stories_split_bundle), "--data", str(TINYSTORIES), "--method", "fzoo", "--grid",
                 "lr=1e-4,1e-1", "directions=2", "--rounds", "1", "--local-steps", "3", "--devices", "2",
                 "--max-validation", "16", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["head"]) == {"loss"} and record["prefix_passes"] > 0  # no head round, no accuracy
    finals = {r["setting"]["lr"]: r["curve"][-1]["loss"] for r in record["results"]}
    assert finals[1e-4] != finals[1e-1]
    assert record["best"]["lr"] == min(finals, key=finals.get)


def test_a_bad_setting_is_refused_before_any_work(tmp_path, split_bundle):
    with pytest.raises(UserError, match="directions"):
        main(["--bundle", str(split_bundle), "--data", str(SST2), "--grid", "directions=1", "--out",
              str(tmp_path / "t.json")])


def test_tensor_scales_are_the_coordinators_made_from_each_rounds_base(tmp_path, split_bundle, monkeypatch):
    """--tensor-scale rms: each round's tasks carry what coordinator.job.JobOptions.round_scales makes from the
    round's base adapter, as the coordinator's would."""
    from coordinator.job import JobOptions
    from fwdfed.methods.fzoo import FzooConfig

    made, used = [], []
    real_scales, real_config = JobOptions.round_scales, FzooConfig.from_hparams.__func__

    def round_scales(self, base, layout, block):
        made.append((base.copy(), real_scales(self, base, layout, block)))
        return made[-1][1]

    def from_hparams(cls, hparams):
        used.append(hparams)
        return real_config(cls, hparams)

    monkeypatch.setattr(JobOptions, "round_scales", round_scales)
    monkeypatch.setattr(FzooConfig, "from_hparams", classmethod(from_hparams))
    out = tmp_path / "tune.json"
    assert main(["--bundle", str(split_bundle), "--data", str(SST2), "--method", "fzoo", "--grid", "lr=1e-2",
                 "directions=2", "--rounds", "2", "--local-steps", "1", "--devices", "1", "--max-validation", "8",
                 "--tensor-scale", "rms", "--tensor-scale-floor", "0.5", "--out", str(out)]) == 0
    assert len(made) == 2 and not (made[0][0] == made[1][0]).all()  # round 2's base is round 1's result
    assert [h["tensor_scales"] for h in used[-2:]] == [scales for _, scales in made]
    record = json.loads(out.read_text())
    assert (record["tensor_scale"], record["tensor_scale_floor"]) == ("rms", 0.5)
    with pytest.raises(UserError, match="--tensor-scale-floor"):
        main(["--bundle", str(split_bundle), "--data", str(SST2), "--tensor-scale-floor", "0", "--out",
              str(tmp_path / "t.json")])
