"""BundleDevice, the app's way into the core (android_demo/app calls nothing else of it to train),
on the JVM with the real stories bundle and an opener that records its calls (BundleDeviceCheck).

What the app relies on: the whole data file is the device's shard with docs/data.md's cut (the
same examples as the Python device's shard 0 of 1); the program is opened once, with the
manifest's program path and perturbation limit, and only after the memory plan has passed; a
budget too small, a missing file or an empty one is one clear error before the program is
opened; the device loop goes to the URL it is given.
"""

from __future__ import annotations

import json
import socket

import pytest

from runtime.data import partition, read_examples, split
from tests.conftest import TINYSTORIES


def check(java_core, bundle, data, budget: str, *url: str):
    result = java_core.run("BundleDeviceCheck", bundle, data, "phone-0", budget, *url, check=False, timeout=120)
    return result.returncode, result.stdout.decode().splitlines()


@pytest.mark.slow
def test_bundle_device_opens_the_program_once_after_the_plan_with_the_python_devices_shard(java_core, stories_bundle):
    manifest = json.loads((stories_bundle / "manifest.json").read_text())
    code, lines = check(java_core, stories_bundle, TINYSTORIES, "1.5GB")
    assert code == 0, lines
    opened = [line.split(" ") for line in lines if line.startswith("opened ")]
    assert len(opened) == 1, lines
    path, perturbations, per_example = opened[0][1:]
    assert path == str(stories_bundle / manifest["program"]["file"])
    assert int(perturbations) == manifest["inputs"]["max_perturbations"]
    assert per_example == "false"  # a causal LM: labels per token
    python_shard = partition(split(read_examples(TINYSTORIES), "train"), 1)[0]
    assert f"examples {len(python_shard)}" in lines
    assert any(line.startswith("plan ") and line != "plan null" for line in lines), lines

    code, lines = check(java_core, stories_bundle, TINYSTORIES, "none")
    assert code == 0 and "plan null" in lines, lines


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tiny budget", "no data file", "empty data file"])
def test_bundle_device_refuses_before_opening_the_program(java_core, stories_bundle, tmp_path, case):
    data, budget = TINYSTORIES, "1.5GB"
    if case == "tiny budget":
        budget = "1MB"
    elif case == "no data file":
        data = tmp_path / "absent.txt"
    else:
        data = tmp_path / "empty.txt"
        data.write_text("")
    code, lines = check(java_core, stories_bundle, data, budget)
    assert code == 1, lines
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and len(errors[0]) > len("error: ") + 10, lines
    assert "opener calls 0" in lines, lines
    if case == "tiny budget":  # the plan's refusal, saying what would fit
        assert " over. Would fit: " in errors[0], errors


@pytest.mark.slow
def test_bundle_device_connects_where_it_is_told(java_core, stories_bundle):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"ws://127.0.0.1:{port}"
    code, lines = check(java_core, stories_bundle, TINYSTORIES, "1.5GB", url)
    assert code == 1, lines
    assert any(line.startswith(f"error: cannot reach the coordinator at {url}") for line in lines), lines
