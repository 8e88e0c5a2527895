"""python -m bench horizon: the claim path while something holds vacuum back.

A REPEATABLE READ transaction that has read the table (a report, a pg_dump) stays open the whole time, so no
dead row version that claims and settles leave behind can be removed. One worker, in process, drains a
backlog with HTTP replaced by an in-process transport (the database path is all there is to measure):
the rate over the last third of a 150,000-event drain, against the same drain with no open transaction;
then, the snapshot still held, another backlog, and the fresh claim's own time after 300,000 deliveries
against its time on the fresh table. Claims are timed in process, statement and commit included.
"""

from __future__ import annotations

import statistics
import threading
import time

from sqlalchemy import text

from bench.common import InstantTransport, empty_outbox, fresh_backlog

CLAIM_SAMPLES = 500  # claims whose median is the claim's time, at the start and at the end


class TimedTransport(InstantTransport):
    """Answers 200 at once and keeps the instant of every send, for the rate over any stretch of the drain."""

    def __init__(self) -> None:
        super().__init__()
        self.instants: list[float] = []

    def send(self, row, *_):
        self.instants.append(time.perf_counter())
        return super().send(row)


def bench_horizon(engine, url: str, args) -> dict:
    """The last third's drain rate with and without a held snapshot, and the claim's time after 300,000."""
    events = args.horizon_events
    free = _drain(engine, url, events, held=None)
    print(f"  no open transaction: last third {free['last_third_per_s']:,.0f}/s", flush=True)
    with engine.connect() as report:
        report.exec_driver_sql("COMMIT")  # SQLAlchemy began one; begin ours with its isolation level
        report.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
        held = _drain(engine, url, events, held=report)
        print(f"  snapshot held: last third {held['last_third_per_s']:,.0f}/s", flush=True)
        more = _drain(engine, url, 2 * events - held["delivered"] + CLAIM_SAMPLES * 25, held=report, keep=True)
        dead = _dead_tuples(engine)  # while the snapshot still holds them
        report.rollback()
    first = statistics.median(held["claim_ms"][:CLAIM_SAMPLES])
    after = statistics.median(more["claim_ms"][-CLAIM_SAMPLES:])
    sweeps = held["sweep_ms"] + more["sweep_ms"]
    return {
        "events": events, "claim_rows": 25,
        "no_snapshot_last_third_per_s": round(free["last_third_per_s"]),
        "held_snapshot_last_third_per_s": round(held["last_third_per_s"]),
        "held_vs_no_snapshot": round(held["last_third_per_s"] / free["last_third_per_s"], 3),
        "claim_ms_fresh_table": round(first, 3),
        "deliveries_under_the_snapshot": held["delivered"] + more["delivered"],
        "claim_ms_after_those": round(after, 3),
        "claim_after_vs_fresh": round(after / first, 3),
        "sweeps": len(sweeps), "sweep_ms_median": round(statistics.median(sweeps), 1) if sweeps else None,
        "sweep_ms_max": round(max(sweeps), 1) if sweeps else None,
        "sweep_share_of_time": round(sum(sweeps) / 1e3 / (held["seconds"] + more["seconds"]), 4),
        **dead,
    }


def _drain(engine, url: str, events: int, held, keep: bool = False) -> dict:
    """Drain a backlog of `events` with one in-process worker, claims of 25; `held` reads the table first."""
    from worker.engine import Worker, build_parser, from_args

    if keep:
        _enqueue_more(engine, events)
    else:
        fresh_backlog(engine, events, per_transaction=5000)
    if held is not None and not keep:
        held.execute(text("SELECT count(*) FROM fp_outbox_events")).scalar()  # the report reads: its snapshot
    settings = from_args(build_parser().parse_args(
        ["--database-url", url, "--drain", "--rate-limit", "1000000", "--concurrency", "25"]), environ={})
    transport = TimedTransport()
    worker = Worker(settings, sender=transport)
    claims, sweeps = _timed(worker.store, "claim_fresh"), _timed(worker.store, "claim_due")
    started = time.perf_counter()
    runner = threading.Thread(target=worker.run)
    runner.start()
    runner.join()
    worker.engine.dispose()
    seconds = time.perf_counter() - started
    instants = transport.instants
    third = len(instants) * 2 // 3
    return {"delivered": len(instants), "seconds": seconds, "claim_ms": claims, "sweep_ms": sweeps,
            "last_third_per_s": (len(instants) - 1 - third) / (instants[-1] - instants[third])}


def _timed(store, name: str) -> list[float]:
    """Time every call of store.<name> (ms) into the returned list."""
    durations: list[float] = []
    call = getattr(store, name)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            durations.append((time.perf_counter() - started) * 1e3)

    setattr(store, name, timed)
    return durations


def _enqueue_more(engine, events: int) -> None:
    from sqlalchemy.orm import Session

    import outbox
    from bench.common import event

    for start in range(0, events, 5000):
        with Session(engine) as session:
            outbox.enqueue_many(session, [event(i) for i in range(start, min(events, start + 5000))])
            session.commit()


def _dead_tuples(engine) -> dict:
    """Dead tuples left under the held snapshot: the events' (summed over their partitions; insert-only, so none
    are expected) apart from the claims log's and the retries' (which claims and settles do update)."""
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        row = conn.execute(text(
            "SELECT coalesce(sum(n_dead_tup) FILTER (WHERE relname LIKE 'fp\\_outbox\\_events\\_s%'), 0) AS events,"
            " coalesce(sum(n_dead_tup) FILTER (WHERE relname IN ('fp_outbox_claims', 'fp_outbox_retries')), 0)"
            " AS claims_and_retries FROM pg_stat_user_tables")).one()
    return {"events_dead_tuples_at_end": int(row.events), "claims_retries_dead_tuples_at_end": int(row.claims_and_retries)}


__all__ = ["bench_horizon", "empty_outbox"]
