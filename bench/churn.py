"""python -m bench churn: what delivering events leaves behind, and whether retention keeps pace.

1. Delivery with retention on: a producer enqueues at 5,000 events a second (--churn-rate; 1,000 per
   transaction) while one in-process worker delivers them (HTTP replaced by a transport answering 200 at
   once) with --retain-delivered 10s, so retention deletes all the while and autovacuum (its naptime is a
   minute) gets its turns. Sampled every two seconds: dead
   tuples (pg_stat_user_tables), table size and index size. Run twice: with the table's own autovacuum
   settings (migration 0003) and with PostgreSQL's defaults.
2. Retention's pace: a feeder inserts 5,000 delivered rows a second, all past the cutoff, while the worker's
   retention (worker.engine.retention.Retention) runs every few seconds; the share of the time it is busy
   and the old rows left at the end say whether it keeps pace.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from bench.common import InstantTransport, empty_outbox, event
from outbox.db import MIGRATIONS_DIR

FEED_PER_S = 5_000
RETENTION_EVERY = 5.0  # seconds between retention runs in the pace test (the worker: at most 60)
SIZES = text("""
    SELECT coalesce(s.n_dead_tup, 0) AS dead, pg_relation_size('fp_outbox_events') AS table_bytes,
           pg_indexes_size('fp_outbox_events') AS index_bytes
      FROM pg_stat_user_tables AS s WHERE s.relname = 'fp_outbox_events'""")


def bench_churn(engine, url: str, args) -> dict:
    """Dead tuples and sizes after delivering, with the shipped autovacuum settings and with the defaults;
    then retention against 5,000 old delivered rows a second."""
    with engine.connect() as conn:
        autovacuum = conn.execute(text("SHOW autovacuum")).scalar()
    if autovacuum != "on":
        print("  autovacuum is off on this server: these figures show the churn with no vacuum at all;"
              " run without --database-url (an embedded server, autovacuum on) for the settings' effect", flush=True)
    figures: dict = {"delivered_events": args.churn_events, "enqueued_per_s": args.churn_rate,
                     "retain_delivered": "10s", "server_autovacuum": autovacuum}
    shipped = _shipped_autovacuum()
    for label, options in (("shipped", shipped), ("defaults", None)):
        _set_autovacuum(engine, shipped, options)
        delivered = _deliver(engine, url, args.churn_events, args.churn_rate)
        figures.update({f"{label}_{key}": value for key, value in delivered.items()})
        print(f"  {label} autovacuum settings: at most {figures[f'{label}_peak_dead_tuples']:,} dead tuples",
              flush=True)
    _set_autovacuum(engine, shipped, shipped)
    figures.update(_retention_pace(engine, args.churn_seconds))
    return figures


def _shipped_autovacuum() -> dict[str, str]:
    path = MIGRATIONS_DIR / "versions" / "0003_light_footprint.py"
    spec = importlib.util.spec_from_file_location("fp_outbox_0003", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AUTOVACUUM


def _set_autovacuum(engine, shipped: dict, options: dict | None) -> None:
    with engine.begin() as conn:
        if options:
            conn.execute(text(f"ALTER TABLE fp_outbox_events SET ({', '.join(f'{k} = {v}' for k, v in options.items())})"))
        else:
            conn.execute(text(f"ALTER TABLE fp_outbox_events RESET ({', '.join(shipped)})"))


def _deliver(engine, url: str, events: int, rate: float) -> dict:
    from worker.engine import Worker, build_parser, from_args

    empty_outbox(engine)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM fp_outbox_events"))  # both variants start from the same clean table
    settings = from_args(build_parser().parse_args(
        ["--database-url", url, "--rate-limit", "1000000", "--concurrency", "100", "--retain-delivered", "10s",
         "--retain-dead", "off"]), environ={})
    transport = InstantTransport()
    worker = Worker(settings, sender=transport)
    vacuums_before = _autovacuums(engine)
    runner = threading.Thread(target=worker.run, daemon=True)
    samples: list = []
    started = time.perf_counter()
    runner.start()
    produced = 0
    while transport.sent < events:
        if produced < min(events, rate * (time.perf_counter() - started)):
            count = min(1000, events - produced)
            with Session(engine) as session:
                outbox.enqueue_many(session, [event(produced + i) for i in range(count)])
                session.commit()
            produced += count
        else:
            time.sleep(0.01)
        if not samples or time.perf_counter() - samples[-1][0] >= 2.0:
            samples.append((time.perf_counter(), _sizes(engine)))
    seconds = time.perf_counter() - started
    worker.stop()
    runner.join(60)
    worker.engine.dispose()
    final = _sizes(engine)
    return {"events_per_s": round(events / seconds), "peak_dead_tuples": max(s.dead for _, s in samples + [(0, final)]),
            "final_dead_tuples": final.dead, "peak_table_mb": _mb(max(s.table_bytes for _, s in samples + [(0, final)])),
            "final_table_mb": _mb(final.table_bytes), "final_index_mb": _mb(final.index_bytes),
            "peak_index_mb": _mb(max(s.index_bytes for _, s in samples + [(0, final)])),
            "autovacuums": _autovacuums(engine) - vacuums_before}


def _sizes(engine):
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        return conn.execute(SIZES).one()


def _autovacuums(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT autovacuum_count FROM pg_stat_user_tables"
                                 " WHERE relname = 'fp_outbox_events'")).scalar()


def _mb(size: int) -> float:
    return round(size / 2**20, 1)


def _retention_pace(engine, seconds: float) -> dict:
    """Retention (7 days) against a feeder of 5,000 delivered rows a second, all 8 days old."""
    from worker.engine.retention import Retention

    empty_outbox(engine)
    stop = threading.Event()
    fed = [0]
    feeder = threading.Thread(target=_feed, args=(engine, stop, fed), daemon=True)
    retention = Retention(engine, timedelta(days=7), None)
    busy = deleted = 0.0
    started = time.perf_counter()
    feeder.start()
    while time.perf_counter() - started < seconds:
        time.sleep(RETENTION_EVERY)
        run_started = time.perf_counter()
        deleted += retention.run()[0]
        busy += time.perf_counter() - run_started
    stop.set()
    feeder.join(30)
    elapsed = time.perf_counter() - started
    with engine.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM fp_outbox_events")).scalar()
    return {"pace_fed_per_s": round(fed[0] / elapsed), "pace_deleted_per_s": round(deleted / elapsed),
            "pace_retention_busy_share": round(busy / elapsed, 3),
            "pace_deletes_per_busy_s": round(deleted / busy) if busy else None,
            "pace_old_rows_left_at_end": left, "pace_retention_every_s": RETENTION_EVERY}


def _feed(engine, stop: threading.Event, fed: list[int]) -> None:
    """5,000 delivered rows a second, in ten inserts of 500, each delivered 8 days ago."""
    tick = time.perf_counter()
    while not stop.is_set():
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO fp_outbox_events (insert_id, event_name, payload, status, created_at, delivered_at)"
                " SELECT 'fed-' || g, 'Purchase', '{\"event\": \"Purchase\", \"properties\": {}}', 'delivered',"
                " now() - interval '8 days', now() - interval '8 days' FROM generate_series(1, :n) AS g"),
                {"n": FEED_PER_S // 10})
        fed[0] += FEED_PER_S // 10
        tick += 0.1
        time.sleep(max(0.0, tick - time.perf_counter()))
