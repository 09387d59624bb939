"""What operators read: the state of a job in text, and its held-out metrics as a plot."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from coordinator.store import Job, Store


def status_text(store: Store, job: Job) -> str:
    lines = [f"job {job.id}: {job.status}, method {job.method}, {store.closed_rounds(job.id)}/{job.rounds} rounds, "
             f"{job.devices_per_round} devices per round (min {job.min_devices}), bundle {job.bundle}"]
    lines.append("rounds:")
    for rnd in store.rounds(job.id):
        updates = len(store.updates(rnd.id))
        extra = f" ({rnd.reason})" if rnd.reason else ""
        lines.append(f"  {rnd.number:>3} attempt {rnd.attempt}: {rnd.status:<6} from version {rnd.base_version}, "
                     f"{updates} updates, {rnd.wave + 1} wave(s){extra}")
    lines.append("devices:")
    now = time.time()
    for device in store.devices():
        lines.append(f"  {device.id:<20} {device.status:<6} last seen {now - device.last_seen:7.0f} s ago, "
                     f"{device.num_examples} examples")
    by_version: dict[int, dict[str, float]] = {}
    for m in store.metrics(job.id):
        by_version.setdefault(m.version, {})[m.name] = m.value
    if by_version:
        last = max(by_version)
        lines.append(f"metrics of version {last}: " + ", ".join(f"{k} {v:.4g}" for k, v in by_version[last].items()))
    refused = Counter(r.code for r in store.refusals(job.id))
    lines.append("refused: " + (", ".join(f"{code} {n}" for code, n in sorted(refused.items())) or "none"))
    return "\n".join(lines)


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
