"""The device given hostile input: a corrupt `.pte`, a manifest that does not match its program,
a task for another model or with a truncated adapter or absurd hyperparameters. Each is a clear
one-line error, before anything heavy is allocated, with no crash and nothing half written."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from device_sdk.client import Device, DeviceConfig, DeviceError
from fwdfed import protocol
from fwdfed.bundle.manifest import BundleError, load_bundle, sha256_file
from fwdfed.methods.estimate import MAX_CANDIDATES, MAX_DIRECTIONS, MAX_LOCAL_STEPS
from fwdfed.model.peft_adapter import save_peft_adapter
from runtime.executorch import EngineError
from tests.conftest import ROOT, TINYSTORIES

HPARAMS = {"lr": 1e-3, "eps": 1e-2, "local_steps": 1}


def device_config(bundle) -> DeviceConfig:
    return DeviceConfig(device_id="hostile-0", coordinator="ws://127.0.0.1:9", bundle=str(bundle), data=str(TINYSTORIES),
                        shard_index=0, shard_count=1, connect_timeout_s=2)


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_bundle(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "bundle")


def edit_manifest(folder, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def install_program(folder, program: bytes) -> None:
    """Replace the program and update the manifest's sha256 to match, as a broken exporter or an attacker would."""
    (folder / "model.pte").write_bytes(program)
    edit_manifest(folder, lambda m: m["program"].update(sha256=sha256_file(folder / "model.pte")))


