"""The operator's page in a real browser (Playwright driving Debian's chromium) during a real job:
stories260K, a coordinator process serving the dashboard beside its rounds, three emulated
devices. The page must follow the rounds and the plot live, agree with `coordinator status`, and
refuse a missing or wrong operator token. Set FWDFED_DASHBOARD_SCREENSHOT=docs/dashboard.png to
keep the screenshot taken mid-job (the one in docs/ was made so)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from coordinator.store import open_store
from fwdfed import protocol
from tests.conftest import ROOT, TINYSTORIES, run_command
from tests.support.fleet import Coordinator, enrol

CHROMIUM = Path("/usr/bin/chromium")
# Skipped before any fixture runs (the bundle's export takes minutes), saying what is missing.
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[browser]')")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")]

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROUNDS = 4
INJECTED = "<img src=x onerror=\"window.injected = 1\">"

# Each round row's cells, by name, as the page shows them (data-field).
ROWS_JS = """() => [...document.querySelectorAll('#rounds tbody tr')].map(tr =>
    Object.fromEntries([...tr.querySelectorAll('td')].map(td => [td.dataset.field, td.textContent])))"""
POINTS_JS = "() => document.getElementById('plot').data[0].x.length"
# Every change of the plot's point count, from the page's side: a growth seen in place, not after a reload.
WATCH_POINTS_JS = """() => { window.pointsSeen = []; setInterval(() => {
    const data = document.getElementById('plot').data, n = data && data[0] ? data[0].x.length : 0;
    if (window.pointsSeen.at(-1) !== n) window.pointsSeen.push(n); }, 50); }"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def dashboard_url(lines: list[str]) -> str:
    return next(line.split()[2] for line in lines if line.startswith("dashboard on "))


def status_rounds(db: Path) -> tuple[list[dict], str, dict[str, int], dict[str, int]]:
    """`coordinator status`: each round line's figures, the best-version line, examples per
    device, and the refusals by code."""
    out = run_command("coordinator", "status", "--db", str(db), check=True).stdout
    fields = ["round", "attempt", "status", "version", "updates", "waves", "seconds", "forward_passes", "peak_mib",
              "heldout_loss"]
    # The round lines lie between the "rounds:" header and the bytes section, whose lines also
    # start with a round and an attempt.
    section = out.split("\nrounds:", 1)[1].split("\nbytes per round", 1)[0]
    rows = [dict(zip(fields, line.split())) for line in section.splitlines() if re.match(r"\s+\d+\s+\d+\s+\w+", line)]
    best = next(line for line in out.splitlines() if line.startswith("best version:"))
    examples = {m[1]: int(m[2]) for m in re.finditer(r"^\s+(emu-\d+)\s.*, (\d+) examples$", out, re.MULTILINE)}
    refused = next(line for line in out.splitlines() if line.startswith("refused:")).removeprefix("refused: ")
    codes = {} if refused == "none" else {code: int(n) for code, n in (item.split() for item in refused.split(", "))}
    return rows, best.split(";")[0], examples, codes


def page_figures(page) -> tuple[list[dict], str, dict[str, int], list[str]]:
    rows = page.evaluate(ROWS_JS)
    best = page.inner_text("#best").split(";")[0]
    examples = {d: int(n.replace(",", "")) for d, n in page.evaluate(
        "() => [...document.querySelectorAll('#devices tbody tr')].map(tr => "
        "[tr.dataset.device, tr.querySelector('[data-field=examples]').textContent])")}
    codes = page.evaluate("() => Object.fromEntries([...document.querySelectorAll('#refusal-codes tr[data-code]')]"
                          ".map(tr => [tr.dataset.code, Number(tr.querySelector('[data-field=count]').textContent)]))")
    return rows, best, examples, codes


def assert_matches_status(page, db: Path) -> None:
    rows, best, examples, codes = page_figures(page)
    expected_rows, expected_best, expected_examples, expected_codes = status_rounds(db)
    assert len(rows) == len(expected_rows) == ROUNDS
    for shown, printed in zip(rows, expected_rows):
        assert {k: shown[k] for k in printed} == printed
    assert best == expected_best and examples == expected_examples and codes == expected_codes


