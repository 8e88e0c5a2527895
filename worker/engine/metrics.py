"""The worker's Prometheus metrics, on a registry of its own, served over HTTP with prometheus-client.

Counters and the send histogram are this process's; the queue gauges are database-wide (every worker
reports the same figures, so aggregate them with max, not sum).
"""

from __future__ import annotations

import time
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server
from sqlalchemy import Engine

from worker.engine.figures import queue_depth
from worker.engine.queries import OLDEST_TRANSACTION, WORKERS_CONNECTED

#: The reason label's whole vocabulary, so a free-text error can never create a new time series.
REASONS = ("http_4xx", "http_5xx", "http_429", "http_3xx", "timeout", "connection", "exhausted", "no_token",
           "malformed", "worker_error", "abandoned", "other")

# Send latency in seconds: from a fast local receiver (ms) to the read timeout (10 s) and the
# in-process retries on top of it.
SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Commit to delivery: milliseconds when the worker is idle and woken at once, up to hours for an event that
# waited out an outage or its retries.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                   3600.0, 21600.0)
# One database call: a claim or settle takes about a millisecond; the worker's own deadline cuts one at 7 s.
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5)
#: The `call` label's vocabulary (worker.engine.calls names each statement with one of these).
CALLS = ("claim", "settle", "recover", "rate_limit", "drain_check", "gauges", "other")

def reason_label(reason: str | None, status: int | None = None) -> str:
    """Map an outcome's reason text and HTTP status to one of REASONS (pure; table-tested)."""
    text_ = (reason or "").lower()
    for prefix, label in (("gave up after", "exhausted"), ("abandoned", "abandoned"), ("no token", "no_token"),
                          ("malformed", "malformed"), ("worker error", "worker_error")):
        if text_.startswith(prefix):
            return label
    if status is not None:
        if status == 429:
            return "http_429"
        for low, label in ((500, "http_5xx"), (400, "http_4xx"), (300, "http_3xx")):
            if low <= status < low + 100:
                return label
    if "timeout" in text_:
        return "timeout"
    if text_.startswith("connection"):
        return "connection"
    return "other"


class Metrics:
    """Every metric the worker exposes; methods take plain values so the loop needs no Prometheus types."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.delivered_total = Counter("fp_outbox_delivered", "Events delivered (answered 2xx)", registry=r)
        self.retried_total = Counter("fp_outbox_retried", "Events scheduled for a later attempt, by reason",
                                     ["reason"], registry=r)
        self.dead_total = Counter("fp_outbox_dead", "Events that became dead, by reason", ["reason"], registry=r)
        self.send_seconds = Histogram("fp_outbox_send_seconds", "Time to send one event, in-process retries included",
                                      buckets=SEND_BUCKETS, registry=r)
        self.queue_depth = Gauge("fp_outbox_queue_depth", "Events in the database by status (all workers)",
                                 ["status"], registry=r)
        self.oldest_pending_age = Gauge("fp_outbox_oldest_pending_age_seconds",
                                        "Age of the oldest event not yet delivered or dead (0 when none)", registry=r)
        self.oldest_transaction_age = Gauge(
            "fp_outbox_oldest_transaction_age_seconds",
            "Age of the oldest open transaction holding this database's vacuum horizon back (0 when none)",
            registry=r)
        self.in_flight = Gauge("fp_outbox_in_flight", "Requests this worker has in flight now", registry=r)
        self.rate_limit_wait = Counter("fp_outbox_rate_limit_wait_seconds",
                                       "Seconds spent waiting for the shared rate limit", registry=r)
        self._add_health_metrics(r)
        for reason in REASONS:  # every series exists from the start, so rate() works from the first scrape
            self.retried_total.labels(reason)
            self.dead_total.labels(reason)
        for call in CALLS:
            self.database_call_seconds.labels(call)
        self._server: WSGIServer | None = None

    def _add_health_metrics(self, r: CollectorRegistry) -> None:
        """What the dashboard and the alert rules need beyond the counts: latencies, states, the limit, workers."""
        self.delivery_latency = Histogram(
            "fp_outbox_delivery_latency_seconds",
            "Commit to delivery: from the event's created_at to the settle that recorded its 2xx",
            buckets=LATENCY_BUCKETS, registry=r)
        self.database_call_seconds = Histogram("fp_outbox_database_call_seconds",
                                               "Time of one database call of this worker, by kind of call",
                                               ["call"], buckets=CALL_BUCKETS, registry=r)
        self.endpoint_up = Gauge("fp_outbox_endpoint_up", "1 while the endpoint answers, 0 during an outage",
                                 registry=r)
        self.database_read_only = Gauge("fp_outbox_database_read_only",
                                        "1 while the database is read-only (a failover in progress), else 0", registry=r)
        self.rate_limit = Gauge("fp_outbox_rate_limit_per_second",
                                "The configured --rate-limit: requests per second for all workers together", registry=r)
        self.workers_connected = Gauge("fp_outbox_workers_connected",
                                       "Worker processes connected to this database (pg_stat_activity, all hosts)",
                                       registry=r)
        self.endpoint_up.set(1)

    def delivered(self, count: int = 1) -> None:
        self.delivered_total.inc(count)

    def retried(self, reason: str | None, status: int | None = None, count: int = 1) -> None:
        self.retried_total.labels(reason_label(reason, status)).inc(count)

    def dead(self, reason: str | None, status: int | None = None, count: int = 1) -> None:
        self.dead_total.labels(reason_label(reason, status)).inc(count)

    def observe_send(self, seconds: float) -> None:
        self.send_seconds.observe(seconds)

    def waited_for_rate_limit(self, seconds: float) -> None:
        if seconds > 0:
            self.rate_limit_wait.inc(seconds)

    def set_in_flight(self, count: int) -> None:
        self.in_flight.set(count)

    def delivered_after(self, created_at: list[float | None]) -> None:
        """Observe commit-to-delivery for events delivered now, from their created_at (epoch seconds, the
        database's clock: keep the hosts' clocks in sync)."""
        now = time.time()
        for moment in created_at:
            if moment is not None:
                self.delivery_latency.observe(max(0.0, now - moment))

    def observe_database_call(self, call: str, seconds: float) -> None:
        self.database_call_seconds.labels(call if call in CALLS else "other").observe(seconds)

    def set_endpoint_up(self, up: bool) -> None:
        self.endpoint_up.set(1 if up else 0)

    def set_database_read_only(self, flag: bool) -> None:
        self.database_read_only.set(1 if flag else 0)

    def set_rate_limit(self, per_second: float) -> None:
        self.rate_limit.set(per_second)

    def refresh_queue(self, engine: Engine) -> dict[str, float | int | None]:
        """Read the queue figures from the database into the gauges (short statements); returns them."""
        started = time.perf_counter()
        with engine.connect() as conn:
            row = queue_depth(conn)
            holding = conn.execute(OLDEST_TRANSACTION).mappings().first()
            self.workers_connected.set(conn.execute(WORKERS_CONNECTED).scalar_one())
        self.observe_database_call("gauges", time.perf_counter() - started)
        for status in ("pending", "in_flight", "dead"):
            self.queue_depth.labels(status).set(row[status])
        self.oldest_pending_age.set(row["oldest_pending_age_s"] or 0.0)
        self.oldest_transaction_age.set(holding["oldest_transaction_age_s"] if holding else 0.0)
        return row

    def start_http_server(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics from a daemon thread; returns the port bound (useful with port 0)."""
        self._server, _thread = _start_http_server(port, addr, registry=self.registry)
        return self._server.server_port

    def stop_http_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
