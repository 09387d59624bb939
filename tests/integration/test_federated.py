"""The whole pipeline with real parts: exported bundles, a coordinator process, emulated device
processes on loopback, SQLite, and held-out evaluation through the ExecuTorch program."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from coordinator.store import open_store
from tests.conftest import ROOT, SST2, TINYSTORIES, run_command
from tests.support.checks import assert_beats_chance, assert_peft_folder_matches_program, assert_versions_are_aggregates
from tests.support.fleet import Coordinator, free_port, run_job


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


def test_distilbert_classifier_three_devices_three_rounds(tmp_path, distilbert_bundle):
    bundle = distilbert_bundle
    db, out = run_job(tmp_path, bundle, SST2, rounds=3,
                      hparams=["--lr", "1e-3", "--eps", "1e-2", "--local-steps", "200", "--directions", "2"],
                      eval_examples=256)
    assert "heldout_accuracy" in out
    assert_beats_chance(bundle, db, SST2, 256)


def test_prompt_tuning_through_the_coordinator_and_devices(tmp_path, stories_prompt_bundle):
    """A prompt-learning bundle runs through the same coordinator and devices as LoRA's (to them the
    adapter is a flat vector), learns, and comes back as a peft folder."""
    bundle = stories_prompt_bundle
    db, out = run_job(tmp_path, bundle, TINYSTORIES, rounds=2, devices=2,
                      hparams=["--lr", "1e-2", "--eps", "1e-2", "--local-steps", "30"], eval_examples=32)
    assert "round 2/2: 2 updates" in out
    assert_beats_chance(bundle, db, TINYSTORIES, 32)
    store = open_store(db)
    peft_folder = tmp_path / "peft"
    run_command("coordinator", "export-adapter", "--db", str(db), "--out", str(peft_folder), check=True)
    vector = np.frombuffer(store.latest_version(store.latest_job().id).vector, "<f4")
    assert_peft_folder_matches_program(bundle, peft_folder, vector)


# The seed pool and the per-tensor scales are separate options of the job, each kept over the restart: one
# resumed job with both checks each (and that they combine), beside one with neither.
@pytest.mark.parametrize("pool, tensor_scale", [(None, "none"), (64, "rms")],
                         ids=["free-seeds", "seed-pool-and-tensor-scale"])
def test_coordinator_killed_mid_job_resumes_from_the_database(tmp_path, tiny_llama_bundle, pool, tensor_scale):
    """kill -9 the coordinator after round 1; a new one on the same database, started without the
    job's flags, finishes the job with the devices that reconnect, aggregating as the first did
    (server lr and clip are the job's, and so are the seed pool: every seed of every round is one
    of it, and the per-tensor scales: every task of a round carries its base version's), and no update
    is lost or counted twice."""
    from dataclasses import replace

    from coordinator.job import JobOptions
    from coordinator.store import Round, UpdateRow
    from coordinator.strategies import SeedFedAvg
    from fwdfed import task_keys as keys
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.directions import pool_key, seed_pool

    db, port = tmp_path / "job.db", free_port()
    job_args = ["--bundle", str(tiny_llama_bundle), "--rounds", "3", "--devices-per-round", "2",
                "--local-steps", "20", "--round-deadline", "120", "--server-lr", "0.5", "--clip", "0.002",
                *(["--seed-pool", str(pool)] if pool else []), "--tensor-scale", tensor_scale,
                "--tensor-scale-floor", "0.003"]
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
    # the aggregation of the previous one with its round's stored updates, by the job's own rule (with a seed
    # pool, its seeds applied in pool order: docs/protocol.md, Aggregation).
    options = JobOptions(server_lr=0.5, clip=0.002, tensor_scale=tensor_scale, tensor_scale_floor=0.003,
                         seed_pool=pool, seed_pool_key=f"{pool_key(job.id):016x}" if pool else None)
    layout = load_bundle(tiny_llama_bundle).manifest.layout
    strategy = SeedFedAvg(hparams=job.hparams, options=options, layout=layout)
    seeds = set()
    for r, before, updates in assert_versions_are_aggregates(store, job, strategy):
        seeds |= {s for u in updates for s, _ in u.pairs}
        scales = options.round_scales(before, layout, None)  # what every task of the round carried
        carried = [t.hparams.get(keys.TENSOR_SCALES) for t in store.tasks(r.id)]
        assert carried == [None if scales is None else [list(s) for s in scales]] * len(carried)
    if tensor_scale == "rms":  # the scales differ by tensor (LoRA B starts at 0: the floor), and they did move it
        assert len({s for _, _, s in scales}) > 1
        unscaled = SeedFedAvg(hparams=job.hparams, options=replace(options, tensor_scale="none"))
        assert not np.array_equal(unscaled.aggregate(before, updates), strategy.aggregate(before, updates))
    assert JobOptions.from_json(job.options).seed_pool == pool
    if pool:
        assert "seed pool: every direction is one of 64 seeds" in out
        assert seeds <= set(seed_pool(pool_key(job.id), pool).tolist()) and len(seeds) > 20
    assert not [r for r in store.refusals(job.id) if r.code == "outside_pool"]
