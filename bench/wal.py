"""`python -m bench wal`: what the outbox writes to the application's database, in WAL bytes per event, against a
plain insert of the same JSON into a table of four columns (id, insert_id, event_name, payload), each event in a
transaction of its own.

Phases, each after a CHECKPOINT (so each pays its own full-page images, as it would in production) and timed by
pg_current_wal_lsn() around it: the plain inserts; enqueue; the worker's claims and settles (one in-process
worker, HTTP replaced by an instant 200, chunks as at the default limit); retention (the slots' partitions
truncated and the claims log purged, once past --retain-delivered, as the worker's retention does); and a VACUUM
of the outbox's tables. WAL is cluster-wide: run it on a database server of its own (the default: an embedded
PostgreSQL), or on a quiet one.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

from sqlalchemy import make_url, text
from sqlalchemy.orm import Session

import outbox
from bench.common import InstantTransport, empty_outbox, event
from tests.inprocess import drain, settings

RETAIN_S = 30.0  # the longest retention whose slot period is the minimum (10 s): the bench waits a period out


def bench_wal(engine, url: str, args) -> dict:
    count = args.wal_events
    empty_outbox(engine)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS bench_plain (id bigserial PRIMARY KEY, insert_id text NOT NULL,"
                          " event_name text NOT NULL, payload json NOT NULL)"))
        conn.execute(text("TRUNCATE bench_plain"))
        conn.execute(text("SELECT fp_outbox_set_slot_period(:r)"), {"r": RETAIN_S})
    sample = event(0)
    payload = json.dumps({**sample, "properties": {**sample["properties"], "time": 1.7e9, "$insert_id": "x" * 36}},
                         separators=(",", ":"))
    phases = {
        "plain_insert": lambda: _plain(engine, count, payload),
        "enqueue": lambda: _enqueue(engine, count, sample),
        "claim_and_settle": lambda: _deliver(url),
        "retention": lambda: _retain(engine),
        "vacuum": lambda: _vacuum(engine),
    }
    bytes_per_event = {name: _wal(engine, run) / count for name, run in phases.items()}
    outbox_total = sum(v for k, v in bytes_per_event.items() if k != "plain_insert")
    return {"events": count, **{f"{k}_bytes_per_event": round(v) for k, v in bytes_per_event.items()},
            "outbox_bytes_per_delivered_event": round(outbox_total),
            "outbox_vs_plain_insert": round(outbox_total / bytes_per_event["plain_insert"], 3)}


def _wal(engine, run) -> int:
    with engine.connect() as conn:
        conn.execute(text("CHECKPOINT"))
        before = conn.execute(text("SELECT pg_current_wal_insert_lsn()")).scalar()
    run()
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), :b)"), {"b": before})
                   .scalar())


def _plain(engine, count: int, payload: str) -> None:
    insert = text("INSERT INTO bench_plain (insert_id, event_name, payload) VALUES (:i, 'Purchase', CAST(:p AS json))")
    with Session(engine) as session:
        for n in range(count):
            session.execute(insert, {"i": f"{n:036d}", "p": payload})
            session.commit()


def _enqueue(engine, count: int, sample: dict) -> None:
    with Session(engine) as session:
        for n in range(count):
            outbox.enqueue(session, {**sample, "properties": {**sample["properties"], "n": n}})
            session.commit()


def _deliver(url: str) -> None:
    from worker.engine import Worker

    worker = Worker(settings(make_url(url), "http://127.0.0.1:9/track", "--drain", "--retain-delivered", "off",
                             "--retain-dead", "off"), sender=InstantTransport())
    drain(worker, timeout=600)


def _retain(engine) -> None:
    from worker.engine import purge_delivered

    deadline = time.monotonic() + 60
    while True:  # the slots written to must be past: a period (10 s) and the retention, made 0 here
        purge_delivered(engine, timedelta(0))
        with engine.connect() as conn:
            left = conn.execute(text("SELECT count(*) FROM fp_outbox_events")).scalar()
        if not left or time.monotonic() > deadline:
            return
        time.sleep(1)


def _vacuum(engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM fp_outbox_events, fp_outbox_claims, fp_outbox_retries, fp_outbox_dead_letters"))
