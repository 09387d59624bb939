"""One federated job, end to end, with real parts, and the figures it leaves behind.

Enrol the devices, start the coordinator (websockets + SQLite) and the emulated devices as
their own processes over loopback, wait for the job to end, write the best and the final
global adapters as peft folders, and read back from the job's database what every benchmark
reports: held-out metric per version, wall time, forward passes, bytes on the wire per device
and peak memory per round. Every command is printed, so each step can be repeated by hand.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fwdfed.demo import python_module, run, run_fleet
from fwdfed.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def earlier_results(out: Path) -> dict:
    """What an earlier call wrote to `out`/results.json ({} if nothing): a run can be completed arm by arm.
    Read before any work is done, so that a damaged file is refused at once, not after the exports."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a results file ({e}); move it away or choose another --out") from None
    if not isinstance(results, dict):
        raise UserError(f"{path} is not a results file (not a JSON object); move it away or choose another --out")
    return results


def export_bundle(out: Path, *flags: str) -> Path:
    run(python_module("export", "--out", str(out), *flags))
    return out


@dataclass
class JobSpec:
    bundle: Path
    data: Path
    rounds: int
    training: list[str]  # serve's flags for the method: --method, --lr, --local-steps, ...
    data_flags: list[str] = field(default_factory=lambda: ["--data-seed", "0"])  # for serve and the devices
    devices: int = 3
    per_round: int | None = None  # devices a round takes (serve --devices-per-round); None: all of them
    deadline_s: float = 3600.0  # serve --round-deadline
    workers: int | None = None
    split: str = "iid"
    alpha: float = 0.5
    eval_examples: int = 800
    mem: str = "1.5GB"
    device_flags: list[str] = field(default_factory=list)  # the emulator's own, e.g. --teacher-bundle


def run_job(spec: JobSpec, out: Path) -> dict:
    """Run the job in `out` (a fresh database each time); returns the figures (`job_figures`)
    with the wall time, and leaves the final global adapter in `out/adapter` and the best by the
    coordinator's held-out metric in `out/best_adapter`, as peft folders."""
    out.mkdir(parents=True, exist_ok=True)
    db, credentials = out / "job.db", out / "tokens.json"
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)
    started = time.time()
    names = [f"emu-{i}" for i in range(spec.devices)]
    run(python_module("coordinator", "enrol", "--db", str(db), "--device-id", *names, "--out", str(credentials)),
        stdout=subprocess.DEVNULL)
    serve = python_module("coordinator", "serve", "--db", str(db), "--port", "0", "--bundle", str(spec.bundle),
                          "--eval-data", str(spec.data), "--eval-examples", str(spec.eval_examples), "--rounds",
                          str(spec.rounds), "--devices-per-round", str(spec.per_round or spec.devices),
                          "--round-deadline", str(spec.deadline_s),
                          *spec.training, *spec.data_flags)
    run_fleet(serve, lambda url: python_module(
        "device_sdk.emulate", "--mem", spec.mem, "--coordinator", url, "--devices", str(spec.devices), "--bundle",
        str(spec.bundle), "--data", str(spec.data), "--credentials", str(credentials), "--split", spec.split,
        "--alpha", str(spec.alpha), *spec.data_flags, *(["--workers", str(spec.workers)] if spec.workers else []),
        *spec.device_flags), out)
    seconds = time.time() - started
    for version, folder in (("latest", "adapter"), ("best", "best_adapter")):
        run(python_module("coordinator", "export-adapter", "--db", str(db), "--version", version, "--out",
                          str(out / folder)), stdout=subprocess.DEVNULL)
    status = run(python_module("coordinator", "status", "--db", str(db)), capture_output=True, text=True).stdout
    (out / "status.txt").write_text(status)
    print(status)
    return job_figures(db) | {"job_seconds": seconds}


