"""Every entry point given bad input: one clear line, exit status 2, nothing stored lost."""

from __future__ import annotations

import asyncio
import hashlib
import shutil

import msgpack
import pytest
from websockets.asyncio.client import connect

from coordinator.store import open_store
from fwdfed import protocol
from tests.conftest import STORIES, TINYSTORIES, run_command
from tests.support.fleet import Coordinator, emulate


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "error:" in last
    for fragment in fragments:
        assert fragment in last, last


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_missing_folder(tmp_path):
    assert_one_line_error(run_command("export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b")),
                          "does not exist")


def test_export_unknown_preset(tmp_path):
    assert_one_line_error(run_command("export", "--preset", "gpt-5", "--out", str(tmp_path / "b")), "unknown preset")


@pytest.mark.parametrize("corrupt", ["config", "weights", "empty"])
def test_export_corrupt_model_folder_keeps_the_existing_bundle(tmp_path, tiny_llama_bundle, corrupt):
    model = tmp_path / "model"
    shutil.copytree(STORIES, model)
    if corrupt == "config":
        (model / "config.json").write_text("{ not json")
    elif corrupt == "weights":
        (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:1000])
    else:
        for p in model.iterdir():
            p.unlink()
    out = tmp_path / "bundle"
    shutil.copytree(tiny_llama_bundle, out)
    before = digest(out)
    result = run_command("export", "--model", str(model), "--out", str(out))
    assert_one_line_error(result)
    assert digest(out) == before  # the bundle that was there is untouched


def test_emulate_bad_mem(tmp_path, tiny_llama_bundle):
    result = run_command("device_sdk.emulate", "--mem", "1.5 gigs", "--coordinator", "ws://127.0.0.1:9",
                         "--bundle", str(tiny_llama_bundle), "--data", str(TINYSTORIES))
    assert_one_line_error(result, "--mem", "cannot read memory size")


def test_emulate_without_a_coordinator(tiny_llama_bundle):
    result = emulate("ws://127.0.0.1:9", tiny_llama_bundle, TINYSTORIES, 2, "--connect-timeout", "2")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("cannot reach the coordinator at ws://127.0.0.1:9") == 2
    assert "2 of 2 devices failed" in result.stderr.strip().splitlines()[-1]


def test_emulate_corrupt_program(tmp_path, tiny_llama_bundle):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_llama_bundle, bundle)
    pte = bundle / "model.pte"
    pte.write_bytes(pte.read_bytes()[:-100])
    result = emulate("ws://127.0.0.1:9", bundle, TINYSTORIES, 1)
    assert_one_line_error(result, "does not match the manifest")


def test_serve_refuses_a_database_it_does_not_understand(tmp_path, tiny_llama_bundle):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    before = junk.read_bytes()
    assert_one_line_error(run_command("coordinator", "serve", "--db", str(junk), "--bundle", str(tiny_llama_bundle)),
                          "database")
    assert junk.read_bytes() == before
    assert_one_line_error(run_command("coordinator", "serve", "--db", str(tmp_path / "new.db")), "--bundle")


def test_malformed_messages_are_refused_and_the_coordinator_keeps_serving(tmp_path, tiny_llama_bundle):
    db = tmp_path / "job.db"
    coordinator = Coordinator(db, "--bundle", str(tiny_llama_bundle), "--rounds", "1", "--devices-per-round", "1",
                              "--round-deadline", "60")

    async def send_and_read(frame):
        async with connect(coordinator.url) as ws:
            await ws.send(frame)
            return protocol.decode(await ws.recv())

    frames = [b"\xc1\xff garbage", "text frame", msgpack.packb([1, 2, 3]),
              msgpack.packb({"type": "hello", "v": 99}),
              msgpack.packb({"type": "update", "v": 1}),
              msgpack.packb({"type": "hello", "v": 1, "device_id": 7, "base_model_hash": "x", "adapter_dim": 1,
                             "num_examples": 1, "mem_budget_bytes": None}),
              protocol.Hello(device_id="d", base_model_hash="0" * 64, adapter_dim=1, num_examples=1,
                             mem_budget_bytes=None).to_wire()]
    try:
        replies = [asyncio.run(send_and_read(f)) for f in frames]
        assert all(isinstance(r, protocol.Error) for r in replies), replies
        assert [r.code for r in replies] == ["bad_message"] * 6 + ["wrong_model"]
        assert "device_id must be a string" in replies[5].message
        assert coordinator.process.poll() is None  # still up
    finally:
        coordinator.kill()
    store = open_store(db)
    job = store.latest_job()
    assert job.status == "running" and [v.version for v in store.versions(job.id)] == [0]


def test_a_budget_too_small_for_the_model_is_refused_before_training(tiny_llama_bundle):
    result = run_command("device_sdk.emulate", "--mem", "100MB", "--coordinator", "ws://127.0.0.1:9", "--devices", "1",
                         "--bundle", str(tiny_llama_bundle), "--data", str(TINYSTORIES), "--connect-timeout", "2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    refusal = next(line for line in result.stderr.splitlines() if line.startswith("error: memory plan"))
    assert "runtime" in refusal and "over. Would fit:" in refusal and "budget" in refusal
    assert "cannot reach the coordinator" not in result.stderr  # refused before connecting or loading


@pytest.mark.parametrize("flags, message", [(["--perturb-only", "classifier"], "no adapter tensor's name contains"),
                                            (["--perturb-only", "lora_A", "--blocks", "2"], "one at a time")])
def test_serve_refuses_a_block_the_adapter_does_not_have_and_stores_no_job(tmp_path, tiny_llama_bundle, flags,
                                                                           message):
    db = tmp_path / "job.db"
    assert_one_line_error(run_command("coordinator", "serve", "--db", str(db), "--bundle", str(tiny_llama_bundle),
                                      *flags), message)
    assert not db.exists() or open_store(db).running_job() is None
