"""Operators see the cause before the symptom: the age of the oldest open transaction that holds this
database's vacuum horizon back (a report's snapshot, a session idle in transaction), as a gauge and as a
line and keys of `fp-outbox status`."""

from __future__ import annotations

import json
import time

from sqlalchemy import text

from tests.conftest import url_string
from worker.admin import main
from worker.engine import oldest_transaction
from worker.engine.metrics import Metrics


def _held_report(engine):
    """A REPEATABLE READ transaction that read the table and stays open, as a long report's does."""
    conn = engine.connect()
    conn.exec_driver_sql("COMMIT")  # SQLAlchemy began one already; start ours with its isolation level
    conn.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
    conn.execute(text("SELECT count(*) FROM fp_outbox_events")).scalar()
    return conn, conn.execute(text("SELECT pg_backend_pid()")).scalar()


def test_nothing_open_means_no_age(clean):
    assert oldest_transaction(clean) == {"oldest_transaction_age_s": None, "oldest_transaction_pid": None,
                                         "oldest_transaction_state": None}
    m = Metrics()
    m.refresh_queue(clean)
    assert m.registry.get_sample_value("fp_outbox_oldest_transaction_age_seconds") == 0.0


def test_a_held_snapshot_shows_in_the_gauge_and_in_status(clean, db_url, capsys):
    report, pid = _held_report(clean)
    try:
        time.sleep(1.1)
        found = oldest_transaction(clean)
        assert found["oldest_transaction_age_s"] >= 1.0 and found["oldest_transaction_pid"] == pid
        assert found["oldest_transaction_state"] == "idle in transaction"
        m = Metrics()
        m.refresh_queue(clean)
        assert m.registry.get_sample_value("fp_outbox_oldest_transaction_age_seconds") >= 1.0
        assert main(["status", "--json", "--database-url", url_string(db_url)]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["oldest_transaction_age_s"] >= 1.0 and status["oldest_transaction_pid"] == pid
        assert main(["status", "--database-url", url_string(db_url)]) == 0
        line = [row for row in capsys.readouterr().out.splitlines() if row.startswith("oldest transaction")]
        assert len(line) == 1 and f"pid {pid}" in line[0] and "idle in transaction" in line[0]
    finally:
        report.rollback()
        report.close()


def test_a_read_committed_session_between_statements_holds_nothing(clean):
    with clean.connect() as idle:  # idle in transaction, but READ COMMITTED: no snapshot between statements
        idle.execute(text("SELECT count(*) FROM fp_outbox_events")).scalar()
        assert oldest_transaction(clean)["oldest_transaction_pid"] is None
        idle.execute(text("SELECT pg_current_xact_id()"))  # now it has an xid: it holds the horizon
        pid = idle.execute(text("SELECT pg_backend_pid()")).scalar()
        assert oldest_transaction(clean)["oldest_transaction_pid"] == pid
