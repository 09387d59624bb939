"""The operator's dashboard without a browser: its store figures, the byte counts a real
coordinator records, the real aiohttp server on loopback (access, pages, live events, reads
off the event loop), the static file and the commands. The page in a real browser during a
real job is tests/integration/test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import time

import aiohttp
import numpy as np
import pytest
from sqlalchemy import text

from coordinator.admission import Limits
from coordinator.dashboard.app import COOKIE, Dashboard
from coordinator.dashboard.cli import address
from coordinator.dashboard.page import asset, write_static
from coordinator.dashboard.snapshot import clean, encode, snapshot
from coordinator.report import status_text
from coordinator.server import Coordinator, JobConfig, job_from_bundle, serve_job
from coordinator.store import Meta, OperatorToken, open_store
from coordinator.strategies import SeedFedAvg
from fwdfed import methods, protocol
from tests.conftest import run_command
from tests.coordinator.test_without_torch import coordinator_without_torch
from tests.support.protocol_client import ProtocolClient

HPARAMS = {"lr": 1e-3, "eps": 1e-2, "local_steps": 2, "directions": 1, "kind": "rademacher"}


class FakeManifest:
    base_model_hash = "h" * 64
    adapter_dim = 16


def make_job(store, rounds: int = 3, devices_per_round: int = 2):
    config = JobConfig(rounds=rounds, devices_per_round=devices_per_round, min_devices=1, round_deadline_s=60,
                       hparams=HPARAMS)
    return store.create_job(job_from_bundle("job", "/bundle", FakeManifest, config), np.zeros(16, np.float32))


def answer(store, rnd, device_id: str, pairs: int, examples: int, peak: int) -> None:
    (task,) = store.add_tasks(rnd.id, 0, {device_id: dict(HPARAMS)})
    assert store.add_update(store.task(task.id), [(k, 1e-3) for k in range(pairs)], 1.0, examples, 2.0, 1.9, peak)


@pytest.fixture
def job_store(tmp_path):
    """A job with one closed round (two updates, evaluated), one open round (one update so far),
    devices with and without a memory budget, and refusals of a device and of a handshake."""
    store = open_store(tmp_path / "job.db")
    job = make_job(store)
    store.add_metrics(job.id, 0, {"heldout_loss": 2.5})
    store.touch_device("d1", 40, 1 << 30)
    store.touch_device("d2", 24, None)
    rnd = store.start_round(job.id, 1, 0)
    answer(store, rnd, "d1", pairs=2, examples=40, peak=300 << 20)
    answer(store, rnd, "d2", pairs=1, examples=24, peak=200 << 20)
    store.close_round(rnd, np.ones(16, np.float32), {"heldout_loss": 2.25, "train_loss_after": 1.9})
    rnd2 = store.start_round(job.id, 2, 1)
    answer(store, rnd2, "d1", pairs=2, examples=40, peak=500 << 20)
    store.add_refusal(job.id, "d2", "late", "the task's round is closed")
    store.add_refusal(job.id, "d2", "late", "the task's round is closed")
    store.add_refusal(job.id, None, "bad_credential", "the credential is not valid or was revoked")
    store.set_device_status("d2", "gone")
    store.add_traffic({"d1": (1000, 5000), "d2": (700, 2500)})
    return store, job


def test_the_snapshot_shows_what_the_store_holds_and_status_prints_the_same_rounds(job_store):
    store, job = job_store
    state = snapshot(store, job.id)
    mezo = methods.get("mezo")
    closed, open_ = state["rounds"]
    assert (closed["status"], closed["version"], closed["updates"], open_["status"], open_["updates"]) == \
        ("closed", 1, 2, "open", 1)
    assert closed["forward_passes"] == mezo.forward_passes(2, HPARAMS, 40) + mezo.forward_passes(1, HPARAMS, 24)
    assert closed["peak_bytes"] == 300 << 20 and closed["metrics"]["heldout_loss"] == 2.25
    assert open_["seconds"] is None and open_["opened_at"] <= state["now"]  # the page counts it on
    assert state["metrics"] == {"heldout_loss": [[0, 2.5], [1, 2.25]]}
    assert state["best"] == {"version": 1, "metric": "heldout_loss", "value": 2.25}
    devices = {d["id"]: d for d in state["devices"]}
    stored = {d.id: d for d in store.devices()}
    assert devices["d1"]["first_seen"] == stored["d1"].first_seen <= devices["d1"]["last_seen"]
    assert devices["d1"] | {"first_seen": None, "last_seen": None} == {
        "id": "d1", "state": "connected", "first_seen": None, "last_seen": None, "examples": 40, "bytes_up": 1000, "bytes_down": 5000,
        "peak_bytes": 500 << 20, "budget_bytes": 1 << 30, "updates": 2, "refusals": 0, "last_refusal": None}
    assert devices["d2"]["state"] == "away" and devices["d2"]["refusals"] == 2
    assert devices["d2"]["last_refusal"] == {"code": "late", "reason": "the task's round is closed"}
    assert state["refusals"]["by_code"] == {"bad_credential": 1, "late": 2}
    assert [r["device"] for r in state["refusals"]["recent"]] == [None, "d2", "d2"]  # newest first
    assert state["job"]["hparams"] == HPARAMS and state["job"]["closed_rounds"] == 1
    # `coordinator status` prints the closed round with the same figures.
    line = next(ln.split() for ln in status_text(store, job).splitlines() if re.match(r"\s+1\s+1\s+closed", ln))
    assert line[4] == str(closed["updates"]) and line[7] == f"{closed['forward_passes']:,}"
    assert line[9] == f"{closed['metrics']['heldout_loss']:.4f}"


def test_a_non_finite_figure_is_shown_as_missing_not_as_invalid_json():
    state = clean({"now": 1.0, "metrics": {"heldout_loss": [[0, float("nan")], [1, float("inf")], [2, 2.0]]}})
    text_, digest = encode(state)
    assert json.loads(text_)["metrics"]["heldout_loss"] == [[0, None], [1, None], [2, 2.0]]
    assert encode(state | {"now": 2.0})[1] == digest != encode(state | {"metrics": {}})[1]  # the clock is no change


def test_bytes_add_up_per_device_and_old_devices_read_as_not_recorded(db_url):  # noqa: F811
    store = open_store(db_url)
    store.touch_device("a", 1, None)
    store.add_traffic({"a": (10, 20)})
    store.add_traffic({"a": (1, 2)})
    assert [(d.bytes_up, d.bytes_down) for d in store.devices()] == [(11, 22)]
    with store.session() as s, s.begin():  # a device row an older coordinator wrote
        s.execute(text("UPDATE devices SET bytes_up = NULL, bytes_down = NULL"))
    assert [(d.bytes_up, d.bytes_down) for d in store.devices()] == [(None, None)]
    store.add_traffic({"a": (5, 6)})
    assert [(d.bytes_up, d.bytes_down) for d in store.devices()] == [(5, 6)]


def test_a_version_3_database_is_upgraded_with_the_byte_columns_and_operator_tokens(tmp_path):
    from sqlalchemy import inspect

    path = tmp_path / "v3.db"
    store = open_store(path)
    make_job(store)
    store.touch_device("old", 3, None)
    OperatorToken.__table__.drop(store.engine)
    with store.session() as s, s.begin():
        s.execute(text("ALTER TABLE devices DROP COLUMN bytes_up"))
        s.execute(text("ALTER TABLE devices DROP COLUMN bytes_down"))
        s.get(Meta, "schema_version").value = "3"
    store = open_store(path)
    columns = {c["name"] for c in inspect(store.engine).get_columns("devices")}
    assert {"bytes_up", "bytes_down"} <= columns and "operator_tokens" in inspect(store.engine).get_table_names()
    assert [(d.id, d.num_examples, d.bytes_up) for d in store.devices()] == [("old", 3, None)]
    assert store.operator(store.issue_operator_token("operator")) == "operator"
    assert snapshot(store, "job")["devices"][0]["bytes_up"] is None


def test_operator_tokens_are_stored_hashed_and_reissuing_revokes_the_old_one(db_url):  # noqa: F811
    store = open_store(db_url)
    first = store.issue_operator_token("operator")
    other = store.issue_operator_token("night-shift")
    assert store.operator(first) == "operator" and store.operator(other) == "night-shift"
    assert store.operator(first + "x") is None and store.operator("") is None
    with store.session() as s:
        hashes = [t.token_hash for t in s.query(OperatorToken)]
    assert first not in hashes and all(len(h) == 64 for h in hashes)
    second = store.issue_operator_token("operator")
    assert store.operator(second) == "operator" and store.operator(first) is None
    assert store.operator(store.enrol("d2")) is None  # a device's token opens no dashboard ...
    assert store.authenticate(second) is None  # ... and an operator's connects no device


class CountingClient(ProtocolClient):
    """A device that counts the bytes of the messages it sends and receives."""
    sent = received = 0

    async def recv(self, timeout: float = 60) -> protocol.Message:
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        self.received += len(frame)
        return protocol.decode(frame)

    async def send(self, message: protocol.Message) -> None:
        frame = message.to_wire()
        self.sent += len(frame)
        await self.ws.send(frame)


def test_a_real_coordinator_stores_the_bytes_each_device_sent_and_was_sent(tmp_path):
    """Over a real websockets server: hello, tasks, updates, acks and done are all counted, exactly."""
    store = open_store(tmp_path / "job.db")
    job = make_job(store, rounds=2, devices_per_round=1)
    coordinator = Coordinator(store, job, SeedFedAvg(hparams=job.hparams, devices_per_round=1),
                              limits=Limits(require_credentials=False))

    async def scenario():
        ready = asyncio.get_running_loop().create_future()
        serving = asyncio.create_task(serve_job(coordinator, "127.0.0.1", 0, ready=ready.set_result))
        url = await asyncio.wait_for(ready, 10)
        async with CountingClient(url, "dev", FakeManifest.base_model_hash, 16) as client:
            await client.answer_until_done(pairs=HPARAMS["local_steps"] * HPARAMS["directions"])
        assert await asyncio.wait_for(serving, 30)
        return client

    client = asyncio.run(scenario())
    (device,) = store.devices()
    assert client.sent > 0 and (device.bytes_up, device.bytes_down) == (client.sent, client.received)


@pytest.mark.parametrize("given, expected", [("8766", ("127.0.0.1", 8766)), ("0.0.0.0:80", ("0.0.0.0", 80)),
                                             ("[::1]:0", ("::1", 0)), (":9000", ("127.0.0.1", 9000))])
def test_the_dashboard_address_is_host_port_or_a_port_on_loopback(given, expected):
    assert address(given) == expected


@pytest.mark.parametrize("bad", ["host", "host:", "h:99999", "h:-1"])
def test_a_bad_dashboard_address_is_refused(bad):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="HOST:PORT"):
        address(bad)


async def started(store, job, poll_s: float = 0.05) -> tuple[Dashboard, str]:
    dashboard = Dashboard(store.engine.url.database, job.id, poll_s=poll_s)
    return dashboard, await dashboard.start("127.0.0.1", 0)


async def next_event(response) -> dict:
    """The next `state` event of a server-sent event stream."""
    data = None
    while True:
        line = (await asyncio.wait_for(response.content.readline(), 10)).decode().rstrip("\n")
        if line.startswith("data: "):
            data = line[len("data: "):]
        elif line == "" and data is not None:
            return json.loads(data)


def test_the_server_refuses_a_missing_or_wrong_token_and_serves_the_page_to_a_valid_one(job_store):
    store, job = job_store
    token = store.issue_operator_token("operator")

    async def scenario():
        dashboard, url = await started(store, job)
        try:
            async with aiohttp.ClientSession() as http:
                for path in ("", "static/plotly.min.js", "api/state", "api/events"):
                    async with http.get(url + path) as r:
                        assert r.status == 401, path
                    async with http.get(url + path, headers={"Authorization": "Bearer wrong"}) as r:
                        assert r.status == 403, path
                    async with http.get(url + path, cookies={COOKIE: "wrong"}) as r:
                        assert r.status == 403, path
                device_token = store.enrol("d1")
                async with http.get(url, headers={"Authorization": f"Bearer {device_token}"}) as r:
                    assert r.status == 403  # a device's token is no operator's
                async with http.get(url + "?token=" + token, allow_redirects=False) as r:
                    assert r.status == 303 and r.headers["Location"] == "/"  # the token leaves the address
                    cookie = r.cookies[COOKIE]
                    assert cookie.value == token and cookie["httponly"] and cookie["samesite"] == "Strict"
            async with aiohttp.ClientSession(cookies={COOKIE: token}) as http:
                async with http.get(url) as r:
                    page = await r.text()
                    assert r.status == 200 and "default-src 'self'" in r.headers["Content-Security-Policy"]
                scripts = re.findall(r'<script src="([^"]+)"', page)
                assert scripts == ["static/plotly.min.js", "static/dashboard.js"]  # the package's, no CDN
                async with http.get(url + "static/plotly.min.js") as r:
                    assert await r.read() == asset("plotly.min.js")
                async with http.get(url + "static/..%2F__init__.py") as r:
                    assert r.status == 404
                async with http.post(url + "api/state") as r:
                    assert r.status == 405  # read-only
                async with http.get(url + "api/state") as r:
                    served = await r.json()
                expected = snapshot(store, job.id)
                assert {k: v for k, v in served.items() if k != "now"} == {k: v for k, v in expected.items()
                                                                            if k != "now"}
        finally:
            await dashboard.stop()

    asyncio.run(scenario())


def test_events_carry_each_change_of_the_store_and_stop_for_a_reissued_token(job_store):
    store, job = job_store
    token = store.issue_operator_token("operator")

    async def scenario():
        dashboard, url = await started(store, job)
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
                async with http.get(url + "api/events") as events:
                    assert events.headers["Content-Type"].startswith("text/event-stream")
                    first = await next_event(events)
                    assert [r["status"] for r in first["rounds"]] == ["closed", "open"]
                    rnd = store.open_round(job.id)
                    store.close_round(rnd, np.ones(16, np.float32), {"heldout_loss": 2.0})  # the coordinator goes on
                    second = await next_event(events)
                    assert [r["status"] for r in second["rounds"]] == ["closed", "closed"]
                    assert second["metrics"]["heldout_loss"][-1] == [2, 2.0]
                    store.issue_operator_token("operator")  # re-issued: this page's token no longer opens it
                    store.add_refusal(job.id, "d1", "late", "late")
                    assert await asyncio.wait_for(events.content.read(), 10) == b""  # the stream ends
        finally:
            await dashboard.stop()

    asyncio.run(scenario())


def test_store_reads_never_block_the_event_loop(job_store):
    """A slow read (a busy database) runs in the dashboard's thread: the loop, which also runs the
    coordinator's rounds, keeps turning meanwhile."""
    store, job = job_store
    token = store.issue_operator_token("operator")

    async def scenario():
        dashboard, url = await started(store, job)
        real = dashboard._state

        def slow_state():
            time.sleep(0.6)
            return real()

        dashboard._state = slow_state
        gaps, stop = [], asyncio.Event()

        async def ticker():
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        ticking = asyncio.create_task(ticker())
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
                started_at = time.monotonic()
                async with http.get(url + "api/state") as r:
                    assert r.status == 200
                assert time.monotonic() - started_at >= 0.6  # the slow read did happen
        finally:
            stop.set()
            await ticking
            await dashboard.stop()
        return max(gaps)

    assert asyncio.run(scenario()) < 0.3


