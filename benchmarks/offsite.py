"""python -m benchmarks.offsite --out DIR: offsite tuning's emulator against the full model, measured.

1. export the pair: `python -m export --emulator drop-layers` writes the emulator (first and last
   blocks kept with the LoRA adapter, a share of the middle ones dropped) and the full model's
   bundle, same shapes, same P, one adapter layout;
2. profile both (`python -m device_sdk.profile`: fresh processes, same batch): a device's peak
   memory and time per step, inference and a MeZO step, emulator against full;
3. train: a federated job (coordinator, emulated devices, loopback websockets, SQLite) whose
   devices train on the emulator while the coordinator evaluates every version on the FULL
   model (`serve --eval-bundle`); with `--arms emulator full` (the default), the same job trained
   on the full model itself, for what the emulator costs in quality;
4. score: the full model's held-out loss before training, after the emulator-trained adapter,
   and after random steps of the same length from the same start (chance), plus the emulator's own
   held-out loss before and after.

It prints the figures and writes DIR/offsite.json. `--memory-preset llama-110m` also exports and
profiles that pair (memory and time only: a preset has random weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.job import SHARED, JobSpec, chance_gains, export_bundle, first_and_last_adapters, run_job
from fwdfed.cli import quiet_libraries, run_main
from fwdfed.demo import python_module, run

ARMS = ("emulator", "full")


def export_pair(out: Path, source: list[str], shape: list[str], emulator: list[str]) -> tuple[Path, Path]:
    export_bundle(out / "emulator", *source, *shape, "--emulator", "drop-layers", *emulator,
                  "--full-out", str(out / "full"))
    return out / "emulator", out / "full"


def profile_pair(emulator: Path, full: Path, out: Path, repeats: int) -> list[dict]:
    run(python_module("device_sdk.profile", "--bundle", str(emulator), "--bundle", str(full), "--modes", "inference",
                      "mezo", "--repeats", str(repeats), "--out", str(out)))
    return json.loads((out / "emulator.json").read_text())


def score_job(db: Path, emulator: Path, full: Path, data: Path, eval_examples: int, controls: int) -> dict:
    """Start and final adapters of a job, on the full model and on the emulator, and chance."""
    from fwdfed.bundle.manifest import load_bundle
    from runtime.evaluate import Evaluator

    start, final = first_and_last_adapters(db)
    on_full = Evaluator(load_bundle(full), data, eval_examples)
    on_emulator = Evaluator(load_bundle(emulator), data, eval_examples)
    length = float(np.linalg.norm(final - start))
    full_start = on_full(start)["heldout_loss"]
    chance = chance_gains(on_full, start, full_start, length, controls)
    return {"step_length": length,
            "full_start": full_start, "full_final": on_full(final)["heldout_loss"],
            "emulator_start": on_emulator(start)["heldout_loss"],
            "emulator_final": on_emulator(final)["heldout_loss"],
            "full_chance_gains": chance}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.offsite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "stories260K")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "tinystories" / "train_head.txt")
    parser.add_argument("--keep-first", default="1")
    parser.add_argument("--keep-last", default="1")
    parser.add_argument("--drop-fraction", default="0.5")
    parser.add_argument("--batch-size", default="4")
    parser.add_argument("--seq-len", default="64")
    parser.add_argument("--max-perturbations", default="8")
    parser.add_argument("--arms", nargs="*", choices=ARMS, default=list(ARMS),
                        help="emulator: devices train on the emulator; full: on the full model (the reference); "
                             "--arms with no value: memory and time only")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--training", default="--method mezo --lr 1e-3 --eps 1e-2 --local-steps 100",
                        help="serve's training flags, as one string")
    parser.add_argument("--eval-examples", type=int, default=128)
    parser.add_argument("--controls", type=int, default=8, help="random steps of the same length (chance)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per profiled mode")
    parser.add_argument("--memory-preset", help="also export and profile this preset's pair (e.g. llama-110m)")
    parser.add_argument("--memory-shape", default="4,128,8", help="the preset pair's batch,seq,P (default 4,128,8)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    shape = ["--batch-size", args.batch_size, "--seq-len", args.seq_len, "--max-perturbations", args.max_perturbations]
    emulator_flags = ["--keep-first", args.keep_first, "--keep-last", args.keep_last,
                      "--drop-fraction", args.drop_fraction]
    emulator, full = export_pair(args.out / "bundles", ["--model", str(args.model)], shape, emulator_flags)
    results = {"model": str(args.model), "shape": shape, "emulator_flags": emulator_flags,
               "emulator": json.loads((emulator / "manifest.json").read_text())["emulator"],
               "profile": profile_pair(emulator, full, args.out / "profile", args.repeats), "arms": {}}
    for arm in args.arms:
        trained_on = emulator if arm == "emulator" else full
        training = args.training.split() + (["--eval-bundle", str(full)] if arm == "emulator" else [])
        figures = run_job(JobSpec(bundle=trained_on, data=args.data, rounds=args.rounds, training=training,
                                  devices=args.devices, eval_examples=args.eval_examples), args.out / arm)
        scores = score_job(args.out / arm / "job.db", emulator, full, args.data, args.eval_examples, args.controls)
        results["arms"][arm] = {"figures": figures, "scores": scores}
    if args.memory_preset:
        b, length, p = args.memory_shape.split(",")
        pair = export_pair(args.out / args.memory_preset, ["--preset", args.memory_preset],
                           ["--batch-size", b, "--seq-len", length, "--max-perturbations", p], emulator_flags)
        results["memory_preset"] = {"preset": args.memory_preset, "shape": [b, length, p],
                                    "profile": profile_pair(*pair, args.out / args.memory_preset / "profile",
                                                            args.repeats)}
    (args.out / "offsite.json").write_text(json.dumps(results, indent=2))
    print_summary(results)
    print(f"wrote {args.out / 'offsite.json'}")
    return 0


def print_summary(results: dict) -> None:
    mib = 2**20
    record = results["emulator"]
    print(f"\nemulator: blocks {record['kept_layers']} of {record['full_layers']} "
          f"(dropped {record['dropped_layers']}), adapter on {record['adapter_layers']}")
    profiles = [("model", results["profile"])]
    if "memory_preset" in results:
        profiles.append((results["memory_preset"]["preset"], results["memory_preset"]["profile"]))
    for name, rows in profiles:
        for r in rows:
            print(f"{name:<12} {r['mode']:<10} peak {r['emulator_peak_bytes'] / mib:6.0f} vs "
                  f"{r['full_peak_bytes'] / mib:6.0f} MiB ({r['peak_ratio']:.3f}x)   "
                  f"{r['emulator_step_seconds'] * 1e3:8.1f} vs {r['full_step_seconds'] * 1e3:8.1f} ms per step "
                  f"({r['time_ratio']:.3f}x)  [emulator vs full]")
    for arm, a in results["arms"].items():
        s = a["scores"]
        chance = s["full_chance_gains"]
        print(f"trained on {arm:<9}: full model's held-out loss {s['full_start']:.4f} -> {s['full_final']:.4f} "
              f"(gain {s['full_start'] - s['full_final']:.4f}; random steps of the same length: "
              f"{min(chance):.4f} .. {max(chance):.4f}); the emulator's {s['emulator_start']:.4f} -> "
              f"{s['emulator_final']:.4f}; job {a['figures']['job_seconds']:.0f} s")


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