def corrupt(program: bytes, how: str) -> bytes:
    data = bytearray(program)
    if how == "truncated":
        return bytes(data[: len(data) * 2 // 3])
    if how == "program identifier":
        data[4] = 0xB7  # 'ET12' -> a byte that is not UTF-8, which the runtime's own log then quotes
    else:  # the header of the first XNNPACK delegate blob, quoted by the delegate's log in turn
        at = data.index(b"XH00")
        data[at + 1] = 0xB7
    return bytes(data)


def foreign_program(batch_size: int, seq_len: int, max_perturbations: int, adapter_dim: int) -> bytes:
    """A program of another export: the methods the device needs, for another adapter's dimension."""
    from executorch.exir import to_edge
    from torch.export import export

    class Forward(torch.nn.Module):
        def forward(self, input_ids, attention_mask, labels, adapters):
            return adapters.sum(1, keepdim=True) + (input_ids + attention_mask + labels).sum(1).float()

    class Predict(torch.nn.Module):
        def forward(self, input_ids, attention_mask, adapter):
            return adapter.sum() + (input_ids + attention_mask).float()

    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    adapters = torch.zeros(max_perturbations, adapter_dim)
    methods = {"forward": export(Forward(), (ids, ids, ids, adapters)), "predict": export(Predict(), (ids, ids, adapters[:1]))}
    return to_edge(methods).to_executorch().buffer


# ---- the program and its manifest ----

def test_a_corrupt_program_is_refused_by_its_sha256(tmp_path, tiny_llama_bundle):
    bundle = copy_bundle(tiny_llama_bundle, tmp_path)
    pte = bundle / "model.pte"
    pte.write_bytes(corrupt(pte.read_bytes(), "program identifier"))
    with pytest.raises(BundleError, match="does not match the manifest's sha256"):
        Device(device_config(bundle))


@pytest.mark.parametrize("how", ["truncated", "program identifier", "delegate header"])
def test_a_corrupt_program_with_a_matching_sha256_is_a_clear_error_not_a_crash(tmp_path, tiny_llama_bundle, how):
    bundle = copy_bundle(tiny_llama_bundle, tmp_path)
    install_program(bundle, corrupt((bundle / "model.pte").read_bytes(), how))
    # Before the runtime's log was routed around the bindings, the last two aborted the process.
    with pytest.raises(EngineError, match="^cannot load the ExecuTorch program: ") as refused:
        Device(device_config(bundle))
    assert "\n" not in str(refused.value)


def change_batch_size(folder):
    edit_manifest(folder, lambda m: m["inputs"].update(batch_size=m["inputs"]["batch_size"] + 1))


def change_max_perturbations(folder):
    edit_manifest(folder, lambda m: m["inputs"].update(max_perturbations=2 * m["inputs"]["max_perturbations"]))


def change_adapter_dim(folder):
    """A consistent manifest (layout, dim, initial adapter) for 8 more adapter values than the program takes."""
    def grow(m):
        dim = m["adapter"]["dim"]
        m["layout"].append({"name": "extra.bias", "shape": [8], "offset": dim})
        m["adapter"]["dim"] = dim + 8
    edit_manifest(folder, grow)
    initial = folder / "adapter_init.f32"
    initial.write_bytes(initial.read_bytes() + bytes(4 * 8))


def install_foreign_program(folder):
    inputs = json.loads((folder / "manifest.json").read_text())["inputs"]
    dim = load_bundle(folder).manifest.adapter_dim
    install_program(folder, foreign_program(inputs["batch_size"], inputs["seq_len"], inputs["max_perturbations"], dim + 1))


@pytest.mark.parametrize("damage, differs", [
    (change_batch_size, "the manifest's batch_size x seq_len"),
    (change_max_perturbations, "the manifest's max_perturbations x adapter_dim"),
    (change_adapter_dim, "the manifest's max_perturbations x adapter_dim"),
    (install_foreign_program, "the manifest's max_perturbations x adapter_dim"),
], ids=["batch_size", "max_perturbations", "adapter_dim", "another program"])
def test_a_manifest_that_does_not_match_the_program_is_refused_at_load(tmp_path, tiny_llama_bundle, damage, differs):
    bundle = copy_bundle(tiny_llama_bundle, tmp_path)
    damage(bundle)
    load_bundle(bundle)  # the bundle is consistent with itself: only the program's inputs tell
    with pytest.raises(EngineError, match="^the program does not match its manifest: its forward input ") as refused:
        Device(device_config(bundle))
    assert differs in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("damage, error", [
    (lambda b: install_program(b, corrupt((b / "model.pte").read_bytes(), "program identifier")),
     "error: cannot load the ExecuTorch program"),
    (change_batch_size, "error: the program does not match its manifest"),
], ids=["corrupt program", "mismatched manifest"])
def test_the_emulator_reports_a_bad_program_in_one_line(tmp_path, tiny_llama_bundle, damage, error):
    bundle = copy_bundle(tiny_llama_bundle, tmp_path)
    damage(bundle)
    # Not `run_command`: the runtime's log quotes the corrupt bytes, which are not text.
    result = subprocess.run([sys.executable, "-m", "device_sdk.emulate", "--mem", "1.5GB", "--coordinator",
                             "ws://127.0.0.1:9", "--devices", "1", "--bundle", str(bundle), "--data", str(TINYSTORIES),
                             "--connect-timeout", "2"], cwd=ROOT, capture_output=True, timeout=300)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode != 0 and "Traceback" not in stderr, stderr
    assert any(line.startswith(error) for line in stderr.splitlines()), stderr
    assert "1 of 1 devices failed" in stderr.strip().splitlines()[-1]
    assert "cannot reach the coordinator" not in stderr  # refused at load, before connecting


# ---- tasks ----

@pytest.fixture(scope="module")
def device(tiny_llama_bundle):
    return Device(device_config(tiny_llama_bundle))


def make_task(device, adapter: bytes | None = None, **fields) -> protocol.Task:
    """A task this device would train on, with `fields` changed; the sha256 follows the adapter."""
    if adapter is None:
        adapter = device.bundle.initial_adapter().astype("<f4").tobytes()
    task = dict(task_id="t-1", job_id="j-1", round=0, global_version=0,
                base_model_hash=device.bundle.manifest.base_model_hash, adapter=adapter,
                adapter_sha256=hashlib.sha256(adapter).hexdigest(), method="mezo", hparams=HPARAMS,
                deadline_s=60.0, reference=b"")
    return protocol.Task(**{**task, **fields})


def initial_with(device, value: float) -> bytes:
    adapter = device.bundle.initial_adapter()
    adapter[3] = value
    return adapter.astype("<f4").tobytes()


HOSTILE_TASKS = {
    "another model": (lambda d: make_task(d, base_model_hash="f" * 64), "is for base model ffffffffffff"),
    "truncated adapter": (lambda d: make_task(d, adapter=initial_with(d, 0.0)[:-4]), "adapter bytes, expected"),
    "no adapter": (lambda d: make_task(d, adapter=b""), "carries 0 adapter bytes"),
    "adapter not its sha256": (lambda d: make_task(d, adapter_sha256="0" * 64), "does not match its sha256"),
    "NaN in the adapter": (lambda d: make_task(d, adapter=initial_with(d, float("nan"))), "adapter holds NaN"),
    "infinity in the adapter": (lambda d: make_task(d, adapter=initial_with(d, float("inf"))), "adapter holds NaN"),
    "reference of the wrong length": (lambda d: make_task(d, reference=bytes(12)), "reference of 12 bytes"),
    "NaN in the reference": (lambda d: make_task(d, method="fwdgrad", reference=initial_with(d, float("nan"))),
                             "reference holds NaN"),
    "unknown method": (lambda d: make_task(d, method="sgd"), "asks for method 'sgd'"),
}
HOSTILE_HPARAMS = {  # (method, hparams replacing HPARAMS' values, what the error says)
    "no local_steps": ("mezo", {"local_steps": None}, "local_steps is missing"),
    "no lr": ("mezo", {"lr": None}, "lr is missing"),
    "huge local_steps": ("mezo", {"local_steps": 10**12}, f"local_steps must be between 1 and {MAX_LOCAL_STEPS}"),
    "zero local_steps": ("backprop", {"local_steps": 0}, "local_steps must be between 1"),
    "huge directions": ("mezo", {"directions": 10**9}, f"directions must be between 1 and {MAX_DIRECTIONS}"),
    "huge fwdgrad directions": ("fwdgrad", {"directions": 10**9}, "directions must be between 1"),
    "zero directions": ("mezo", {"directions": 0}, "directions must be between 1"),
    "huge candidates": ("fwdgrad", {"candidates": 10**6}, f"candidates must be between 1 and {MAX_CANDIDATES}"),
    "steps x directions": ("mezo", {"local_steps": MAX_LOCAL_STEPS, "directions": MAX_DIRECTIONS},
                           "pairs than an update may carry"),
    "negative lr": ("mezo", {"lr": -1e-3}, "lr must be a finite number > 0, got -0.001"),
    "NaN lr": ("fwdgrad", {"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
    "infinite lr": ("backprop", {"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
    "infinite eps": ("mezo", {"eps": float("inf")}, "eps must be a finite number > 0, got inf"),
    "zero fwdgrad step": ("fwdgrad", {"eps": 0.0}, "eps must be a finite number > 0, got 0.0"),  # its h is eps
    "NaN weight decay": ("backprop", {"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0"),
    "huge weight decay": ("mezo", {"weight_decay": 1e9}, "0 <= lr * weight_decay < 1"),
    "lr as words": ("mezo", {"lr": "fast"}, "lr must be a number, got 'fast'"),
    "directions as words": ("mezo", {"directions": "many"}, "directions must be an integer, got 'many'"),
    "infinite directions": ("fwdgrad", {"directions": float("inf")}, "directions must be an integer, got inf"),
    "local_steps as a list": ("mezo", {"local_steps": [1]}, "local_steps must be an integer, got [1]"),
    "unknown kind": ("mezo", {"kind": "uniform"}, "unknown direction kind 'uniform'"),
    "unknown schedule": ("mezo", {"schedule": "cosine"}, "unknown schedule 'cosine'"),
    "block past the adapter": ("mezo", {"block_start": 0, "block_end": 10**9}, "passes the adapter's dimension"),
    "block reversed": ("mezo", {"block_start": 50, "block_end": 10}, "0 <= block_start < block_end, got [50, 10)"),
    "negative block": ("fwdgrad", {"block_start": -5, "block_end": 10}, "0 <= block_start < block_end"),
    "block without its end": ("mezo", {"block_start": 0}, "block_end is missing"),
    "negative wave": ("fwdgrad", {"wave": -1}, "wave must be >= 0"),
    "wave as words": ("mezo", {"wave": "next"}, "wave must be an integer, got 'next'"),
}


def hostile_hparams(device, method, changes):
    hparams = {k: v for k, v in {**HPARAMS, **changes}.items() if v is not None}
    return make_task(device, method=method, hparams=hparams)


def refused_cheaply(device, monkeypatch, task) -> str:
    """Train on `task`: the refusal must come before any forward pass or sizeable allocation, and leave
    the device as it was."""
    def no_forward(*args):
        raise AssertionError("a hostile task reached the program")

    monkeypatch.setattr(device.engine, "losses", no_forward)
    done = device.tasks_done
    tracemalloc.start()
    try:
        with pytest.raises(DeviceError) as refused:
            device.train(task)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated before refusing"
    assert device.tasks_done == done and device._eager is None
    message = str(refused.value)
    assert message.startswith(f"task {task.task_id}") and "\n" not in message
    return message


@pytest.mark.parametrize("name", HOSTILE_TASKS)
def test_a_hostile_task_is_refused_before_any_work(device, monkeypatch, name):
    build, says = HOSTILE_TASKS[name]
    assert says in refused_cheaply(device, monkeypatch, build(device))


@pytest.mark.parametrize("name", HOSTILE_HPARAMS)
def test_hostile_hyperparameters_are_refused_before_any_work(device, monkeypatch, name):
    method, changes, says = HOSTILE_HPARAMS[name]
    message = refused_cheaply(device, monkeypatch, hostile_hparams(device, method, changes))
    assert "unusable hyperparameter" in message and says in message, message


def test_after_refusals_the_device_trains_and_writes_nothing(device, monkeypatch, tmp_path, tiny_llama_bundle):
    monkeypatch.chdir(tmp_path)
    before = digest(tiny_llama_bundle)
    for build, _ in HOSTILE_TASKS.values():
        with pytest.raises(DeviceError):
            device.train(build(device))
    update = device.train(make_task(device, hparams={**HPARAMS, "local_steps": 2}))
    assert len(update.seeds) == 2 and np.isfinite([update.loss_before, update.loss_after]).all()
    assert digest(tiny_llama_bundle) == before and not any(tmp_path.iterdir())


# ---- the adapter written back for peft ----

@pytest.mark.parametrize("existing", [False, True], ids=["new folder", "over an adapter"])
def test_a_failed_adapter_write_leaves_no_partial_folder(tmp_path, monkeypatch, tiny_llama_bundle, existing):
    from peft import PeftModel

    bundle = load_bundle(tiny_llama_bundle)
    out = tmp_path / "out" / "adapter"
    if existing:
        save_peft_adapter(bundle, bundle.initial_adapter(), out)
    before = digest(tmp_path)

    def disk_full(self, folder, **kwargs):
        (folder / "adapter_config.json").write_text("{")  # half written when the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_peft_adapter(bundle, bundle.initial_adapter() + 1, out)
    assert digest(tmp_path) == before
    assert [p.name for p in (tmp_path / "out").iterdir()] == (["adapter"] if existing else [])


def test_an_adapter_of_the_wrong_size_is_refused_before_writing(tmp_path, tiny_llama_bundle):
    bundle = load_bundle(tiny_llama_bundle)
    with pytest.raises(BundleError, match="this bundle's layout needs"):
        save_peft_adapter(bundle, bundle.initial_adapter()[:-1], tmp_path / "adapter")
    assert not any(tmp_path.iterdir())
