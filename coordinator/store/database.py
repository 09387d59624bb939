"""Opening the database: SQLite by path (WAL, chosen durability) or any SQLAlchemy URL, and the
schema check. A database of another schema version is refused rather than misread; one whose
upgrade only adds tables and nullable columns is upgraded in place.
"""

from __future__ import annotations

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from coordinator.store.queries import Store
from coordinator.store.schema import SCHEMA_VERSION, UPGRADABLE, Base, Meta
from fwdfed.errors import UserError, first_line


class StoreError(UserError):
    """A database the coordinator cannot use; the message is meant for the user."""


def open_store(url, sqlite_sync: str = "full") -> Store:
    """Open (creating if new) the database at `url`; a bare path means SQLite.

    `sqlite_sync`: "full" makes every accepted update durable against power loss before it is
    acknowledged; "normal" (WAL) keeps it safe from a crash of the process only, and is faster."""
    url = str(url)
    if "://" not in url:
        url = f"sqlite:///{url}"
    try:
        engine = create_engine(url)
        if engine.dialect.name == "sqlite":
            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(conn, _record):
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                cur.execute("PRAGMA busy_timeout=5000")
                cur.execute(f"PRAGMA synchronous={'NORMAL' if sqlite_sync == 'normal' else 'FULL'}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        tables = set(inspect(engine).get_table_names())
    except SQLAlchemyError as e:
        raise StoreError(f"cannot open database {url}: {first_line(e)}") from None
    store = Store(engine)
    if not tables:
        Base.metadata.create_all(engine)
        with Session(engine) as s, s.begin():
            s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
    else:
        check_schema(engine, tables)
    return store


def check_schema(engine, tables: set[str]) -> None:
    """Refuse a database of another schema version; upgrade one whose upgrade only adds tables and
    nullable columns."""
    if "meta" not in tables:
        raise StoreError("the database was not made by this coordinator (it has no meta table); use a new --db")
    with Session(engine) as s:
        row = s.get(Meta, "schema_version")
    if row is not None and row.value in UPGRADABLE:
        Base.metadata.create_all(engine)  # adds the missing tables, touches no existing one
        add_missing_columns(engine)
        with Session(engine) as s, s.begin():
            s.get(Meta, "schema_version").value = str(SCHEMA_VERSION)
        return
    if row is None or row.value != str(SCHEMA_VERSION):
        found = row.value if row else "none"
        raise StoreError(f"database schema version {found} is not supported (this coordinator uses {SCHEMA_VERSION})")


def add_missing_columns(engine) -> None:
    """ALTER TABLE ... ADD COLUMN for each nullable column the tables lack: their rows read as NULL,
    which the code takes as 'not recorded then'."""
    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present:
                    if not column.nullable:
                        raise StoreError(f"cannot upgrade the database: {table.name}.{column.name} is missing")
                    kind = column.type.compile(dialect=engine.dialect)
                    conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))