def job_figures(db: Path) -> dict:
    """What the job's database says: per round, the held-out metrics of the version it made, its
    wall time, forward passes, peak memory of the devices, and the bytes each device received (its task
    frames as the coordinator sent and counted them, seed-form history or dense adapter; `received_bytes_per_device`
    the largest, rebuilt as a dense task for a job stored before the coordinator counted them) and sent (its
    update's frame, re-encoded from what the coordinator stored: `coordinator.report.update_frame_bytes`), per
    device in `devices`: {device: {"down": bytes, "up": bytes, "seed_form": bool}}."""
    from coordinator.job import JobOptions, round_method_name
    from coordinator.report import batch_size_of, best_version, device_bytes, metrics_by_version
    from coordinator.store import open_store
    from fwdfed import methods

    store = open_store(db)
    job = store.latest_job()
    by_version = metrics_by_version(store, job)
    batch_size, options = batch_size_of(job), JobOptions.from_json(job.options)
    traffic = device_bytes(store, job)
    rounds = []
    for rnd in store.rounds(job.id):
        if rnd.status != "closed":
            continue
        method = methods.get(round_method_name(job.method, options, rnd.number))
        tasks, updates = store.tasks(rnd.id), store.updates(rnd.id)
        devices = traffic.get(rnd.id, {})
        version_metrics = by_version.get(rnd.base_version + 1, {})
        dense = max((task_frame_bytes(job, rnd, method, t.hparams) for t in tasks), default=0)
        received = int(version_metrics.get("task_bytes_max", dense))
        rounds.append({"round": rnd.number, "version": rnd.base_version + 1, "seconds": rnd.closed_at - rnd.opened_at,
                       "updates": len(updates), "method": method.name,
                       "forward_passes": sum(method.forward_passes(u.num_pairs, tasks[0].hparams, u.num_examples,
                                                                   batch_size) for u in updates),
                       "sent_bytes_per_device": max((d["up"] for d in devices.values()), default=0),
                       "received_bytes_per_device": received, "dense_task_bytes": dense,
                       "devices": {name: devices[name] for name in sorted(devices)},
                       "peak_rss_bytes": max((u.peak_rss_bytes for u in updates), default=0),
                       **version_metrics})
    best = best_version(store, job)
    return {"method": job.method, "hparams": job.hparams, "adapter_dim": job.adapter_dim,
            "start": by_version.get(0, {}), "rounds": rounds, "best_version": best[0] if best else None,
            "prefix_passes": prefix_passes(store, job, batch_size)}


def prefix_passes(store, job, batch_size: int) -> int:
    """A split bundle's prefix passes (fwdfed.model.split): each device runs the frozen prefix once over its
    batches, before its first step; 0 for a bundle that is not split. Each costs about a whole-model pass
    less the adapted blocks, so they are counted apart from the passes through the top."""
    from fwdfed.bundle.manifest import load_bundle

    try:
        if not load_bundle(job.bundle).manifest.program.split:
            return 0
    except (UserError, OSError):  # a bundle moved since: the figure is unknown, not zero
        return -1
    examples = {}
    for rnd in store.rounds(job.id):
        for u in store.updates(rnd.id):
            examples.setdefault(u.device_id, u.num_examples)
    return sum(-(-n // batch_size) for n in examples.values())


def task_frame_bytes(job, rnd, method, hparams: dict) -> int:
    """The size of a task message of this round: the global adapter (d float32), the hyperparameters
    and, for a method that uses it, the previous round's update."""
    from fwdfed import protocol

    d = job.adapter_dim
    reference = b"\0" * (4 * d) if method.uses_reference and rnd.base_version > 0 else b""
    message = protocol.Task(task_id="t" * 36, job_id=job.id, round=rnd.number, global_version=rnd.base_version,
                            base_model_hash=job.base_model_hash, adapter=np.zeros(d, "<f4").tobytes(),
                            adapter_sha256="0" * 64, method=method.name, hparams=hparams, deadline_s=3600.0,
                            reference=reference)
    return len(message.to_wire())


def chance_gains(evaluate, start: np.ndarray, start_loss: float, length: float, count: int) -> list[float]:
    """The held-out gain of `count` random steps of `length` from `start` (whose held-out loss is
    `start_loss`): what chance alone moves it. `evaluate(adapter)` is a `runtime.evaluate.Evaluator`."""
    from fwdfed.directions import direction

    gains = []
    for k in range(count):
        z = direction(10_000 + k, start.shape[0])
        gains.append(start_loss - evaluate(start + length * z / np.linalg.norm(z))["heldout_loss"])
    return gains


def chance_bar(gains: list[float]) -> float:
    """The gain a trained adapter must pass to beat chance: the best random step's, or three standard
    deviations above their mean, whichever is higher."""
    return max(max(gains), float(np.mean(gains) + 3 * np.std(gains)), 0.0)


def first_and_last_adapters(db: Path) -> tuple[np.ndarray, np.ndarray]:
    """The latest job's first (version 0) and last global adapters, from its database."""
    from coordinator.store import open_store

    store = open_store(db)
    versions = store.versions(store.latest_job().id)
    return tuple(np.frombuffer(v.vector, "<f4") for v in (versions[0], versions[-1]))


def gain_against_chance(bundle_dir: Path, db: Path, data: Path, examples: int, controls: int = 8) -> dict:
    """The latest job's first and last global adapters on `examples` held-out rows of `data`, and `controls`
    random steps of the same length from the first (benchmarks.quantized, benchmarks.prompt_learning)."""
    from fwdfed.bundle.manifest import load_bundle
    from runtime.evaluate import Evaluator

    start, final = first_and_last_adapters(db)
    evaluate = Evaluator(load_bundle(bundle_dir), data, examples)
    start_loss, final_loss = evaluate(start)["heldout_loss"], evaluate(final)["heldout_loss"]
    step = float(np.linalg.norm(final - start))
    chance = chance_gains(evaluate, start, start_loss, step, controls)
    gain = start_loss - final_loss
    bar = chance_bar(chance)
    return {"heldout_loss_start": start_loss, "heldout_loss_final": final_loss, "gain": gain,
            "random_step_gains": chance, "chance_bar": bar, "beats_chance": bool(gain > bar), "step_norm": step}
