"""Finite but extreme floats against a running job: coefficients, scales, dense values, losses and
example counts at every edge of float32 and float64 (zeros of both signs, subnormals, the largest
finite values, 1e±38, just past float32's range), each in a well-formed update, from a device that
takes part in every round beside an honest emulated one. The coordinator must answer each with an
ack, stay up, publish only finite adapters that move by no more than its bound, and let the honest
device's rounds complete. The figures are printed (`pytest ... -s`)."""

from __future__ import annotations

import asyncio
import collections
import struct
import sys

import numpy as np

from coordinator.job import DEFAULT_MAX_UPDATE_RMS
from coordinator.store import UpdateRow, open_store
from fwdfed import protocol
from fwdfed.bundle.manifest import load_bundle
from tests.conftest import TINYSTORIES
from tests.integration.test_server_bugs import adapters_are_finite_and_bounded
from tests.support.fleet import Coordinator, emulate
from tests.support.protocol_client import ProtocolClient

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32
F32_SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)
F64_MAX = sys.float_info.max
# Every class of finite float, both signs: zero, subnormal, normal at both ends, past float32's range.
EDGES = [0.0, -0.0, 5e-324, -5e-324, sys.float_info.min, F32_SUBNORMAL, -F32_SUBNORMAL, F32_TINY, 1e-38, -1e-38,
         1e-7, 0.5, 1.0 - 1e-7, 1.0 + 1e-7, 1e38, -1e38, F32_MAX, -F32_MAX, np.nextafter(F32_MAX, np.inf), 1e39, -1e39,
         1e300, F64_MAX, -F64_MAX]
ANSWERS = {"accepted", "norm_bound", "bad_scale", "non_finite", "duplicate"}  # every ack is one of these
LOCAL_STEPS = 5


def hostile_updates(task: protocol.Task, dim: int) -> list[protocol.Update]:
    """A task's answers, each with one extreme value in one place; the harmless ones last (one is accepted)."""
    def update(seeds=(1,), coefs=(1e-4,), scale=1.0, dense=b"", num_examples=10, loss=1.0):
        return protocol.Update(task_id=task.task_id, job_id=task.job_id, round=task.round,
                               global_version=task.global_version, seeds=list(seeds), coefs=list(coefs), scale=scale,
                               dense=dense, num_examples=num_examples, loss_before=loss, loss_after=loss,
                               peak_rss_bytes=2**62)

    def filled(value: float) -> bytes:  # float32 dense values: past float32's range they are infinite
        with np.errstate(over="ignore"):
            return np.full(dim, value, "<f4").tobytes()

    risky = [update(coefs=[v]) for v in EDGES] + [update(scale=v) for v in EDGES if v >= 0]
    risky += [update(dense=filled(v)) for v in EDGES]
    risky += [update(seeds=[7] * LOCAL_STEPS, coefs=[F32_MAX] * LOCAL_STEPS),  # one seed, summed: 5 x the largest
              update(seeds=range(LOCAL_STEPS), coefs=[DEFAULT_MAX_UPDATE_RMS / 2] * LOCAL_STEPS)]  # past it, together
    # Within every bound, extreme elsewhere: the largest example count and losses, subnormal and signed-zero
    # coefficients, a change just inside the bound (which a real model may not survive: the coordinator decides).
    harmless = update(seeds=range(LOCAL_STEPS), coefs=[5e-324, -0.0, F32_SUBNORMAL, -1e-38,
                                                        0.9 * DEFAULT_MAX_UPDATE_RMS],
                      num_examples=2**31 - 1, loss=F64_MAX)
    # A dense part in float32 whose values sit at the subnormal edge: a change of nothing, accepted as such.
    tiny_dense = update(dense=struct.pack(f"<{dim}f", *([F32_SUBNORMAL, -0.0] * dim)[:dim]))
    # Round 2 takes the largest change the bound allows (and the largest claim of examples) first.
    return [harmless, *risky, tiny_dense] if task.round == 2 else [*risky, harmless, tiny_dense]


async def hostile(url: str, manifest) -> collections.Counter:
    """Answer every task with all of `hostile_updates`, one at a time; count the acks by code."""
    answers = collections.Counter()
    async with ProtocolClient(url, "extremes", manifest.base_model_hash, manifest.adapter_dim) as device:
        tasks: list[protocol.Task] = []

        async def next_ack() -> bool:
            """Wait for the ack of the last update; False once the job is done. Tasks meanwhile wait their turn."""
            while True:
                message = await device.recv(timeout=120)
                assert not isinstance(message, protocol.Error), message  # never: every value here is finite
                if isinstance(message, protocol.Done):
                    return False
                if isinstance(message, protocol.Task):
                    tasks.append(message)
                elif isinstance(message, protocol.Ack):
                    answers["accepted" if message.accepted else message.reason.split(":")[0]] += 1
                    return True

        while True:
            if not tasks:
                message = await device.recv(timeout=120)
                if isinstance(message, protocol.Done):
                    return answers
                tasks += [message] if isinstance(message, protocol.Task) else []
                continue
            for update in hostile_updates(tasks.pop(0), manifest.adapter_dim):
                await device.send(update)
                if not await next_ack():
                    return answers


def test_extreme_finite_floats_neither_crash_the_coordinator_nor_reach_the_adapter(tmp_path, tiny_llama_bundle):
    db = tmp_path / "job.db"
    # 3 devices per round and 2 connected: every round waits for its deadline, so that every answer of the
    # extreme device is judged (none arrives after its round closed); with fewer than 2 updates (the honest
    # device still starting) a round fails and is tried again.
    coordinator = Coordinator(db, "--bundle", str(tiny_llama_bundle), "--rounds", "3", "--devices-per-round", "3",
                              "--min-devices", "2", "--max-attempts", "8", "--local-steps", str(LOCAL_STEPS),
                              "--eval-data", str(TINYSTORIES), "--eval-examples", "8", "--round-deadline", "20",
                              "--max-messages-per-s", "1000")
    manifest = load_bundle(tiny_llama_bundle).manifest

    async def job():
        fuzzing = asyncio.create_task(hostile(coordinator.url, manifest))
        honest = await asyncio.to_thread(emulate, coordinator.url, tiny_llama_bundle, TINYSTORIES, 1)
        return await fuzzing, honest

    try:
        answers, honest = asyncio.run(job())
        code, out, err = coordinator.wait(timeout=120)
    finally:
        coordinator.kill()
    assert honest.returncode == 0, honest.stderr[-2000:]
    assert code == 0 and "round 3/3" in out and "Traceback" not in err, err[-3000:]
    assert set(answers) <= ANSWERS and answers["accepted"] >= 1, answers
    assert {"norm_bound", "bad_scale", "non_finite"} <= set(answers), answers
    moves = adapters_are_finite_and_bounded(db, DEFAULT_MAX_UPDATE_RMS)
    store = open_store(db)
    job_id = store.latest_job().id
    assert all(np.isfinite(m.value) for m in store.metrics(job_id))
    with store.session() as s:
        kept = collections.Counter(u.device_id for u in s.query(UpdateRow))
    refused = collections.Counter((r.device_id, r.code) for r in store.refusals(job_id))
    print(f"\nacks to the extreme device: {dict(answers)}; refusals stored: {dict(refused)}; "
          f"updates kept: {dict(kept)}; RMS moves of the adapter per round: {np.round(moves, 4).tolist()}")
    assert kept["emu-0"] == 3, kept  # the honest device's update is in every round
