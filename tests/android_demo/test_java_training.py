"""Every forward-only method of the Java core against the Python device, on the real `.pte`.

The Java device trains tasks offline (no coordinator) with its LossProgram backed by the
bundle's program in an ExecuTorch helper process; the Python device trains the same tasks on
the same shard, drawing the Java device's seeds. Their updates must agree: the same seeds,
coefficients within float tolerance (in practice bit for bit), the same scale, example count
and probe losses. The tasks cover MeZO (Rademacher, Gaussian with several directions, weight
decay, a linear schedule), one-sided MeZO on a block of the adapter, the forward gradient
selecting among candidates with a reference, and FZOO and MeZO with per-tensor scales.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from fwdfed import protocol
from fwdfed.directions import pool_key, seed_pool
from tests.android_demo.support import HELPER_COMMAND, assert_same_update, decode, python_device, replay
from tests.conftest import TINYSTORIES

TASKS = {
    "mezo-decay-linear": ("mezo", {"lr": 1e-3, "eps": 1e-2, "local_steps": 12, "directions": 1, "kind": "rademacher",
                                   "wave": 0, "weight_decay": 0.5, "schedule": "linear"}),
    "mezo-gaussian-3": ("mezo", {"lr": 1e-3, "eps": 1e-2, "local_steps": 6, "directions": 3, "kind": "gaussian"}),
    "onesided-block": ("onesided", {"lr": 1e-3, "eps": 1e-2, "local_steps": 6, "directions": 2,
                                    "block_start": 512, "block_end": 4096}),
    "fwdgrad-candidates": ("fwdgrad", {"lr": 0.01, "eps": 1e-2, "local_steps": 4, "directions": 4, "kind": "gaussian",
                                       "candidates": 3, "wave": 1}),
    "fzoo-linear": ("fzoo", {"lr": 1e-3, "eps": 1e-2, "local_steps": 4, "directions": 3, "kind": "rademacher",
                             "schedule": "linear"}),
    # FedKSeed: every seed one of the job's pool of 16 (docs/directions.md), drawn as each device draws them
    "mezo-seed-pool": ("mezo", {"lr": 1e-3, "eps": 1e-2, "local_steps": 4, "directions": 2, "kind": "rademacher",
                                "seed_pool": 16, "seed_pool_key": f"{pool_key('job'):016x}"}),
    # per-tensor scales (docs/directions.md): a gap at scale 1, a scale that is no power of two, one below 1
    "fzoo-tensor-scales": ("fzoo", {"lr": 1e-3, "eps": 1e-2, "local_steps": 4, "directions": 3, "kind": "rademacher",
                                    "tensor_scales": [[0, 1024, 0.5], [1024, 3000, 3.1], [3500, 4096, 1e-3]]}),
    "mezo-gaussian-block-tensor-scales": ("mezo", {"lr": 1e-3, "eps": 1e-2, "local_steps": 4, "directions": 2,
                                                   "kind": "gaussian", "block_start": 512, "block_end": 4096,
                                                   "tensor_scales": [[0, 2048, 2.5], [2048, 4096, 0.3]]}),
}


def test_java_methods_give_the_python_devices_pairs(tmp_path, stories_bundle, java_core):
    manifest = json.loads((stories_bundle / "manifest.json").read_text())
    initial = np.fromfile(stories_bundle / manifest["adapter"]["initial"], "<f4")
    # Away from peft's init, where LoRA B = 0 makes half the gradient vanish.
    adapter = (initial + 0.05 * np.random.default_rng(0).standard_normal(initial.shape[0])).astype("<f4")
    reference = (0.01 * np.random.default_rng(1).standard_normal(adapter.shape[0])).astype("<f4").tobytes()
    task_files, out_files, frames = [], [], []
    for i, (name, (method, hparams)) in enumerate(TASKS.items()):
        raw = adapter.tobytes()
        task = protocol.Task(task_id=name, job_id="job", round=i + 1, global_version=i, base_model_hash=manifest["model"]["hash"],
                             adapter=raw, adapter_sha256=hashlib.sha256(raw).hexdigest(), method=method,
                             hparams=hparams, deadline_s=60.0, reference=reference if method == "fwdgrad" else b"")
        frames.append(task.to_wire())
        task_files.append(tmp_path / f"{name}.task")
        task_files[-1].write_bytes(frames[-1])
        out_files.append(tmp_path / f"{name}.update")
    java_core.run("JvmDevice", "--bundle", stories_bundle, "--data", TINYSTORIES, "--device-id", "java-1",
                  "--shard-index", "1", "--shard-count", "2", "--mem", "1.5GB", "--helper", HELPER_COMMAND,
                  "--train-task", ",".join(map(str, task_files)), "--out", ",".join(map(str, out_files)), timeout=300)
    reference_device = python_device(stories_bundle, TINYSTORIES, "java-1", 1, 2)
    for name, frame, out in zip(TASKS, frames, out_files):
        java = decode(out.read_bytes())
        exact = assert_same_update(java, replay(reference_device, frame))
        if "seed_pool" in TASKS[name][1]:
            assert set(java.seeds) <= set(seed_pool(pool_key("job"), 16).tolist())
        print(f"{name}: {len(java.coefs)} pairs, {exact} bit-identical, scale {java.scale:.6f}, "
              f"loss {java.loss_before:.4f} -> {java.loss_after:.4f}")
