"""The headline commands' flags (benchmarks.headline): their defaults, and a bad value as one clear error."""

from __future__ import annotations

import pytest

from benchmarks.headline import HEADLINES, parse_args


def test_ag_news_draws_from_a_pool_of_1024_by_default_and_sst2_from_free_seeds():
    assert parse_args(["--out", "x"], HEADLINES["agnews"]).seed_pool == 1024
    assert parse_args(["--out", "x"], HEADLINES["sst2"]).seed_pool == 0
    assert parse_args(["--out", "x", "--seed-pool", "0"], HEADLINES["agnews"]).seed_pool == 0


@pytest.mark.parametrize("value", ["-1", str(2**20 + 1), "x"])
def test_a_bad_pool_is_one_clear_error(value, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--out", "x", "--seed-pool", value], HEADLINES["agnews"])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m benchmarks.agnews: error: ") and "--seed-pool" in last
