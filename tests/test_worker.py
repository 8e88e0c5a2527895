"""The whole path on real parts: enqueue in a transaction, worker processes, a real /track receiver."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from tests.conftest import TOKEN, status_of, url_string, wait_until

# Short timeouts make the derived lease short, so crash recovery is quick to observe.
FAST = ["--connect-timeout", "0.5", "--read-timeout", "1", "--inline-attempts", "2",
        "--retry-base", "0.2", "--retry-cap", "1", "--poll-interval", "0.2"]


def _enqueue(engine, count: int, *, commit: bool = True, name: str = "Purchase", **props) -> list[str]:
    with Session(engine) as session:
        ids = outbox.enqueue_many(session, [
            {"event": name, "properties": {"distinct_id": f"user-{i}", "n": i, **props}} for i in range(count)
        ])
        session.commit() if commit else session.rollback()
    return ids


def test_committed_events_arrive_once_with_token_time_and_insert_id(clean, db_url, sink, workers):
    committed = _enqueue(clean, 300)
    _enqueue(clean, 50, commit=False, name="RolledBack")
    with Session(clean) as session:
        own = outbox.enqueue(session, {"event": "OwnToken", "properties": {
            "distinct_id": "u", "token": "their-own-token", "time": 1_700_000_000.123}})
        session.commit()
    worker = workers(db_url, sink.url, "--drain", *FAST)
    assert worker.wait(60) == 0, worker.output()
    arrived = {r.insert_id: r for r in sink.accepted()}
    assert set(arrived) == set(committed) | {own}
    assert len(sink.accepted()) == len(arrived)  # nothing sent twice without a crash
    assert all(r.event != "RolledBack" for r in sink.received())
    assert all(arrived[i].token == TOKEN for i in committed)
    assert arrived[own].token == "their-own-token" and arrived[own].body["properties"]["time"] == 1_700_000_000.123
    with clean.connect() as conn:
        stored = dict(conn.execute(text("SELECT insert_id, payload->'properties'->'time' FROM fp_outbox_events")).all())
    assert all(arrived[i].body["properties"]["time"] == stored[i] for i in committed)  # fixed at enqueue
    assert status_of(clean) == {"delivered": 301}
    assert TOKEN not in worker.output()


def test_four_workers_share_a_backlog_and_deliver_each_event_once(clean, db_url, sink, workers):
    committed = _enqueue(clean, 4000)
    procs = [workers(db_url, sink.url, "--drain", "--concurrency", "8", *FAST) for _ in range(4)]
    for proc in procs:
        assert proc.wait(120) == 0, proc.output()
    ids = [r.insert_id for r in sink.accepted()]
    assert sorted(ids) == sorted(committed)
    assert status_of(clean) == {"delivered": 4000}
    counts = [json.loads(_status_json(db_url))]
    assert counts[0]["delivered"] == 4000 and counts[0]["pending"] == 0


def test_sigkill_mid_batch_then_another_worker_resends_with_same_insert_id(clean, db_url, sink, workers):
    committed = _enqueue(clean, 40)
    sink.set_faults(latency=5.0)  # every answer is slow: the first worker is mid-batch when killed
    first = workers(db_url, sink.url, "--concurrency", "8", "--connect-timeout", "0.5", "--read-timeout", "1",
                    "--inline-attempts", "1", "--poll-interval", "0.2")
    assert wait_until(lambda: len(sink.received()) >= 8, 20), first.output()
    assert status_of(clean).get("in_flight") == 8
    first.signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    seen_before = {r.insert_id for r in sink.received()}
    sink.set_faults(latency=0.0)
    second = workers(db_url, sink.url, "--drain", *FAST)
    assert second.wait(90) == 0, second.output()
    delivered = {r.insert_id for r in sink.accepted()}
    assert delivered == set(committed)
    assert seen_before <= delivered  # the killed batch was re-sent, with the same $insert_ids
    with clean.connect() as conn:
        attempts = dict(conn.execute(text("SELECT insert_id, attempts FROM fp_outbox_event_states")).all())
    assert all(attempts[i] == 2 for i in seen_before)  # one attempt by the dead worker, one by the next


def test_permanent_4xx_is_dead_at_once_with_status_and_excerpt(clean, db_url, sink, workers):
    [bad] = _enqueue(clean, 1, name="Bad")
    sink.answer_next(400, body=f"bad request: field price must be a number (token {TOKEN})")
    worker = workers(db_url, sink.url, "--drain", *FAST)
    assert worker.wait(60) == 0, worker.output()
    with clean.connect() as conn:
        row = conn.execute(text("SELECT status, attempts, last_status, last_error FROM fp_outbox_event_states")).one()
    assert (row.status, row.attempts, row.last_status) == ("dead", 1, 400)
    assert "price must be a number" in row.last_error and TOKEN not in row.last_error
    assert len(sink.received()) == 1  # never retried
    assert TOKEN not in worker.output()


def test_transient_errors_are_retried_until_delivered(clean, db_url, sink, workers):
    [event_id] = _enqueue(clean, 1)
    sink.answer_next(503, count=3)  # two inline tries, then a durable retry, then success
    worker = workers(db_url, sink.url, "--drain", *FAST)
    assert worker.wait(60) == 0, worker.output()
    assert [r.status for r in sink.received()] == [503, 503, 503, 200]
    assert {r.insert_id for r in sink.received()} == {event_id}
    assert status_of(clean) == {"delivered": 1}


@pytest.mark.parametrize("inline, after", [("2", 1), ("1", 3)], ids=["re-sent in process", "re-sent from the row"])
def test_a_503_with_retry_after_is_re_sent_no_sooner_than_it_asks(clean, db_url, sink, workers, inline, after):
    """503 with Retry-After, then 200: the re-send arrives no sooner than asked, whether the worker waits in
    process (1 s) or schedules it in the row (3 s: longer than the sweep's interval; the retry base is 0.2 s)."""
    [event_id] = _enqueue(clean, 1)
    sink.answer_next(503, retry_after=str(after))
    worker = workers(db_url, sink.url, "--drain", *FAST, "--inline-attempts", inline)
    assert worker.wait(60) == 0, worker.output()
    first, second = sink.received()
    assert (first.status, second.status) == (503, 200) and first.insert_id == second.insert_id == event_id
    assert second.arrived_at - first.arrived_at >= after - 0.02, second.arrived_at - first.arrived_at
    assert status_of(clean) == {"delivered": 1}


def test_a_row_claimed_max_attempts_times_without_an_outcome_is_dead_and_never_sent_again(clean, db_url,
                                                                                         workers):
    """Its workers die while sending it, --max-attempts times: the next claim dead-letters it, saying why, and
    sends nothing."""
    from worker.devtools.fast_receiver import ReceiverProcess

    _enqueue(clean, 1)
    flags = ["--max-attempts", "3", "--connect-timeout", "0.5", "--read-timeout", "20", "--inline-attempts", "1",
             "--poll-interval", "0.2"]
    with ReceiverProcess(mode="hang") as hanging:
        for claims in (1, 2, 3):
            doomed = workers(db_url, hanging.url, *flags)
            assert wait_until(lambda: hanging.stats()["requests"] == claims, 30), doomed.output()
            doomed.signal(signal.SIGKILL)
            assert doomed.wait(10) == -signal.SIGKILL
            with clean.begin() as conn:  # its lease runs out now rather than in a minute (its claim's, or its retry's)
                conn.execute(text("UPDATE fp_outbox_claims SET lease_until = now() WHERE settled_at IS NULL"))
                conn.execute(text("UPDATE fp_outbox_retries SET lease_until = now(), next_attempt_at = now()"))
        last = workers(db_url, hanging.url, "--drain", *flags)
        assert last.wait(60) == 0, last.output()
        assert hanging.stats()["requests"] == 3  # never sent again
    with clean.connect() as conn:
        row = conn.execute(text("SELECT status, attempts, last_error FROM fp_outbox_event_states")).one()
    assert (row.status, row.attempts) == ("dead", 4)
    assert row.last_error.startswith("abandoned after 3 claims without a result"), row.last_error


def test_exhausted_attempts_become_dead_with_last_error(clean, db_url, sink, workers):
    _enqueue(clean, 1)
    sink.outage(60, status=502)
    worker = workers(db_url, sink.url, "--drain", "--max-attempts", "2", *FAST)
    assert worker.wait(60) == 0, worker.output()
    with clean.connect() as conn:
        row = conn.execute(text("SELECT status, attempts, last_status, last_error FROM fp_outbox_event_states")).one()
    assert (row.status, row.attempts, row.last_status) == ("dead", 2, 502)
    assert row.last_error.startswith("gave up after 2 attempts")


def test_events_without_any_token_are_dead_with_a_reason(clean, db_url, sink, workers):
    _enqueue(clean, 2)
    worker = workers(db_url, sink.url, "--drain", *FAST, token=None)
    assert worker.wait(60) == 0, worker.output()
    assert sink.received() == []
    with clean.connect() as conn:
        errors = conn.execute(text("SELECT last_error FROM fp_outbox_event_states WHERE status = 'dead'")).scalars().all()
    assert len(errors) == 2 and all("FP_OUTBOX_TOKEN" in e for e in errors)


def test_sigterm_finishes_in_flight_work_and_exits_zero(clean, db_url, sink, workers):
    _enqueue(clean, 30)
    sink.set_faults(latency=0.5)
    worker = workers(db_url, sink.url, "--concurrency", "4", "--connect-timeout", "0.5", "--read-timeout", "2",
                     "--poll-interval", "0.2")
    assert wait_until(lambda: len(sink.received()) >= 4, 20), worker.output()
    in_flight = status_of(clean).get("in_flight", 0)
    assert in_flight > 0  # the signal lands with requests in flight
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.output()
    stopped_after = time.monotonic() - started
    # Answers take 0.5 s, inside the grace (connect + read timeout + 1 s = 3.5 s): the worker waits for them,
    # settles and exits. The bound is that grace plus a loaded machine's margin, far inside the promised 30 s.
    assert stopped_after < 3.5 + 5, stopped_after
    counts = status_of(clean)
    assert counts.get("in_flight", 0) == 0  # finished and settled, or released at once
    assert counts["delivered"] == len(sink.accepted()) >= in_flight  # what was in flight was finished
    assert counts["delivered"] + counts.get("pending", 0) == 30


def test_worker_gives_up_on_an_unreachable_database_with_a_clear_message(sink, workers):
    from sqlalchemy.engine import make_url

    url = make_url("postgresql+psycopg://nobody@127.0.0.1:1/none")
    worker = workers(url, sink.url, "--startup-timeout", "2")
    assert worker.wait(30) == 1
    assert "could not reach the database within 2 s" in worker.output()


def _status_json(db_url) -> str:
    out = subprocess.run([sys.executable, "-c", "import sys; from worker.admin import main; sys.exit(main())",
                          "status", "--json", "--database-url", url_string(db_url)],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout
