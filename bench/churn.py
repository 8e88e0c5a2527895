"""python -m bench churn: whether the outbox keeps its shape while it delivers with retention on (issue 20).

For --churn-seconds (default 1,800) a feeder enqueues --churn-rate events a second (0, the default: as fast as the
worker delivers, keeping at most BACKLOG waiting) while one worker process, with --retain-delivered --churn-retain
(default 5m) and no rate limit to speak of, delivers them to the fast receiver (worker.devtools.fast_receiver, a
process of its own answering 200 at once: the Sink answers about 2,000 requests a second and keeps every request,
so it would be the limit and grow for 30 minutes). Retention truncates the slots' partitions and purges the claims
log all the while. Sampled every SAMPLE_EVERY seconds (fewer for a short run, so it still has 30 samples): the size
of every outbox table with its indexes (the events' partitions summed), the dead tuples of the events' partitions
and of the claims log and retries (pg_stat_user_tables), and the worker's own /metrics: its delivered count and the
histogram of its claims' times (fp_outbox_database_call_seconds{call="claim"}).

Windows are fractions of the run, so a short run prints every figure (for 30 minutes: minutes 10-20 against the
last 10, and 5-minute buckets): the largest size in the last third against the middle third (a plateau: at most
1.1), the events' most dead tuples (insert-only: near zero), the claim's p99 in each sixth of the run (flat: the
last like the first), and the events delivered per second.
"""

from __future__ import annotations

import itertools
import math
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from bench.common import empty_outbox, event
from worker.devtools.fast_receiver import ReceiverProcess

BACKLOG = 2000  # --churn-rate 0: the feeder keeps at most this many events waiting for the worker
FEED_BATCH = 1000  # events per enqueue transaction, at most
SAMPLE_EVERY = 10.0  # seconds between samples, for a run of 300 s or more
BUCKETS = 6  # the claim's p99 per sixth of the run: 5 minutes of 30
SIZES = text(r"""
    SELECT (SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class AS c
             WHERE c.relkind = 'r' AND c.relname LIKE 'fp\_outbox\_%'
               AND c.relnamespace = CAST(current_schema() AS regnamespace)) AS bytes,
           coalesce(sum(n_dead_tup) FILTER (WHERE relname LIKE 'fp\_outbox\_events\_s%'), 0) AS events_dead,
           coalesce(sum(n_dead_tup) FILTER (WHERE relname IN ('fp_outbox_claims', 'fp_outbox_retries')), 0)
             AS log_dead
      FROM pg_stat_user_tables WHERE schemaname = current_schema()""")


@dataclass(frozen=True)
class Scraped:
    """What the worker's /metrics says: events delivered, and its claims' histogram (bound -> claims at most)."""

    delivered: float
    claim: dict[float, float]


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the feeding began
    bytes: int
    events_dead: int
    log_dead: int  # the claims log's and the retries'
    worker: Scraped


