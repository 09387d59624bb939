"""python -m benchmarks.fleet --out DIR --bundle B: FwdLLM's setting at its scale, on a fleet that looks like phones.

AG News dealt to 1,000 emulated devices, 100 a round, forward-only: the class-statistics head
round, then rounds of FZOO (the headline's method and defaults, benchmarks.headline) through the
split MiniLM program B. The devices run as Ray actors (`--ray`) or worker processes, with
profiles (speed, dropouts, online windows) and, at `--time-scale S`, each update held until its
device's simulated training time has passed (S wall seconds per simulated second), so that the
coordinator's over-selection and deadline meet the slow devices (docs/fleets.md).

B is a split MiniLM bundle, exported once and reused, e.g. at FwdLLM's batch of 8:

    python -m export --model M --task seq-cls --num-labels 4 --batch-size 8 --seq-len 64 --lora-rank 8 \\
        --max-perturbations 9 --adapter-blocks top:1 --out B

(M: the installed all-MiniLM-L6-v2, benchmarks.headline.minilm_folder). DIR/report.json holds,
per round, held-out accuracy and loss, the updates taken, the devices that came late, the wall
time and the simulated time; the emulator's wall time and its workers' peak RSS. DIR/fleet.png
plots accuracy against rounds, simulated time and wall time.

Simulated time of a round: from its first task sent to the moment it stopped collecting (its last
update taken, or its deadline), divided by the time scale; the coordinator's aggregation and
held-out evaluation are not device time and are left out (wall time keeps them). Both clocks start
at the first task of the first round, after the devices have connected.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.job import SHARED, JobSpec, run_job
from fwdfed import methods
from fwdfed import task_keys as keys
from fwdfed.cli import quiet_libraries
from fwdfed.errors import UserError
from fwdfed.methods.class_stats import DEFAULT_SHRINKAGE

AG_NEWS = SHARED / "data" / "ag_news" / "train_8000.csv"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True, help="a split MiniLM bundle (above)")
    parser.add_argument("--data", type=Path, default=AG_NEWS)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100, help="updates a round takes")
    parser.add_argument("--over-select", type=float, default=0.2, help="serve's: task this share more devices")
    parser.add_argument("--min-devices", type=int, help="fewest updates that close a round at its deadline "
                        "(default: 80%% of --per-round)")
    parser.add_argument("--deadline", type=float, default=60.0,
                        help="the round deadline in simulated seconds (serve's is this x --time-scale)")
    parser.add_argument("--rounds", type=int, default=10, help="training rounds after the head round")
    parser.add_argument("--method", default="fzoo", choices=methods.names(selectable_only=True))
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--directions", type=int, default=8)
    parser.add_argument("--head-lr", type=float, help="hybrid: the exact head step's learning rate (serve's default)")
    parser.add_argument("--head-init", choices=("lda", "none"), default="lda")
    parser.add_argument("--lda-shrinkage", type=float, default=DEFAULT_SHRINKAGE)
    parser.add_argument("--eval-examples", type=int, default=800)
    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="Ray actors: a local cluster, or the one at ADDRESS (default: worker processes)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--time-scale", type=float, default=10.0, help="wall seconds per simulated second")
    parser.add_argument("--profile-speed", default="2:8", help="the emulator's (2: twice as slow as this machine)")
    parser.add_argument("--profile-dropout", type=float, default=0.02)
    parser.add_argument("--profile-online", default="0.5:1")
    parser.add_argument("--profile-day", type=float, default=120.0, help="simulated seconds")
    parser.add_argument("--mem", default="1.5GB")
    args = parser.parse_args(argv)
    if min(args.devices, args.per_round, args.rounds, args.workers, args.local_steps) < 1:
        parser.error("--devices, --per-round, --rounds, --workers and --local-steps must be at least 1")
    if args.per_round > args.devices:
        parser.error("--per-round must not exceed --devices")
    if args.min_devices is None:
        args.min_devices = max(1, math.ceil(0.8 * args.per_round))
    if not 1 <= args.min_devices <= args.per_round:
        parser.error("--min-devices must be between 1 and --per-round")
    if args.head_lr is not None and keys.HEAD_LR not in {h.name for h in methods.get(args.method).hparams}:
        parser.error(f"--head-lr is for a method with an exact head step (hybrid), not {args.method}")
    for name in ("deadline", "time_scale"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a number > 0, got {value!r}")
    return args


def job_spec(args) -> JobSpec:
    training = ["--method", args.method, "--local-steps", str(args.local_steps), "--lr", str(args.lr), "--eps",
                str(args.eps), "--directions", str(args.directions), "--head-init", args.head_init,
                "--lda-shrinkage", str(args.lda_shrinkage), "--over-select", str(args.over_select),
                "--min-devices", str(args.min_devices)]
    if args.head_lr is not None:
        training += ["--head-lr", str(args.head_lr)]
    fleet = (["--ray", *([args.ray] if args.ray else [])] if args.ray is not None else []) + [
        "--connect-timeout", "300", "--time-scale", str(args.time_scale), "--profile-speed", args.profile_speed,
        "--profile-dropout", str(args.profile_dropout), "--profile-online", args.profile_online, "--profile-day",
        str(args.profile_day), "--profile-out", str(args.out.resolve() / "profiles.json")]
    return JobSpec(bundle=args.bundle, data=args.data, rounds=args.rounds, training=training, devices=args.devices,
                   per_round=args.per_round, deadline_s=args.deadline * args.time_scale, workers=args.workers,
                   eval_examples=args.eval_examples, mem=args.mem, device_flags=fleet)


def fleet_rounds(db: Path, devices: list[dict], time_scale: float) -> list[dict]:
    """Every round attempt, in order: what it took and when, in wall and simulated time (the module's docstring),
    with the held-out metrics of the version it made and the devices whose updates came late."""
    from coordinator.report import metrics_by_version
    from coordinator.store import open_store

    store = open_store(db)
    job = store.latest_job()
    by_version = metrics_by_version(store, job)
    late = defaultdict(list)
    for device in devices:
        for task in device["tasks"]:
            if task["outcome"] == "late":
                late[task["round"]].append(device["device_id"])
    rows, start = [], None
    simulated = 0.0
    for rnd in sorted(store.rounds(job.id), key=lambda r: r.opened_at):
        tasks = store.tasks(rnd.id)
        if rnd.closed_at is None or not tasks:
            continue
        # A round counts from its first task sent: the first round opens before the devices have connected.
        opened = min(t.sent_at for t in tasks)
        start = opened if start is None else start
        updates = store.updates(rnd.id)
        enough = len(updates) >= job.devices_per_round
        stopped = max(u.received_at for u in updates) if enough else \
            min(rnd.wave_opened_at + job.round_deadline_s, rnd.closed_at)
        simulated += (stopped - opened) / time_scale
        metrics = by_version.get(rnd.base_version + 1, {}) if rnd.status == "closed" else {}
        rows.append({"round": rnd.number, "attempt": rnd.attempt, "status": rnd.status,
                     "closed_by": "updates" if enough else "deadline", "tasks": len(tasks), "updates": len(updates),
                     "late": sorted(late.get(rnd.number, [])) if rnd.status == "closed" else [],
                     "heldout_accuracy": metrics.get("heldout_accuracy"), "heldout_loss": metrics.get("heldout_loss"),
                     "wall_seconds": rnd.closed_at - opened, "collect_seconds": stopped - opened,
                     "simulated_seconds": (stopped - opened) / time_scale,
                     "cumulative_wall_seconds": rnd.closed_at - start, "cumulative_simulated_seconds": simulated})
    return rows


def fleet_summary(profiles: dict) -> dict:
    """What the emulator's record says of the fleet: its workers' memory and what became of the devices' tasks."""
    devices = profiles["devices"]
    tasks = [t for d in devices for t in d["tasks"]]
    lags = [t["lag_seconds"] for t in tasks if "lag_seconds" in t]
    outcomes = defaultdict(int)
    for t in tasks:
        outcomes[t["outcome"]] += 1
    return {"workers": profiles["workers"], "devices_tasked": sum(bool(d["tasks"]) for d in devices),
            "task_outcomes": dict(outcomes), "dropouts": sum(d["dropouts"] for d in devices),
            "tasks_behind_the_clock": sum(lag > 0 for lag in lags), "max_lag_seconds": max(lags, default=0.0),
            "device_train_seconds": sum(d["train_seconds"] for d in devices),
            "device_simulated_seconds": sum(d["simulated_seconds"] for d in devices)}


def plot(report: dict, path: Path) -> None:
    """Held-out accuracy (top) and loss (bottom) against rounds, simulated time and wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [r for r in report["rounds"] if r["status"] == "closed"]
    start = report["start"]
    axes = plt.subplots(2, 3, figsize=(14, 7), sharex="col", sharey="row")[1]
    for row, (metric, label, scale) in enumerate((("heldout_accuracy", "held-out accuracy (%)", 100),
                                                  ("heldout_loss", "held-out loss", 1))):
        values = [scale * v for v in [start.get(metric)] + [r[metric] for r in closed]]
        for ax, key, name in ((axes[row][0], None, "round"),
                              (axes[row][1], "cumulative_simulated_seconds", "simulated time (s)"),
                              (axes[row][2], "cumulative_wall_seconds", "wall time (min)")):
            xs = list(range(len(values))) if key is None else \
                [0.0] + [r[key] / (60 if key == "cumulative_wall_seconds" else 1) for r in closed]
            ax.plot(xs, values, marker="o", markersize=3)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel(name)
        axes[row][0].set_ylabel(label)
    settings = report["settings"]
    plt.suptitle(f"AG News over {settings['devices']} devices, {settings['per_round']} a round: {report['method']} "
                 f"after the class-statistics head (round 1)")
    plt.tight_layout()
    plt.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    if not args.data.is_file():
        raise UserError(f"{args.data} does not exist (the shared data beside the checkout)")
    out = args.out.resolve()
    figures = run_job(job_spec(args), out)
    profiles = json.loads((out / "profiles.json").read_text())
    rounds = fleet_rounds(out / "job.db", profiles["devices"], args.time_scale)
    report = {"command": "python -m benchmarks.fleet " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "method": figures["method"], "hparams": figures["hparams"], "start": figures["start"],
              "rounds": rounds, "fleet": fleet_summary(profiles), "job_seconds": figures["job_seconds"],
              "job_figures": figures["rounds"]}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, out / "fleet.png")
    for r in rounds:
        late = f"; late: {', '.join(r['late'])}" if r["late"] else ""
        accuracy = "" if r["heldout_accuracy"] is None else f", held-out accuracy {r['heldout_accuracy']:.4f}"
        print(f"round {r['round']} ({r['status']}, by {r['closed_by']}): {r['updates']} of {r['tasks']} tasked"
              f"{accuracy}; simulated {r['simulated_seconds']:.1f} s, wall {r['wall_seconds']:.0f} s{late}")
    rss = ", ".join(f"{w['peak_rss'] / 2**20:.0f} MiB ({w['devices']} devices)" for w in report["fleet"]["workers"])
    print(f"job wall {report['job_seconds'] / 60:.1f} min; worker peak RSS {rss}; report {out / 'report.json'}, "
          f"plot {out / 'fleet.png'}")
    return 0


if __name__ == "__main__":
    from fwdfed.cli import run_main

    run_main(main)
