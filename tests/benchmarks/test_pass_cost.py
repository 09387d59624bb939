"""benchmarks.pass_cost: a pass through the top against the whole program, on a causal LM's split bundle."""

import json

from benchmarks.pass_cost import main
from tests.conftest import TINYSTORIES


def test_the_top_and_the_whole_program_are_timed_side_by_side_and_recorded(tmp_path, stories_split_bundle):
    out = tmp_path / "cost.json"
    assert main(["--bundle", str(stories_split_bundle), "--data", str(TINYSTORIES), "--repeats", "2",
                 "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["split"] == {"frozen_blocks": 3, "adapted_blocks": 2, "hidden_size": 64, "states_dtype": "float16"}
    # 4 batches x 2 repeats, each timed both ways; 2 of the 5 blocks (and the head) cost less than all of them
    assert figures["calls_timed"] == 8 and 0 < figures["top_ms_per_pass"] < figures["whole_ms_per_pass"]
