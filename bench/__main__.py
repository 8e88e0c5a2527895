"""python -m bench NAME [--database-url URL]: figures against a baseline measured in the same run, NAME one of
enqueue, drain, faults, latency, rate, growth, cycle, concurrency, horizon, churn, recovery, wal.

Without --database-url (or FP_OUTBOX_DATABASE_URL) an embedded PostgreSQL is used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from bench import drain, rate
from bench.churn import bench_churn
from bench.common import empty_outbox, report
from bench.common import event as _event
from bench.common import fresh_backlog as _fresh_backlog
from bench.concurrency import bench_concurrency
from bench.cycle import bench_cycle
from bench.horizon import bench_horizon
from bench.recovery import bench_recovery
from bench.wal import bench_wal
from outbox.db import make_engine, normalise_url, upgrade
from outbox.wake import BUSY_WAKE_INTERVAL
from worker.devtools.sink import Sink


def bench_enqueue(engine, args) -> dict:
    """Median time one enqueue adds to a committed transaction, against a bare JSON insert."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS bench_bare (id bigserial PRIMARY KEY, payload jsonb NOT NULL)"))
    insert_bare = text("INSERT INTO bench_bare (payload) VALUES (CAST(:p AS jsonb))")
    payload = json.dumps(_event(0))

    def bare(session, i):
        session.execute(insert_bare, {"p": payload})

    def with_outbox(session, i):
        outbox.enqueue(session, _event(i))

    timings = {}
    for name, body in (("bare insert", bare), ("enqueue", with_outbox)) * 2:  # interleaved, twice
        samples = timings.setdefault(name, [])
        with Session(engine) as session:
            for i in range(args.transactions):
                started = time.perf_counter()
                body(session, i)
                session.commit()
                samples.append(time.perf_counter() - started)
    bare_ms = statistics.median(timings["bare insert"]) * 1e3
    enqueue_ms = statistics.median(timings["enqueue"]) * 1e3
    many = []
    for _ in range(5):
        events = [_event(i) for i in range(1000)]
        with Session(engine) as session:
            started = time.perf_counter()
            outbox.enqueue_many(session, events)
            session.commit()
            many.append(time.perf_counter() - started)
    empty_outbox(engine)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE bench_bare"))
    return {
        "bare_insert_txn_median_ms": round(bare_ms, 3),
        "enqueue_txn_median_ms": round(enqueue_ms, 3),
        "enqueue_vs_bare": round(enqueue_ms / bare_ms, 3),
        "enqueue_many_1000_events_per_s": round(1000 / statistics.median(many)),
    }


