"""FedKD end to end on tiny-distilbert: an inference-only teacher program labels each device's shard
and is freed, the student trains forward-only on the mixed loss over the real coordinator, and what
does not fit (a wrong teacher, a bad weight or temperature, a student without logits) is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coordinator.store import Task, UpdateRow, open_store
from tests.conftest import SST2, export_bundle, run_command
from tests.support.fleet import Coordinator, emulate, run_job

COMMON = ["--seq-len", "32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, distilbert_bundle):
    """(student with the logits method, teacher: another tiny-distilbert, predict alone, a data file)."""
    folder = tmp_path_factory.mktemp("fedkd")
    student = distilbert_bundle  # batch 4, seq 32, P 4, with the logits method (--distillation)
    teacher = export_bundle(folder / "teacher", "--preset", "tiny-distilbert", "--num-labels", "2", *COMMON,
                            "--seed", "1", "--inference-only", "--lora-rank", "1")
    header, *rows = SST2.read_text().splitlines(keepends=True)
    data = folder / "sst2_400.tsv"
    data.write_text(header + "".join(rows[:400]))
    return student, teacher, data


def teacher_hash(bundle) -> str:
    return json.loads((bundle / "manifest.json").read_text())["program"]["sha256"]


def test_a_fedkd_job_runs_with_the_teacher_named_in_every_task(tmp_path, bundles):
    student, teacher, data = bundles
    db, out = run_job(tmp_path, student, data, rounds=1, devices=2, eval_examples=32, hparams=[
        "--method", "fedkd", "--teacher-bundle", str(teacher), "--kd-weight", "0.7", "--kd-temperature", "2",
        "--lr", "1e-3", "--eps", "1e-2", "--local-steps", "5", "--directions", "2"],
        emulate_args=["--teacher-bundle", str(teacher)])
    store = open_store(db)
    with store.session() as s:
        tasks = s.query(Task).all()
        assert len(tasks) == 2 and {t.hparams["teacher_sha256"] for t in tasks} == {teacher_hash(teacher)}
        assert {(t.hparams["kd_weight"], t.hparams["kd_temperature"]) for t in tasks} == {(0.7, 2.0)}
        updates = s.query(UpdateRow).all()
        assert [u.num_pairs for u in updates] == [10] * 2  # MeZO's upload: 5 steps x 2 directions
    versions = store.versions(store.latest_job().id)
    assert len(versions) == 2 and versions[0].vector != versions[-1].vector


def test_unlabelled_rows_are_learnt_from_the_teacher_and_left_out_without_one(tmp_path, bundles):
    """Three rows in four without a label: the fedkd job's head round and its MeZO round use every row
    (counted by the teacher's targets), a device without a teacher trains on the labelled rows alone."""
    from device_sdk.client import Device, DeviceConfig, DeviceError
    from runtime.data import DataSpec, read_examples, split

    student, teacher, data = bundles
    header, *rows = data.read_text().splitlines(keepends=True)
    partly = tmp_path / "partly_labelled.tsv"
    partly.write_text(header + "".join(r if i % 4 == 0 else "\t" + r.split("\t", 1)[1] for i, r in enumerate(rows)))
    train = split(read_examples(partly, DataSpec(num_labels=2)), "train")
    # lr 1e-4: after the LDA head of tiny random features (large weights), lr 1e-3 steps move the adapter past
    # the default --max-update-rms, and a refused update fails this two-device round.
    db, out = run_job(tmp_path, student, partly, rounds=1, devices=2, eval_examples=32, hparams=[
        "--method", "fedkd", "--teacher-bundle", str(teacher), "--kd-weight", "0.5", "--kd-temperature", "2",
        "--head-init", "lda", "--lr", "1e-4", "--eps", "1e-2", "--local-steps", "3", "--directions", "2"],
        emulate_args=["--teacher-bundle", str(teacher)])
    store = open_store(db)
    with store.session() as s:
        tasks = s.query(Task).order_by(Task.id).all()
        head_round = [t for t in tasks if "num_classes" in t.hparams]  # the class-statistics round's
        assert len(head_round) == 2 and all(t.hparams["teacher_sha256"] == teacher_hash(teacher)
                                            and t.hparams["kd_weight"] == 0.5 for t in head_round)
        assert {u.num_examples for u in s.query(UpdateRow).all()} == {len(train) // 2}  # every row of each shard
    versions = store.versions(store.latest_job().id)
    assert len(versions) == 3 and len({v.vector for v in versions}) == 3  # the head round, then fedkd's, each moved it

    config = DeviceConfig(device_id="d0", coordinator="ws://127.0.0.1:1", bundle=str(student), data=str(partly),
                          shard_index=0, shard_count=2)
    assert Device(config, load_program=False).num_examples == sum(e.label is not None for e in train[::2])
    unlabelled = tmp_path / "unlabelled.tsv"
    unlabelled.write_text(header + "".join("\t" + r.split("\t", 1)[1] for r in rows))
    with pytest.raises(DeviceError, match="has no labelled rows .*a device given a teacher"):
        Device(config.__class__(**{**config.__dict__, "data": str(unlabelled)}), load_program=False)


def test_the_teacher_program_is_inference_only_and_the_student_has_batched_logits(bundles):
    from fwdfed.bundle.manifest import load_bundle
    from runtime.data import DataSpec, encode, read_examples
    from runtime.engine import ProgramEngine
    from runtime.evaluate import load_tokenizer
    from runtime.executorch import EngineError
    from runtime.teacher import label

    student, teacher, data = (load_bundle(bundles[0]), load_bundle(bundles[1]), bundles[2])
    assert teacher.manifest.program.methods == ("predict",)
    assert "logits" in student.manifest.program.methods
    assert student.manifest.verification["batched_logits_max_abs_diff"] < 1e-4
    examples = read_examples(data, DataSpec(num_labels=2))[:10]
    labelling = label(teacher, examples)
    assert labelling.logits.shape == (10, 2) and labelling.sha256 == teacher.manifest.program.sha256
    assert labelling.peak_bytes >= labelling.rss_after_bytes
    engine = ProgramEngine.for_bundle(teacher)
    batch = encode(load_tokenizer(teacher), examples, "seq-cls", 4, 32)[0]
    np.testing.assert_allclose(engine.logits(batch, teacher.initial_adapter()), labelling.logits[:4], atol=1e-6)
    with pytest.raises(EngineError, match="inference-only"):
        engine.losses(batch, teacher.initial_adapter())


def test_the_plan_is_the_larger_phase_and_the_profiler_measures_both(tmp_path, bundles):
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.memory_plan import BudgetError, plan_teacher_then_student

    student, teacher, _ = bundles
    plan = plan_teacher_then_student(load_bundle(teacher), load_bundle(student), 2**40, 100, 1, runtime=200 * 2**20)
    labelling, training = plan.phases
    assert plan.total == max(labelling.total, training.total) < labelling.total + training.total
    assert "peak = max(teacher labelling" in plan.describe()
    with pytest.raises(BudgetError, match="teacher labelling: memory plan"):
        plan_teacher_then_student(load_bundle(teacher), load_bundle(student), 100 * 2**20, 100, 1,
                                  runtime=200 * 2**20)
    result = run_command("device_sdk.profile", "--bundle", str(student), "--modes", "inference", "fedkd",
                         "--teacher", str(teacher), "--repeats", "0", "--out", str(tmp_path / "profile"))
    assert result.returncode == 0, result.stderr[-2000:]
    phases = json.loads((tmp_path / "profile" / "distillation.json").read_text())
    (student_phase,) = phases["students"]
    assert student_phase["device_peak_bytes"] == max(phases["teacher_labelling_peak_bytes"],
                                                     student_phase["student_training_peak_bytes"])


@pytest.mark.parametrize("flags,message", [
    (["--method", "fedkd"], "--method fedkd needs --teacher-bundle"),
    (["--method", "mezo", "--teacher-bundle", "{teacher}"], "--teacher-bundle is for a method that distils"),
    (["--method", "fedkd", "--teacher-bundle", "{teacher}", "--kd-weight", "1.5"], "kd_weight must be in \\[0, 1\\]"),
    (["--method", "fedkd", "--teacher-bundle", "{teacher}", "--kd-temperature", "0"], "kd_temperature must be in"),
    (["--method", "fedkd", "--teacher-bundle", "{missing}"], "--teacher-bundle: "),
    (["--method", "fedkd", "--teacher-bundle", "{teacher}", "--bundle", "{teacher}"], "has no logits method"),
])
def test_serve_refuses_a_bad_distillation_job(tmp_path, bundles, flags, message):
    import re

    student, teacher, data = bundles
    flags = [f.format(teacher=teacher, missing=tmp_path / "nothing") for f in flags]
    if "--bundle" not in flags:
        flags += ["--bundle", str(student)]
    result = run_command("coordinator", "serve", "--db", str(tmp_path / "job.db"), "--port", "0", "--auth", "none",
                         *flags, timeout=120)
    assert result.returncode == 2 and re.search(message, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_device_holding_another_teacher_refuses_the_task(tmp_path, bundles):
    student, teacher, data = bundles
    coordinator = Coordinator(tmp_path / "job.db", "--bundle", str(student), "--rounds", "1", "--devices-per-round",
                              "1", "--round-deadline", "300", "--method", "fedkd",
                              "--teacher-bundle", str(teacher), "--local-steps", "1")
    try:  # the round waits for the devices, who refuse its task; the coordinator is stopped after
        # The student's own program as the teacher: a classifier of the same classes, but not the job's teacher.
        devices = emulate(coordinator.url, student, data, 1, "--teacher-bundle", str(student))
        assert devices.returncode == 1
        assert f"is for teacher {teacher_hash(teacher)[:12]}, this device holds teacher " \
               f"{teacher_hash(student)[:12]}" in devices.stderr
        assert "Traceback" not in devices.stderr
        # Another device: the one that declined the task does not get it back in this round's wave.
        devices = emulate(coordinator.url, student, data, 1, "--device-prefix", "no-teacher")
        assert devices.returncode == 1 and "this device was given no teacher bundle" in devices.stderr
    finally:
        coordinator.kill()
    # Each said so on the wire before it stopped (docs/protocol.md, decline): its task went back at once.
    store = open_store(tmp_path / "job.db")
    declined = [r.reason for r in store.refusals(store.latest_job().id) if r.code == "declined"]
    assert len(declined) == 2 and "this device was given no teacher bundle" in declined[1], declined
