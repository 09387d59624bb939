"""Per-tensor perturbation scales on the coordinator: the job option and its refusals, the scales a round's tasks
carry (made from the round's base version), and aggregation with them (in-process, on a real SQLite store)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.__main__ import parse_args
from coordinator.admission import Limits
from coordinator.job import JobOptions, resumed_options
from coordinator.serve_args import job_options
from coordinator.server import Coordinator, JobConfig, job_from_bundle
from coordinator.store import open_store
from coordinator.strategies import AcceptedUpdate, SeedFedAvg
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.tensor_scale import round_scales
from fwdfed.update import weighted_sum

HPARAMS = {"lr": 1e-3, "eps": 1e-2, "local_steps": 2, "directions": 2, "kind": "rademacher"}
LAYOUT = AdapterLayout.from_shapes([("lora_A", (2, 3)), ("lora_B", (3, 2)), ("classifier.weight", (2, 2))])
SERVE = ["serve", "--db", "x.db", "--bundle", "b"]


class FakeManifest:
    base_model_hash = "h" * 64
    adapter_dim = LAYOUT.dim


def scaled_coordinator(tmp_path, start: np.ndarray, **options) -> Coordinator:
    config = JobConfig(rounds=2, devices_per_round=1, min_devices=1, round_deadline_s=60, hparams=HPARAMS,
                       options=JobOptions(tensor_scale="rms", tensor_scale_floor=0.05, **options))
    store = open_store(tmp_path / "job.db")
    job = store.create_job(job_from_bundle("job", "/bundle", FakeManifest, config), start)
    stored = JobOptions.from_json(job.options)
    strategy = SeedFedAvg(hparams=job.hparams, options=stored, layout=LAYOUT)
    return Coordinator(store, job, strategy, limits=Limits(require_credentials=False), layout=LAYOUT)


def test_serve_stores_the_option_with_the_job_and_an_older_job_runs_on_unscaled():
    options = job_options(parse_args([*SERVE, "--tensor-scale", "rms", "--tensor-scale-floor", "0.5"]))
    assert (options.tensor_scale, options.tensor_scale_floor) == ("rms", 0.5)
    resumed, warnings = resumed_options(options.to_json(), {"server_lr": None, "clip": None})
    assert resumed == options and warnings == []
    older = {k: v for k, v in options.to_json().items() if not k.startswith("tensor_scale")}
    assert resumed_options(older, {})[0].tensor_scale == "none"
    assert job_options(parse_args(SERVE)).tensor_scale == "none"  # the default: today's directions


@pytest.mark.parametrize("flags, error", [
    (["--tensor-scale-floor", "0"], "--tensor-scale-floor must be a finite number > 0, got 0.0"),
    (["--tensor-scale-floor", "nan"], "--tensor-scale-floor must be a finite number > 0, got nan"),
    (["--tensor-scale-floor", "-1"], "--tensor-scale-floor must be a finite number > 0, got -1.0"),
    (["--tensor-scale", "rms", "--method", "backprop"], "--tensor-scale rms: --method backprop takes no directions"),
    (["--tensor-scale", "rms", "--strategy", "trimmed-mean"],
     "--tensor-scale rms: --strategy trimmed-mean: only fedavg aggregates with the scales"),
    (["--tensor-scale", "rms", "--lr-strategy", "model-diff"],
     "--tensor-scale rms: --lr-strategy model-diff reads devices' changes unscaled"),
    (["--tensor-scale", "rms", "--method", "fwdgrad", "--variance-threshold", "1"],
     "--tensor-scale rms: --variance-threshold reads devices' changes unscaled"),
    (["--tensor-scale", "max"], "argument --tensor-scale: invalid choice: 'max'"),
])
def test_a_bad_flag_is_one_clear_error(flags, error, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([*SERVE, *flags])
    assert e.value.code == 2
    assert error in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_rounds_tasks_carry_the_scales_of_its_base_version_and_it_aggregates_with_them(tmp_path):
    start = np.array([0.3, -0.3] * 3 + [0.0] * 6 + [40.0, -40.0, 40.0, -40.0], np.float32)
    c = scaled_coordinator(tmp_path, start)
    rnd = c.store.start_round(c.job.id, 1, 0, None)
    scales = c._round_scales(rnd, c.store.version(c.job.id, 0), None)
    assert scales == round_scales(start, LAYOUT, 0.05) and len({s for _, _, s in scales}) == 3
    updates = [AcceptedUpdate.of("a", [(3, 1e-3), (8, -2e-3)], 10), AcceptedUpdate.of("b", [(8, 5e-4)], 30)]
    new = c.strategy.aggregate(start, updates)
    terms = c.strategy.terms(updates)
    np.testing.assert_array_equal(new, weighted_sum(start, terms, "rademacher", None, scales).astype(np.float32))
    assert not np.array_equal(new, weighted_sum(start, terms, "rademacher").astype(np.float32))
    assert c.strategy.version_sums(updates) is None  # its tasks go down dense: the history has no place for scales
    # inside a block the scales are the block's, and the directions, so the version, change it alone
    blocked = c.strategy.aggregate(start, updates, (6, 16))
    np.testing.assert_array_equal(blocked[:6], start[:6])
    assert c._round_scales(c.store.start_round(c.job.id, 2, 0, (6, 16)), c.store.version(c.job.id, 0),
                           (6, 16)) == round_scales(start, LAYOUT, 0.05, (6, 16))


def test_the_class_statistics_round_carries_no_scales(tmp_path):
    start = np.ones(LAYOUT.dim, np.float32)
    c = scaled_coordinator(tmp_path, start, head_init="lda")
    rnd = c.store.start_round(c.job.id, 1, 0, None)
    assert c._round_scales(rnd, c.store.version(c.job.id, 0), None) is None
    unscaled = SeedFedAvg(hparams=HPARAMS, layout=LAYOUT)
    assert unscaled.options.round_scales(start, LAYOUT, None) is None
