"""The claim path on a real PostgreSQL, in process: what the worker's statements carry, the fresh path's snapshot
windows (late commits, long transactions, rollbacks, savepoints), a claim that fails, lost leases, released
events, and the plans that keep the claim flat."""

from __future__ import annotations

import os
import re
import time

import psycopg
from sqlalchemy import text
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

import outbox
from outbox.db import make_engine
from tests.conftest import TOKEN, status_of, wait_until
from tests.inprocess import drain, settings, start
from worker.engine import Worker
from worker.engine.store import Settled, Store


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
    assert any("fp-outbox claim fresh" in message for message in sent), sent
    assert any("fp-outbox settle fresh" in message for message in sent), sent
    assert not [message for message in sent if TOKEN in message]  # ... but never to the database


def _delivered(rows) -> list[Settled]:
    return [Settled(row, "delivered", 200) for row in rows]


def test_a_claim_and_a_settle_take_one_round_trip_each(clean, db_url, tmp_path):
    """Each of the cycle's statements travels with the server's limits as one message, one implicit
    transaction: no BEGIN, no COMMIT, nothing in between."""
    _enqueue(clean, 5)
    engine = make_engine(db_url, pool_pre_ping=False)  # as the worker's: no ping before each use
    _trace_what_is_sent(engine, tmp_path / "trace")
    store = Store(engine, "me", 30.0)
    rows, _ = store.claim_fresh(10, 1e6)
    assert store.settle(_delivered(rows)) == 5
    engine.dispose()
    sent = _sent(tmp_path / "trace")
    assert [message.split("\t")[2].strip() for message in sent] == ["Query", "Query", "Terminate"], sent
    assert "set_config('statement_timeout'" in sent[0] and "fp-outbox claim fresh" in sent[0], sent
    assert "set_config('statement_timeout'" in sent[1] and "fp-outbox settle fresh" in sent[1], sent
    assert status_of(clean) == {"delivered": 5}


def test_a_settle_of_deliveries_alone_sends_the_statement_of_the_claims_log_alone(clean, db_url, tmp_path):
    """The settle that also copies failed events into the retries and the dead letters joins the events' 16
    partitions twice, and is planned at every execution (no prepared statements, for PgBouncer): 0.9 ms of the
    server's planning a settle, against 0.26 ms for the claims log alone. Nearly every settle is deliveries only:
    it sends the lighter statement; one with a failure among them, the whole one."""
    ids = _enqueue(clean, 4)
    engine = make_engine(db_url, pool_pre_ping=False)
    _trace_what_is_sent(engine, tmp_path / "trace")
    store = Store(engine, "me", 30.0)
    rows, _ = store.claim_fresh(10, 1e6)
    assert store.settle(_delivered(rows[:2])) == 2
    assert store.settle([Settled(rows[2], "delivered", 200), Settled(rows[3], "dead", 400, "bad")]) == 2
    engine.dispose()
    settles = [message for message in _sent(tmp_path / "trace") if "fp-outbox settle fresh" in message]
    assert len(settles) == 2, settles
    assert "fp_outbox_dead_letters" not in settles[0] and "fp_outbox_events" not in settles[0], settles[0]
    assert "fp_outbox_dead_letters" in settles[1]
    assert status_of(clean) == {"delivered": 3, "dead": 1} and len(ids) == 4


def test_a_hand_written_row_without_insert_id_is_sent_with_its_column(clean, db_url, sink):
    by_hand = '{"event": "Manual", "properties": {"distinct_id": "u", "time": 1.7e9}}'
    with clean.begin() as conn:
        conn.execute(text("INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
                          " VALUES ('by-hand-1', 'Manual', :payload)"), {"payload": by_hand})
    worker = Worker(settings(db_url, sink.url, "--drain"))
    drain(worker)
    [arrived] = sink.accepted()
    assert arrived.insert_id == "by-hand-1" and arrived.token == TOKEN


def _claim(store: Store, limit: int = 100) -> list[str]:
    """One fresh claim, settled delivered at once; the insert_ids it took."""
    rows, _ = store.claim_fresh(limit, 1e6)
    store.settle(_delivered(rows))
    return [row.insert_id for row in rows]


