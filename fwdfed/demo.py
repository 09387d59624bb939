"""python -m fwdfed.demo: the main job, end to end, with real parts.

1. export the pretrained stories260K LLaMA with a LoRA adapter to an ExecuTorch bundle;
2. enrol the devices (a token each) and start the coordinator (websockets + SQLite) as its own process;
3. start emulated devices, each with its token, each its own process with its own shard of TinyStories, training
   with MeZO through the `.pte` and uploading (seed, coefficient) pairs;
4. print the held-out loss after every round, and write the final adapter as a peft folder.

Everything goes under --workdir (default runs/demo). The commands it runs are printed, so
each step can be repeated by hand.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from fwdfed.cli import run_main
from fwdfed.errors import UserError
from fwdfed.progress import echo, progress

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ROUND_LINE = re.compile(r"round (\d+)/(\d+): ")


def python_module(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run one step from the project root, printed first so it can be repeated by hand; a failed step
    is a UserError naming it. `kwargs` go to subprocess.run (capture_output=True, ...)."""
    print("$ " + shlex.join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, **kwargs)
    if result.returncode != 0:
        raise UserError(f"step failed ({result.returncode}): {shlex.join(cmd[2:4])}")
    return result


def serve_in_background(serve: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start `python -m coordinator serve ...` (its log in `log_path`, its output echoed); returns
    the process and the URL it printed once it listens. The caller kills the process when done."""
    print("$ " + shlex.join(serve), flush=True)
    coordinator = subprocess.Popen(serve, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True)
    for line in coordinator.stdout:
        print("  coordinator | " + line, end="", flush=True)
        if line.startswith("listening on "):
            return coordinator, line.split()[-1]
    coordinator.kill()
    raise UserError(f"the coordinator did not start; see {log_path}")


def run_fleet(serve: list[str], emulate: Callable[[str], list[str]], logs: Path) -> None:
    """Run a job as processes until it ends: the coordinator (`serve`) and, once it listens, the emulated
    devices (`emulate(url)`), their output echoed and their logs in `logs`; a failed job is a UserError."""
    coordinator, url = serve_in_background(serve, logs / "coordinator.log")
    devices = None
    try:
        command = emulate(url)
        print("$ " + shlex.join(command), flush=True)
        with (logs / "devices.log").open("w") as device_log:
            devices = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=device_log, text=True)
            bar = progress(desc="rounds", unit="round")
            for line in coordinator.stdout:
                echo(bar, "  coordinator | " + line)
                if done := ROUND_LINE.match(line):  # `round 3/5: ...`, as the coordinator closes a round
                    bar.total = int(done[2])
                    bar.update(int(done[1]) - bar.n)
            bar.close()
            device_lines = devices.communicate()[0]
        print("".join("  devices | " + line for line in device_lines.splitlines(keepends=True)), end="")
        if coordinator.wait() != 0 or devices.returncode != 0:
            raise UserError(f"the job failed; see {logs}/coordinator.log and devices.log")
    finally:
        for process in (coordinator, devices):
            if process is not None and process.poll() is None:
                process.kill()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fwdfed.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "stories260K")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "tinystories" / "train_head.txt")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=100)
    parser.add_argument("--mem", default="1.5GB")
    args = parser.parse_args(argv)
    for path in (args.model, args.data):
        if not path.exists():
            raise UserError(f"{path} does not exist (the demo uses the shared model and data beside the checkout)")

    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle, db, adapter = args.workdir / "bundle", args.workdir / "job.db", args.workdir / "peft_adapter"
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)  # the demo is a fresh job each time

    run(python_module("export", "--model", str(args.model), "--out", str(bundle)))
    names = [f"emu-{i}" for i in range(args.devices)]
    credentials = args.workdir / "tokens.json"
    run(python_module("coordinator", "enrol", "--db", str(db), "--device-id", *names, "--out", str(credentials)))
    serve = python_module("coordinator", "serve", "--db", str(db), "--port", "0", "--bundle", str(bundle),
                          "--eval-data", str(args.data), "--eval-examples", "128", "--rounds", str(args.rounds),
                          "--devices-per-round", str(args.devices), "--local-steps", str(args.local_steps),
                          "--lr", "1e-3", "--eps", "1e-2")
    run_fleet(serve, lambda url: python_module("device_sdk.emulate", "--mem", args.mem, "--coordinator", url,
                                               "--devices", str(args.devices), "--bundle", str(bundle), "--data",
                                               str(args.data), "--credentials", str(credentials)), args.workdir)
    run(python_module("coordinator", "export-adapter", "--db", str(db), "--out", str(adapter)))
    print(f"done: PeftModel.from_pretrained(base, {str(adapter)!r}) loads the trained adapter")
    return 0


if __name__ == "__main__":
    run_main(main)
