"""Shared fixtures: real bundles exported once per session, and helpers to run our commands."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "tinystories" / "train_head.txt"
SST2 = SHARED / "data" / "sst2" / "train.tsv"


# Tests that need an exported program or real processes: `pytest -m "not slow"` is the fast lane.
SLOW_FIXTURES = {"stories_bundle", "tiny_llama_bundle", "stories_prompt_bundle", "prompt_learning_bundle",
                 "offsite_bundles", "split_bundle", "minilm_split_bundle", "stories_split_bundle",
                 "distilbert_bundle"}
SLOW_FOLDERS = {"integration", "android_demo"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or SLOW_FOLDERS & set(item.path.parts):
            item.add_marker(pytest.mark.slow)


def run_command(*args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m ...` of this project as a user would, from the project root."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def program_and_batches(bundle_dir: Path, count: int):
    """The bundle, its ExecuTorch engine, and `count` TinyStories examples in the program's batch shape."""
    from fwdfed.bundle.manifest import load_bundle
    from runtime.data import encode, read_examples
    from runtime.engine import ProgramEngine
    from runtime.evaluate import load_tokenizer

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    batches = encode(load_tokenizer(bundle), read_examples(TINYSTORIES)[:count], m.task, m.inputs.batch_size,
                     m.inputs.seq_len)
    return bundle, ProgramEngine(bundle.program_path, m.inputs.max_perturbations), batches


def away_from_init(bundle, seed: int = 0):
    """An adapter away from peft's init, where LoRA B = 0 makes half the gradient vanish."""
    import numpy as np

    noise = 0.05 * np.random.default_rng(seed).standard_normal(bundle.manifest.adapter_dim)
    return (bundle.initial_adapter() + noise).astype(np.float32)


def export_bundle(out: Path, *args: str, timeout: float = 600) -> Path:
    run_command("export", "--out", str(out), *args, check=True, timeout=timeout)
    return out


def exported_once(tmp_path_factory, name: str, export) -> Path:
    """`export(folder)` run once for all of this run's xdist workers (an export is minutes of one busy
    core, and both workers need the common bundles). The folder is shared: a test that alters a bundle
    copies it first (as every test here does)."""
    here = tmp_path_factory.getbasetemp()
    shared = (here.parent if os.environ.get("PYTEST_XDIST_WORKER") else here) / "exported-once"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits for this export instead of running its own
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            export(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def stories_bundle(tmp_path_factory) -> Path:
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is not here")
    return exported_once(tmp_path_factory, "stories", lambda f: export_bundle(f, "--model", str(STORIES)))


# Prompt tuning on stories260K initialised from text, small shapes: the prompt-learning export tests and
# the federated prompt-tuning job share one export.
STORIES_PROMPT_FLAGS = ("--adapter", "prompt-tuning", "--prompt-init", "text", "--prompt-init-text", "Once upon a time",
                        "--num-virtual-tokens", "4", "--batch-size", "2", "--seq-len", "32", "--max-perturbations", "2")


@pytest.fixture(scope="session")
def stories_prompt_bundle(tmp_path_factory) -> Path:
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is not here")
    return exported_once(tmp_path_factory, "stories-prompt", lambda f: export_bundle(
        f, "--model", str(STORIES), *STORIES_PROMPT_FLAGS))


@pytest.fixture(scope="session")
def tiny_llama_bundle(tmp_path_factory) -> Path:
    return exported_once(tmp_path_factory, "tiny-llama", lambda f: export_bundle(
        f, "--preset", "tiny-llama", "--batch-size", "2", "--seq-len", "16", "--max-perturbations", "4"))


@pytest.fixture(scope="session")
def distilbert_bundle(tmp_path_factory) -> Path:
    """A 2-class DistilBERT (2 blocks, random weights) with LoRA and its biases (peft's bias="all"), small
    shapes and the batched logits a fedkd student needs: the classifier jobs (FedAvg, the head round, FedKD's
    student) and the LoRA-with-biases export test (tests/export/test_adapters.py) share one export."""
    return exported_once(tmp_path_factory, "distilbert", lambda f: export_bundle(
        f, "--preset", "tiny-distilbert", "--num-labels", "2", "--seq-len", "32", "--batch-size", "4",
        "--max-perturbations", "4", "--distillation", "--lora-bias", "all"))


@pytest.fixture(scope="session")
def split_bundle(tmp_path_factory) -> Path:
    """A 2-class DistilBERT (2 blocks) with LoRA on its top block, split into prefix and top; small shapes."""
    return exported_once(tmp_path_factory, "split", lambda f: export_bundle(
        f, "--preset", "tiny-distilbert", "--num-labels", "2", "--adapter-blocks", "top:1", "--batch-size", "4",
        "--seq-len", "32", "--max-perturbations", "5", timeout=1200))


# stories260K (5 blocks) with LoRA on its top 2, split into prefix and top; small shapes: the causal LM's
# split tests and its federated job share one export.
STORIES_SPLIT_FLAGS = ("--adapter-blocks", "top:2", "--batch-size", "2", "--seq-len", "32", "--max-perturbations", "4")


@pytest.fixture(scope="session")
def stories_split_bundle(tmp_path_factory) -> Path:
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is not here")
    return exported_once(tmp_path_factory, "stories-split", lambda f: export_bundle(
        f, "--model", str(STORIES), *STORIES_SPLIT_FLAGS, timeout=1200))


@pytest.fixture(scope="session")
def minilm_split_bundle(tmp_path_factory) -> Path:
    """The headline's encoder with its real weights (all-MiniLM-L6-v2, 6 blocks), 2 classes, LoRA on its top
    block and the head, split into prefix and top; small shapes."""
    from benchmarks.headline import minilm_folder

    return exported_once(tmp_path_factory, "minilm-split", lambda f: export_bundle(
        f, "--model", str(minilm_folder()), "--task", "seq-cls", "--num-labels", "2", "--adapter-blocks", "top:1",
        "--batch-size", "8", "--seq-len", "32", "--max-perturbations", "5", timeout=1200))


@pytest.fixture(scope="session")
def offsite_bundles(tmp_path_factory) -> tuple[Path, Path]:
    """Offsite tuning's pair from a 3-block model with real weights, stories260K's blocks 0, 2 and 4 (in the
    folder `full.parent / "model"`): the emulator keeping its blocks 0 and 2, and the full model, both with
    LoRA on those blocks; small shapes, exported once. (emulator, full). Three blocks, not stories260K's five:
    the pair's lowering costs 3 + 2 blocks instead of 5 + 3, and a dropped block is still a real one."""
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is not here")

    def export_pair(folder: Path):  # one command writes both
        from fwdfed.bundle.tasks import CAUSAL_LM
        from fwdfed.model.emulator import DropLayers, write_emulator_model

        folder.mkdir()
        write_emulator_model(STORIES, folder / "model", CAUSAL_LM, 2, DropLayers(keep_first=1, keep_last=1))
        export_bundle(folder / "emulator", "--model", str(folder / "model"), "--emulator", "drop-layers",
                      "--keep-first", "1", "--keep-last", "1", "--drop-fraction", "0.5", "--full-out",
                      str(folder / "full"), "--batch-size", "2", "--seq-len", "16", "--max-perturbations", "2",
                      timeout=1200)

    folder = exported_once(tmp_path_factory, "offsite", export_pair)
    return folder / "emulator", folder / "full"


@pytest.fixture
def tls_files(tmp_path):
    """A private CA and a certificate for 127.0.0.1 that it signed, as PEM files: (cert, key, ca)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    (tmp_path / "cert.pem").write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    return tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
