"""What operators read: the state of a job in text, and its held-out metrics as a plot."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path

import msgpack
from sqlalchemy import select

from coordinator.job import JobOptions, round_method_name
from coordinator.store import Job, Round, Store, Task, UpdateRow
from fwdfed import methods, protocol
from fwdfed.bundle.files import MANIFEST, BundleError
from fwdfed.bundle.manifest import Manifest


def metrics_by_version(store: Store, job: Job) -> dict[int, dict[str, float]]:
    by_version: dict[int, dict[str, float]] = {}
    for m in store.metrics(job.id):
        by_version.setdefault(m.version, {})[m.name] = m.value
    return by_version


def best_version(store: Store, job: Job) -> tuple[int, str, float] | None:
    """The version with the best held-out metric (accuracy when there is one, else loss), with it."""
    by_version = metrics_by_version(store, job)
    for name, better in (("heldout_accuracy", max), ("heldout_loss", min)):
        scored = {v: m[name] for v, m in by_version.items() if name in m}
        if scored:
            version = better(scored, key=lambda v: (scored[v], -v) if better is max else (scored[v], v))
            return version, name, scored[version]
    return None


def batch_size_of(job: Job) -> int:
    """The bundle's batch size (forward passes over a device's data count its batches), 1 when its
    manifest cannot be read (the status still shows the rest)."""
    try:
        return int(Manifest.from_json((Path(job.bundle) / MANIFEST).read_text()).inputs.batch_size)
    except (OSError, BundleError, ValueError, KeyError, TypeError):
        return 1


def first_tasks(store: Store, job_id: str) -> dict[int, dict]:
    """Each round's first task's hyperparameters, by round id (as sent: class-stats rounds differ)."""
    first: dict[int, dict] = {}
    with store.session() as s:
        rows = s.execute(select(Task.round_id, Task.hparams).join(Round, Round.id == Task.round_id)
                         .where(Round.job_id == job_id).order_by(Task.sent_at))
        for round_id, hparams in rows:
            first.setdefault(round_id, hparams)
    return first


def turnarounds(store: Store, job_id: str) -> dict[int, list[float]]:
    """Per round id, each accepted update's turnaround: seconds from its task sent (the latest send, for a
    resent task) to the update received."""
    by_round: dict[int, list[float]] = {}
    with store.session() as s:
        rows = s.execute(select(UpdateRow.round_id, UpdateRow.received_at - Task.sent_at)
                         .join(Task, Task.id == UpdateRow.task_id).join(Round, Round.id == UpdateRow.round_id)
                         .where(Round.job_id == job_id).order_by(UpdateRow.id))
        for round_id, seconds in rows:
            by_round.setdefault(round_id, []).append(seconds)
    return by_round


def turnaround_figures(seconds: list[float]) -> dict | None:
    """The median and the largest of a round's turnarounds, and how many; None for a round without updates."""
    if not seconds:
        return None
    return {"median": statistics.median(seconds), "max": max(seconds), "count": len(seconds)}


def round_rows(store: Store, job: Job, now: float | None = None) -> list[dict]:
    """Every round attempt's figures, as `status` prints them and the dashboard shows them: number,
    attempt, status, version (closed rounds), method, updates, waves, opened_at, seconds (so far, for an open round),
    forward passes, peak_bytes (the largest device peak), the version's held-out metrics, reason, and turnaround
    (`turnaround_figures` of its accepted updates)."""
    options, batch_size = JobOptions.from_json(job.options), batch_size_of(job)
    by_version = metrics_by_version(store, job)
    updates_by_round: dict[int, list] = {}
    for u in store.update_figures(job.id):
        updates_by_round.setdefault(u.round_id, []).append(u)
    first_hparams, turnaround_by_round = first_tasks(store, job.id), turnarounds(store, job.id)
    now = time.time() if now is None else now
    rows = []
    for rnd in store.rounds(job.id):
        updates = updates_by_round.get(rnd.id, [])
        name = round_method_name(job.method, options, rnd.number)
        method = methods.get(name) if name in methods.METHODS else None
        hparams = first_hparams.get(rnd.id, job.hparams)
        passes = sum(method.forward_passes(u.num_pairs, hparams, u.num_examples, batch_size) for u in updates) \
            if method else 0
        version = rnd.base_version + 1 if rnd.status == "closed" else None
        rows.append({"number": rnd.number, "attempt": rnd.attempt, "status": rnd.status, "version": version,
                     "method": name, "updates": len(updates), "waves": rnd.wave + 1,
                     "opened_at": rnd.opened_at, "seconds": (rnd.closed_at or now) - rnd.opened_at,
                     "forward_passes": passes,
                     "peak_bytes": max((u.peak_rss_bytes for u in updates), default=0),
                     "metrics": by_version.get(version, {}) if version is not None else {}, "reason": rnd.reason,
                     "turnaround": turnaround_figures(turnaround_by_round.get(rnd.id, []))})
    return rows


