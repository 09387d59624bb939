"""One job's state as the dashboard shows it, read from the store alone: a JSON-ready dict.

The round figures come from `coordinator.report.round_rows`, the same function `coordinator
status` prints, so the page and the text agree number for number.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter

from coordinator.job import JobOptions
from coordinator.report import best_version, metrics_by_version, round_rows
from coordinator.store import Store

RECENT_REFUSALS = 20


def snapshot(store: Store, job_id: str) -> dict:
    """Everything the page shows; times are absolute (seconds since the epoch), `now` is the
    store reader's clock, so that a state that did not change reads the same (`digest`)."""
    job = store.job(job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    rows = round_rows(store, job)
    for row in rows:  # an open round's seconds run on: the page counts them from opened_at
        if row["status"] == "open":
            row["seconds"] = None
    series: dict[str, list[list[float]]] = {}
    for version, values in sorted(metrics_by_version(store, job).items()):
        for name, value in values.items():
            if name.startswith("heldout_"):
                series.setdefault(name, []).append([version, value])
    best = best_version(store, job)
    refusals = store.refusals(job.id)
    return clean({
        "now": time.time(),
        "job": {"id": job.id, "status": job.status, "method": job.method, "rounds": job.rounds,
                "closed_rounds": sum(r["status"] == "closed" for r in rows),
                "devices_per_round": job.devices_per_round, "min_devices": job.min_devices,
                "round_deadline_s": job.round_deadline_s, "bundle": job.bundle, "created_at": job.created_at,
                "adapter_dim": job.adapter_dim, "hparams": job.hparams,
                "options": JobOptions.from_json(job.options).to_json()},
        "rounds": rows,
        "metrics": series,
        "best": None if best is None else {"version": best[0], "metric": best[1], "value": best[2]},
        "devices": device_rows(store, job.id, refusals),
        "refusals": {"by_code": dict(sorted(Counter(r.code for r in refusals).items())),
                     "recent": [{"at": r.at, "device": r.device_id, "code": r.code, "reason": r.reason}
                                for r in refusals[-RECENT_REFUSALS:][::-1]]},
    })


def device_rows(store: Store, job_id: str, refusals: list) -> list[dict]:
    """Each device: connected or away, first seen (its first hello), examples, bytes up and down, its peak
    memory in this job against its budget, updates, and its refusals (how many, the last one's code and reason)."""
    peak: dict[str, int] = {}
    updates: Counter = Counter()
    for u in store.update_figures(job_id):
        peak[u.device_id] = max(peak.get(u.device_id, 0), u.peak_rss_bytes)
        updates[u.device_id] += 1
    refused: dict[str, list] = {}
    for r in refusals:
        if r.device_id is not None:
            refused.setdefault(r.device_id, []).append(r)
    return [{"id": d.id, "state": "connected" if d.status == "online" else "away", "first_seen": d.first_seen,
             "last_seen": d.last_seen,
             "examples": d.num_examples, "bytes_up": d.bytes_up, "bytes_down": d.bytes_down,
             "peak_bytes": peak.get(d.id), "budget_bytes": d.mem_budget_bytes, "updates": updates[d.id],
             "refusals": len(refused.get(d.id, [])),
             "last_refusal": ({"code": refused[d.id][-1].code, "reason": refused[d.id][-1].reason}
                              if d.id in refused else None)}
            for d in store.devices()]


def clean(value):
    """JSON has no NaN or infinity: a non-finite figure is shown as missing (null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def encode(state: dict) -> tuple[str, str]:
    """The state as JSON text, and a digest of everything in it but the clock (changed or not)."""
    text = json.dumps(state, allow_nan=False, separators=(",", ":"))
    steady = json.dumps({k: v for k, v in state.items() if k != "now"}, sort_keys=True, allow_nan=False)
    return text, hashlib.sha256(steady.encode()).hexdigest()
