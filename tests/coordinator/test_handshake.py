"""The Ed25519 challenge-response in the handshake (docs/protocol.md), on an in-process coordinator over real
websockets on loopback and a real SQLite store: a signed answer gets in once, and the same answer replayed on
a new connection is refused; so is a wrong key, a claimed device id, a clock far off; bearer tokens only with
--allow-bearer; revocation and re-enrolling cut a connected device off within the sweep's second; the device
SDK (the tests/support fake bundle, `train` answering without a program) runs a job with its key."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from coordinator.admission import Limits
from coordinator.server import Coordinator, JobConfig, job_from_bundle, serve_job
from coordinator.store import open_store
from coordinator.strategies import SeedFedAvg
from device_sdk.client import Device, DeviceConfig, DeviceError
from fwdfed import handshake, protocol
from fwdfed.bundle.manifest import load_bundle
from tests.conftest import TINYSTORIES
from tests.support.fake_bundle import write_fake_bundle

HPARAMS = {"lr": 1e-3, "eps": 1e-2, "local_steps": 2, "directions": 2, "kind": "rademacher"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_fake_bundle(tmp_path_factory.mktemp("handshake") / "bundle")


def serving(tmp_path, bundle, allow_bearer=False, rounds=1):
    """An async context: the coordinator of a `rounds`-round job for one device, its store and its URL."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = open_store(tmp_path / "job.db")
    loaded = load_bundle(bundle)
    config = JobConfig(rounds=rounds, devices_per_round=1, min_devices=1, round_deadline_s=30, hparams=HPARAMS)
    job = store.create_job(job_from_bundle("job", str(bundle), loaded.manifest, config), loaded.initial_adapter())
    coordinator = Coordinator(store, job, SeedFedAvg(hparams=job.hparams),
                              limits=Limits(require_credentials=True, allow_bearer=allow_bearer))

    class Serving:
        async def __aenter__(self):
            ready = asyncio.get_running_loop().create_future()
            self.task = asyncio.create_task(serve_job(coordinator, "127.0.0.1", 0, ready=ready.set_result))
            self.url = await asyncio.wait_for(ready, 10)
            self.store, self.coordinator, self.manifest = store, coordinator, loaded.manifest
            return self

        async def __aexit__(self, *exc):
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    return Serving()


def enrol_key(store, device_id: str):
    private, public = handshake.new_device_key()
    store.enrol_key(device_id, public)
    return handshake.load_device_key(private)


async def status(url: str, authorization: str | None = None) -> tuple[int | None, object]:
    """(HTTP status, response headers) of a handshake refused, or (None, the open websocket)."""
    try:
        ws = await connect(url, additional_headers={"Authorization": authorization} if authorization else None,
                           open_timeout=10)
    except InvalidStatus as e:
        return e.response.status_code, e.response.headers
    return None, ws


async def challenge(url: str) -> str:
    code, headers = await status(url)
    assert code == 401
    return handshake.parse_challenge(headers["WWW-Authenticate"])


async def hello(ws, manifest, device_id: str) -> protocol.Message:
    await ws.send(protocol.Hello(device_id=device_id, base_model_hash=manifest.base_model_hash,
                                 adapter_dim=manifest.adapter_dim, num_examples=1, mem_budget_bytes=None).to_wire())
    return protocol.decode(await asyncio.wait_for(ws.recv(), 10))


def codes(store) -> list[str]:
    return [r.code for r in store.refusals("job")]


def test_a_signed_answer_gets_in_once_and_its_replay_on_a_new_connection_is_refused(tmp_path, bundle):
    async def scenario():
        async with serving(tmp_path, bundle) as s:
            key = enrol_key(s.store, "phone")
            captured = handshake.answer(key, "phone", await challenge(s.url), int(time.time()))
            code, ws = await status(s.url, captured)
            assert code is None
            assert isinstance(await hello(ws, s.manifest, "phone"), protocol.Welcome)
            await ws.close()
            # The same header, as a proxy or a log would have kept it: its nonce was used.
            code, headers = await status(s.url, captured)
            assert code == 401 and handshake.parse_challenge(headers["WWW-Authenticate"])  # a fresh one offered
            # The captured signature does not answer a new nonce.
            fresh = await challenge(s.url)
            device, _, when, signature = captured.split(" ", 1)[1].split(".")
            assert (await status(s.url, f"{handshake.SCHEME} {device}.{fresh}.{when}.{signature}"))[0] == 403
            # A nonce the coordinator never issued.
            made_up = handshake.answer(key, "phone", handshake.new_nonce(), int(time.time()))
            assert (await status(s.url, made_up))[0] == 401
            return s.store

    store = asyncio.run(scenario())
    assert codes(store) == ["stale_challenge", "bad_credential", "stale_challenge"]


