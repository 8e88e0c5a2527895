"""The Prometheus metrics: the reason vocabulary, a real scrape over HTTP, and the queue gauges read
from the database without scanning the delivered rows."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

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
    with clean.begin() as conn:
        conn.execute(text(
            "INSERT INTO fp_outbox_events (insert_id, event_name, payload, status, created_at, dead_at) VALUES"
            " ('a', 'E', '{}', 'pending', now() - interval '90 seconds', NULL),"
            " ('b', 'E', '{}', 'pending', now(), NULL),"
            " ('c', 'E', '{}', 'in_flight', now(), NULL),"
            " ('d', 'E', '{}', 'delivered', now(), NULL),"
            " ('e', 'E', '{}', 'dead', now(), now())"))
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


def test_queue_figures_come_from_partial_indexes_with_many_delivered_rows(clean):
    with clean.begin() as conn:
        conn.execute(text(
            "INSERT INTO fp_outbox_events (insert_id, event_name, payload, status, delivered_at)"
            " SELECT g::text, 'E', '{}'::jsonb, 'delivered', now() FROM generate_series(1, 50000) g"))
        conn.execute(text(
            "INSERT INTO fp_outbox_events (insert_id, event_name, payload, status, dead_at)"
            " SELECT 'x' || g, 'E', '{}'::jsonb, 'dead', now() FROM generate_series(1, 5) g"))
        conn.execute(text("ANALYZE fp_outbox_events"))
    with clean.connect() as conn:
        plan = "\n".join(conn.execute(text("EXPLAIN " + queries.QUEUE_DEPTH.text)).scalars())
    assert "fp_outbox_events_due_idx" in plan and "fp_outbox_events_dead_idx" in plan, plan
    assert "Seq Scan" not in plan, plan
