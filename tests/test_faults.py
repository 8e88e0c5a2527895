"""Fault injection against real processes: bad answers switched while a worker runs, SIGKILL at random
moments, database connections cut in the middle of claim and of settle, poison rows, signals.

After each run: every committed event delivered, none of the rolled-back ones, every re-send the same
event with the same $insert_id, permanent failures dead with their reason, and no re-send sooner than
the policy allows."""

from __future__ import annotations

import random
import signal
import time
from collections import defaultdict

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from outbox.db import make_engine, normalise_url, upgrade
from tests.conftest import status_of, wait_until

# Short timeouts make the derived lease short (9 s), so recovery is quick to observe.
FAST = ["--connect-timeout", "0.5", "--read-timeout", "1", "--inline-attempts", "2",
        "--retry-base", "0.2", "--retry-cap", "1", "--poll-interval", "0.2", "--max-attempts", "100"]
INLINE_MIN_WAIT = 0.1  # tenacity's first in-process wait (wait_exponential_jitter initial)
CLOCK_SLOP = 0.02


def _enqueue(engine, count: int, name: str = "Purchase", commit: bool = True) -> list[str]:
    ids = []
    for start in range(0, count, 500):
        with Session(engine) as session:
            ids += outbox.enqueue_many(session, [
                {"event": name, "properties": {"distinct_id": f"u{i}", "n": i}}
                for i in range(start, min(count, start + 500))])
            session.commit() if commit else session.rollback()
    return ids


def _check_delivery(sink, committed: list[str], rolled_back: list[str] = (), killed: bool = False) -> dict[str, list]:
    """The invariants every fault run must keep; returns the requests grouped by $insert_id."""
    by_id: dict[str, list] = defaultdict(list)
    truncated = 0
    for request in sink.received():
        if request.body is None:  # a worker killed while writing the request: never a delivery
            truncated += 1
            continue
        by_id[request.insert_id].append(request)
    assert killed or not truncated
    delivered = {r.insert_id for r in sink.accepted()}
    assert set(committed) <= delivered, f"lost: {len(set(committed) - delivered)}"
    assert not set(rolled_back) & set(by_id), "a rolled-back event was sent"
    for insert_id, requests in by_id.items():
        bodies = {repr(sorted(r.body["properties"].items())) for r in requests}
        assert len(bodies) == 1, f"re-sends of {insert_id} differ: {bodies}"  # same time, same $insert_id
    return by_id


def _check_spacing(by_id: dict[str, list]) -> None:
    """No re-send sooner than the policy allows: the smallest in-process wait, or Retry-After."""
    for insert_id, requests in by_id.items():
        for before, after in zip(requests, requests[1:]):
            gap = after.arrived_at - before.arrived_at
            assert gap >= INLINE_MIN_WAIT - CLOCK_SLOP, f"{insert_id}: re-sent after {gap:.3f} s ({before.status})"
            if before.status in (429, 503) and before.retry_after:
                assert gap >= float(before.retry_after) - CLOCK_SLOP, \
                    f"{insert_id}: Retry-After {before.retry_after} ignored ({gap:.3f} s)"


