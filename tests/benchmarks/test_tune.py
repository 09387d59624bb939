"""benchmarks.tune: a grid run on the training rows' own split, its figures on record."""

import json

import pytest

from benchmarks.tune import main, parse_grid, settings
from fwdfed.errors import UserError
from tests.conftest import SST2


def test_the_grid_is_every_combination_of_the_values_given():
    grid = parse_grid(["lr=1e-3,3e-3", "directions=4,8", "schedule=linear"])
    assert grid == {"lr": [1e-3, 3e-3], "directions": [4, 8], "schedule": ["linear"]}
    assert len(settings(grid)) == 4 and {"directions": 8, "lr": 3e-3, "schedule": "linear"} in settings(grid)
    with pytest.raises(UserError, match="NAME=V1,V2"):
        parse_grid(["lr"])


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


def test_a_bad_setting_is_refused_before_any_work(tmp_path, split_bundle):
    with pytest.raises(UserError, match="directions"):
        main(["--bundle", str(split_bundle), "--data", str(SST2), "--grid", "directions=1", "--out",
              str(tmp_path / "t.json")])