def test_the_static_file_holds_the_state_the_plot_library_and_no_outside_address(job_store, tmp_path):
    store, job = job_store
    out = write_static(snapshot(store, job.id), tmp_path / "job.html")
    page = out.read_text()
    assert not re.findall(r"<(?:script|link|img)[^>]*\s(?:src|href)=", page)  # nothing loaded from elsewhere
    state = json.loads(re.search(r'<script type="application/json" id="snapshot">(.*?)</script>', page, re.DOTALL)
                       .group(1).replace("<\\/", "</"))
    assert state["rounds"][0]["forward_passes"] == snapshot(store, job.id)["rounds"][0]["forward_passes"]
    assert page.count("</script>") == 3 and len(page) > len(asset("plotly.min.js"))


def test_the_commands_issue_a_private_token_and_write_the_static_page_without_torch(job_store, tmp_path):
    store, _ = job_store
    db = store.engine.url.database
    out = tmp_path / "operator-token"
    issued = coordinator_without_torch("operator-token", "--db", db, "--out", str(out))
    assert issued.returncode == 0, issued.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600 and store.operator(out.read_text().strip()) == "operator"
    assert out.read_text().strip() not in issued.stdout  # the token is in the file only
    fresh, fresh_out = tmp_path / "new.db", tmp_path / "fresh-token"  # before the first serve, as with enrol
    assert coordinator_without_torch("operator-token", "--db", str(fresh), "--out", str(fresh_out)).returncode == 0
    assert open_store(fresh).operator(fresh_out.read_text().strip()) == "operator"
    written = coordinator_without_torch("dashboard", "--db", db, "--html", str(tmp_path / "job.html"))
    assert written.returncode == 0, written.stderr
    assert "plotly" in (tmp_path / "job.html").read_text()[:200_000].lower()


