"""The whole pipeline with real parts: exported bundles, a coordinator process, emulated device
processes on loopback, SQLite, and held-out evaluation through the ExecuTorch program."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from coordinator.store import open_store
from device_sdk.evaluate import Evaluator
from fwdfed.bundle.manifest import load_bundle
from fwdfed.directions import direction
from tests.conftest import ROOT, SST2, TINYSTORIES, export_bundle, run_command


class Coordinator:
    """`python -m coordinator serve` in its own process; the port it bound is read from its output.
    Without credentials (`--auth none`) unless `args` says otherwise: the tests of credentials enrol."""

    def __init__(self, db: Path, *args: str, port: int = 0):
        auth = [] if "--auth" in args else ["--auth", "none"]
        # The log goes to a file: a pipe nobody reads during the job would fill and stall the server.
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "serve", "--db", str(db), "--port", str(port), *auth, *args],
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


def enrol(db: Path, out: Path, names: list[str]) -> dict[str, str]:
    """Credentials for these devices, as an operator issues them: written to `out`, and returned."""
    run_command("coordinator", "enrol", "--db", str(db), "--device-id", *names, "--out", str(out), check=True)
    return json.loads(out.read_text())


def run_job(tmp_path, bundle, data, rounds, hparams, eval_examples=128, devices=3):
    """A whole job as an operator runs it: enrol the devices, serve, emulate them with their tokens."""
    db = tmp_path / "job.db"
    credentials = tmp_path / "tokens.json"
    enrol(db, credentials, [f"emu-{i}" for i in range(devices)])  # the emulator names its devices emu-0, emu-1, ...
    coordinator = Coordinator(db, "--auth", "token", "--bundle", str(bundle), "--eval-data", str(data),
                              "--eval-examples", str(eval_examples), "--rounds", str(rounds), "--devices-per-round",
                              str(devices), "--round-deadline", "300", *hparams)
    try:
        devices_run = emulate(coordinator.url, bundle, data, devices, "--credentials", str(credentials))
        code, out, err = coordinator.wait()
    finally:
        coordinator.kill()
    assert devices_run.returncode == 0, devices_run.stderr[-3000:]
    assert code == 0, err[-3000:]
    return db, out


def assert_beats_chance(bundle_dir: Path, db: Path, data: Path, eval_examples: int, controls: int = 8) -> dict:
    """The trained adapter's held-out loss must beat the start by more than a random step of the
    same length does: chance alone moves the loss by the spread of those controls."""
    bundle = load_bundle(bundle_dir)
    store = open_store(db)
    job = store.latest_job()
    versions = store.versions(job.id)
    start = np.frombuffer(versions[0].vector, "<f4")
    final = np.frombuffer(versions[-1].vector, "<f4")
    assert len(versions) == job.rounds + 1
    evaluate = Evaluator(bundle, data, eval_examples)
    start_loss, final_loss = evaluate(start)["heldout_loss"], evaluate(final)["heldout_loss"]
    step = np.linalg.norm(final - start)
    chance = []
    for k in range(controls):
        z = direction(10_000 + k, start.shape[0])
        chance.append(start_loss - evaluate(start + step * z / np.linalg.norm(z))["heldout_loss"])
    gain = start_loss - final_loss
    bar = max(max(chance), float(np.mean(chance) + 3 * np.std(chance)), 0.0)
    print(f"held-out loss {start_loss:.4f} -> {final_loss:.4f} (gain {gain:.4f}); "
          f"random steps of the same length: gains {np.round(chance, 4).tolist()}")
    assert gain > bar, f"gain {gain:.4f} is within chance (bar {bar:.4f})"
    # The coordinator's own per-round figures agree with a fresh evaluation.
    logged = [m.value for m in store.metrics(job.id) if m.name == "heldout_loss"]
    assert logged[0] == pytest.approx(start_loss, rel=1e-5) and logged[-1] == pytest.approx(final_loss, rel=1e-5)
    return {"start": start_loss, "final": final_loss, "chance": chance}


def test_stories260k_three_devices_three_rounds(tmp_path, stories_bundle):
    db, out = run_job(tmp_path, stories_bundle, TINYSTORIES, rounds=3,
                      hparams=["--lr", "1e-3", "--eps", "1e-2", "--local-steps", "100"], eval_examples=64)
    assert "round 3/3: 3 updates" in out
    assert_beats_chance(stories_bundle, db, TINYSTORIES, 64)
    store = open_store(db)
    job = store.latest_job()
    with store.session() as s:
        from coordinator.store import UpdateRow

        updates = s.query(UpdateRow).all()
    assert len(updates) == 9 and {u.num_pairs for u in updates} == {100}
    assert all(0 < u.peak_rss_bytes < 1.5e9 for u in updates)
    assert job.status == "finished"
    plot = tmp_path / "loss.png"
    run_command("coordinator", "plot", "--db", str(db), "--out", str(plot), check=True)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The trained adapter as a peft folder: eager peft agrees with the .pte on real text.
    out = tmp_path / "peft"
    run_command("coordinator", "export-adapter", "--db", str(db), "--out", str(out), check=True)
    assert_peft_folder_matches_program(stories_bundle, out, np.frombuffer(store.latest_version(job.id).vector, "<f4"))


def assert_peft_folder_matches_program(bundle_dir: Path, peft_folder: Path, vector: np.ndarray) -> None:
    """Load the written adapter the way a user would (peft, or BitFit's safetensors) and compare
    the eager loss with the .pte's on real text."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from device_sdk.data import encode, read_examples
    from device_sdk.engine import ProgramEngine
    from device_sdk.evaluate import load_tokenizer
    from fwdfed.bundle.tasks import CAUSAL_LM
    from fwdfed.model.program import per_example_loss

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    if m.task == CAUSAL_LM:
        base, data = AutoModelForCausalLM.from_pretrained(bundle.base_model_path), TINYSTORIES
    else:
        base = AutoModelForSequenceClassification.from_pretrained(bundle.base_model_path, num_labels=m.model["num_labels"])
        data = SST2
    if m.adapter["kind"] == "lora":
        model = PeftModel.from_pretrained(base, peft_folder).eval()
    else:
        missing, unexpected = base.load_state_dict(load_file(peft_folder / "bitfit.safetensors"), strict=False)
        assert not unexpected
        model = base.eval()
    batch = encode(load_tokenizer(bundle), read_examples(data)[:8], m.task, m.inputs["batch_size"],
                   m.inputs["seq_len"])[0]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    eager = per_example_loss(logits, batch.labels, m.task).numpy()
    program = ProgramEngine(bundle.program_path, m.inputs["max_perturbations"]).losses(batch, vector)[0]
    np.testing.assert_allclose(program, eager, rtol=1e-4, atol=1e-5)


def test_distilbert_classifier_three_devices_three_rounds(tmp_path_factory, tmp_path):
    bundle = export_bundle(tmp_path_factory.mktemp("bundles") / "distilbert", "--preset", "tiny-distilbert",
                           "--num-labels", "2", "--seq-len", "48")
    db, out = run_job(tmp_path, bundle, SST2, rounds=3,
                      hparams=["--lr", "1e-3", "--eps", "1e-2", "--local-steps", "200", "--directions", "2"],
                      eval_examples=256)
    assert "heldout_accuracy" in out
    assert_beats_chance(bundle, db, SST2, 256)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_coordinator_killed_mid_job_resumes_from_the_database(tmp_path, tiny_llama_bundle):
    """kill -9 the coordinator after round 1; a new one on the same database finishes the job
    with the devices that reconnect, and no update is lost or counted twice."""
    from coordinator.store import Round, UpdateRow

    db, port = tmp_path / "job.db", free_port()
    job_args = ["--bundle", str(tiny_llama_bundle), "--rounds", "3", "--devices-per-round", "2",
                "--local-steps", "20", "--round-deadline", "120"]
    first = Coordinator(db, *job_args, port=port)
    devices = subprocess.Popen(
        [sys.executable, "-m", "device_sdk.emulate", "--mem", "1.5GB", "--coordinator", first.url, "--devices", "2",
         "--bundle", str(tiny_llama_bundle), "--data", str(TINYSTORIES), "--connect-timeout", "60"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first.read_until("round 1/3")
        first.process.kill()  # SIGKILL: no chance to clean up
        first.process.communicate()
        second = Coordinator(db, port=port)
        code, out, err = second.wait()
        assert code == 0, err[-3000:]
        assert "resuming after round 1 of 3" in out and "round 3/3" in out
        _, devices_err = devices.communicate(timeout=120)
        assert devices.returncode == 0, devices_err[-3000:]
    finally:
        first.kill()
        devices.kill()
    store = open_store(db)
    job = store.latest_job()
    assert job.status == "finished"
    assert [v.version for v in store.versions(job.id)] == [0, 1, 2, 3]
    with store.session() as s:
        closed = s.query(Round).filter(Round.status == "closed").order_by(Round.number).all()
        assert [r.number for r in closed] == [1, 2, 3]
        for r in closed:
            updates = s.query(UpdateRow).filter(UpdateRow.round_id == r.id).all()
            assert sorted(u.device_id for u in updates) == ["emu-0", "emu-1"]
    # The same result as an uninterrupted run given the same updates: every version is exactly
    # the aggregation of the previous one with its round's stored updates.
    from coordinator.strategy import SeedFedAvg

    versions = [np.frombuffer(v.vector, "<f4") for v in store.versions(job.id)]
    for r, before, after in zip(closed, versions, versions[1:]):
        np.testing.assert_array_equal(SeedFedAvg().aggregate(before, store.accepted(r.id)), after)
