"""Security with real processes over loopback: credentials checked in the handshake, TLS that the
device verifies, revocation that cuts a connected device off, limits on connections, message
rate and frame size, and updates that would poison the model refused with their reason."""

from __future__ import annotations

import asyncio
import shutil
import ssl

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from coordinator.store import UpdateRow, open_store
from fwdfed import protocol
from fwdfed.bundle.manifest import load_bundle, sign_bundle
from fwdfed.bundle.signing import generate_keys, load_private_key
from tests.conftest import TINYSTORIES, run_command
from tests.support.fleet import Coordinator, emulate, enrol
from tests.support.protocol_client import ProtocolClient


def handshake_status(url: str, headers=None, tls=None) -> int | None:
    """The HTTP status a handshake is refused with, or None when the websocket opened."""
    async def attempt():
        try:
            async with connect(url, additional_headers=headers, ssl=tls, open_timeout=10):
                return None
        except InvalidStatus as e:
            return e.response.status_code

    return asyncio.run(attempt())


def refusal_codes(db) -> list[str]:
    store = open_store(db)
    return [r.code for r in store.refusals(store.latest_job().id)]


def test_only_enrolled_devices_get_in_over_verified_tls_and_revocation_cuts_one_off(tmp_path, tiny_llama_bundle,
                                                                                      tls_files):
    cert, key, ca = tls_files
    db = tmp_path / "job.db"
    tokens = enrol(db, tmp_path / "tokens.json", ["emu-0"])
    intruder_token = enrol(db, tmp_path / "intruder.json", ["intruder"])["intruder"]
    assert oct((tmp_path / "tokens.json").stat().st_mode & 0o777) == "0o600"
    coordinator = Coordinator(db, "--auth", "token", "--cert", str(cert), "--key", str(key), "--bundle",
                              str(tiny_llama_bundle), "--rounds", "2", "--devices-per-round", "1", "--local-steps", "5",
                              "--device-timeout", "2", "--round-deadline", "120")
    manifest = load_bundle(tiny_llama_bundle).manifest
    trusted = ssl.create_default_context(cafile=str(ca))
    try:
        assert coordinator.url.startswith("wss://")
        # Refused in the handshake, before the coordinator reads any message: no credential gets the challenge
        # (401), a bearer token is refused without --allow-bearer, emu-0's key signing for emu-1 does not verify.
        assert handshake_status(coordinator.url, tls=trusted) == 401
        assert handshake_status(coordinator.url, {"Authorization": "Bearer not-a-token"}, trusted) == 403

        def impersonate(signer):
            async def attempt():
                async with ProtocolClient(coordinator.url, "emu-1", manifest.base_model_hash, manifest.adapter_dim,
                                          tokens["emu-0"], trusted, signer=signer):
                    pass
            asyncio.run(attempt())
        with pytest.raises(InvalidStatus, match="403"):
            impersonate("emu-1")
        # A credential is someone's: signed as emu-0, a hello naming another device is refused.
        with pytest.raises(RuntimeError, match="wrong_device"):
            impersonate("emu-0")

        # The device refuses a server whose certificate it cannot verify.
        untrusting = emulate(coordinator.url, tiny_llama_bundle, TINYSTORIES, 1, "--credentials",
                             str(tmp_path / "tokens.json"), "--connect-timeout", "5")
        assert untrusting.returncode != 0 and "TLS certificate is not trusted" in untrusting.stderr
        assert "Traceback" not in untrusting.stderr

        # The intruder takes round 1's only task, then is revoked: cut off within seconds, its
        # task goes to emu-0, and it cannot come back.
        async def intruder():
            async with ProtocolClient(coordinator.url, "intruder", manifest.base_model_hash, manifest.adapter_dim,
                                      intruder_token, trusted) as device:
                assert isinstance(await device.recv(), protocol.Task)
                revoked = run_command("coordinator", "revoke", "--db", str(db), "--device-id", "intruder", check=True)
                assert "intruder: revoked" in revoked.stdout
                error = await device.recv(timeout=10)
                assert isinstance(error, protocol.Error) and error.code == "revoked"
                with pytest.raises(ConnectionClosed):
                    await device.recv(timeout=10)
        asyncio.run(intruder())

        async def intruder_again():
            async with ProtocolClient(coordinator.url, "intruder", manifest.base_model_hash, manifest.adapter_dim,
                                      intruder_token, trusted):
                pass
        with pytest.raises(InvalidStatus, match="403"):
            asyncio.run(intruder_again())

        # The honest device trusts only bundles its operator signed (docs/security.md): a signed copy of the export.
        signing_key, trust_key = generate_keys(tmp_path / "keys")
        signed = shutil.copytree(tiny_llama_bundle, tmp_path / "signed")
        sign_bundle(signed, load_private_key(signing_key))
        devices = emulate(coordinator.url, signed, TINYSTORIES, 1, "--credentials", str(tmp_path / "tokens.json"),
                          "--ca-file", str(ca), "--trust-key", str(trust_key))
        code, out, err = coordinator.wait(timeout=300)
        assert devices.returncode == 0, devices.stderr[-2000:]
        assert "bundle signed by the trusted key" in devices.stdout
        assert code == 0 and "round 2/2: 1 updates" in out, err[-2000:]
    finally:
        coordinator.kill()
    codes = refusal_codes(db)
    assert codes.count("bearer_refused") == 1 and codes.count("bad_credential") == 2
    assert {"wrong_device", "revoked"} <= set(codes)
    with open_store(db).session() as s:
        assert {u.device_id for u in s.query(UpdateRow)} == {"emu-0"}


