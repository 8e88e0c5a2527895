"""What the benchmarks share: the sample event, a fresh backlog, an in-process transport that answers 200,
the one-second-window count, and printing and saving a benchmark's figures."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox

RESULTS = Path(__file__).resolve().parent / "results"


def event(i: int) -> dict:
    """The benchmarks' event: small, like a real Purchase, different in each row."""
    return {"event": "Purchase", "properties": {"distinct_id": f"user-{i % 1000}", "price": 500, "sku": f"sku-{i}"}}


OUTBOX_TABLES = "fp_outbox_events, fp_outbox_claims, fp_outbox_retries, fp_outbox_dead_letters"


def empty_outbox(engine) -> None:
    """No events, no claims, retries or dead letters (nor the previous release's rows), the shared rate-limit
    schedule back at its start and the endpoint up: each bench starts from what a new install has, whatever ran
    before it."""
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {OUTBOX_TABLES}"))
        if conn.execute(text("SELECT to_regclass('fp_outbox_events_legacy')")).scalar():
            conn.execute(text("TRUNCATE fp_outbox_events_legacy"))
        conn.execute(text("SELECT setval('fp_outbox_rate_limit_seq', 0)"))
        conn.execute(text("UPDATE fp_outbox_endpoint SET down_since = NULL, probes = 0, next_probe_at = NULL,"
                          " probe_owner = NULL, probe_until = NULL, reason = NULL"))


def fresh_backlog(engine, events: int, per_transaction: int = 1000) -> list[str]:
    """An outbox holding exactly `events` pending events (enqueued `per_transaction` at a time)."""
    empty_outbox(engine)
    ids = []
    for start in range(0, events, per_transaction):
        with Session(engine) as session:
            ids += outbox.enqueue_many(session, [event(i) for i in range(start, min(events, start + per_transaction))])
            session.commit()
    return ids


class InstantTransport:
    """Stands in for HTTP in the cycle benchmarks: every event is answered 200 at once; counts what it saw."""

    def __init__(self) -> None:
        self.sent = 0

    def send(self, row, *_):
        from worker.engine import Delivered

        self.sent += 1
        return Delivered(200)


def busiest_window(times: list[float], weights: list[int] | None = None, width: float = 1.0) -> int:
    """The most events (each counted with its weight) whose instants fall in any window of `width` seconds."""
    pairs = sorted(zip(times, weights or [1] * len(times)))
    most = inside = start = 0
    for end, (t, weight) in enumerate(pairs):
        inside += weight
        while t - pairs[start][0] >= width:
            inside -= pairs[start][1]
            start += 1
        most = max(most, inside)
    return most


def report(name: str, figures: dict) -> None:
    """Print the figures as a table and write bench/results/<name>.json."""
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
