import numpy as np
import pytest
from sqlalchemy import text

from coordinator.job import JobOptions
from coordinator.server import JobConfig, job_from_bundle
from coordinator.store import Meta, StoreError, open_store
from coordinator.store.queries import token_hash
from coordinator.strategies import AcceptedUpdate, SeedFedAvg
from fwdfed.directions import direction


class FakeManifest:
    base_model_hash = "h" * 64
    adapter_dim = 16


def make_job(store):
    config = JobConfig(rounds=2, devices_per_round=2, min_devices=1, round_deadline_s=10, hparams={"lr": 1.0})
    return store.create_job(job_from_bundle("j", "/b", FakeManifest, config), np.zeros(16, np.float32))


def test_updates_are_stored_once_per_task(db_url):
    store = open_store(db_url)
    job = make_job(store)
    rnd = store.start_round(job.id, 1, 0)
    store.touch_device("d1", 5, None)
    (task,) = store.add_tasks(rnd.id, 0, {"d1": {"lr": 1.0}})
    task = store.task(task.id)
    assert task.hparams == {"lr": 1.0}
    assert store.add_update(task, [(1, 0.5)], 1.0, 5, 1.0, 0.9, 3 * 2**30)  # peaks past 2^31 bytes fit
    assert not store.add_update(task, [(2, 0.5)], 1.0, 5, 1.0, 0.9, 100)  # duplicate
    assert [AcceptedUpdate.from_row(u).pairs for u in store.updates(rnd.id)] == [[(1, 0.5)]]
    version = store.close_round(rnd, np.ones(16, np.float32), {"heldout_loss": 1.0})
    assert version == 1 and store.open_round(job.id) is None and store.closed_rounds(job.id) == 1


def test_a_device_s_first_seen_is_its_first_hello_and_later_ones_leave_it(db_url):
    store = open_store(db_url)
    store.touch_device("d", 5, None)
    with store.session() as s, s.begin():  # as if its first hello was long ago
        s.execute(text("UPDATE devices SET first_seen = 1000.0, last_seen = 1000.0"))
    store.touch_device("d", 6, None)  # a later hello, a disconnect, traffic
    store.set_device_status("d", "gone")
    store.add_traffic({"d": (1, 2)})
    (device,) = store.devices()
    assert device.first_seen == 1000.0 < device.last_seen and device.num_examples == 6


def test_schema_version_is_checked(db_url):
    path = db_url
    store = open_store(path)
    with store.session() as s, s.begin():
        s.get(Meta, "schema_version").value = "999"
    with pytest.raises(StoreError, match="schema version 999"):
        open_store(path)


def test_state_survives_reopening(db_url):
    path = db_url
    job = make_job(open_store(path))
    open_store(path).add_refusal(job.id, "d", "late", "late")
    store = open_store(path)
    assert store.running_job().id == job.id
    assert np.frombuffer(store.latest_version(job.id).vector, "<f4").shape == (16,)
    assert [r.code for r in store.refusals(job.id)] == ["late"]


def test_seed_fedavg_weights_devices_by_examples():

    w = np.zeros(32, np.float32)
    updates = [AcceptedUpdate.of("a", [(1, 1.0)], 3), AcceptedUpdate.of("b", [(2, 1.0)], 1)]
    new = SeedFedAvg(options=JobOptions(server_lr=2.0)).aggregate(w, updates)
    np.testing.assert_allclose(new, 2.0 * (0.75 * direction(1, 32) + 0.25 * direction(2, 32)), rtol=1e-6)
    assert np.array_equal(SeedFedAvg().aggregate(w, []), w)