def test_limits_and_poisoned_updates_are_refused_with_their_reason(tmp_path, tiny_llama_bundle):
    db = tmp_path / "job.db"
    tokens = enrol(db, tmp_path / "tokens.json", ["honest", "flood", "big", "c1", "c2", "c3"])
    coordinator = Coordinator(db, "--auth", "token", "--bundle", str(tiny_llama_bundle), "--rounds", "1",
                              "--devices-per-round", "1", "--local-steps", "4", "--max-update-rms", "0.5",
                              "--max-connections", "3", "--max-messages-per-s", "1", "--round-deadline", "120")
    manifest = load_bundle(tiny_llama_bundle).manifest

    def client(name):
        return ProtocolClient(coordinator.url, name, manifest.base_model_hash, manifest.adapter_dim, tokens[name])

    async def scenario():
        async with client("honest") as honest:
            task = await honest.recv()
            assert isinstance(task, protocol.Task)
            # Poisoned answers: each refused with its code leading the reason, none stored; the
            # device keeps its task (a 3-byte dense part is not whole float32 values: still a refusal).
            poisoned = [
                ("too_many_pairs", honest.update(task, seeds=range(5), coefs=[1e-3] * 5)),
                ("norm_bound", honest.update(task, seeds=range(4), coefs=[1.0] * 4)),
                ("bad_scale", protocol.Update(**{**honest.update(task).__dict__, "scale": 0.0})),
                ("wrong_dimension", protocol.Update(**{**honest.update(task).__dict__, "dense": b"\0" * 12})),
                ("wrong_dimension", protocol.Update(**{**honest.update(task).__dict__, "dense": b"\0" * 3})),
                ("non_finite", protocol.Update(**{**honest.update(task).__dict__,
                                                 "dense": b"\xff" * (4 * manifest.adapter_dim)})),
            ]
            for code, update in poisoned:
                await honest.send(update)
                ack = await honest.recv()
                assert isinstance(ack, protocol.Ack) and not ack.accepted, code
                assert ack.reason.startswith(f"{code}: "), (code, ack.reason)

            # A device past its message rate is disconnected with the reason.
            async with client("flood") as flood:
                for _ in range(30):
                    await flood.send(flood.update(task))
                replies = []
                with pytest.raises(ConnectionClosed):
                    while True:
                        replies.append(await flood.recv(timeout=10))
                assert isinstance(replies[-1], protocol.Error) and replies[-1].code == "rate_limited"

            # A frame larger than the job needs is refused from its header: closed with 1009.
            async with client("big") as big:
                await big.ws.send(b"\0" * (4 * manifest.adapter_dim + 2 * 1024 * 1024))
                with pytest.raises(ConnectionClosed) as closed:
                    await big.recv(timeout=10)
                assert closed.value.rcvd.code == 1009

            # The connection cap: with 3 open, the 4th is refused (503) before its websocket opens.
            async with client("c1"), client("c2"):
                with pytest.raises(InvalidStatus) as full:
                    async with client("c3"):
                        pass
                assert full.value.response.status_code == 503

            await honest.send(honest.update(task, seeds=range(4), coefs=[1e-3] * 4))
            ack = await honest.recv()
            assert ack.accepted, ack.reason
            assert isinstance(await honest.recv(), protocol.Done)

    try:
        asyncio.run(scenario())
        code, out, err = coordinator.wait(timeout=120)
        assert code == 0, err[-2000:]
    finally:
        coordinator.kill()
    codes = refusal_codes(db)
    for code in ("too_many_pairs", "norm_bound", "bad_scale", "wrong_dimension", "rate_limited", "too_many_connections"):
        assert code in codes, (code, codes)
    with open_store(db).session() as s:
        assert [u.device_id for u in s.query(UpdateRow)] == ["honest"]


def test_differential_privacy_noises_each_version_and_records_the_epsilon_spent(tmp_path, tiny_llama_bundle):
    from coordinator.strategies.dp_fedavg import gaussian_epsilon

    db = tmp_path / "job.db"
    coordinator = Coordinator(db, "--bundle", str(tiny_llama_bundle), "--rounds", "2", "--devices-per-round", "2",
                              "--local-steps", "10", "--dp-clip", "0.01", "--dp-noise-multiplier", "2",
                              "--dp-delta", "1e-6", "--round-deadline", "120")
    manifest = load_bundle(tiny_llama_bundle).manifest

    async def two_devices():
        async def device(name):
            async with ProtocolClient(coordinator.url, name, manifest.base_model_hash, manifest.adapter_dim) as client:
                return await client.answer_until_done(pairs=10)
        return await asyncio.gather(device("d1"), device("d2"))

    try:
        assert asyncio.run(two_devices()) == [2, 2]
        code, out, err = coordinator.wait(timeout=120)
        assert code == 0, err[-2000:]
    finally:
        coordinator.kill()
    assert f"({gaussian_epsilon(2, 2, 1e-6):.3g}, 1e-06)-DP per device after 2 rounds" in out
    store = open_store(db)
    job = store.latest_job()
    spent = [m.value for m in store.metrics(job.id) if m.name == "dp_epsilon"]
    assert spent == pytest.approx([gaussian_epsilon(2, r, 1e-6) for r in (1, 2)])
    # Each version moved by the noise: std 2 * 0.01 / 2 devices per value, far above the clipped mean.
    import numpy as np

    versions = [np.frombuffer(v.vector, "<f4") for v in store.versions(job.id)]
    for before, after in zip(versions, versions[1:]):
        assert np.std(after - before) == pytest.approx(0.01, rel=0.1)