def bench_churn(engine, url: str, args) -> dict:
    """Size, dead tuples and the claim's p99 over a long delivery with retention on; see the module's docstring."""
    seconds, every = args.churn_seconds, min(SAMPLE_EVERY, args.churn_seconds / 30)
    empty_outbox(engine)
    with engine.connect() as conn:
        autovacuum = conn.execute(text("SHOW autovacuum")).scalar()
    if autovacuum != "on":
        print("  autovacuum is off on this server: the claims log and the retries (updated by every settle) are"
              " never vacuumed here; the events need no vacuum either way", flush=True)
    port = _free_port()
    metrics = f"http://127.0.0.1:{port}/metrics"
    with ReceiverProcess() as receiver:
        worker = subprocess.Popen(_worker_command(url, receiver.url, args.churn_retain, port),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for(metrics, 60)
            samples = _run(engine, receiver, metrics, args.churn_rate, seconds, every)
        finally:
            worker.terminate()
            worker.wait(40)
    return {"seconds": seconds, "enqueued_per_s": args.churn_rate or "as fast as delivered",
            "retain_delivered": args.churn_retain, "server_autovacuum": autovacuum, "sample_every_s": every,
            **_figures(samples, seconds)}


def _worker_command(url: str, endpoint: str, retain: str, port: int) -> list[str]:
    return [sys.executable, "-m", "worker", "--database-url", url, "--endpoint", endpoint, "--token", "bench-token",
            "--rate-limit", "1000000", "--retain-delivered", retain, "--retain-dead", "off",
            "--metrics-port", str(port)]


def _run(engine, receiver: ReceiverProcess, metrics: str, rate: float, seconds: float, every: float) -> list[Sample]:
    """Feed for `seconds` while sampling every `every` seconds; the samples, the first at the start."""
    stop = threading.Event()
    feeder = threading.Thread(target=_feed, args=(engine, rate, metrics, stop), daemon=True)
    started = time.monotonic()
    samples = [_sample(engine, metrics, 0.0)]
    feeder.start()
    try:
        for n in range(1, math.floor(seconds / every + 1e-9) + 1):
            time.sleep(max(0.0, started + n * every - time.monotonic()))
            samples.append(_sample(engine, metrics, time.monotonic() - started))
            receiver.reset()  # the worker counts what was delivered: the receiver's own sets need not grow
            _progress(samples)
    finally:
        stop.set()
        feeder.join(30)
    return samples


def _feed(engine, rate: float, metrics: str, stop: threading.Event) -> None:
    """Enqueue until `stop`: `rate` events a second, or (rate 0) whenever fewer than BACKLOG wait."""
    batch = FEED_BATCH if rate <= 0 else max(1, min(FEED_BATCH, round(rate / 10)))  # ten commits a second at least
    produced, started = 0, time.monotonic()
    while not stop.is_set():
        if rate > 0:
            room = rate * (time.monotonic() - started) - produced
        else:
            room = BACKLOG - (produced - _scrape(metrics).delivered)
        if room < batch:
            stop.wait(0.05)
            continue
        with Session(engine) as session:
            outbox.enqueue_many(session, [event(produced + i) for i in range(batch)])
            session.commit()
        produced += batch


def _sample(engine, metrics: str, at: float) -> Sample:
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        row = conn.execute(SIZES).one()
    return Sample(at, int(row.bytes), int(row.events_dead), int(row.log_dead), _scrape(metrics))


def _scrape(metrics: str) -> Scraped:
    with urllib.request.urlopen(metrics, timeout=10) as answer:
        body = answer.read().decode()
    delivered, claim = 0.0, {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "fp_outbox_delivered_total":
                delivered += sample.value
            elif sample.name == "fp_outbox_database_call_seconds_bucket" and sample.labels.get("call") == "claim":
                claim[float(sample.labels["le"])] = sample.value
    return Scraped(delivered, claim)


def _figures(samples: list[Sample], seconds: float) -> dict:
    """The plateau (last third against middle third), the dead tuples, the claim's p99 per sixth, the rate."""
    middle = max(s.bytes for s in samples if seconds / 3 <= s.at < 2 * seconds / 3)
    last = max(s.bytes for s in samples if s.at >= 2 * seconds / 3)
    p99s = _p99s(samples, seconds / BUCKETS)
    first, end = samples[0], samples[-1]
    return {
        "delivered_events_per_s": round((end.worker.delivered - first.worker.delivered) / (end.at - first.at)),
        "size_mb_max_middle_third": _mb(middle), "size_mb_max_last_third": _mb(last),
        "size_last_vs_middle_third": round(last / middle, 3),
        "events_dead_tuples_max": max(s.events_dead for s in samples),
        "claims_retries_dead_tuples_max": max(s.log_dead for s in samples),
        "claims_retries_dead_tuples_at_end": end.log_dead,
        "claim_p99_ms_per_sixth": p99s,
        "claim_p99_last_vs_first_sixth": round(p99s[-1] / p99s[0], 3) if p99s[0] and p99s[-1] else None,
    }


def _p99s(samples: list[Sample], width: float) -> list[float | None]:
    """The claim's p99 (ms) between the samples nearest each bucket's edges."""
    edges = [min(samples, key=lambda s, k=k: abs(s.at - k * width)) for k in range(BUCKETS + 1)]
    return [_p99_ms(a.worker.claim, b.worker.claim) for a, b in itertools.pairwise(edges)]


def _p99_ms(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The 99th percentile of the claims between two scrapes, interpolated in its bucket as Prometheus's
    histogram_quantile does (the histogram's buckets are all the worker exports)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = 0.99 * counts[-1]
    lower = below = 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if math.isinf(bound):
                return round(lower * 1e3, 3)  # past the last finite bound: that bound, as Prometheus answers
            return round((lower + (bound - lower) * (rank - below) / (count - below)) * 1e3, 3)
        lower, below = bound, count
    return None


def _progress(samples: list[Sample]) -> None:
    s = samples[-1]
    rate = (s.worker.delivered - samples[-2].worker.delivered) / (s.at - samples[-2].at)
    print(f"  {s.at:6.0f} s: {_mb(s.bytes)} MB, dead tuples {s.events_dead} (events),"
          f" {s.log_dead} (claims, retries), {rate:.0f} delivered/s", flush=True)


def _wait_for(metrics: str, timeout: float) -> None:
    """Until the worker serves /metrics (it has started), or SystemExit after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _scrape(metrics)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"the worker did not serve {metrics} within {timeout:.0f} s") from None
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _mb(size: int) -> float:
    return round(size / 2**20, 1)