def test_each_event_is_claimed_once_in_commit_order_whatever_order_its_ids_were_taken_in(clean):
    """A transaction that took its ids first and commits last is claimed by the first claim that sees it
    committed, not passed over, and never claimed twice; one that rolls back, never."""
    store = Store(clean, "me", 30.0)
    assert _claim(store) == []
    with clean.connect() as held:  # a business transaction: it writes (so has an xid), then enqueues
        held.execute(text("SELECT pg_current_xact_id()"))
        late = outbox.enqueue(held, {"event": "Late", "properties": {"distinct_id": "u"}})
        later = _enqueue(clean, 5)  # enqueued after it, committed before it
        assert sorted(_claim(store)) == sorted(later)
        with clean.connect() as doomed:
            outbox.enqueue(doomed, {"event": "Doomed", "properties": {"distinct_id": "u"}})
            doomed.rollback()
        assert _claim(store) == []
        held.commit()
    assert _claim(store) == [late]
    assert _claim(store) == []
    assert status_of(clean) == {"delivered": 6}


def test_savepoints_rolled_back_send_nothing_and_released_ones_are_sent(clean):
    store = Store(clean, "me", 30.0)
    with Session(clean) as session:
        kept = outbox.enqueue(session, {"event": "Kept", "properties": {"distinct_id": "u"}})
        with session.begin_nested():
            inner = outbox.enqueue(session, {"event": "Inner", "properties": {"distinct_id": "u"}})
        nested = session.begin_nested()
        outbox.enqueue(session, {"event": "Undone", "properties": {"distinct_id": "u"}})
        nested.rollback()
        assert _claim(store) == []  # not committed yet
        session.commit()
    assert sorted(_claim(store)) == sorted([kept, inner])
    assert _claim(store) == []


def test_a_long_write_transaction_holds_nothing_back(clean, db_url, sink):
    """A write transaction left open (a batch job, an idle-in-transaction session) delays no other event, and its
    own are delivered at the first claim after it commits (the next poll), not by a sweep's luck."""
    worker = Worker(settings(db_url, sink.url))
    runner = start(worker)
    try:
        with clean.connect() as held:
            held.execute(text("SELECT pg_current_xact_id()"))  # an xid, as any writing transaction has
            late = outbox.enqueue(held, {"event": "Late", "properties": {"distinct_id": "u"}})
            for _ in range(3):
                batch = _enqueue(clean, 10)
                assert sink.wait_for(lambda s: set(batch) <= {r.insert_id for r in s.accepted()}, 10)
            held.commit()
            committed_at = time.monotonic()
        assert sink.wait_for(lambda s: late in {r.insert_id for r in s.accepted()}, 10)
        assert time.monotonic() - committed_at < 3
    finally:
        worker.stop()
        runner.join(30)
        worker.engine.dispose()


