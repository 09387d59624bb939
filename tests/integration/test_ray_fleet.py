"""The emulator's devices as Ray actors (`python -m device_sdk.emulate --ray ADDRESS`) on a two-node Ray
cluster started here, on loopback: a head and a worker node, one CPU each, so that the two workers
(one CPU each) land one on each node. The coordinator is the real one and does not know where its
devices run. The same job through the process emulator gives the same updates and versions, its devices
profiled and held to their simulated time in both."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINYSTORIES
from tests.support.fleet import Coordinator, emulate, free_port

pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")

# Both on lo (127.0.0.0/8). Not 127.0.0.1: Ray replaces that with the host's routable address.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
RAY = str(Path(sys.executable).with_name("ray"))
# For the nodes and the emulator alike. Without RAY_AUTH_MODE, a token in ~/.ray (which a local ray.init() writes)
# would turn token authentication on for some of them and not others.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def start_node(log: Path, *args: str) -> subprocess.Popen:
    """`ray start --block` in its own process group, so that stopping the group stops every process of the node."""
    common = ["--num-cpus", "1", "--object-store-memory", str(80 * 2**20), "--disable-usage-stats", "--block",
              "--dashboard-agent-listen-port", str(free_port())]
    with log.open("w") as out:
        return subprocess.Popen([RAY, "start", *args, *common], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_node(node: subprocess.Popen) -> None:
    try:
        os.killpg(node.pid, signal.SIGKILL)  # SIGTERM would drain for up to 30 s; this cluster holds nothing
    except ProcessLookupError:
        pass
    node.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the node's raylet, GCS and workers share its group
        try:
            os.killpg(node.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes of the Ray node {node.pid} outlived SIGKILL")


@contextmanager
def two_node_cluster():
    """The head's address; both nodes stopped at the end."""
    folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's unix sockets live under it
    port, nodes = free_port(), []
    try:
        nodes.append(start_node(folder / "head.log", "--head", "--port", str(port), "--node-ip-address", HEAD_IP,
                                "--include-dashboard=false", "--dashboard-port", str(free_port()),
                                "--temp-dir", str(folder)))
        nodes.append(start_node(folder / "worker.log", "--address", f"{HEAD_IP}:{port}", "--node-ip-address",
                                WORKER_IP))
        yield f"{HEAD_IP}:{port}"
    finally:
        for node in reversed(nodes):
            stop_node(node)
        shutil.rmtree(folder, ignore_errors=True)


def run(tmp_path: Path, bundle: Path, *emulate_args: str) -> tuple[Path, str]:
    """A 2-round job of 4 devices, all in every round; the database and the emulator's output."""
    tmp_path.mkdir()
    db = tmp_path / "job.db"
    coordinator = Coordinator(db, "--bundle", str(bundle), "--rounds", "2", "--devices-per-round", "4",
                              "--local-steps", "8", "--lr", "1e-3", "--round-deadline", "120")
    try:
        # Profiled devices held to their simulated time: the order they train and answer in does not change what.
        devices = emulate(coordinator.url, bundle, TINYSTORIES, 4, "--workers", "2", "--connect-timeout", "60",
                          "--profile-speed", "0.5:2", "--time-scale", "0.2", *emulate_args)
        assert devices.returncode == 0, devices.stdout[-2000:] + devices.stderr[-3000:]
        code, _, err = coordinator.wait(timeout=120)
    finally:
        coordinator.kill()
    assert code == 0, err[-3000:]
    return db, devices.stdout


def stored(db: Path) -> tuple[dict, list[np.ndarray]]:
    """{(round, device): (pairs, num_examples)} and the versions, after checking each version is the
    aggregation of the one before with its round's stored updates, each device's once."""
    from coordinator.job import JobOptions
    from coordinator.store import open_store
    from coordinator.strategies import AcceptedUpdate, SeedFedAvg

    store = open_store(db)
    job = store.latest_job()
    assert job.status == "finished"
    strategy = SeedFedAvg(hparams=job.hparams, options=JobOptions.from_json(job.options))
    versions = [np.frombuffer(v.vector, "<f4") for v in store.versions(job.id)]
    rounds = store.closed_round_list(job.id)
    assert [r.number for r in rounds] == [1, 2] and len(versions) == 3
    updates = {}
    for r, before, after in zip(rounds, versions, versions[1:]):
        rows = store.updates(r.id)
        assert sorted(u.device_id for u in rows) == [f"emu-{i}" for i in range(4)]  # every update, once
        accepted = [AcceptedUpdate.from_row(u) for u in rows]
        np.testing.assert_array_equal(strategy.aggregate(before, accepted), after)
        updates |= {(r.number, u.device_id): (u.pairs, u.num_examples) for u in accepted}
    return updates, versions


def test_devices_on_two_ray_nodes_match_the_process_emulator(tmp_path, tiny_llama_bundle, monkeypatch):
    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)
    # The process emulator's job beside the Ray job: most of either is waiting for imports and connections.
    with ThreadPoolExecutor(1) as pool, two_node_cluster() as address:
        processes = pool.submit(run, tmp_path / "processes", tiny_llama_bundle)
        ray_db, out = run(tmp_path / "ray", tiny_llama_bundle, "--ray", address)
        process_db, _ = processes.result()
    nodes = {line.split(" on Ray node ")[1].split()[0] for line in out.splitlines() if " on Ray node " in line}
    assert nodes == {HEAD_IP, WORKER_IP}, out
    ray_updates, ray_versions = stored(ray_db)
    process_updates, process_versions = stored(process_db)
    assert ray_updates == process_updates  # the same seeds and coefficients, device by device
    for a, b in zip(ray_versions, process_versions):
        np.testing.assert_array_equal(a, b)
