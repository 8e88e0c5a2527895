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
from tests.conftest import create_database, drop_database, wait_until
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


def test_0004_takes_no_lock_on_the_table_and_keeps_the_previous_releases_functions(server_url):
    """Expand-only: 0003 -> 0004 completes while another transaction holds the table in ACCESS EXCLUSIVE mode
    (so it waits on no lock of the table), the previous release's workers' functions answer as before, and
    the downgrade leaves them as 0003 made them."""
    import threading

    url = create_database(server_url)
    eng = make_engine(url)
    functions = text("SELECT array_agg(p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')'"
                     " ORDER BY p.proname) FROM pg_proc p WHERE p.proname LIKE 'fp_outbox_%_permits'")
    try:
        upgrade(url, "0003")
        with eng.connect() as holder:
            holder.execute(text("LOCK TABLE fp_outbox_events IN ACCESS EXCLUSIVE MODE"))
            done = threading.Thread(target=upgrade, args=(url, "0004"), daemon=True)
            done.start()
            done.join(30)
            assert not done.is_alive(), "0004 waited for a lock on fp_outbox_events"
            holder.rollback()
        with eng.begin() as conn:
            assert conn.execute(functions).scalar() == [
                "fp_outbox_pause_permits(pause_s double precision)", "fp_outbox_reset_permits(max_ahead_s double "
                "precision)", "fp_outbox_take_permits(span_s double precision)"]
            assert conn.execute(text("SELECT fp_outbox_take_permits(0.001) IS NOT NULL")).scalar()
            assert conn.execute(text("SELECT fp_outbox_pause_permits(0.0) IS NOT NULL")).scalar()
        command.downgrade(alembic_config(url), "0003")
        with eng.connect() as conn:
            assert conn.execute(functions).scalar() == ["fp_outbox_pause_permits(pause_s double precision)",
                                                        "fp_outbox_take_permits(span_s double precision)"]
    finally:
        eng.dispose()
        drop_database(server_url, url)


def _explain(conn, statement, params: dict, options: str = "") -> str | list:
    """The plan of `statement` (executed, and rolled back, when options ask for ANALYZE)."""
    rows = conn.execute(text(f"EXPLAIN {options} " + statement.text), params).scalars().all()
    conn.rollback()
    return rows[0] if "JSON" in options else "\n".join(rows)


CLAIM = {"owner": "plan-test", "lease_s": 30.0, "limit": 25, "rate": 1e6, "probe": False}


def _settled_and_pending(engine, settled: int = 50000, pending: int = 20) -> int:
    """Many delivered rows, then a few pending ones; returns the id below the pending ones (a floor)."""
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO fp_outbox_events (insert_id, event_name, payload, status, delivered_at)"
            " SELECT g::text, 'E', '{}', 'delivered', now() FROM generate_series(1, :n) g"), {"n": settled})
        floor = conn.execute(text("SELECT max(id) FROM fp_outbox_events")).scalar()
        conn.execute(text(
            "INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
            " SELECT 'p' || g, 'E', '{}' FROM generate_series(1, :n) g"), {"n": pending})
        conn.execute(text("ANALYZE fp_outbox_events"))
    return floor


def test_the_fresh_claim_reads_the_primary_key_from_the_floor(clean):
    floor = _settled_and_pending(clean)
    with clean.connect() as conn:
        plan = _explain(conn, queries.CLAIM_FRESH, {**CLAIM, "floor": floor})
    assert "Index Scan using fp_outbox_events_pkey" in plan and "Index Cond: (id > " in plan, plan
    assert "Seq Scan on fp_outbox_events" not in plan and "fp_outbox_events_due_idx" not in plan, plan


