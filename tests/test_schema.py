"""The Alembic history agrees with the metadata, keeps its own version table, and the claim query
stays on the partial index however many settled rows the table keeps."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from outbox.db import alembic_config, make_engine, upgrade
from outbox.schema import VERSION_TABLE, compared_by_alembic, metadata
from tests.conftest import create_database, drop_database
from worker.engine import queries


def test_history_from_empty_equals_metadata(engine):
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": _ours, "version_table": VERSION_TABLE})
        assert compare_metadata(context, metadata) == []


def _ours(obj, name, type_, reflected, compare_to):
    return type_ != "table" or compared_by_alembic(name)


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


def _explain(conn, statement, params: dict) -> str:
    rows = conn.execute(text("EXPLAIN " + statement.text), params).scalars().all()
    conn.rollback()
    return "\n".join(rows)


CLAIM = {"owner": "plan-test", "lease_s": 30.0, "limit": 25, "rate": 1e6, "probe": False}


def _entries_read(conn, statement, params: dict | None = None) -> int:
    """Index entries the statement read (live or dead, from every index of the outbox's tables and partitions),
    run and rolled back. A count of what it visited, which no machine load can change."""
    count = text("SELECT sum(pg_stat_get_xact_tuples_returned(i.indexrelid)) FROM pg_index AS i"
                 " JOIN pg_class AS c ON c.oid = i.indrelid WHERE c.relname LIKE 'fp_outbox_%'")
    before = conn.execute(count).scalar()
    conn.execute(statement, params or {})
    after = conn.execute(count).scalar()
    conn.rollback()
    return int(after - before)


def _enqueue(engine, count: int) -> None:
    from sqlalchemy.orm import Session

    import outbox

    with Session(engine) as session:
        outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": f"u{i}"}} for i in range(count)])
        session.commit()


def test_a_fresh_claim_reads_its_events_and_no_more_from_a_big_backlog(clean):
    """The window's events come from the primary key in (txid, id) order: 25 of a 20,000 backlog (no statistics:
    the table was never analyzed), not the backlog read and sorted."""
    _enqueue(clean, 20000)
    with clean.connect() as conn:
        read = _entries_read(conn, queries.CLAIM_FRESH, CLAIM)
    assert read < 100, read


def test_the_due_claim_reads_the_retries_index(clean):
    """Many retries waiting (an outage's backlog, say), a few due: from the due index, not a scan."""
    with clean.begin() as conn:
        conn.execute(text("INSERT INTO fp_outbox_retries (id, insert_id, event_name, payload, created_at, attempts,"
                          " next_attempt_at) SELECT g, g::text, 'E', '{}', now(), 1,"
                          " now() + CASE WHEN g % 1000 = 0 THEN interval '-1 s' ELSE interval '1 h' END"
                          " FROM generate_series(1, 50000) g"))
        conn.execute(text("ANALYZE fp_outbox_retries"))
    with clean.connect() as conn:
        plan = _explain(conn, queries.CLAIM_DUE, CLAIM)
    assert "fp_outbox_retries_due_idx" in plan, plan
    assert "Seq Scan on fp_outbox_retries" not in plan, plan


def test_under_a_held_snapshot_the_fresh_claim_visits_only_what_is_new(clean):
    """Insert-only events leave no dead versions: with a snapshot held open (a report, pg_dump) throughout, after
    3,000 deliveries a fresh claim reads the ten new events' entries, as on a fresh table. (Before, a claim over
    per-row status had to step over every dead entry a held-back vacuum could not remove.)"""
    from worker.engine.store import Settled, Store

    store = Store(clean, "me", 30.0)
    _enqueue(clean, 3000)
    with clean.connect() as report:
        report.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
        assert report.execute(text("SELECT count(*) FROM fp_outbox_events")).scalar() == 3000
        while rows := store.claim_fresh(100, 1e6)[0]:
            store.settle([Settled(row, "delivered", 200) for row in rows])
        _enqueue(clean, 10)
        with clean.connect() as conn:
            fresh = _entries_read(conn, queries.CLAIM_FRESH, CLAIM)
        report.rollback()
    assert fresh < 60, fresh  # the ten new events, found, and the ends of the ranges searched


def test_the_fresh_claim_never_compiles(clean):
    """The claim's settings (ordered index ranges only) raise the estimated cost of any plan that still sorts past
    JIT's threshold: compiling took 100 ms of a claim of 1 ms. So JIT is off in the function, and in every
    transaction of the worker (worker.engine.timeouts)."""
    from worker.engine.timeouts import server_limits

    with clean.connect() as conn:
        config = conn.execute(text("SELECT proconfig FROM pg_proc WHERE proname = 'fp_outbox_claim_fresh'")).scalar()
    assert "jit=off" in config and "enable_sort=off" in config, config
    assert "set_config('jit', 'off', true)" in server_limits(5.0)