def test_the_live_page_follows_a_real_job_and_agrees_with_status(tmp_path, stories_bundle, browser):
    db, credentials, token_file = tmp_path / "job.db", tmp_path / "tokens.json", tmp_path / "operator-token"
    enrol(db, credentials, [f"emu-{i}" for i in range(3)])
    run_command("coordinator", "operator-token", "--db", str(db), "--out", str(token_file), check=True)
    token = token_file.read_text().strip()
    coordinator = Coordinator(db, "--auth", "token", "--bundle", str(stories_bundle), "--eval-data", str(TINYSTORIES),
                              "--eval-examples", "32", "--rounds", str(ROUNDS), "--devices-per-round", "3",
                              "--local-steps", "20", "--round-deadline", "120", "--dashboard", "127.0.0.1:0")
    devices = standalone = None
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    errors: list[str] = []
    try:
        url = dashboard_url(coordinator.lines)
        # The devices start now: loading their runtime takes longer than the browser's checks below.
        devices = subprocess.Popen(
            [sys.executable, "-m", "device_sdk.emulate", "--mem", "1.5GB", "--coordinator", coordinator.url,
             "--devices", "3", "--bundle", str(stories_bundle), "--data", str(TINYSTORIES), "--credentials",
             str(credentials)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert http_status(url + "api/state") == 401
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
        assert page.goto(url).status == 401
        assert page.goto(url + "?token=not-the-token").status == 403
        assert page.goto(url + "?token=" + token).status == 200 and page.url == url  # the token left the address
        page.wait_for_selector("#live[data-live=live]")
        page.evaluate(WATCH_POINTS_JS)  # a reload would lose it
        page.wait_for_selector('#rounds tr[data-round="1"][data-status="closed"]', timeout=120_000)
        page.wait_for_selector('#rounds tr[data-round="2"][data-status="closed"]', timeout=120_000)
        page.wait_for_function("() => window.pointsSeen.at(-1) === 3")
        seen = page.evaluate("() => window.pointsSeen")
        assert seen[-2:] == [2, 3], seen  # the start and round 1, then round 2: live, in place
        assert page.inner_text("#job-status") == "running"
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("FWDFED_DASHBOARD_SCREENSHOT"):
            shutil.copy(shot, os.environ["FWDFED_DASHBOARD_SCREENSHOT"])

        _, devices_err = devices.communicate(timeout=300)
        assert devices.returncode == 0, devices_err[-3000:]
        code, _, err = coordinator.wait(timeout=120)
        assert code == 0, err[-3000:]

        # The finished job on `coordinator dashboard`: the same figures as `coordinator status`. A refusal
        # whose reason is markup (a device chooses what it sends) is shown as text, never run.
        store = open_store(db)
        store.add_refusal(store.latest_job().id, "emu-0", "late", INJECTED)
        standalone = subprocess.Popen([sys.executable, "-m", "coordinator", "dashboard", "--db", str(db), "--port", "0"],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = dashboard_url([standalone.stdout.readline()])
        assert page.goto(url + "?token=" + token).status == 200
        page.wait_for_selector("#live[data-live=live]")
        assert page.inner_text("#job-status") == "finished" and page.evaluate(POINTS_JS) == ROUNDS + 1
        assert_matches_status(page, db)
        assert page.inner_text("#refusal-recent [data-field=reason]") == INJECTED
        assert page.evaluate("() => window.injected") is None
        job = store.latest_job()
        # The smallest task frame a device can get: a seed-form task of no version (docs/protocol.md).
        smallest_task = len(protocol.Task(task_id="", job_id=job.id, round=1, global_version=0,
                                          base_model_hash=job.base_model_hash, adapter=b"", adapter_sha256="",
                                          method=job.method, hparams={}, deadline_s=0.0, reference=b"",
                                          history=[]).to_wire())
        for device in store.devices():  # bytes: as stored, and at least a task frame per round received
            shown = page.locator(f'#devices tr[data-device="{device.id}"]')
            assert shown.get_attribute("data-bytes-up") == str(device.bytes_up) and device.bytes_up > 0
            assert shown.get_attribute("data-bytes-down") == str(device.bytes_down)
            assert device.bytes_down > ROUNDS * smallest_task

        # The same job as one static file: the same figures, the plot drawn with nothing fetched.
        static = tmp_path / "job.html"
        run_command("coordinator", "dashboard", "--db", str(db), "--html", str(static), check=True)
        offline = context.new_page()
        offline.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:")
                      else route.continue_())
        offline.goto(static.as_uri())
        offline.wait_for_selector("#plot .main-svg")
        assert offline.inner_text("#live").endswith("(a static copy: no live updates)")
        assert offline.evaluate(POINTS_JS) == ROUNDS + 1
        assert_matches_status(offline, db)
        assert errors == []
    finally:
        context.close()
        for process in (devices, standalone):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()
        coordinator.kill()