def update_frame_bytes(row: UpdateRow, job_id: str, rnd: Round) -> int:
    """The size of an accepted update's frame, re-encoded from what the coordinator stored of it: the frame the
    device sent wherever it encodes floats as msgpack float 64, as both SDKs do (docs/protocol.md)."""
    pairs = msgpack.unpackb(row.pairs)
    message = protocol.Update(task_id=row.task_id, job_id=job_id, round=rnd.number, global_version=rnd.base_version,
                              seeds=[int(s) for s, _ in pairs], coefs=[float(c) for _, c in pairs],
                              scale=float(row.scale), dense=row.dense or b"", num_examples=row.num_examples,
                              loss_before=row.loss_before, loss_after=row.loss_after,
                              peak_rss_bytes=row.peak_rss_bytes)
    return len(message.to_wire())


def device_bytes(store: Store, job: Job) -> dict[int, dict[str, dict]]:
    """Per round id, per device that had a task in it: `down`, the bytes of the task frames it was sent (every
    send, every wave; None where the coordinator did not count them: it stopped before the round ended),
    `seed_form`, whether its latest task carried the seed-form history instead of the dense adapter, and `up`,
    the bytes of its accepted updates (`update_frame_bytes`)."""
    rounds = {r.id: r for r in store.rounds(job.id)}
    out: dict[int, dict[str, dict]] = {}
    with store.session() as s:
        for task in s.scalars(select(Task).join(Round, Round.id == Task.round_id).where(Round.job_id == job.id)
                              .order_by(Task.sent_at)):
            row = out.setdefault(task.round_id, {}).setdefault(task.device_id,
                                                               {"down": None, "seed_form": None, "up": 0})
            if task.sent_bytes is not None:
                row["down"], row["seed_form"] = (row["down"] or 0) + task.sent_bytes, task.sent_seed_form
        for update in s.scalars(select(UpdateRow).join(Round, Round.id == UpdateRow.round_id)
                                .where(Round.job_id == job.id).order_by(UpdateRow.id)):
            row = out.setdefault(update.round_id, {}).setdefault(update.device_id,
                                                                 {"down": None, "seed_form": None, "up": 0})
            row["up"] += update_frame_bytes(update, job.id, rounds[update.round_id])
    return out


def bytes_line(devices: dict[str, dict], shown: int = 6) -> str:
    """One round's bytes per device, "device down / up" in KiB, a task in seed form marked *; past `shown`
    devices, the rest as a count and their largest figures."""
    def kib(n: int | None) -> str:
        return "-" if n is None else f"{n / 1024:,.1f}"

    names = sorted(devices)
    parts = [f"{d} {kib(devices[d]['down'])}{'*' if devices[d]['seed_form'] else ''} / {kib(devices[d]['up'])}"
             for d in names[:shown]]
    if rest := names[shown:]:
        down = max((devices[d]["down"] or 0 for d in rest), default=0)
        parts.append(f"{len(rest)} more (largest {kib(down)} / {kib(max(devices[d]['up'] for d in rest))})")
    return ", ".join(parts)


