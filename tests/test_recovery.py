"""The worst days: an endpoint outage, a batch job that commits late, a requeue of thousands of dead rows, a
worker that starts with old due rows, a due path that keeps failing. Every kind of due row goes out at the
rate limit, not at a sweep's pace; an outage costs probes, not the events' attempts, and kills nothing.

Real worker processes, a real receiver, the test's PostgreSQL. Rates are asserted with a wide margin (a CI
machine is busy), against the limit they would be measured by; what each test pins down would fail by far
before the fix (e.g. a late batch went out at about 1 row a second)."""

from __future__ import annotations

import contextlib
import io
import json
import time
import urllib.request

from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from tests.conftest import free_port, status_of, url_string, wait_until
from worker.admin import main as admin_main
from worker.engine.store import Settled, Store

# Short timeouts and backoff, so an outage's probes come every second at most (min(--retry-cap, 30 s)).
FAST = ["--connect-timeout", "0.5", "--read-timeout", "1", "--inline-attempts", "2", "--retry-base", "0.2",
        "--retry-cap", "1", "--poll-interval", "0.2", "--concurrency", "8"]
MARGIN = 2.0  # a busy CI machine: the rates asserted are half the limit's


def _enqueue(engine, count: int, name: str = "E") -> list[str]:
    ids = []
    for start in range(0, count, 1000):
        with Session(engine) as session:
            ids += outbox.enqueue_many(session, [{"event": name, "properties": {"distinct_id": f"u{i}"}}
                                                 for i in range(start, min(count, start + 1000))])
            session.commit()
    return ids


def _delivered(sink, ids: list[str]) -> bool:
    return set(ids) <= {r.insert_id for r in sink.accepted()}


def _log_lines(workers_, message: str) -> list[str]:
    """The lines whose message starts with `message` (not lines that only quote it, as a retry's reason may)."""
    return [line for w in workers_ for line in w.output().splitlines() if f'msg="{message}' in line]


