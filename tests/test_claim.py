"""The claim path on a real PostgreSQL, in process: what the worker's statements carry, the floor and the
sweep, late commits, lost leases, released rows, and the plans that keep the claim flat."""

from __future__ import annotations

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

import outbox
from tests.conftest import TOKEN
from tests.inprocess import drain, settings
from worker.engine import Worker


def _enqueue(engine, count: int, name: str = "Purchase") -> list[str]:
    with Session(engine) as session:
        ids = outbox.enqueue_many(session, [{"event": name, "properties": {"distinct_id": f"u{i}"}}
                                            for i in range(count)])
        session.commit()
    return ids


def test_the_token_is_never_a_statement_parameter(clean, db_url, sink):
    committed = _enqueue(clean, 30)
    worker = Worker(settings(db_url, sink.url, "--drain"))
    seen: list[tuple[str, object]] = []
    sa_event.listen(worker.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, parameters, context, many: seen.append((statement, parameters)))
    drain(worker)
    assert {r.insert_id for r in sink.accepted()} == set(committed)
    assert all(r.token == TOKEN for r in sink.accepted())  # the token was sent ...
    assert any("UPDATE fp_outbox_events" in statement for statement, _ in seen)
    for statement, parameters in seen:  # ... but never given to the database
        assert TOKEN not in statement and TOKEN not in repr(parameters), statement


def test_a_hand_written_row_without_insert_id_is_sent_with_its_column(clean, db_url, sink):
    from sqlalchemy import text

    by_hand = '{"event": "Manual", "properties": {"distinct_id": "u", "time": 1.7e9}}'
    with clean.begin() as conn:
        conn.execute(text("INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
                          " VALUES ('by-hand-1', 'Manual', :payload)"), {"payload": by_hand})
    worker = Worker(settings(db_url, sink.url, "--drain"))
    drain(worker)
    [arrived] = sink.accepted()
    assert arrived.insert_id == "by-hand-1" and arrived.token == TOKEN
