"""The Prometheus metrics: the reason vocabulary, a real scrape over HTTP, and the queue gauges read
from the database without reading the delivered events."""

from __future__ import annotations

import signal
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from tests.storage import claim_fresh, dead_letter, delivered_in_bulk, enqueue, entries_read, settle_fresh
from worker.engine import queries
from worker.engine.metrics import REASONS, Metrics, reason_label
from worker.engine.policy import Dead, Retry, classify_exception, classify_response
from worker.engine.payload import MALFORMED, NO_TOKEN


@pytest.mark.parametrize("reason, status, label", [
    ("HTTP 400: bad price", 400, "http_4xx"),
    ("HTTP 408", 408, "http_4xx"),
    ("HTTP 429: slow down", 429, "http_429"),
    ("HTTP 503: busy", 503, "http_5xx"),
    ("HTTP 301: moved", 301, "http_3xx"),
    ("connect timeout: ConnectTimeout", None, "timeout"),
    ("read timeout: no answer in time", None, "timeout"),
    ("connection error: Connection refused", None, "connection"),
    ("gave up after 25 attempts: HTTP 503: busy", 503, "exhausted"),
    ("abandoned after 25 claims without a result (its workers died ...)", None, "abandoned"),
    (NO_TOKEN, None, "no_token"),
    (MALFORMED, None, "malformed"),
    ("worker error: KeyError: 'x'", None, "worker_error"),
    ("rate limiter unreachable: ...", None, "other"),
    ("", None, "other"),
    (None, None, "other"),
])
def test_reason_label(reason, status, label):
    assert reason_label(reason, status) == label


def test_every_outcome_the_policy_produces_has_a_known_label():
    import requests

    outcomes = [classify_response(s, {}, "body") for s in (301, 400, 404, 408, 429, 500, 503)]
    outcomes += [classify_exception(e) for e in (requests.ConnectTimeout("x"), requests.ReadTimeout("x"),
                                                 requests.ConnectionError("x"), ValueError("x"))]
    labels = {reason_label(o.reason, o.status) for o in outcomes if isinstance(o, Retry | Dead)}
    assert labels <= set(REASONS) and "other" not in labels


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.status == 200
        body = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def test_scrape_over_http(clean):
    delivered = enqueue(clean, insert_ids=["d"])
    settle_fresh(clean, claim_fresh(clean)[0], delivered=delivered)
    enqueue(clean, insert_ids=["c"])
    claim_fresh(clean)  # in flight
    enqueue(clean, insert_ids=["a"], created_ago="90 seconds")  # pending, past the position
    enqueue(clean, insert_ids=["b"])
    dead_letter(clean, 99, insert_id="e")
    m = Metrics()
    port = m.start_http_server(0, "127.0.0.1")
    try:
        m.delivered(3)
        m.retried("HTTP 503: busy", 503)
        m.retried("read timeout: no answer in time", count=2)
        m.dead("HTTP 400: bad", 400)
        m.observe_send(0.02)
        m.observe_send(3.0)
        m.waited_for_rate_limit(0.25)
        m.waited_for_rate_limit(0)
        m.set_in_flight(7)
        figures = m.refresh_queue(clean)
        got = _scrape(port)
    finally:
        m.stop_http_server()
    assert (figures["pending"], figures["in_flight"], figures["dead"]) == (2, 1, 1)
    assert got[("fp_outbox_delivered_total", ())] == 3
    assert got[("fp_outbox_retried_total", (("reason", "http_5xx"),))] == 1
    assert got[("fp_outbox_retried_total", (("reason", "timeout"),))] == 2
    assert got[("fp_outbox_retried_total", (("reason", "http_429"),))] == 0  # every reason present from the start
    assert got[("fp_outbox_dead_total", (("reason", "http_4xx"),))] == 1
    assert got[("fp_outbox_send_seconds_count", ())] == 2
    assert got[("fp_outbox_send_seconds_bucket", (("le", "0.025"),))] == 1
    assert got[("fp_outbox_rate_limit_wait_seconds_total", ())] == 0.25
    assert got[("fp_outbox_in_flight", ())] == 7
    assert {s: got[("fp_outbox_queue_depth", (("status", s),))] for s in ("pending", "in_flight", "dead")} == \
        {"pending": 2, "in_flight": 1, "dead": 1}
    assert 89 < got[("fp_outbox_oldest_pending_age_seconds", ())] < 120
    assert not any(name.startswith("python_") or name.startswith("process_") for name, _ in got)  # own registry