def _max_attempts(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT coalesce(max(attempts), 0) FROM fp_outbox_event_states")).scalar()


def test_an_outage_costs_probes_not_attempts_and_recovery_goes_at_the_rate_limit(clean, db_url, sink, workers):
    limit, count, outage = 200, 1000, 8.0
    ids = _enqueue(clean, count)
    sink.outage(outage)  # 503 to everything, from before the workers start
    began = time.monotonic()
    running = [workers(db_url, sink.url, "--rate-limit", str(limit), *FAST) for _ in range(2)]
    assert wait_until(lambda: _log_lines(running, "the endpoint is down"), 30), running[0].output()
    assert wait_until(lambda: time.monotonic() - began >= outage, outage + 1)
    during = len(sink.received())
    recovered = time.monotonic()
    # Bounded by the probes: what was in flight when the outage was seen (8 sends x 2 tries x 2 workers, at
    # most) and one probe a second at most; not by the 1,000 waiting events.
    assert during <= 2 * 8 * 2 + outage / 0.2 + 10, during
    assert status_of(clean).get("dead", 0) == 0
    allowed = 1.0 + count / (0.96 * limit) * MARGIN + 10  # one probe interval, the backlog at the limit, slack
    assert sink.wait_for(lambda s: _delivered(s, ids), allowed), (status_of(clean), running[0].output())
    took = time.monotonic() - recovered
    assert count / took >= limit / MARGIN / 2, took  # at the limit, not at a sweep's pace (1-25 rows a second)
    # the last arrivals' settles commit a moment after the receiver saw them
    assert wait_until(lambda: status_of(clean) == {"delivered": count}, 10), status_of(clean)
    assert _max_attempts(clean) <= 2  # the outage's failures gave their attempts back
    assert len(_log_lines(running, "the endpoint is down")) == 1  # one line at each change, by whoever made it
    assert len(_log_lines(running, "the endpoint answers again")) == 1


def _endpoint_gauge(port: int) -> str | None:
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    return next((line.split()[1] for line in page.splitlines() if line.startswith("fp_outbox_endpoint_up ")), None)


def _status(db_url) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert admin_main(["status", "--json", "--database-url", url_string(db_url)]) == 0
    return json.loads(out.getvalue())


def test_an_outage_longer_than_the_whole_retry_schedule_kills_nothing(clean, db_url, sink, workers):
    """With two attempts and sub-second backoff every event would die within a second of failing; the outage
    lasts many times that, and not one event dies of it. Operators see it: status, the gauge, two log lines."""
    ids = _enqueue(clean, 60)
    sink.outage(3600)
    port = free_port()
    worker = workers(db_url, sink.url, "--max-attempts", "2", "--retry-base", "0.1", "--retry-cap", "0.3",
                     *FAST[:6], "--poll-interval", "0.2", "--concurrency", "4", "--metrics-port", str(port))
    assert wait_until(lambda: _status(db_url)["endpoint"] == "down", 30), worker.output()
    assert wait_until(lambda: _endpoint_gauge(port) == "0.0", 10), worker.output()
    time.sleep(5)  # many times the whole retry schedule (2 attempts, 0.1 s then 0.3 s)
    assert status_of(clean).get("dead", 0) == 0, status_of(clean)
    assert _status(db_url)["endpoint_probes"] >= 3
    sink.outage(0)
    assert sink.wait_for(lambda s: _delivered(s, ids), 60), (status_of(clean), worker.output())
    assert wait_until(lambda: status_of(clean) == {"delivered": 60}, 10), status_of(clean)
    assert _status(db_url)["endpoint"] == "up" and _endpoint_gauge(port) == "1.0"
    assert len(_log_lines([worker], "the endpoint is down")) == 1
    assert len(_log_lines([worker], "the endpoint answers again")) == 1


def test_one_event_that_keeps_failing_while_others_succeed_dies_by_its_own_attempts(clean, db_url, sink, workers):
    """Not an outage: the endpoint answers the others, so the poison event backs off and dies as it always did."""
    sink.set_faults(reject_events={"Poison": 503})
    poison = _enqueue(clean, 1, name="Poison")
    good = _enqueue(clean, 200)
    worker = workers(db_url, sink.url, "--max-attempts", "3", "--rate-limit", "100", *FAST)
    assert wait_until(lambda: status_of(clean) == {"delivered": 200, "dead": 1}, 60), \
        (status_of(clean), worker.output())
    assert _delivered(sink, good)
    assert len([r for r in sink.received() if r.insert_id == poison[0]]) == 3 * 2  # 3 claims x 2 tries each
    assert not _log_lines([worker], "the endpoint is down")


def test_a_late_batch_goes_out_at_the_rate_limit(clean, db_url, sink, workers):
    """Two batch transactions stay open for seconds, their ids taken, while the application commits a trickle:
    the trickle is not held back, and the batch goes out at the rate limit from its commit."""
    limit, batch = 500, 1500
    worker = workers(db_url, sink.url, "--rate-limit", str(limit), *FAST)
    jobs = [Session(clean) for _ in range(2)]
    late = []
    for job in jobs:
        late += outbox.enqueue_many(job, [{"event": "Batch", "properties": {"distinct_id": f"b{i}"}}
                                          for i in range(batch)])
    trickle = []
    for _ in range(12):  # 3 s of an application committing 20 events a second
        trickle += _enqueue(clean, 5)
        time.sleep(0.25)
    assert sink.wait_for(lambda s: _delivered(s, trickle), 10), worker.output()  # not held back by the batch
    for job in jobs:
        job.commit()
        job.close()
    committed = time.monotonic()
    allowed = len(late) / (0.96 * limit) * MARGIN + 5
    assert sink.wait_for(lambda s: _delivered(s, late), allowed), (status_of(clean), worker.output())
    assert time.monotonic() - committed <= allowed


def test_a_requeue_of_thousands_of_dead_rows_goes_at_the_rate_limit(clean, db_url, sink, workers):
    limit, count = 1000, 4000
    with clean.begin() as conn:
        conn.execute(text(
            "INSERT INTO fp_outbox_dead_letters (id, insert_id, event_name, payload, created_at, attempts, last_status,"
            "                                    last_error)"
            " SELECT -g, 'dead-' || g, 'E', json_build_object('event', 'E', 'properties',"
            "        json_build_object('distinct_id', 'u' || g, '$insert_id', 'dead-' || g, 'time', 1796000000)),"
            "        now(), 25, 503, 'gave up after 25 attempts: HTTP 503'"
            " FROM generate_series(1, :n) g"), {"n": count})
    worker = workers(db_url, sink.url, "--rate-limit", str(limit), *FAST)
    _enqueue(clean, 1)  # the worker is up and past its first sweep before the requeue
    assert sink.wait_for(lambda s: len(s.accepted()) == 1, 20), worker.output()
    assert admin_main(["requeue", "--dead", "--yes", "--database-url", url_string(db_url)]) == 0
    requeued = time.monotonic()
    allowed = count / (0.96 * limit) * MARGIN + 5
    assert sink.wait_for(lambda s: len({r.insert_id for r in s.accepted()}) == count + 1, allowed), \
        (status_of(clean), worker.output())
    assert time.monotonic() - requeued <= allowed


def _index_entries_read(conn, statement: str) -> int:
    """Index entries a statement read (live or dead, every index of the events' partitions), run and rolled back:
    a count of what it visited, which no machine load can change."""
    count = text("SELECT sum(pg_stat_get_xact_tuples_returned(i.indexrelid)) FROM pg_index AS i"
                 " JOIN pg_inherits AS p ON p.inhrelid = i.indrelid WHERE p.inhparent = 'fp_outbox_events'::regclass")
    before = conn.execute(count).scalar()
    conn.execute(text(statement))
    after = conn.execute(count).scalar()
    conn.rollback()
    return int(after - before)


def test_old_due_retries_and_all_that_was_delivered_cost_a_fresh_claim_nothing(clean, db_url, sink, workers):
    """An old retry waiting, behind 30,000 delivered events: the fresh claim reads the new events' index entries
    only (the position is past everything delivered), and the old retry goes out by the due path. Before, a worker
    whose floor started below such a retry read all that was delivered since on every claim."""
    old = _enqueue(clean, 1, name="Old")
    store = Store(clean, "me", 30.0)
    rows, _ = store.claim_fresh(1, 1e6)
    store.settle([Settled(rows[0], "retry", 503, "HTTP 503", 0.0)])  # a retry, due now
    with clean.begin() as conn:
        conn.execute(text("INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
                          " SELECT 'd' || g, 'E', '{}' FROM generate_series(1, 30000) g"))
    while store.claim_fresh(1000, 1e6)[0]:
        pass  # all claimed (as if delivered)
    fresh = _enqueue(clean, 20)
    with clean.connect() as conn:
        read = _index_entries_read(conn, "SELECT * FROM fp_outbox_claim_fresh('reader', 30, 25, false)")
    assert read < 100, read  # the twenty new events and the ends of the index ranges; not 30,000
    worker = workers(db_url, sink.url, *FAST)
    assert sink.wait_for(lambda s: _delivered(s, fresh + old), 30), worker.output()


def test_a_due_path_that_keeps_failing_never_stops_the_fresh_path(clean, db_url, sink, workers):
    """A trigger (an application's audit trigger, say) refuses to touch rows that were tried before: every claim
    of the due path fails, the fresh path must go on; once it is dropped, the due rows go out too."""
    with clean.begin() as conn:  # retries, due at once
        conn.execute(text("INSERT INTO fp_outbox_retries (id, insert_id, event_name, payload, created_at, attempts)"
                          " SELECT -g, 'retry-' || g, 'E', json_build_object('event', 'E', 'properties',"
                          "        json_build_object('distinct_id', 'u', '$insert_id', 'retry-' || g, 'time', 1796000000)),"
                          "        now(), 1"
                          " FROM generate_series(1, 5) g"))
        conn.execute(text("CREATE FUNCTION fpo_no_retries() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                          " IF NEW.lease_owner IS NOT NULL THEN"
                          " RAISE EXCEPTION 'no retries today'; END IF; RETURN NEW; END $$"))
        conn.execute(text("CREATE TRIGGER fpo_no_retries BEFORE UPDATE ON fp_outbox_retries"
                          " FOR EACH ROW EXECUTE FUNCTION fpo_no_retries()"))
    try:
        worker = workers(db_url, sink.url, *FAST)
        assert wait_until(lambda: _log_lines([worker], "claiming due rows failed"), 20), worker.output()
        fresh = _enqueue(clean, 30)
        assert sink.wait_for(lambda s: _delivered(s, fresh), 20), worker.output()
        assert worker.proc.poll() is None
    finally:
        with clean.begin() as conn:
            conn.execute(text("DROP TRIGGER fpo_no_retries ON fp_outbox_retries"))
            conn.execute(text("DROP FUNCTION fpo_no_retries()"))
    retries = [f"retry-{n}" for n in range(1, 6)]
    assert sink.wait_for(lambda s: _delivered(s, retries), 60), worker.output()  # its backoff is at most 30 s