def test_answers_switched_while_a_worker_runs(clean, db_url, sink, workers):
    committed = _enqueue(clean, 1000)
    rolled_back = _enqueue(clean, 20, commit=False)
    bad = _enqueue(clean, 10, name="Rejected")
    sink.set_faults(reject_events={"Rejected": 400}, latency=0.01)
    worker = workers(db_url, sink.url, "--drain", "--concurrency", "8", *FAST)
    phases = [  # (the faults, the status that shows one happened: 0 is a reset)
        ({"error_rate": 0.3, "error_status": 503}, 503),                       # a third fail, no Retry-After
        ({"error_rate": 0.3, "error_status": 503, "retry_after": "1"}, 503),   # with Retry-After
        ({"error_rate": 0.3, "error_status": 429, "retry_after": None}, 429),  # 429: every worker pauses 1 s
        ({"error_rate": 0.0, "reset_rate": 0.2}, 0),                           # connections reset unanswered
        ({"reset_rate": 0.0, "latency": 1.5}, None),                           # slower than the read timeout
    ]
    for phase, shows in phases:  # each lasts a number of requests, and until its fault was seen: never luck
        sink.set_faults(**phase)
        seen = len(sink.received())
        assert wait_until(lambda: len(sink.received()) >= seen + 25 and (
            shows is None or any(r.status == shows for r in sink.received()[seen:])), 30), \
            (phase, worker.output())
    sink.set_faults(latency=0.01, error_rate=0.0)
    assert worker.wait(120) == 0, worker.output()
    by_id = _check_delivery(sink, committed, rolled_back)
    _check_spacing(by_id)
    statuses = {r.status for r in sink.received()}
    assert {429, 503, 0}.issubset(statuses), statuses  # the faults really happened
    with clean.connect() as conn:
        dead = conn.execute(text("SELECT insert_id, last_status, last_error FROM fp_outbox_event_states"
                                 " WHERE status = 'dead'")).all()
    assert {row.insert_id for row in dead} == set(bad)
    assert all(row.last_status == 400 and "rejected by the sink" in row.last_error for row in dead)
    assert all(len(by_id[i]) == 1 for i in bad)  # a permanent failure is never retried
    assert status_of(clean) == {"delivered": 1000, "dead": 10}


def _in_flight_under(engine, pid: int) -> int:
    """Rows in flight under a lease of the worker process `pid` (its owner id is host:pid:random)."""
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM fp_outbox_event_states WHERE status = 'in_flight'"
                                 " AND split_part(lease_owner, ':', 2) = :pid"), {"pid": str(pid)}).scalar()


def test_sigkill_at_random_moments_then_restart(clean, db_url, sink, workers):
    committed = _enqueue(clean, 2000)
    sink.set_faults(latency=0.04)  # 16 in flight at a time: about 400/s, so the backlog outlasts the kills
    rng = random.Random(20261128)
    for _ in range(4):
        victim = workers(db_url, sink.url, "--concurrency", "16", *FAST)
        assert wait_until(lambda: _in_flight_under(clean, victim.proc.pid) > 0, 30), victim.output()
        time.sleep(rng.uniform(0.0, 1.0))  # a random moment while it delivers
        victim.signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        assert _in_flight_under(clean, victim.proc.pid) > 0  # it died holding rows: they must come back
    survivor = workers(db_url, sink.url, "--drain", "--concurrency", "16", *FAST)
    assert survivor.wait(120) == 0, survivor.output()
    by_id = _check_delivery(sink, committed, killed=True)
    _check_spacing(by_id)
    assert status_of(clean) == {"delivered": 2000}


def _backend_waiting_on(engine, fragment: str) -> int | None:
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'fp-outbox-worker %'"
            " AND wait_event_type = 'Lock' AND query LIKE :q"), {"q": f"%{fragment}%"}).scalar()


def _cut_when_waiting(engine, fragment: str, worker) -> None:
    """Wait until the worker's statement containing `fragment` waits on the test's lock, then kill its backend."""
    assert wait_until(lambda: _backend_waiting_on(engine, fragment) is not None, 30), worker.output()
    with engine.connect() as conn:
        pid = _backend_waiting_on(engine, fragment)
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()


def test_connection_cut_in_the_middle_of_a_claim(clean, db_url, sink, workers):
    committed = _enqueue(clean, 200)
    with clean.connect() as blocker:
        blocker.execute(text("LOCK TABLE fp_outbox_claims IN EXCLUSIVE MODE"))  # the claim must wait
        worker = workers(db_url, sink.url, "--drain", *FAST)
        _cut_when_waiting(clean, "fp-outbox claim fresh", worker)
        blocker.rollback()
    assert worker.wait(90) == 0, worker.output()
    assert "database unavailable, backing off" in worker.output()
    _check_delivery(sink, committed)
    assert len(sink.accepted()) == 200  # nothing was claimed by the cut statement, so no re-send
    assert status_of(clean) == {"delivered": 200}