def test_oldest_age_is_zero_when_nothing_waits(clean):
    m = Metrics()
    assert m.refresh_queue(clean)["oldest_pending_age_s"] is None
    assert m.registry.get_sample_value("fp_outbox_oldest_pending_age_seconds") == 0.0


def test_two_instances_do_not_share_a_registry():
    first, second = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    first.delivered()
    assert second.registry.get_sample_value("fp_outbox_delivered_total") == 0


def test_queue_figures_read_what_waits_not_the_many_delivered_events(clean):
    """The gauges' statement every 15 s, and `status --watch` every second: it reads the events past the position,
    the open claims, the retries and the dead letters, never the delivered events (20,000 here)."""
    delivered_in_bulk(clean)
    enqueue(clean, 3)
    dead_letter(clean, 1, insert_id="x1")
    with clean.connect() as conn:
        [figures], read = entries_read(conn, queries.QUEUE_DEPTH)
    figures = figures._mapping
    assert (figures["pending"], figures["in_flight"], figures["dead"]) == (3, 0, 1)
    assert read < 100, read


def test_real_workers_report_latency_database_calls_states_the_limit_and_themselves(clean, db_url, sink, workers):
    from sqlalchemy.orm import Session

    import outbox
    from tests.conftest import free_port, wait_until
    from worker.engine import workers_connected

    with Session(clean) as session:
        outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": str(n)}} for n in range(20)])
        session.commit()
    ports = [free_port(), free_port()]
    procs = [workers(db_url, sink.url, "--metrics-port", str(port), "--rate-limit", "1234", "--poll-interval", "0.2")
             for port in ports]
    assert wait_until(lambda: len(sink.accepted()) >= 20, 30), procs[0].output()
    assert wait_until(lambda: workers_connected(clean) == 2, 10)
    with clean.connect() as conn:
        names = conn.execute(text("SELECT DISTINCT application_name FROM pg_stat_activity"
                                  " WHERE datname = current_database()")).scalars().all()
    assert sum(name.startswith("fp-outbox-worker ") for name in names) == 2, names
    claimed = lambda port: _scrape(port)[("fp_outbox_database_call_seconds_count", (("call", "claim"),))]  # noqa: E731
    assert wait_until(lambda: all(claimed(port) >= 1 for port in ports), 10)  # each worker's first claim, at least
    scrapes = [_scrape(port) for port in ports]
    latency_count = sum(got[("fp_outbox_delivery_latency_seconds_count", ())] for got in scrapes)
    latency_sum = sum(got[("fp_outbox_delivery_latency_seconds_sum", ())] for got in scrapes)
    assert latency_count == 20 and 0 < latency_sum / latency_count < 30
    for got in scrapes:
        assert got[("fp_outbox_database_call_seconds_count", (("call", "claim"),))] >= 1
        assert got[("fp_outbox_database_call_seconds_count", (("call", "gauges"),))] >= 1
        assert got[("fp_outbox_endpoint_up", ())] == 1
        assert got[("fp_outbox_database_read_only", ())] == 0
        assert got[("fp_outbox_rate_limit_per_second", ())] == 1234
        assert got[("fp_outbox_workers_connected", ())] >= 1
    assert sum(got[("fp_outbox_database_call_seconds_count", (("call", "settle"),))] for got in scrapes) >= 1
    for proc in procs:
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert wait_until(lambda: workers_connected(clean) == 0, 10)


def test_states_the_integrator_wires_are_settable():
    m = Metrics()
    assert m.registry.get_sample_value("fp_outbox_endpoint_up") == 1
    m.set_endpoint_up(False)
    m.set_database_read_only(True)
    assert m.registry.get_sample_value("fp_outbox_endpoint_up") == 0
    assert m.registry.get_sample_value("fp_outbox_database_read_only") == 1
    m.observe_database_call("no such kind", 0.01)
    assert m.registry.get_sample_value("fp_outbox_database_call_seconds_count", {"call": "other"}) == 1
