"""Issue 25's faults, each a whole job of 21 to 24 model-free devices (tests.support.device_fleet) and a real
coordinator process: over a link the test makes for itself between two network namespaces, impaired by the
userspace netem (tests.support.netem: this kernel has no netem qdisc), with latency, loss and reordering, or a
third of the fleet cut off for longer than a round's deadline; the coordinator kill -9ed mid-round on SQLite and
on PostgreSQL; the disk under its SQLite database filling up.

After each: no update lost, doubled or altered, every version the aggregation of its round's stored updates,
the job finished and every device told so (tests.support.ledger); and the scenario's own facts. The figures
print with `-s`; `python -m benchmarks.faults` runs the same scenarios longer (docs/security.md, Network faults).
"""

from __future__ import annotations

import os

import pytest

from tests.support import fault_scenarios as scenarios
from tests.support.fake_bundle import write_fake_bundle
from tests.support.testbed import unavailable

POSTGRES = os.environ.get("FWDFED_TEST_POSTGRES_URL")  # .ci/run starts PostgreSQL and sets it


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The job's identity (model hash, adapter size): the devices run no program."""
    return write_fake_bundle(tmp_path_factory.mktemp("faults") / "bundle")


@pytest.fixture
def network():
    if (reason := unavailable()) is not None:
        pytest.skip(reason)


def checked(outcome: scenarios.Outcome) -> scenarios.Outcome:
    print(outcome.summary())
    scenarios.assert_recovered(outcome)
    return outcome


def test_latency_of_200_ms_with_50_ms_jitter_and_5_percent_loss(tmp_path, bundle, network):
    """Each way: 200 ± 50 ms per packet and 5% of packets lost; enrolled devices, so every handshake's challenge
    and signed answer cross the link too."""
    outcome = checked(scenarios.impaired_job(tmp_path, bundle, devices=21, rounds=2, enrolled=True,
                                             impairment={"delay_ms": 200, "jitter_ms": 50, "loss": 0.05}))
    for way in ("near_to_far", "far_to_near"):
        link = outcome.link[way]
        assert link["lost"] > 0 and link["reordered"] > 0, link  # the link did lose and reorder packets
        assert 150 <= link["delay_ms_min"] and link["delay_ms_max"] <= 250, link
    assert outcome.ledger.stored == 21 * 2  # every task once (acked or not)


def test_reordering_within_tcp_connections(tmp_path, bundle, network):
    """A quarter of the packets sent at once, overtaking the others (delayed 20 ms); updates of 300 pairs, so
    that several segments of one connection are in flight together."""
    outcome = checked(scenarios.impaired_job(tmp_path, bundle, devices=21, rounds=3, pairs=300,
                                             impairment={"delay_ms": 20, "reorder": 0.25}))
    for way in ("near_to_far", "far_to_near"):
        assert outcome.link[way]["reordered_in_flow"] > 0, outcome.link  # TCP had packets to put back in order
    assert outcome.ledger.stored == 21 * 3  # every task once (acked or not)


def test_a_third_of_the_fleet_cut_off_longer_than_a_round_deadline_then_healed(tmp_path, bundle, network):
    """A third of the fleet sampled per round; the third holding round 2's tasks is cut off for 12 s (the
    deadline is 10 s). Their tasks go to the others and round 2 closes during the partition; once healed, the
    cut devices come back and take tasks again; what they sent into the partition is refused, never counted."""
    outcome = checked(scenarios.partition(tmp_path, bundle))
    facts = outcome.facts
    assert outcome.times["partition"] > 10
    assert facts["round_two_attempts"] == ["closed"] and facts["round_two_closed_during_partition"], facts
    # Each cut device's task either was answered before the cut or went to another device.
    assert facts["cut_tasks_abandoned"] + facts["round_two_updates"]["from the cut"] == len(facts["cut"]), facts
    assert facts["round_two_updates"]["from the others"] >= facts["cut_tasks_abandoned"], facts
    assert facts["not_back"] == [] and facts["updates_from_cut_after_heal"] > 0, facts
    assert outcome.ledger.rounds_failed == 0


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_coordinator_killed_mid_round_under_load_resumes_on_the_same_database(tmp_path, bundle, database):
    """24 devices answering round 2 within 2 s of their task; SIGKILL once 30% of its updates are stored, and a
    new coordinator on the same database: the devices reconnect, what they had sent without an ack is sent
    again (and refused as a duplicate when it had been stored), and the round closes with every update once."""
    if database == "sqlite":
        outcome = checked(scenarios.coordinator_killed(tmp_path, bundle, str(tmp_path / "job.db"), rounds=2, think_s=2))
    else:
        if not POSTGRES:
            pytest.skip("FWDFED_TEST_POSTGRES_URL is not set (.ci/run sets it)")
        with scenarios.postgres_schema(POSTGRES) as url:
            outcome = checked(scenarios.coordinator_killed(tmp_path, bundle, url, rounds=2, think_s=2))
    facts = outcome.facts
    assert 0 < facts["stored_at_kill"] < facts["target"], facts  # killed mid-round
    assert facts["round_two_status"] == "closed" and facts["not_back"] == [], facts
    assert outcome.ledger.stored == 24 * 2  # every task once (acked or not)


def test_a_full_disk_stops_the_coordinator_with_one_line_and_it_resumes_once_there_is_room(tmp_path, bundle):
    """The SQLite database on a 2 MB tmpfs filled, once round 1 closed, but for 48 KB, which the coordinator's own
    writes use up mid-round 2: it stops at its first failed write with one line (no traceback, no connection
    left to fail on its own), having acked only what it stored; with the room back, serve resumes the job."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    outcome = checked(scenarios.disk_fills(tmp_path, bundle))
    facts, last = outcome.facts, outcome.facts["first_stderr"].strip().splitlines()[-1]
    assert facts["first_exit"] == 2 and last.startswith("error: cannot write the database"), last
    assert "database or disk is full" in last, last
    assert "Traceback" not in facts["first_stderr"], facts["first_stderr"][-3000:]
    assert outcome.times["stopped after the fill"] < 15, outcome.times
    assert facts["not_back"] == [], facts
    assert outcome.ledger.stored == 24 * 3  # every task once (acked or not)
