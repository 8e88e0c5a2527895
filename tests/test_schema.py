"""The Alembic history agrees with the metadata, keeps its own version table, and the claim query
stays on the partial index however many settled rows the table keeps."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from outbox.db import alembic_config, make_engine, upgrade
from outbox.schema import VERSION_TABLE, metadata
from tests.conftest import create_database, drop_database
from worker.engine import queries


def test_history_from_empty_equals_metadata(engine):
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": _ours, "version_table": VERSION_TABLE})
        assert compare_metadata(context, metadata) == []


def _ours(obj, name, type_, reflected, compare_to):
    return type_ != "table" or name.startswith("fp_outbox_")


def test_own_version_table_beside_an_applications_alembic(server_url):
    url = create_database(server_url)
    eng = make_engine(url)
    try:
        with eng.begin() as conn:  # an application that already uses Alembic
            conn.execute(text("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)"))
            conn.execute(text("INSERT INTO alembic_version VALUES ('app_rev_42')"))
        upgrade(url)
        with eng.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "app_rev_42"
            head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
            assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == head
        command.downgrade(alembic_config(url), "base")
        with eng.connect() as conn:
            assert conn.execute(text("SELECT to_regclass('fp_outbox_events')")).scalar() is None
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "app_rev_42"
        upgrade(url)  # and back up again: the history is repeatable
    finally:
        eng.dispose()
        drop_database(server_url, url)


def test_claim_uses_the_partial_index_with_many_settled_rows(clean):
    with clean.begin() as conn:
        conn.execute(text(
            "INSERT INTO fp_outbox_events (insert_id, event_name, payload, status, delivered_at)"
            " SELECT g::text, 'E', '{}'::jsonb, 'delivered', now() FROM generate_series(1, 50000) g"))
        conn.execute(text(
            "INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
            " SELECT 'p' || g, 'E', '{}'::jsonb FROM generate_series(1, 20) g"))
        conn.execute(text("ANALYZE fp_outbox_events"))
    params = {"owner": "plan-test", "lease_s": 30.0, "limit": 100, "token": None}
    with clean.connect() as conn:
        plan = "\n".join(conn.execute(text("EXPLAIN " + queries.CLAIM_BATCH.text), params).scalars())
        conn.rollback()
    assert "fp_outbox_events_due_idx" in plan, plan
    assert "Seq Scan" not in plan, plan
