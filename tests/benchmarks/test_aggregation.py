"""benchmarks.aggregation at a toy size: the directions it reports are the pool's at most, or every pair."""

import pytest

from benchmarks.aggregation import main
from fwdfed.errors import UserError


def test_the_pool_caps_the_directions_and_free_seeds_make_one_a_pair(capsys):
    assert main(["--dim", "64", "--pool", "8", "--pairs", "4", "--updates", "100", "--free-updates", "10"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("pool", "100", "400", "8"), ("free", "10", "40", "40")]


def test_bad_sizes_are_refused():
    with pytest.raises(UserError, match="--pool must be in"):
        main(["--pool", "0"])
