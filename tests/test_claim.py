"""The claim path on a real PostgreSQL, in process: what the worker's statements carry, the floor and the
sweep, late commits, lost leases, released rows, and the plans that keep the claim flat."""

from __future__ import annotations

import json
import os
import re
import time

import psycopg

from sqlalchemy import bindparam, text
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

import outbox
from tests.conftest import TOKEN, wait_until
from outbox.db import make_engine
from tests.inprocess import drain, settings, start
from worker.engine import Worker
from worker.engine import floor as floor_module
from worker.engine.floor import FLOOR_WAIT_CAP, Floor
from worker.engine.store import Store


def _enqueue(engine, count: int, name: str = "Purchase") -> list[str]:
    with Session(engine) as session:
        ids = outbox.enqueue_many(session, [{"event": name, "properties": {"distinct_id": f"u{i}"}}
                                            for i in range(count)])
        session.commit()
    return ids


def _trace_what_is_sent(engine, path) -> None:
    """libpq's own trace of every message each new connection of `engine` sends and receives, into `path`:
    whatever layer built a statement, this is what reached the server."""
    def trace(dbapi_connection, _record) -> None:
        dbapi_connection.pgconn.trace(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND))
        dbapi_connection.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
    sa_event.listen(engine.pool, "connect", trace)


def _sent(path) -> list[str]:
    """The messages the client sent, from a trace file (a statement's text spans lines: a message starts with
    'F' or 'B', for front or back end, and a tab)."""
    messages = re.split(r"\n(?=[FB]\t)", path.read_text(errors="replace"))
    return [message for message in messages if message.startswith("F\t")]


def test_the_token_is_never_a_statement_parameter(clean, db_url, sink, tmp_path):
    committed = _enqueue(clean, 30)
    worker = Worker(settings(db_url, sink.url, "--drain"))
    _trace_what_is_sent(worker.engine, tmp_path / "trace")
    drain(worker)
    worker.engine.dispose()
    assert {r.insert_id for r in sink.accepted()} == set(committed)
    assert all(r.token == TOKEN for r in sink.accepted())  # the token was sent ...
    sent = _sent(tmp_path / "trace")
    assert any("UPDATE fp_outbox_events" in message for message in sent), sent
    assert not [message for message in sent if TOKEN in message]  # ... but never to the database


def test_a_claim_and_a_settle_take_one_round_trip_each(clean, db_url, tmp_path):
    """Each of the cycle's statements travels with the server's limits as one message, one implicit
    transaction: no BEGIN, no COMMIT, nothing in between."""
    _enqueue(clean, 5)
    engine = make_engine(db_url, pool_pre_ping=False)  # as the worker's: no ping before each use
    _trace_what_is_sent(engine, tmp_path / "trace")
    store = Store(engine, "me", 30.0)
    rows, _, _ = store.claim_fresh(0, 10, 1e6)
    assert store.mark_delivered(rows, [200] * len(rows)) == 5
    engine.dispose()
    sent = _sent(tmp_path / "trace")
    assert [message.split("\t")[2].strip() for message in sent] == ["Query", "Query", "Terminate"], sent
    assert "set_config('statement_timeout'" in sent[0] and "FOR UPDATE SKIP LOCKED" in sent[0], sent
    assert "set_config('statement_timeout'" in sent[1] and "SET status = 'delivered'" in sent[1], sent


def test_a_hand_written_row_without_insert_id_is_sent_with_its_column(clean, db_url, sink):
    by_hand = '{"event": "Manual", "properties": {"distinct_id": "u", "time": 1.7e9}}'
    with clean.begin() as conn:
        conn.execute(text("INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
                          " VALUES ('by-hand-1', 'Manual', :payload)"), {"payload": by_hand})
    worker = Worker(settings(db_url, sink.url, "--drain"))
    drain(worker)
    [arrived] = sink.accepted()
    assert arrived.insert_id == "by-hand-1" and arrived.token == TOKEN


def _running(db_url, sink, *flags: str) -> Worker:
    worker = Worker(settings(db_url, sink.url, *flags))
    worker.runner = start(worker)
    return worker


def _stop(worker: Worker) -> None:
    worker.stop()
    worker.runner.join(30)
    assert not worker.runner.is_alive()
    worker.engine.dispose()


def _delivered(sink, insert_ids) -> bool:
    return set(insert_ids) <= {r.insert_id for r in sink.accepted()}


