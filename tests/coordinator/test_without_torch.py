"""The operator's commands that need no model run where torch is not installed:
`python -m coordinator enrol|revoke|credentials|status` import none of torch, ExecuTorch,
transformers or peft (here they are made unimportable in the command's process)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from coordinator.server import JobConfig, job_from_bundle
from coordinator.store import open_store
from tests.conftest import ROOT

HEAVY = ("torch", "torchao", "executorch", "transformers", "peft", "tokenizers", "safetensors")

WITHOUT_TORCH = f"""
import runpy, sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed here)")

sys.meta_path.insert(0, NotInstalled())
sys.argv = ["coordinator", *sys.argv[1:]]
runpy.run_module("coordinator", run_name="__main__", alter_sys=True)
"""


def coordinator_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


class FakeManifest:
    base_model_hash = "h" * 64
    adapter_dim = 8


def test_enrol_revoke_credentials_and_status_run_without_torch(tmp_path):
    db, tokens = tmp_path / "job.db", tmp_path / "tokens.json"
    enrolled = coordinator_without_torch("enrol", "--db", str(db), "--device-id", "a", "b", "--out", str(tokens))
    assert enrolled.returncode == 0, enrolled.stderr
    assert set(json.loads(tokens.read_text())) == {"a", "b"}
    revoked = coordinator_without_torch("revoke", "--db", str(db), "--device-id", "b")
    assert revoked.returncode == 0 and "b: revoked" in revoked.stdout, revoked.stderr
    listed = coordinator_without_torch("credentials", "--db", str(db))
    assert listed.returncode == 0 and "valid" in listed.stdout and "revoked" in listed.stdout, listed.stderr
    assert listed.stdout.count("\tEd25519 key ") == 2  # enrol's credentials are keys (--bearer: tokens)

    config = JobConfig(rounds=2, devices_per_round=1, min_devices=1, round_deadline_s=10, hparams={"lr": 1e-3})
    open_store(db).create_job(job_from_bundle("job-1", "/bundle", FakeManifest, config), np.zeros(8, np.float32))
    status = coordinator_without_torch("status", "--db", str(db))
    assert status.returncode == 0 and "job job-1: running" in status.stdout, status.stderr


def test_the_blocker_really_blocks():
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH.replace('runpy.run_module("coordinator", '
                                                                         'run_name="__main__", alter_sys=True)',
                                                                         "import torch")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "not installed here" in result.stderr