def test_a_backlog_the_statistics_know_nothing_of_is_claimed_from_the_floor(server_url, template_db):
    """Right after a burst of enqueues (or on a table never analyzed) the planner has no idea that nearly every
    row above the floor is pending. The fresh claim must still walk the primary key from the floor and stop
    after its rows, not read (and sort) the whole backlog above it on every claim."""
    url = create_database(server_url, template_db)  # a table no ANALYZE has seen
    eng = make_engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(text("INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
                              " SELECT g::text, 'E', '{}' FROM generate_series(1, 20000) g"))
        with eng.connect() as conn:
            plan = _explain(conn, queries.CLAIM_FRESH, {**CLAIM, "floor": 0})
            read = _entries_read(conn, queries.CLAIM_FRESH, {**CLAIM, "floor": 0})
    finally:
        eng.dispose()
        drop_database(server_url, url)
    assert "Index Scan using fp_outbox_events_pkey" in plan and "Index Cond: (id > " in plan, plan
    assert "Sort Key: fp_outbox_events.id" not in plan and "Bitmap" not in plan and "Seq Scan on fp_outbox_events" not in plan, plan
    assert read < 100, read  # the 25 rows found, then updated, and the head; not 20,000


def test_the_sweep_reads_the_partial_index_with_many_settled_rows(clean):
    _settled_and_pending(clean)
    with clean.connect() as conn:
        plan = _explain(conn, queries.CLAIM_SWEEP, CLAIM)
    assert "fp_outbox_events_due_idx" in plan, plan
    assert "Seq Scan on fp_outbox_events" not in plan, plan


def _entries_read(conn, statement, params: dict) -> int:
    """Index entries the statement read (live or dead, from every index of the table), run and rolled back.
    A count of what it visited, which no machine load can change."""
    count = text("SELECT sum(pg_stat_get_xact_tuples_returned(indexrelid)) FROM pg_index"
                 " WHERE indrelid = 'fp_outbox_events'::regclass")
    before = conn.execute(count).scalar()  # the backend's counts not yet reported, this statement's among them
    conn.execute(statement, params)
    after = conn.execute(count).scalar()
    conn.rollback()
    return int(after - before)


def test_under_a_held_snapshot_the_fresh_claim_never_visits_what_lies_below_the_floor(clean):
    """The dead versions every claim and settle leave behind cannot be removed while a snapshot is open
    (a report, pg_dump); the fresh claim starts above them, the sweep has to step over them."""
    from sqlalchemy.orm import Session

    import outbox
    from worker.engine.floor import Floor
    from worker.engine.store import Store

    with Session(clean) as session:
        outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": f"u{i}"}} for i in range(3000)])
        session.commit()
    store = Store(clean, "me", 30.0)
    floor = Floor(store.first_floor())
    with clean.connect() as report:
        report.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
        assert report.execute(text("SELECT count(*) FROM fp_outbox_events")).scalar() == 3000
        while _claimed_and_delivered(store, floor):
            pass
        # Snapshots' xmin is cluster-wide: a write transaction in another database may hold the floor back
        # for a moment; the claim below is only meant to start where the drain ended.
        last = report.execute(text("SELECT max(id) FROM fp_outbox_events")).scalar()
        assert wait_until(lambda: _claimed_and_delivered(store, floor) == 0 and floor.value >= last, 30)
        with Session(clean) as session:
            outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": "u"}}] * 10)
            session.commit()
        with clean.connect() as conn:
            fresh = _entries_read(conn, queries.CLAIM_FRESH, {**CLAIM, "floor": floor.value})
            sweep = _entries_read(conn, queries.CLAIM_SWEEP, CLAIM)
        report.rollback()
    assert fresh < 60, fresh  # the ten new rows, found and then updated, and the head
    assert sweep > 20 * fresh, (fresh, sweep)  # the 3,000 dead entries are there, for whoever starts below them


def _claimed_and_delivered(store, floor) -> int:
    rows, _, snapshot = store.claim_fresh(floor.value, 100, 1e6)
    floor.observe([row.id for row in rows], 100, snapshot)
    store.mark_delivered(rows, [200] * len(rows))
    return len(rows)
