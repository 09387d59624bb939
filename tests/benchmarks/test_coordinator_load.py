"""benchmarks.coordinator_load end to end at a small scale: the real coordinator and the floor server in their own
processes, the fleet's devices in two worker processes, every update acked once and stored once; and its flags'
one-line errors. (The figures themselves are a benchmark: docs/BENCHMARKS.md.)"""

from __future__ import annotations

import re

from tests.conftest import run_command


def test_a_small_fleet_is_acked_and_stored_once_by_the_coordinator_and_acked_by_the_floor(tiny_llama_bundle):
    result = run_command("benchmarks.coordinator_load", "--bundle", str(tiny_llama_bundle), "--devices", "30",
                         "--rounds", "2", "--floor", timeout=300, check=True)
    floor = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["floor"]]
    assert [row[2:5] for row in floor[:2]] == [["1", "30", "0"], ["2", "30", "0"]]
    summary = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["sqlite"] and "all:" in line)
    assert "60 acked accepted, 60 rows stored (0 doubled)" in summary
    assert re.search(r", \d+% of the floor's rate;", summary)


def test_a_fleet_smaller_than_the_device_processes_is_one_error_line(tmp_path):
    result = run_command("benchmarks.coordinator_load", "--bundle", str(tmp_path), "--devices", "1",
                         "--workers", "2", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
