"""benchmarks.history_forms on a real job database: each version's entry in both forms, the one sent marked."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.history_forms import main
from coordinator.job import JobOptions
from fwdfed.directions import pool_key
from fwdfed.errors import UserError
from tests.coordinator.test_downlink import HPARAMS, closed_round, coordinator


def test_each_version_is_measured_in_both_forms_and_the_smaller_is_the_one_sent(tmp_path, capsys):
    async def rounds():
        c = coordinator(tmp_path, JobOptions(seed_pool=16, seed_pool_key=f"{pool_key('job'):016x}"),
                        hparams={**HPARAMS, "local_steps": 20})
        await closed_round(c, 1, pairs=40)  # every pool seed: packed is smaller
        await closed_round(c, 2, pairs=2)  # 4 sums: seeds and coefs are

    asyncio.run(rounds())
    capsys.readouterr()  # the rounds' own lines
    assert main(["--db", str(tmp_path / "job.db")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "job job: d = 4,096 (dense adapter 16,384 B), seed pool K = 16"
    first, second = (line.split() for line in lines[2:])
    assert first[:3] == ["1", "mezo", "16"] and first[-1] == "packed" and int(first[5]) < int(first[4])
    assert second[:3] == ["2", "mezo", "4"] and second[-1] == "seeds+coefs" and int(second[4]) < int(second[5])


def test_a_missing_database_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        main(["--db", str(tmp_path / "none.db")])
