"""A fleet on loopback, as an operator runs one: the coordinator and emulated devices as real
processes, credentials issued with `coordinator enrol`, and whole jobs run end to end."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import ROOT, run_command


class Coordinator:
    """`python -m coordinator serve` in its own process; the port it bound is read from its output.
    Without credentials (`--auth none`) unless `args` says otherwise: the tests of credentials enrol.
    `launcher`: a prefix for the command (`ip netns exec NS`: on a host of tests.support.testbed)."""

    def __init__(self, db: Path, *args: str, port: int = 0, launcher: tuple[str, ...] | list[str] = ()):
        auth = [] if "--auth" in args else ["--auth", "none"]
        # The log goes to a file: a pipe nobody reads during the job would fill and stall the server.
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [*launcher, sys.executable, "-m", "coordinator", "serve", "--db", str(db), "--port", str(port), *auth,
             *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.lines = []
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("listening on "):
                self.url = line.split()[-1]
                return
        raise AssertionError(f"coordinator did not start:\n{''.join(self.lines)}\n{self.stderr()}")

    def read_until(self, text: str) -> str:
        for line in self.process.stdout:
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"coordinator ended before printing {text!r}:\n{''.join(self.lines)}")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait(self, timeout: float = 600) -> tuple[int, str, str]:
        out, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode, "".join(self.lines) + out, self.stderr()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def emulate(url: str, bundle: Path, data: Path, devices: int = 3, *args: str) -> subprocess.CompletedProcess:
    return run_command("device_sdk.emulate", "--mem", "1.5GB", "--coordinator", url, "--devices", str(devices),
                       "--bundle", str(bundle), "--data", str(data), *args)


def enrol(db: Path, out: Path, names: list[str], bearer: bool = False) -> dict:
    """Credentials for these devices, as an operator issues them: written to `out`, and returned (each a
    {"private_key": PEM}; with `bearer`, a token, which only `serve --allow-bearer` accepts)."""
    run_command("coordinator", "enrol", "--db", str(db), "--device-id", *names, "--out", str(out),
                *(["--bearer"] if bearer else []), check=True)
    return json.loads(out.read_text())


def run_job(tmp_path, bundle, data, rounds, hparams, eval_examples=128, devices=3, emulate_args=()):
    """A whole job as an operator runs it: enrol the devices, serve, emulate them with their tokens
    (and `emulate_args`, e.g. a teacher bundle)."""
    db = tmp_path / "job.db"
    credentials = tmp_path / "tokens.json"
    enrol(db, credentials, [f"emu-{i}" for i in range(devices)])  # the emulator names its devices emu-0, emu-1, ...
    coordinator = Coordinator(db, "--auth", "token", "--bundle", str(bundle), "--eval-data", str(data),
                              "--eval-examples", str(eval_examples), "--rounds", str(rounds), "--devices-per-round",
                              str(devices), "--round-deadline", "300", *hparams)
    try:
        devices_run = emulate(coordinator.url, bundle, data, devices, "--credentials", str(credentials), *emulate_args)
        # Failed devices leave the coordinator waiting for its round: say why now, not at its timeout,
        # with the coordinator's side (it may be the one that died).
        assert devices_run.returncode == 0, (devices_run.stderr[-3000:], coordinator.stderr()[-3000:])
        code, out, err = coordinator.wait()
    finally:
        coordinator.kill()
    assert code == 0, err[-3000:]
    return db, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