def status_text(store: Store, job: Job) -> str:
    lines = [f"job {job.id}: {job.status}, method {job.method}, {store.closed_rounds(job.id)}/{job.rounds} rounds, "
             f"{job.devices_per_round} devices per round (min {job.min_devices}), bundle {job.bundle}"]
    by_version = metrics_by_version(store, job)
    shown = [n for n in ("heldout_loss", "heldout_accuracy") if any(n in m for m in by_version.values())]
    lines.append("rounds:  round attempt status  version  updates waves  seconds  forward passes  peak MiB  "
                 + "  ".join(n.removeprefix("heldout_") for n in shown)
                 + "  tasks: KiB max, mean, in seed form  turnaround s: median, max of updates")
    if 0 in by_version:
        lines.append(f"  {'start':>5} {'':>7} {'':<6} {0:>8} {'':>8} {'':>5} {'':>8} {'':>15} {'':>9} "
                     + "  ".join(f"{by_version[0].get(n, float('nan')):.4f}" for n in shown))
    for row in round_rows(store, job):
        version, values = row["version"], row["metrics"]
        extra = f" ({row['reason']})" if row["reason"] else ""
        lines.append(f"  {row['number']:>5} {row['attempt']:>7} {row['status']:<6} "
                     f"{version if version is not None else '-':>8} {row['updates']:>8} {row['waves']:>5} "
                     f"{row['seconds']:>8.1f} {row['forward_passes']:>15,} {row['peak_bytes'] / 2**20:>9.0f} "
                     + "  ".join(f"{values[n]:.4f}" if n in values else "-" for n in shown)
                     + f"  {downlink(values)}  {turnaround(row['turnaround'])}" + extra)
    traffic = device_bytes(store, job)
    lines.append("bytes per round and device, down / up, KiB (* the task carried the seed-form history):")
    for rnd in store.rounds(job.id):
        if devices := traffic.get(rnd.id):
            lines.append(f"  {rnd.number:>5} {rnd.attempt:>7}  " + bytes_line(devices))
    best = best_version(store, job)
    if best is not None:
        lines.append(f"best version: {best[0]} ({best[1]} {best[2]:.4f}); "
                     f"python -m coordinator export-adapter --version best writes it")
    lines.append("devices:")
    now = time.time()
    for device in store.devices():
        when = (f"connected, last hello {now - device.last_seen:.0f} s ago" if device.status == "online"
                else f"away, last seen {now - device.last_seen:.0f} s ago")
        lines.append(f"  {device.id:<20} {when}, {(device.bytes_down or 0) / 1024:,.1f} KiB down, "
                     f"{(device.bytes_up or 0) / 1024:,.1f} KiB up, {device.num_examples} examples")
    refused = Counter(r.code for r in store.refusals(job.id))
    lines.append("refused: " + (", ".join(f"{code} {n}" for code, n in sorted(refused.items())) or "none"))
    return "\n".join(lines)


def downlink(metrics: dict) -> str:
    """A closed round's task frames as its coordinator sent them (the largest, the mean, how many of how many
    carried the seed-form history instead of the dense adapter); "-" for a round without the figures."""
    if "task_bytes_max" not in metrics:
        return "-"
    return (f"{metrics['task_bytes_max'] / 1024:.1f}, {metrics['task_bytes_mean'] / 1024:.1f}, "
            f"{metrics['tasks_in_seed_form']:.0f}/{metrics['tasks_sent']:.0f}")


def turnaround(figures: dict | None) -> str:
    """A round's turnaround figures as the round line prints them: "median, max of count"; "-" without updates."""
    if figures is None:
        return "-"
    return f"{figures['median']:.1f}, {figures['max']:.1f} of {figures['count']}"


def plot_metrics(store: Store, job: Job, out: Path) -> Path:
    """Held-out loss (and accuracy, when there is one) per global version, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series: dict[str, list[tuple[int, float]]] = {}
    for m in store.metrics(job.id):
        if m.name.startswith("heldout_"):
            series.setdefault(m.name, []).append((m.version, m.value))
    if not series:
        raise ValueError(f"job {job.id} has no held-out metrics (serve it with --eval-data)")
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (name, points) in zip(axes[0], sorted(series.items())):
        versions, values = zip(*points)
        ax.plot(versions, values, marker="o")
        ax.set_xlabel("global version (round)")
        ax.set_ylabel(name.replace("_", " "))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"job {job.id} ({job.method})")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