def test_a_transaction_that_commits_after_later_ones_is_delivered(clean, db_url, sink, monkeypatch):
    monkeypatch.setattr(floor_module, "FLOOR_WAIT_CAP", 60.0)  # the xid rule alone, however slow this machine
    worker = _running(db_url, sink)
    try:
        first = _enqueue(clean, 3)
        assert wait_until(lambda: _delivered(sink, first), 20)
        with clean.connect() as held:  # a business transaction: it writes (so has an xid), then enqueues
            held.execute(text("SELECT pg_current_xact_id()"))
            late = outbox.enqueue(held, {"event": "Late", "properties": {"distinct_id": "u"}})
            late_id = held.execute(text("SELECT id FROM fp_outbox_events WHERE insert_id = :i"), {"i": late}).scalar()
            later = _enqueue(clean, 50)  # enqueued after it, committed before it
            assert wait_until(lambda: _delivered(sink, later), 30)
            assert worker.claimer.floor.value < late_id  # the floor waits for the open transaction
            held.commit()
            committed_at = time.monotonic()
        assert wait_until(lambda: _delivered(sink, [late]), 10)
        assert time.monotonic() - committed_at < 5  # the fresh path, at the next poll: not a sweep's luck
    finally:
        _stop(worker)


def test_a_long_write_transaction_holds_the_floor_back_only_briefly(clean, db_url, sink):
    """A write transaction left open (a batch job, an idle-in-transaction session) keeps xmin back for its whole
    life; the floor must not wait for it, or every fresh claim would read all that was delivered since. The
    floor passes it after FLOOR_WAIT_CAP, and its event, committed at last, is found by the sweep."""
    worker = _running(db_url, sink)
    try:
        with clean.connect() as held:
            held.execute(text("SELECT pg_current_xact_id()"))  # an xid, as any writing transaction has
            late = outbox.enqueue(held, {"event": "Late", "properties": {"distinct_id": "u"}})
            first = _enqueue(clean, 20)
            assert wait_until(lambda: _delivered(sink, first), 20)
            time.sleep(FLOOR_WAIT_CAP + 0.5)
            later = _enqueue(clean, 20)
            assert wait_until(lambda: _delivered(sink, later), 20)
            passed = max(_ids(clean, first))
            assert wait_until(lambda: worker.claimer.floor.value >= passed, 10)  # not held back by `held`
            held.commit()
        assert wait_until(lambda: _delivered(sink, [late]), 15)  # the sweep finds what the floor passed
    finally:
        _stop(worker)


def _reserve_ids(engine, count: int) -> list[int]:
    """Ids no row holds, below everything enqueued from now on (as if taken and not yet committed)."""
    with engine.begin() as conn:
        first = conn.execute(text("SELECT nextval(pg_get_serial_sequence('fp_outbox_events', 'id'))")).scalar()
        conn.execute(text("SELECT setval(pg_get_serial_sequence('fp_outbox_events', 'id'), :to)"),
                     {"to": first + count})
    return list(range(first, first + count))


def test_a_row_that_appears_below_the_floor_is_swept_up(clean, db_url, sink):
    """The rare late commit the xid rule cannot see (an id taken before its transaction had an xid), or any
    row that shows up below the floor: the sweep claims it by due time."""
    gap = _reserve_ids(clean, 1)
    worker = _running(db_url, sink)
    try:
        after = _enqueue(clean, 10)
        assert wait_until(lambda: _delivered(sink, after), 20)
        assert wait_until(lambda: worker.claimer.floor.value > gap[0], 10)
        with clean.begin() as conn:
            conn.execute(text("INSERT INTO fp_outbox_events (id, insert_id, event_name, payload) VALUES (:id, 'below',"
                              " 'Below', CAST(:p AS json))"), {"id": gap[0], "p": _payload("below")})
        assert wait_until(lambda: _delivered(sink, ["below"]), 10)
    finally:
        _stop(worker)


def _payload(insert_id: str) -> str:
    return json.dumps({"event": "Below", "properties": {"distinct_id": "u", "time": 1.7e9, "$insert_id": insert_id}})