def test_connection_cut_in_the_middle_of_a_settle(clean, db_url, sink, workers):
    committed = _enqueue(clean, 20)
    sink.set_faults(latency=0.5)
    worker = workers(db_url, sink.url, "--drain", "--concurrency", "20", *FAST)
    assert wait_until(lambda: status_of(clean).get("in_flight", 0) == 20, 30), worker.output()
    with clean.connect() as blocker:
        blocker.execute(text("SELECT id FROM fp_outbox_claims WHERE settled_at IS NULL FOR UPDATE"))
        _cut_when_waiting(clean, "fp-outbox settle fresh", worker)
        blocker.rollback()
    assert worker.wait(90) == 0, worker.output()
    assert "database unavailable, backing off" in worker.output()
    _check_delivery(sink, committed)
    assert len(sink.accepted()) == 20  # the outcomes were kept and settled again: no re-send
    assert status_of(clean) == {"delivered": 20}


def test_poison_rows_are_dead_lettered_and_do_not_block_the_queue(clean, db_url, sink, workers):
    committed = _enqueue(clean, 50)
    with clean.begin() as conn:  # rows written by hand, bypassing enqueue's validation
        conn.execute(text(
            "INSERT INTO fp_outbox_events (insert_id, event_name, payload) VALUES"
            " ('p1', 'x', '{\"event\": \"x\", \"properties\": [1, 2]}'),"
            " ('p2', 'x', '\"just a string\"'),"
            " ('p3', 'x', '{\"properties\": {\"distinct_id\": \"u\"}}')"))
    worker = workers(db_url, sink.url, "--drain", *FAST)
    assert worker.wait(60) == 0, worker.output()
    _check_delivery(sink, committed)
    with clean.connect() as conn:
        dead = dict(conn.execute(text("SELECT insert_id, last_error FROM fp_outbox_event_states WHERE status = 'dead'")).all())
    assert set(dead) == {"p1", "p2", "p3"} and all("malformed payload" in e for e in dead.values())


def test_sigterm_releases_what_cannot_finish_and_a_second_signal_exits_at_once(clean, db_url, sink, workers):
    _enqueue(clean, 8)
    sink.set_faults(latency=5.0)  # nothing can finish within the shutdown grace
    worker = workers(db_url, sink.url, "--concurrency", "8", *FAST)
    assert wait_until(lambda: len(sink.received()) >= 8, 20), worker.output()
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()
    assert time.monotonic() - started < 10
    with clean.connect() as conn:
        rows = conn.execute(text("SELECT status, lease_owner FROM fp_outbox_event_states")).all()
    assert all(row.status == "pending" and row.lease_owner is None for row in rows)  # released at once

    again = workers(db_url, sink.url, "--concurrency", "8", *FAST)
    assert wait_until(lambda: status_of(clean).get("in_flight", 0) == 8, 20), again.output()
    again.signal(signal.SIGTERM)
    time.sleep(0.2)
    started = time.monotonic()
    again.signal(signal.SIGTERM)
    assert again.wait(10) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 2


def test_postgresql_restart_while_delivering(tmp_path, sink, workers):
    pgserver = pytest.importorskip("pgserver")
    server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="delete")  # a server of its own to restart
    try:
        url = normalise_url(server.get_uri())
        upgrade(url)
        engine = make_engine(url)
        committed = _enqueue(engine, 600)
        sink.set_faults(latency=0.02)
        worker = workers(url, sink.url, "--concurrency", "8", *FAST)
        assert wait_until(lambda: len(sink.accepted()) >= 100, 30), worker.output()
        pgserver.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)
        assert wait_until(lambda: status_of(engine).get("delivered") == 600, 90), worker.output()
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output()
        assert "database unavailable" in worker.output()
        _check_delivery(sink, committed)
        engine.dispose()
    finally:
        server.cleanup()
