"""`python -m bench recovery`: the worst days, each timed from the moment its rows are due, against the limit.

Three shapes, each for every N in --recovery-sizes (default 6,000 and 100,000), two workers at --rate-limit
(default 1,000) with default settings otherwise, delivering to the Sink (a real HTTP receiver that can
simulate an outage):
- outage: N events wait while the endpoint answers 503 to everything for --outage-seconds (20), then 200.
  Figures: requests sent during the outage (bounded by the probes, not by N), seconds from the endpoint's
  recovery to the last delivery against the target (one probe interval + N / (0.96 x limit) + 10 s), and the
  rate once the first event after the recovery arrived.
- late batch: two transactions of N/2 events each, kept open 4 s while the application commits 20 events a
  second; the rate from their commit.
- requeue: N dead letters, their events already truncated, requeued with `fp-outbox requeue --dead`; the rate
  from the requeue.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from bench.common import empty_outbox, event, fresh_backlog
from worker.admin import main as admin_main
from worker.devtools.sink import Sink

WORKERS = 2
BATCH_HELD_S = 4.0
TRICKLE_PER_S = 20


def bench_recovery(engine, url: str, args) -> dict:
    figures: dict = {"rate_limit": args.rate_limit, "workers": WORKERS}
    for size in args.recovery_sizes:
        for shape, run in (("outage", _outage), ("late_batch", _late_batch), ("requeue", _requeue)):
            empty_outbox(engine)
            result = run(engine, url, args, size)
            print(f"  {shape} N={size:,}: {result}", file=sys.stderr)
            figures.update({f"{shape}_{size}_{key}": value for key, value in result.items()})
    return figures


def _workers(url: str, endpoint: str, rate_limit: float) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "worker", "--database-url", url, "--endpoint", endpoint, "--token", "bench-token",
           "--rate-limit", str(rate_limit), "--retain-delivered", "off"]
    return [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(WORKERS)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(40)


def _delivered_by(sink: Sink, count: int, timeout: float) -> bool:
    return sink.wait_for(lambda s: s.counts()["distinct_insert_ids"] >= count, timeout)


def _rate(sink: Sink, since: float, count: int, limit: float) -> dict:
    """From `since` (time.time()) to the last 200: seconds, events/s over that, and over the steady part."""
    times = sorted(r.arrived_at for r in sink.accepted() if r.arrived_at >= since)
    took = times[-1] - since
    steady = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return {"seconds_from_due": round(took, 1), "events_per_s_from_due": round(count / took),
            "vs_limit_from_due": round(count / took / limit, 3), "steady_events_per_s": round(steady),
            "steady_vs_limit": round(steady / limit, 3)}


def _outage(engine, url: str, args, size: int) -> dict:
    fresh_backlog(engine, size)
    with Sink(burst_limit=None) as sink:
        sink.outage(args.outage_seconds)
        procs = _workers(url, sink.url, args.rate_limit)
        try:
            time.sleep(args.outage_seconds)
            recovered = time.time()
            during = len(sink.received())
            done = _delivered_by(sink, size, 3600)
            rate = _rate(sink, recovered, size, args.rate_limit)
        finally:
            _stop(procs)
    target = 30 + size / (0.96 * args.rate_limit) + 10  # the probe interval's cap (30 s) at default settings
    return {"requests_during_outage": during, "all_delivered": done, **rate,
            "target_seconds": round(target, 1), "within_target": rate["seconds_from_due"] <= target}


def _late_batch(engine, url: str, args, size: int) -> dict:
    with Sink(burst_limit=None) as sink:
        procs = _workers(url, sink.url, args.rate_limit)
        try:
            jobs = [Session(engine) for _ in range(2)]
            for n, job in enumerate(jobs):
                for start in range(0, size // 2, 1000):
                    outbox.enqueue_many(job, [event(n * size + i) for i in range(start, min(size // 2, start + 1000))])
            stop = threading.Event()
            trickle = threading.Thread(target=_trickle, args=(engine, stop), daemon=True)
            trickle.start()
            time.sleep(BATCH_HELD_S)
            committed = time.time()
            for job in jobs:
                job.commit()
                job.close()
            done = _delivered_by(sink, size, 3600)
            stop.set()
            trickle.join()
            rate = _rate(sink, committed, size, args.rate_limit)
        finally:
            _stop(procs)
    return {"all_delivered": done, **rate}


def _trickle(engine, stop: threading.Event) -> None:
    """The application's own events meanwhile: TRICKLE_PER_S a second, each its own transaction."""
    n = 0
    while not stop.wait(1 / TRICKLE_PER_S):
        with Session(engine) as session:
            outbox.enqueue(session, event(10_000_000 + n))
            session.commit()
        n += 1


def _requeue(engine, url: str, args, size: int) -> dict:
    # Dead letters alone, their events' partitions long truncated (the usual case for an old one): the requeue
    # must send each from its own payload.
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO fp_outbox_dead_letters (id, insert_id, event_name, payload, created_at, attempts,"
            " last_status, last_error, dead_at)"
            " SELECT g, 'dead-' || g, 'Purchase', json_build_object('event', 'Purchase', 'properties',"
            " json_build_object('distinct_id', 'u' || g, 'time', 1.7e9, '$insert_id', 'dead-' || g)),"
            " now() - interval '1 day', 25, 503, 'HTTP 503: busy', now() FROM generate_series(1, :n) g"),
            {"n": size})
    with Sink(burst_limit=None) as sink:
        procs = _workers(url, sink.url, args.rate_limit)
        try:
            time.sleep(3)  # both workers up and idle
            requeued = time.time()
            assert admin_main(["requeue", "--dead", "--yes", "--database-url", url]) == 0
            done = _delivered_by(sink, size, 3600)
            rate = _rate(sink, requeued, size, args.rate_limit)
        finally:
            _stop(procs)
    return {"all_delivered": done, **rate}
