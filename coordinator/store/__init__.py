"""Everything the coordinator knows, in SQLite (or PostgreSQL) through SQLAlchemy: the tables
(`schema`), opening and checking a database (`database`), and the queries (`queries`)."""

from coordinator.store.database import StoreError, open_store
from coordinator.store.queries import Store
from coordinator.store.schema import (SCHEMA_VERSION, AdapterVersion, Base, Credential, Device, Job, Meta, Metric,
                                      OperatorToken, Refusal, Round, Task, UpdateRow)

__all__ = ["SCHEMA_VERSION", "AdapterVersion", "Base", "Credential", "Device", "Job", "Meta", "Metric", "OperatorToken",
           "Refusal", "Round", "Store", "StoreError", "Task", "UpdateRow", "open_store"]