def test_a_fresh_claim_that_fails_moves_nothing(clean):
    """The claim's statement is one transaction: if it fails (here a trigger of the application's refuses its row
    in the log), the position does not move and the next claim takes the same events."""
    store = Store(clean, "me", 30.0)
    ids = _enqueue(clean, 3)
    with clean.begin() as conn:
        conn.execute(text("CREATE FUNCTION fpo_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                          "$$ BEGIN RAISE EXCEPTION 'not now'; END $$"))
        conn.execute(text("CREATE TRIGGER fpo_refuse BEFORE INSERT ON fp_outbox_claims "
                          "FOR EACH ROW EXECUTE FUNCTION fpo_refuse()"))
    try:
        with pytest_raises("not now"):
            store.claim_fresh(10, 1e6)
    finally:
        with clean.begin() as conn:
            conn.execute(text("DROP TRIGGER fpo_refuse ON fp_outbox_claims"))
            conn.execute(text("DROP FUNCTION fpo_refuse()"))
    assert sorted(_claim(store)) == sorted(ids)


def pytest_raises(fragment: str):
    import pytest

    return pytest.raises(Exception, match=fragment)


def _state(engine, insert_id: str):
    with engine.connect() as conn:
        return conn.execute(text("SELECT status, attempts, lease_owner, coalesce(next_attempt_at <= now(), false)"
                                 " AS due FROM fp_outbox_event_states WHERE insert_id = :i"), {"i": insert_id}).one()


def test_a_lease_lost_to_another_worker_is_never_settled_by_the_first(clean):
    [insert_id] = _enqueue(clean, 1)
    first, second = Store(clean, "first", 0.3), Store(clean, "second", 30.0)
    [row], _ = first.claim_fresh(10, 1e6)
    assert wait_until(lambda: second.recover_expired(10) == (1, 1), 10)  # its lease ran out (the first hung)
    [again], _ = second.claim_due(10, 1e6)
    assert again.id == row.id and again.attempts == 2 and not again.fresh
    # The first worker wakes up and settles what it believes it still holds: nothing may change.
    for kind in ("delivered", "retry", "dead"):
        assert first.settle([Settled(row, kind, 503, "HTTP 503", 5.0)]) == 0
    assert tuple(_state(clean, insert_id))[:3] == ("in_flight", 2, "second")
    # Nor may an outcome of the second worker's earlier claim of the same row (its attempt was 1).
    assert second.settle([Settled(type(again)(again.id, 1, again.payload, again.insert_id, again.claim_id),
                                  "dead", 400, "HTTP 400")]) == 0
    assert second.settle([Settled(again, "delivered", 200)]) == 1
    assert first.settle([Settled(row, "retry", 503, "HTTP 503", 5.0)]) == 0  # nor resurrect it afterwards
    assert tuple(_state(clean, insert_id))[:2] == ("delivered", 2)


def test_a_release_gives_the_attempt_back_and_makes_the_events_due_at_once(clean):
    ids = _enqueue(clean, 2)
    store = Store(clean, "me", 30.0)
    rows, _ = store.claim_fresh(10, 1e6)
    assert [row.attempts for row in rows] == [1, 1]
    released = [Settled(row, "retry", None, "not sent: released", 0.0, counted=False) for row in rows]
    assert store.settle(released) == 2
    assert {tuple(_state(clean, i)) for i in ids} == {("pending", 0, None, True)}
    again, _ = store.claim_due(10, 1e6)
    assert sorted(row.insert_id for row in again) == sorted(ids) and {row.attempts for row in again} == {1}


def test_settling_the_same_outcome_twice_changes_nothing(clean):
    """A settle whose reply was lost is sent again (worker.engine.settler): it must not count twice."""
    _enqueue(clean, 3)
    store = Store(clean, "me", 30.0)
    rows, _ = store.claim_fresh(10, 1e6)
    assert store.settle(_delivered(rows[:2])) == 2
    assert store.settle(_delivered(rows[:2])) == 0
    with clean.connect() as conn:
        claim = conn.execute(text("SELECT done, delivered, settled_at FROM fp_outbox_claims")).one()
    assert sorted(claim.done) == sorted(row.id for row in rows[:2]) and claim.delivered == 2
    assert claim.settled_at is None
    assert store.settle(_delivered(rows)) == 1
    assert status_of(clean) == {"delivered": 3}


def test_the_late_outcome_of_a_superseded_claim_of_the_same_worker_is_never_settled(clean):
    """One worker claims events; its send outlives the lease, the claim expires and the same worker claims them
    again (now retries). The first claim's outcome, arriving late, has the right owner: it must still settle
    nothing, and the second claim's must settle the events."""
    ids = _enqueue(clean, 2)
    store = Store(clean, "me", 0.3)
    first, _ = store.claim_fresh(10, 1e6)
    assert wait_until(lambda: store.recover_expired(10) == (1, 2), 10)
    second, _ = store.claim_due(10, 1e6)
    assert sorted(row.id for row in second) == sorted(row.id for row in first)
    assert {row.attempts for row in second} == {2}
    for kind in ("delivered", "retry", "dead"):
        assert store.settle([Settled(first[0], kind, 400, "HTTP 400", 5.0)]) == 0
    assert store.settle([Settled(row, "delivered", 200) for row in second]) == 2
    assert {tuple(_state(clean, i))[:2] for i in ids} == {("delivered", 2)}