def test_seed_fedavg_applies_weight_decay_scale_and_blocks():
    from fwdfed.directions import block_direction

    w = np.ones(32, np.float32)
    updates = [AcceptedUpdate.of("a", [(1, 1.0)], 1, scale=0.5), AcceptedUpdate.of("b", [(2, 1.0)], 1, scale=1.0)]
    new = SeedFedAvg().aggregate(w, updates, block=(8, 16))
    expected = w - 0.25 * w + 0.5 * block_direction(1, 32, block=(8, 16)) + 0.5 * block_direction(2, 32, block=(8, 16))
    np.testing.assert_allclose(new, expected, rtol=1e-6)


def test_estimate_variance_is_the_variance_of_the_mean_estimate():
    from coordinator.strategies import estimate_variance

    lr, dim = 0.1, 16
    updates = [AcceptedUpdate.of(str(i), [(i, -lr * (1.0 + i))], 1) for i in range(4)]
    estimates = np.stack([(1.0 + i) * direction(i, dim) for i in range(4)])
    assert estimate_variance(updates, dim, "rademacher", lr) == pytest.approx(estimates.var(axis=0, ddof=1).mean() / 4)
    assert estimate_variance(updates[:1], dim, "rademacher", lr) == float("inf")


def test_credentials_are_stored_hashed_and_revocation_holds(db_url):
    store = open_store(db_url)
    token = store.enrol("phone-1")
    other = store.enrol("phone-2")
    assert store.authenticate(token) == "phone-1" and store.authenticate(other) == "phone-2"
    assert store.authenticate(token + "x") is None and store.authenticate("") is None
    stored = {c.device_id: c.token_hash for c in store.credentials()}
    assert token not in stored.values() and len(stored["phone-1"]) == 64  # only the sha256 is kept
    assert store.revoke("phone-1") and not store.revoke("phone-1") and not store.revoke("nobody")
    assert store.authenticate(token) is None and store.authenticate(other) == "phone-2"
    assert store.superseded({"phone-1": token_hash(token), "phone-2": token_hash(other)}) == {"phone-1"}
    fresh = store.enrol("phone-1")  # re-enrolment issues a new token; the old one stays dead
    assert store.authenticate(fresh) == "phone-1" and store.authenticate(token) is None


def test_a_version_2_database_is_upgraded_by_adding_the_credentials_table(tmp_path):
    from sqlalchemy import inspect

    from coordinator.store import Credential

    path = tmp_path / "v2.db"
    store = open_store(path)
    make_job(store)
    Credential.__table__.drop(store.engine)
    with store.session() as s, s.begin():
        s.get(Meta, "schema_version").value = "2"
    store = open_store(path)
    assert "credentials" in inspect(store.engine).get_table_names() and store.latest_job().id == "j"
    assert store.authenticate(store.enrol("d")) == "d"


def test_a_connection_s_token_is_superseded_by_revoking_or_re_enrolling(db_url):
    from coordinator.store.queries import token_hash

    store = open_store(db_url)
    first, other = store.enrol("phone-1"), store.enrol("phone-2")
    held = {"phone-1": token_hash(first), "phone-2": token_hash(other), "never-enrolled": token_hash("x")}
    assert store.superseded(held) == {"never-enrolled"}
    store.enrol("phone-1")  # a new token: sessions opened with the first one are no longer valid
    assert store.superseded(held) == {"phone-1", "never-enrolled"}
    store.revoke("phone-2")
    assert store.superseded(held) == {"phone-1", "phone-2", "never-enrolled"}


def test_a_version_4_database_gains_the_forfeited_column_in_place(tmp_path):
    from sqlalchemy import text

    path = tmp_path / "v4.db"
    store = open_store(path)
    job = make_job(store)
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE tasks DROP COLUMN forfeited"))
    with store.session() as s, s.begin():
        s.get(Meta, "schema_version").value = "4"
    store = open_store(path)
    rnd = store.start_round(job.id, 1, 0)
    store.touch_device("d", 1, None)
    (task,) = store.add_tasks(rnd.id, 0, {"d": {}})
    store.forfeit_task(task.id, "bad_message")
    assert store.task(task.id).forfeited == "bad_message" and store.task(task.id).abandoned_at is not None
