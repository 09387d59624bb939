"""The coordinator's tests' shared fixtures."""

import os

import pytest
from sqlalchemy import create_engine

POSTGRES = os.environ.get("FWDFED_TEST_POSTGRES_URL")  # .ci/run starts PostgreSQL and sets it


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """The same storage tests on SQLite and on PostgreSQL (a fresh schema each time)."""
    if request.param == "sqlite":
        return str(tmp_path / "s.db")
    if not POSTGRES:
        pytest.skip("FWDFED_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    from coordinator.store import Base

    engine = create_engine(POSTGRES)
    Base.metadata.drop_all(engine)
    engine.dispose()
    return POSTGRES
