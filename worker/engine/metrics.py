"""The worker's Prometheus metrics, on a registry of its own, served over HTTP with prometheus-client.

Counters and the send histogram are this process's; the queue gauges are database-wide (every worker
reports the same figures, so aggregate them with max, not sum).
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server
from sqlalchemy import Engine

from worker.engine.queries import OLDEST_TRANSACTION, QUEUE_DEPTH

#: The reason label's whole vocabulary, so a free-text error can never create a new time series.
REASONS = ("http_4xx", "http_5xx", "http_429", "http_3xx", "timeout", "connection", "exhausted", "no_token",
           "malformed", "worker_error", "abandoned", "other")

# Send latency in seconds: from a fast local receiver (ms) to the read timeout (10 s) and the
# in-process retries on top of it.
SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

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
        self.endpoint_up = Gauge("fp_outbox_endpoint_up",
                                 "1 while the endpoint answers, 0 during an outage (shared by every worker)", registry=r)
        self.endpoint_up.set(1)
        self.database_read_only = Gauge("fp_outbox_database_read_only",
                                        "1 while the database refuses writes (a failover in progress)", registry=r)
        for reason in REASONS:  # every series exists from the start, so rate() works from the first scrape
            self.retried_total.labels(reason)
            self.dead_total.labels(reason)
        self._server: WSGIServer | None = None

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

    def set_endpoint_up(self, up: bool) -> None:
        self.endpoint_up.set(1 if up else 0)

    def set_database_read_only(self, read_only: bool) -> None:
        self.database_read_only.set(1 if read_only else 0)

    def set_in_flight(self, count: int) -> None:
        self.in_flight.set(count)

    def refresh_queue(self, engine: Engine) -> dict[str, float | int | None]:
        """Read the queue figures from the database into the gauges (one short statement); returns them."""
        with engine.connect() as conn:
            row = dict(conn.execute(QUEUE_DEPTH).mappings().one())
            holding = conn.execute(OLDEST_TRANSACTION).mappings().first()
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
