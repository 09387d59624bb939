"""After a fault: what the devices were told (tests.support.device_fleet's report) weighed against what the
coordinator's database holds, and every version checked against the aggregation of its stored updates.

The figures every fault scenario reports (docs/security.md, Network faults):
- sent: distinct updates the devices sent (one per task they answered), and sends, the frames, resends included;
- accepted: updates acked as accepted; refused: updates only ever refused, by the first refusal's code; and
  every refused ack by its code (a resent update's `duplicate` among them); unanswered: neither;
- lost: updates acked as accepted that the database does not hold (0);
- doubled: a task with two stored updates, a device with two updates in one round, or an update acked as
  accepted twice (0); altered: a stored update whose pairs are not the ones its device sent (0);
- stored, and stored_unacked: held though the device never saw the ack (the ack was lost with its connection),
  and in_failed_rounds: held by a round attempt that failed (too few updates by its deadline), so in no version;
- rounds: closed, failed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import msgpack

from coordinator import strategies
from coordinator.job import JobOptions
from coordinator.store import Round, UpdateRow
from fwdfed.bundle.manifest import load_bundle
from tests.support.checks import assert_versions_are_aggregates


@dataclass
class Ledger:
    sent: int
    sends: int
    accepted: int
    refused: dict[str, int]
    refused_acks: dict[str, int]
    stored: int
    stored_unacked: int
    in_failed_rounds: int
    lost: int
    doubled: int
    altered: int
    rounds_closed: int
    rounds_failed: int
    devices_done: int
    devices: int
    errors: dict[str, str] = field(default_factory=dict)  # device -> the error that stopped it

    def line(self) -> str:
        def codes(counts):
            return ", ".join(f"{code} {n}" for code, n in sorted(counts.items())) or "none"
        return (f"updates sent {self.sent} ({self.sends} sends), accepted {self.accepted}, "
                f"refused {self.refused_total} ({codes(self.refused)}; acks refused: {codes(self.refused_acks)}), "
                f"unanswered {self.unanswered}, "
                f"stored {self.stored} ({self.stored_unacked} without their ack, {self.in_failed_rounds} in failed "
                f"rounds), lost {self.lost}, "
                f"doubled {self.doubled}, altered {self.altered}; rounds closed {self.rounds_closed}, failed "
                f"{self.rounds_failed}; devices that saw the job end {self.devices_done}/{self.devices}")

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    @property
    def unanswered(self) -> int:
        """Sent, and never answered on any connection (the device gave up first)."""
        return self.sent - self.accepted - self.refused_total

    def as_dict(self) -> dict:
        return asdict(self)


def reckon(store, report: dict) -> Ledger:
    """The ledger of the store's latest job against a fleet's report."""
    job = store.latest_job()
    with store.session() as s:
        rows = s.query(UpdateRow).join(Round, Round.id == UpdateRow.round_id).filter(Round.job_id == job.id).all()
    rounds = store.rounds(job.id)
    failed = {r.id: r.status == "failed" for r in rounds}
    sent = accepted = sends = 0
    refused: Counter[str] = Counter()
    refused_acks: Counter[str] = Counter()
    acked, doubled_acks, pairs_sent = set(), 0, {}
    for device_id, device in report["devices"].items():
        for task_id, task in device["tasks"].items():
            if not task["sends"]:
                continue
            sent += 1
            sends += task["sends"]
            pairs_sent[task_id] = (device_id, list(zip(task["seeds"], task["coefs"])))
            yes = sum(1 for ok, _ in task["acks"] if ok)
            refused_acks.update(reason.split(":")[0] for ok, reason in task["acks"] if not ok)
            if yes:
                accepted += 1
                acked.add(task_id)
                doubled_acks += yes - 1
            elif task["acks"]:
                refused[task["acks"][0][1].split(":")[0]] += 1
    stored = Counter(row.task_id for row in rows)
    per_round_device = Counter((row.round_id, row.device_id) for row in rows)
    doubled = (sum(n - 1 for n in stored.values()) + sum(n - 1 for n in per_round_device.values()) + doubled_acks)

    def as_sent(row) -> bool:
        return pairs_sent.get(row.task_id) == (row.device_id, [tuple(p) for p in msgpack.unpackb(row.pairs)])
    altered = sum(not as_sent(row) for row in rows)
    return Ledger(sent=sent, sends=sends, accepted=accepted, refused=dict(refused), refused_acks=dict(refused_acks),
                  stored=len(rows), stored_unacked=len(set(stored) - acked),
                  in_failed_rounds=sum(1 for row in rows if failed[row.round_id]), lost=len(acked - set(stored)),
                  doubled=doubled, altered=altered, rounds_closed=sum(r.status == "closed" for r in rounds),
                  rounds_failed=sum(r.status == "failed" for r in rounds),
                  devices_done=sum(d["done"] for d in report["devices"].values()), devices=len(report["devices"]),
                  errors={d: v["error"] for d, v in report["devices"].items() if v["error"]})


def assert_nothing_lost_or_doubled(store, report: dict) -> Ledger:
    """The scenario's figures, after checking them: no update lost, doubled or altered, every version the
    aggregation of its round's stored updates by the job's own rule, the job finished, and every device
    told so."""
    ledger = reckon(store, report)
    assert (ledger.lost, ledger.doubled, ledger.altered) == (0, 0, 0), ledger.line()
    assert not ledger.errors, ledger.errors
    job = store.latest_job()
    assert job.status == "finished", f"job {job.id} is {job.status}: {ledger.line()}"
    assert ledger.rounds_closed == job.rounds and ledger.devices_done == ledger.devices, ledger.line()
    strategy = strategies.build(job, JobOptions.from_json(job.options), load_bundle(job.bundle).manifest.layout)
    assert_versions_are_aggregates(store, job, strategy)
    return ledger
