"""Revision 0005 adds the trace context column while the previous release keeps running: it waits for its lock
only a moment at a time, so enqueues never queue behind it for long, and the application's role may write the
new column with no grant of the operator's."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import text

from outbox.db import make_engine, upgrade
from tests.conftest import _admin, create_database, drop_database

INSERT = "INSERT INTO fp_outbox_events (insert_id, event_name, payload) VALUES (:i, 'E', '{}')"


@pytest.fixture
def at_0003(server_url):
    url = create_database(server_url)
    upgrade(url, "0003")
    yield url
    drop_database(server_url, url)


def _columns(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(text(
            "SELECT column_name, is_nullable FROM information_schema.columns WHERE table_name = 'fp_outbox_events'"
        )).all())


def test_it_waits_for_a_long_transaction_without_queueing_enqueues_behind_it(at_0003):
    engine = make_engine(at_0003)
    try:
        blocker = engine.connect()
        blocker.execute(text(INSERT), {"i": "held"})  # an application transaction left open: ROW EXCLUSIVE held
        migrated = threading.Event()
        runner = threading.Thread(target=lambda: (upgrade(at_0003, "0005"), migrated.set()), daemon=True)
        runner.start()
        slowest, deadline = 0.0, time.monotonic() + 3
        try:
            while time.monotonic() < deadline:  # enqueues go on meanwhile, each waiting a moment at most
                started = time.monotonic()
                with engine.begin() as conn:
                    conn.execute(text("SET LOCAL lock_timeout = '2s'"))  # fails, rather than hangs, if blocked
                    conn.execute(text(INSERT), {"i": uuid.uuid4().hex})
                slowest = max(slowest, time.monotonic() - started)
            assert not migrated.is_set()  # still waiting for the open transaction
        finally:
            blocker.commit()
            blocker.close()
            runner.join(30)
        assert migrated.is_set()
        assert slowest < 1.0, slowest  # LOCK_TIMEOUT (0.2 s) plus scheduling on a busy machine
        assert _columns(engine)["trace_context"] == "YES"
        with engine.connect() as conn:
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "0"
    finally:
        engine.dispose()


def test_the_roles_that_insert_events_may_insert_their_trace_context(server_url, at_0003):
    app = f"fpo_app_{uuid.uuid4().hex[:8]}"
    admin = _admin(server_url)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{app}" LOGIN'))
    engine = make_engine(at_0003)
    app_engine = make_engine(at_0003.set(username=app))
    try:
        with engine.begin() as conn:
            conn.execute(text(f'GRANT INSERT (insert_id, event_name, payload) ON fp_outbox_events TO "{app}"'))
        upgrade(at_0003, "0005")
        with app_engine.begin() as conn:
            conn.execute(text("INSERT INTO fp_outbox_events (insert_id, event_name, payload, trace_context)"
                              " VALUES ('a', 'E', '{}', '{}')"))
    finally:
        app_engine.dispose()
        with engine.begin() as conn:
            conn.execute(text(f'DROP OWNED BY "{app}"'))
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP ROLE "{app}"'))
        admin.dispose()