def test_the_dashboard_of_a_missing_database_is_a_one_line_error(tmp_path):
    result = run_command("coordinator", "dashboard", "--db", str(tmp_path / "none.db"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: database {tmp_path / 'none.db'} does not exist"]
    assert not (tmp_path / "none.db").exists()
    result = run_command("coordinator", "dashboard", "--db", "x.db", "--cert", "c.pem")
    assert result.returncode == 2 and "--cert and --key go together" in result.stderr


def test_under_tls_the_page_is_served_over_https_and_the_cookie_is_secure(job_store, tls_files):
    import ssl

    from coordinator.serve_cli import tls_context

    store, job = job_store
    token = store.issue_operator_token("operator")
    cert, key, ca = tls_files

    async def scenario():
        dashboard = Dashboard(store.engine.url.database, job.id, tls=True)
        url = await dashboard.start("127.0.0.1", 0, tls_context(cert, key))
        try:
            assert url.startswith("https://")
            trusting = ssl.create_default_context(cafile=str(ca))
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "?token=" + token, ssl=trusting, allow_redirects=False) as r:
                    assert r.status == 303 and r.cookies[COOKIE]["secure"]
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await http.get(url)  # not trusted without the private CA
        finally:
            await dashboard.stop()

    asyncio.run(scenario())