def bench_faults(engine, url: str, args) -> dict:
    """The failure trial: drain a backlog while the receiver fails a third of its requests for 10 s and
    the worker is killed twice (default settings, as a user runs it); count what was lost or duplicated."""
    committed = _fresh_backlog(engine, args.events)
    with Session(engine) as session:
        rolled_back = outbox.enqueue_many(session, [_event(i) for i in range(200)])
        session.rollback()
    with Session(engine) as session:
        rejected = outbox.enqueue_many(session, [{"event": "Rejected", "properties": {"distinct_id": "u"}}] * 20)
        session.commit()
    cmd = [sys.executable, "-m", "worker", "--database-url", url, "--token", "bench-token"]
    with Sink(burst_limit=None, latency=args.latency_ms / 1000) as sink:
        sink.set_faults(reject_events={"Rejected": 400})
        started = time.perf_counter()
        worker = subprocess.Popen([*cmd, "--endpoint", sink.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kills = 0
        outage_until = None
        while True:
            done = sink.counts()["distinct_insert_ids"]
            if outage_until is None and done >= args.events * 0.1:
                sink.set_faults(error_rate=1 / 3, error_status=503)
                outage_until = time.monotonic() + 10
            if outage_until and time.monotonic() > outage_until:
                sink.set_faults(error_rate=0.0)
            if kills < 2 and done >= args.events * (0.35 if kills == 0 else 0.7):
                worker.kill()
                worker.wait()
                kills += 1
                worker = subprocess.Popen([*cmd, "--endpoint", sink.url], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            counts = _status(engine)
            if kills == 2 and counts["pending"] == 0 and counts["in_flight"] == 0:
                break
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
        worker.terminate()
        worker.wait(35)
        arrived = {r.insert_id for r in sink.accepted()}
        figures = sink.counts()
    counts = _status(engine)
    with engine.connect() as conn:
        reasons = conn.execute(text("SELECT last_error, count(*) FROM fp_outbox_dead_letters GROUP BY 1")).all()
    return {
        "committed": len(committed) + len(rejected), "rolled_back": len(rolled_back),
        "lost": len(set(committed) - arrived), "rolled_back_sent": len(set(rolled_back) & arrived),
        "requests": figures["requests"], "rejected_answers": figures["rejected"],
        "duplicates_absorbed": figures["duplicates"], "dead": counts["dead"],
        "dead_reasons": {reason: n for reason, n in reasons}, "workers_killed": kills,
        "seconds_to_drain": round(elapsed, 1),
    }


def bench_latency(engine, url: str, args) -> dict:
    """Commit-to-arrival on an idle system: events committed one at a time, a worker woken by NOTIFY."""
    empty_outbox(engine)
    with Sink(burst_limit=None) as sink:
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--database-url", url, "--endpoint", sink.url,
                                   "--token", "bench-token"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)  # let it start and go idle
            committed_at = {}
            for i in range(args.samples):
                with Session(engine) as session:
                    insert_id = outbox.enqueue(session, _event(i))
                    session.commit()
                committed_at[insert_id] = time.time()
                time.sleep(0.05)  # idle between events
            sink.wait_for(lambda s: s.counts()["distinct_insert_ids"] >= args.samples, 30)
        finally:
            worker.terminate()
            worker.wait(35)
        latencies = sorted((r.arrived_at - committed_at[r.insert_id]) * 1e3 for r in sink.accepted())
    return {
        "samples": len(latencies),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
        "max_ms": round(latencies[-1], 2),
        "poll_interval_ms_for_comparison": 1000,
    }


def bench_growth(engine, url: str, args) -> dict:
    """Drain throughput with an empty table, with many delivered rows kept, and at the head of a huge
    backlog: the claim reads only past the shared position, so neither should change its cost."""
    big = args.big_rows

    def fill(status: str, rows: int) -> None:
        if status == "delivered":
            _fill_delivered(engine, rows)
        else:
            _fill_events(engine, 0, rows)
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))

    def measure(label: str, backlog_rows: int) -> float:
        if backlog_rows == 0:
            with Session(engine) as session:
                for start in range(0, args.events, 1000):
                    outbox.enqueue_many(session, [_event(i) for i in range(start, min(args.events, start + 1000))])
                session.commit()
        with Sink(burst_limit=None) as sink:
            worker = subprocess.Popen([sys.executable, "-m", "worker", "--database-url", url, "--endpoint", sink.url,
                                       "--token", "bench-token"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                sink.wait_for(lambda s: len(s.received()) >= 500, 60)  # past start-up
                first = time.perf_counter(), len(sink.received())
                sink.wait_for(lambda s: len(s.received()) >= first[1] + args.events // 2, 1800)
                rate = (len(sink.received()) - first[1]) / (time.perf_counter() - first[0])
            finally:
                worker.terminate()
                worker.wait(35)
        print(f"  {label}: {rate:.0f} events/s", file=sys.stderr)
        return rate

    def reset() -> None:
        empty_outbox(engine)

    reset()
    empty = measure("empty table", 0)
    reset()
    fill("delivered", big)
    kept = measure(f"{big:,} delivered rows kept", 0)
    reset()
    fill("pending", big)
    backlog = measure(f"head of a {big:,}-event backlog", big)
    reset()
    return {"rows": big, "empty_events_per_s": round(empty), "with_delivered_rows_events_per_s": round(kept),
            "with_backlog_events_per_s": round(backlog), "delivered_rows_vs_empty": round(kept / empty, 3),
            "backlog_vs_empty": round(backlog / empty, 3)}


FILL_BATCH = 5000  # events per transaction, and per claim, when growth fills the outbox


def _fill_events(engine, start: int, rows: int) -> None:
    """`rows` pending events, FILL_BATCH a transaction (a backlog as applications write it, not one huge one)."""
    for first in range(start, start + rows, FILL_BATCH):
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO fp_outbox_events (insert_id, event_name, payload)"
                " SELECT 'filler-' || g, 'Purchase', json_build_object('event', 'Purchase', 'properties',"
                " json_build_object('distinct_id', 'u' || g, 'time', 1.7e9, '$insert_id', 'filler-' || g))"
                " FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) g"),
                {"first": first, "last": min(start + rows, first + FILL_BATCH) - 1})


def _fill_delivered(engine, rows: int) -> None:
    """`rows` delivered events as the workers leave them: the events, claimed past the shared position by the real
    claim, and one settled claims-log row per batch (tests.storage.delivered_in_bulk, in bulk)."""
    from tests.storage import claim_fresh, settle_fresh

    for first in range(0, rows, FILL_BATCH):
        _fill_events(engine, first, min(FILL_BATCH, rows - first))
        while True:
            claim_id, ids = claim_fresh(engine, limit=FILL_BATCH)
            if claim_id is None:
                break
            settle_fresh(engine, claim_id, delivered=ids)


def _status(engine) -> dict:
    from worker.engine import status_counts

    return status_counts(engine)


@contextlib.contextmanager
def _database(args):
    raw = args.database_url or os.environ.get("FP_OUTBOX_DATABASE_URL")
    if raw:
        url = normalise_url(raw)
        upgrade(url)
        yield url
        return
    from worker.devtools.embedded import embedded_database

    with tempfile.TemporaryDirectory() as scratch, embedded_database(Path(scratch) / "pg", delete=True) as url:
        yield url


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("which", choices=["enqueue", "drain", "faults", "latency", "rate", "growth", "cycle",
                                          "concurrency", "horizon", "churn", "recovery", "wal"])
    parser.add_argument("--rounds", type=int, default=1,
                        help="drain: runs of each sender; concurrency: of each variant (interleaved, median)")
    parser.add_argument("--profile", help="drain: then profile one worker with py-spy into PROFILE.txt and .svg")
    parser.add_argument("--big-rows", type=int, default=1_000_000, help="growth: rows kept / backlog size")
    parser.add_argument("--samples", type=int, default=200, help="latency: events committed one at a time")
    parser.add_argument("--workers", type=int, default=4, help="rate: worker processes")
    parser.add_argument("--rate-limit", type=int, default=None,
                        help="rate: the shared limit (default 2000); recovery: (default 1000)")
    parser.add_argument("--recovery-sizes", type=int, nargs="+", default=[6000, 100_000],
                        help="recovery: the N of each shape")
    parser.add_argument("--outage-seconds", type=float, default=20.0, help="recovery: how long the endpoint is down")
    parser.add_argument("--database-url")
    parser.add_argument("--transactions", type=int, default=2000, help="enqueue: transactions per variant")
    parser.add_argument("--events", type=int, default=20000, help="drain: backlog size")
    parser.add_argument("--concurrency", type=int, default=32, help="drain: requests in flight")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="faults: receiver answer delay")
    parser.add_argument("--seconds", type=int, default=15, help="concurrency: seconds per pgbench run")
    parser.add_argument("--horizon-events", type=int, default=150_000, help="horizon: backlog drained per run")
    parser.add_argument("--churn-seconds", type=float, default=1800.0, help="churn: seconds of feeding and delivery")
    parser.add_argument("--churn-rate", type=float, default=0.0,
                        help="churn: events enqueued per second (0: as fast as the worker delivers)")
    parser.add_argument("--churn-retain", default="5m", help="churn: the worker's --retain-delivered")
    parser.add_argument("--wal-events", type=int, default=5000, help="wal: events enqueued, each its own transaction")
    parser.add_argument("--app-processes", type=int, default=8,
                        help="concurrency: application processes sending wake-ups (each at most 1/WAKE_INTERVAL "
                             "while a worker idles, 1/BUSY_WAKE_INTERVAL while every worker is busy)")
    parser.add_argument("--wake-interval-busy", type=float, default=BUSY_WAKE_INTERVAL,
                        help="concurrency: seconds between one process's wake-ups while every worker is busy "
                             "(the same rounds also run them spaced by WAKE_INTERVAL, as before 0.6.0)")
    parser.add_argument("--protocol", choices=["extended", "prepared"], default="extended",
                        help="concurrency: pgbench's query mode for the business transactions and the wake-ups")
    parser.add_argument("--anatomy", action="store_true",
                        help="concurrency: also time copies of the events table without its partitions, txid and slot")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="concurrency: idle worker measured this long")
    args = parser.parse_args()
    if args.rate_limit is None:
        args.rate_limit = 1000 if args.which == "recovery" else 2000
    with _database(args) as url:
        engine = make_engine(url)
        plain = url.render_as_string(hide_password=False)
        figures = {"enqueue": lambda: bench_enqueue(engine, args), "drain": lambda: drain.bench_drain(engine, plain, args),
                   "faults": lambda: bench_faults(engine, plain, args),
                   "latency": lambda: bench_latency(engine, plain, args),
                   "rate": lambda: rate.bench_rate(engine, plain, args),
                   "growth": lambda: bench_growth(engine, plain, args),
                   "cycle": lambda: bench_cycle(engine, plain, args),
                   "concurrency": lambda: bench_concurrency(engine, plain, args),
                   "horizon": lambda: bench_horizon(engine, plain, args),
                   "churn": lambda: bench_churn(engine, plain, args),
                   "recovery": lambda: bench_recovery(engine, plain, args),
                   "wal": lambda: bench_wal(engine, plain, args)}[args.which]()
        engine.dispose()
    report(args.which, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