def test_rows_held_by_a_claim_that_rolls_back_are_claimed_again_above_the_floor(clean):
    """Another worker's claim locked them (SKIP LOCKED passes them by), then rolled back. That claim had an xid,
    so this worker's floor cannot pass them while it is open; once it ended they are pending above the floor."""
    store = Store(clean, "me", 30.0)
    floor = Floor(store.first_floor())

    def claim() -> list[str]:
        rows, _, snapshot = store.claim_fresh(floor.value, 100, 1e6)
        floor.observe([row.id for row in rows], 100, snapshot)
        store.mark_delivered(rows, [200] * len(rows))
        return [row.insert_id for row in rows]

    assert len(claim() + claim()) == 0
    taken = _enqueue(clean, 5)
    with clean.connect() as other:  # the other worker's claim, still open: its rows are locked
        locked = other.execute(text("SELECT id FROM fp_outbox_events WHERE status = 'pending' FOR UPDATE")).all()
        assert len(locked) == len(taken)
        after = _enqueue(clean, 10)
        assert sorted(claim()) == sorted(after) and claim() == []
        assert floor.value < min(_ids(clean, taken))
        other.rollback()
    assert sorted(claim()) == sorted(taken)


def _ids(engine, insert_ids: list[str]) -> list[int]:
    with engine.connect() as conn:
        return conn.execute(text("SELECT id FROM fp_outbox_events WHERE insert_id IN :ids")
                            .bindparams(bindparam("ids", expanding=True)), {"ids": insert_ids}).scalars().all()


def _row(engine, row_id: int):
    with engine.connect() as conn:
        return conn.execute(text("SELECT status, attempts, lease_owner, next_attempt_at <= now() AS due"
                                 " FROM fp_outbox_events WHERE id = :id"), {"id": row_id}).one()


def test_a_lease_lost_to_another_worker_is_never_settled_by_the_first(clean):
    _enqueue(clean, 1)
    first, second = Store(clean, "first", 0.3), Store(clean, "second", 30.0)
    [row], _, _ = first.claim_fresh(0, 10, 1e6)
    assert wait_until(lambda: _row(clean, row.id).due, 10)  # its lease ran out (the first worker hung)
    [again], _ = second.claim_due(10, 1e6)
    assert again.id == row.id and again.attempts == 2
    # The first worker wakes up and settles what it believes it still holds: nothing may change.
    assert first.mark_delivered([row], [200]) == 0
    assert first.schedule_retry([row], [5.0], [503], ["HTTP 503"]) == 0
    assert first.mark_dead([row], [400], ["HTTP 400"]) == 0
    assert first.release([row]) == 0
    assert tuple(_row(clean, row.id))[:3] == ("in_flight", 2, "second")
    assert second.mark_delivered([again], [200]) == 1
    assert first.schedule_retry([row], [5.0], [503], ["HTTP 503"]) == 0  # nor resurrect it afterwards
    assert _row(clean, row.id).status == "delivered"


def test_the_late_outcome_of_a_superseded_claim_of_the_same_worker_is_never_settled(clean):
    """One worker claims a row; its send outlives the lease (the row is due again) and the same worker claims it
    again. The first claim's outcome, arriving late, has the right owner: it must still settle nothing, and the
    second claim's must settle the row."""
    _enqueue(clean, 2)
    store = Store(clean, "me", 0.3)
    first = store.claim_fresh(0, 10, 1e6)[0]
    assert wait_until(lambda: all(_row(clean, row.id).due for row in first), 10)
    second, _ = store.claim_due(10, 1e6)
    assert [row.id for row in second] == [row.id for row in first] and {row.attempts for row in second} == {2}
    assert store.mark_delivered(first[:1], [200]) == 0
    assert store.schedule_retry(first[:1], [5.0], [503], ["HTTP 503"]) == 0
    assert store.mark_dead(first[:1], [400], ["HTTP 400"]) == 0
    assert store.release(first) == 0
    assert {tuple(_row(clean, row.id))[:3] for row in first} == {("in_flight", 2, "me")}
    assert store.mark_dead(second[:1], [400], ["HTTP 400"]) == 1
    assert store.release(second[1:]) == 1
    assert [tuple(_row(clean, row.id))[:2] for row in second] == [("dead", 2), ("pending", 1)]


def test_release_gives_the_attempt_back_and_makes_the_row_due_at_once(clean):
    _enqueue(clean, 2)
    store = Store(clean, "me", 30.0)
    rows, _, _ = store.claim_fresh(0, 10, 1e6)
    assert [row.attempts for row in rows] == [1, 1]
    assert store.release(rows) == 2
    assert {tuple(_row(clean, row.id)) for row in rows} == {("pending", 0, None, True)}
