"""The strategy registry: every strategy module found by name, its options checked, flags and storage."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import strategies
from coordinator.job import JobOptions
from coordinator.store import Job
from coordinator.strategies.dp_fedavg import DPSeedFedAvg
from coordinator.strategies.fedavg import SeedFedAvg
from coordinator.strategies.trimmed_mean import TrimmedMean

ROOT = Path(__file__).resolve().parents[3]


def test_every_strategy_module_is_found_and_fedavg_comes_first():
    assert strategies.names() == ["fedavg", "dp-fedavg", "trimmed-mean"]
    with pytest.raises(ValueError, match="unknown strategy 'fedadam'; known strategies: fedavg, dp-fedavg"):
        strategies.get("fedadam")


@pytest.mark.parametrize("name", strategies.names())
def test_each_strategy_fills_its_defaults_and_refuses_what_it_does_not_take(name):
    spec = strategies.get(name)
    required = {o.name: 1.0 for o in spec.options if o.required}
    values = spec.checked(required)
    assert set(values) == {o.name for o in spec.options}
    for o in spec.options:
        if o.required:
            with pytest.raises(ValueError, match=f"--strategy {name} needs {o.flag}"):
                spec.checked({k: v for k, v in required.items() if k != o.name})
        with pytest.raises(ValueError, match=f"{o.flag} "):
            spec.checked(required | {o.name: -1.0})


@pytest.mark.parametrize("name, cls", [("fedavg", SeedFedAvg), ("dp-fedavg", DPSeedFedAvg),
                                       ("trimmed-mean", TrimmedMean)])
def test_the_job_s_stored_strategy_is_the_one_built(name, cls):
    spec = strategies.get(name)
    options = JobOptions(strategy=name, strategy_options=spec.checked({o.name: 0.25 for o in spec.options}))
    job = Job(id="j", bundle="b", method="mezo", hparams={"lr": 1e-3, "kind": "rademacher"}, rounds=1,
              devices_per_round=2, min_devices=1, round_deadline_s=1.0, adapter_dim=4, options=options.to_json())
    built = strategies.build(job, JobOptions.from_json(job.options))
    assert type(built) is cls and built.devices_per_round == 2


def test_a_job_stored_before_strategies_keeps_its_differential_privacy():
    old = {"server_lr": 1.0, "dp_clip": 0.5, "dp_noise_multiplier": 2.0, "dp_delta": 1e-6}
    options = JobOptions.from_json(old)
    assert options.strategy == "dp-fedavg"
    assert options.strategy_options == {"dp_clip": 0.5, "dp_noise_multiplier": 2.0, "dp_delta": 1e-6}
    plain = JobOptions.from_json({"server_lr": 1.0, "dp_clip": None, "dp_noise_multiplier": None, "dp_delta": 1e-5})
    assert (plain.strategy, plain.strategy_options) == ("fedavg", {})


@pytest.mark.parametrize("flags, message", [
    (["--dp-clip", "1"], "--strategy dp-fedavg needs --dp-noise-multiplier"),
    (["--strategy", "dp-fedavg"], "--strategy dp-fedavg needs --dp-clip"),
    (["--trim-fraction", "0.1", "--dp-clip", "1", "--dp-noise-multiplier", "1"],
     "for --strategy dp-fedavg, not fedavg"),
    (["--strategy", "fedavg", "--trim-fraction", "0.1"], "--trim-fraction: for --strategy trimmed-mean, not fedavg"),
    (["--strategy", "fedadam"], "invalid choice: 'fedadam'"),
])
def test_serve_refuses_a_strategy_s_options_that_do_not_fit_in_one_line(tmp_path, flags, message):
    from tests.conftest import run_command

    result = run_command("coordinator", "serve", "--db", str(tmp_path / "j.db"), *flags)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_the_options_of_one_strategy_select_it():
    from coordinator.__main__ import parse_args

    args = parse_args(["serve", "--db", "j.db", "--dp-clip", "1", "--dp-noise-multiplier", "0.5"])
    assert (args.strategy, args.strategy_options) == ("dp-fedavg", {"dp_clip": 1.0, "dp_noise_multiplier": 0.5,
                                                                    "dp_delta": 1e-5})
    args = parse_args(["serve", "--db", "j.db"])
    assert (args.strategy, args.strategy_options) == ("fedavg", {})


def test_the_worked_example_in_docs_strategies_md_is_the_module_as_it_is():
    """docs/strategies.md shows trimmed_mean.py whole, as the diff that adds it: that diff must give the file."""
    doc = (ROOT / "docs" / "strategies.md").read_text()
    header = "+++ b/coordinator/strategies/trimmed_mean.py\n"
    hunk = doc[doc.index(header) + len(header):]
    first, body = hunk.split("\n", 1)
    added = [line[1:] for line in body[: body.index("```")].splitlines()]
    module = (ROOT / "coordinator" / "strategies" / "trimmed_mean.py").read_text().splitlines()
    assert added == module
    assert first == f"@@ -0,0 +1,{len(module)} @@"
