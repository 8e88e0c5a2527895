"""The claim path on a real PostgreSQL, in process: what the worker's statements carry, the floor and the
sweep, late commits, lost leases, released rows, and the plans that keep the claim flat."""

from __future__ import annotations

import threading

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

import outbox
from tests.conftest import TOKEN, url_string
from worker.engine import Worker, build_parser, from_args

FAST = ["--connect-timeout", "0.5", "--read-timeout", "1", "--inline-attempts", "2", "--retry-base", "0.2",
        "--retry-cap", "1", "--poll-interval", "0.2"]


def _settings(db_url, endpoint: str, *args: str, token: str | None = TOKEN):
    argv = ["--database-url", url_string(db_url), "--endpoint", endpoint, *FAST, *args]
    return from_args(build_parser().parse_args(argv + (["--token", token] if token else [])), environ={})


def _enqueue(engine, count: int, name: str = "Purchase") -> list[str]:
    with Session(engine) as session:
        ids = outbox.enqueue_many(session, [{"event": name, "properties": {"distinct_id": f"u{i}"}}
                                            for i in range(count)])
        session.commit()
    return ids


def _drain(worker: Worker, timeout: float = 60) -> None:
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    runner.join(timeout)
    assert not runner.is_alive(), "the worker did not drain in time"


def test_the_token_is_never_a_statement_parameter(clean, db_url, sink):
    committed = _enqueue(clean, 30)
    worker = Worker(_settings(db_url, sink.url, "--drain"))
    seen: list[tuple[str, object]] = []
    sa_event.listen(worker.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, parameters, context, many: seen.append((statement, parameters)))
    _drain(worker)
    assert {r.insert_id for r in sink.accepted()} == set(committed)
    assert all(r.token == TOKEN for r in sink.accepted())  # the token was sent ...
    assert any("UPDATE fp_outbox_events" in statement for statement, _ in seen)
    for statement, parameters in seen:  # ... but never given to the database
        assert TOKEN not in statement and TOKEN not in repr(parameters), statement
    worker.engine.dispose()


def test_a_hand_written_row_without_insert_id_is_sent_with_its_column(clean, db_url, sink):
    from sqlalchemy import text

    by_hand = '{"event": "Manual", "properties": {"distinct_id": "u", "time": 1.7e9}}'
    with clean.begin() as conn:
        conn.execute(text("INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
                          " VALUES ('by-hand-1', 'Manual', :payload)"), {"payload": by_hand})
    worker = Worker(_settings(db_url, sink.url, "--drain"))
    _drain(worker)
    [arrived] = sink.accepted()
    assert arrived.insert_id == "by-hand-1" and arrived.token == TOKEN
    worker.engine.dispose()