def test_a_wrong_key_another_devices_id_a_far_clock_and_garbage_are_refused(tmp_path, bundle):
    async def scenario():
        async with serving(tmp_path, bundle) as s:
            key = enrol_key(s.store, "phone")
            enrol_key(s.store, "other")
            now = int(time.time())
            stranger = handshake.load_device_key(handshake.new_device_key()[0])
            refused = [
                handshake.answer(stranger, "phone", await challenge(s.url), now),  # a key that is not phone's
                handshake.answer(key, "other", await challenge(s.url), now),  # phone's key claiming other
                handshake.answer(key, "nobody", await challenge(s.url), now),  # not enrolled
                handshake.answer(key, "phone", await challenge(s.url), now - handshake.MAX_CLOCK_SKEW_S - 5),
                f"{handshake.SCHEME} not.an.answer",
                f"{handshake.SCHEME} {'x' * 40}",
                "Basic cGhvbmU6cGhvbmU=",
            ]
            statuses = [(await status(s.url, header))[0] for header in refused]
            # The key's own device signing now gets in; a hello naming another device is then refused.
            code, ws = await status(s.url, handshake.answer(key, "phone", await challenge(s.url), now))
            assert code is None
            error = await hello(ws, s.manifest, "other")
            assert isinstance(error, protocol.Error) and error.code == "wrong_device"
            return statuses, s.store

    statuses, store = asyncio.run(scenario())
    assert statuses == [403] * 7
    assert codes(store) == ["bad_credential"] * 7 + ["wrong_device"]


def test_bearer_tokens_only_with_allow_bearer(tmp_path, bundle):
    async def attempt(allow_bearer: bool, folder):
        async with serving(folder, bundle, allow_bearer=allow_bearer) as s:
            token = s.store.enrol("old-phone")
            enrol_key(s.store, "phone")
            key_hash = s.store.device_key("phone")[1]
            code, ws = await status(s.url, f"Bearer {token}")
            welcomed = code is None and isinstance(await hello(ws, s.manifest, "old-phone"), protocol.Welcome)
            # A key credential never opens as a token would, whatever is sent as one.
            others = [(await status(s.url, f"Bearer {guess}"))[0] for guess in (key_hash, "not-a-token")]
            return code, welcomed, others, codes(s.store)

    refused = asyncio.run(attempt(False, tmp_path / "strict"))
    assert refused == (403, False, [403, 403], ["bearer_refused"] * 3)
    allowed = asyncio.run(attempt(True, tmp_path / "allowing"))
    assert allowed == (None, True, [403, 403], ["bad_credential"] * 2)


@pytest.mark.parametrize("how", ["revoke", "re-enrol"])
def test_revoking_or_re_enrolling_cuts_a_connected_device_off_within_the_sweep(tmp_path, bundle, how):
    async def scenario():
        async with serving(tmp_path, bundle) as s:
            key = enrol_key(s.store, "phone")
            _, ws = await status(s.url, handshake.answer(key, "phone", await challenge(s.url), int(time.time())))
            assert isinstance(await hello(ws, s.manifest, "phone"), protocol.Welcome)
            assert isinstance(protocol.decode(await asyncio.wait_for(ws.recv(), 10)), protocol.Task)
            s.store.revoke("phone") if how == "revoke" else enrol_key(s.store, "phone")
            started = time.monotonic()
            error = protocol.decode(await asyncio.wait_for(ws.recv(), 5))
            cut_after = time.monotonic() - started
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            # Its key no longer opens the door.
            again = (await status(s.url, handshake.answer(key, "phone", await challenge(s.url), int(time.time()))))[0]
            return error, cut_after, again

    error, cut_after, again = asyncio.run(scenario())
    assert isinstance(error, protocol.Error) and error.code == "revoked"
    assert cut_after < 2.5  # the sweep runs every REVOCATION_CHECK_S (1 s); the heartbeat is 10 s
    assert again == 403


def answering(monkeypatch) -> None:
    """Device.train without a program: a seed-form answer to the task."""
    def train(self, task):
        self.check_task(task)
        return protocol.Update(task_id=task.task_id, job_id=task.job_id, round=task.round,
                               global_version=task.global_version, seeds=[1, 2], coefs=[1e-3, -1e-3], scale=1.0,
                               dense=b"", num_examples=self.num_examples, loss_before=1.0, loss_after=0.9,
                               peak_rss_bytes=1)

    monkeypatch.setattr(Device, "train", train)


def test_the_device_sdk_answers_the_challenge_and_a_wrong_key_stops_it_with_one_line(tmp_path, bundle, monkeypatch):
    answering(monkeypatch)

    def device(url, private_key):
        return Device(DeviceConfig(device_id="phone", coordinator=url, bundle=str(bundle), data=str(TINYSTORIES),
                                   shard_index=0, shard_count=1, connect_timeout_s=10, private_key=private_key),
                      load_program=False)

    async def scenario():
        async with serving(tmp_path, bundle, rounds=2) as s:
            private, public = handshake.new_device_key()
            s.store.enrol_key("phone", public)
            with pytest.raises(DeviceError, match="refused this device's credential: bad_credential: the signature "
                                                  "does not verify"):
                await device(s.url, handshake.new_device_key()[0]).run()  # a key that is not phone's
            done = await asyncio.wait_for(device(s.url, private).run(), 60)
            return done, await asyncio.wait_for(s.task, 30)

    with pytest.raises(DeviceError, match="not enrolled"):  # nobody enrolled: the first attempt's line
        async def unenrolled():
            async with serving(tmp_path / "empty", bundle) as s:
                await device(s.url, handshake.new_device_key()[0]).run()
        asyncio.run(unenrolled())
    assert asyncio.run(scenario()) == (2, True)
