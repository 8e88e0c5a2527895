"""The Grafana dashboard (deploy/grafana/fp-outbox.json) on real parts: a real Prometheus scrapes a real worker
delivering to a real receiver, with every kind of outcome (delivered, retried on 503, dead on 400), and every
panel's query runs through Prometheus's HTTP API: each must parse and return data. The alert rules load into
the same Prometheus and evaluate without error."""

from __future__ import annotations

import json
import re

from sqlalchemy.orm import Session

import outbox
from tests.conftest import free_port, wait_until
from tests.prometheus import DASHBOARD, JOB, running

# What Grafana puts in place of the dashboard's variables before it sends a query.
VARIABLES = {"$__rate_interval": "15s", "$job": JOB}
# The panels, by title.
PANELS = ["Backlog", "Oldest pending age", "Delivered per second against the limit", "Outcomes by kind",
          "Dead letters", "Endpoint and database state", "Commit-to-delivery latency", "Database call latency (p99)",
          "Vacuum horizon age", "Workers up"]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL as Grafana sends it) for every target of every panel."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            found.append((panel["title"], expr))
    return found


def test_the_dashboard_is_a_plain_grafana_dashboard_on_a_prometheus_variable():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    titles = [panel["title"] for panel in board["panels"]]
    assert set(PANELS) <= set(titles), set(PANELS) - set(titles)
    assert len(set(panel["id"] for panel in board["panels"])) == len(titles)
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(target["datasource"]["uid"] == "${datasource}" for target in panel["targets"]), panel["title"]
        leftover = [v for _, expr in queries() for v in re.findall(r"\$\w+", expr)]
        assert not leftover, leftover


def test_every_panel_query_returns_data_from_a_real_worker(clean, db_url, sink, workers, tmp_path):
    sink.set_faults(reject_events={"Refused": 400, "Flaky": 503})
    with Session(clean) as session:
        outbox.enqueue_many(session, [{"event": name, "properties": {"distinct_id": str(n)}}
                                      for n in range(10) for name in ("Purchase", "Refused", "Flaky")])
        session.commit()
    port = free_port()
    proc = workers(db_url, sink.url, "--metrics-port", str(port), "--inline-attempts", "1", "--retry-base", "0.5",
                   "--retry-cap", "1", "--poll-interval", "0.2", "--rate-limit", "200")
    # Scraped every half second: the 21 samples every window needs (below) take 10 s, not 21.
    with running(tmp_path, [f"127.0.0.1:{port}"], scrape_interval="500ms") as prometheus:
        def scraped(expr: str) -> bool:
            return (prometheus.value(expr) or 0) > 0

        assert wait_until(lambda: scraped(f'sum(fp_outbox_retried_total{{job="{JOB}"}})'), 60), proc.output()
        sink.set_faults(reject_events={"Refused": 400})  # the endpoint recovers for Flaky: they are delivered
        assert wait_until(lambda: len(sink.accepted()) == 20, 60), proc.output()
        assert wait_until(lambda: prometheus.value(f'sum(fp_outbox_delivered_total{{job="{JOB}"}})') == 20, 30)
        assert scraped(f'sum(fp_outbox_dead_total{{job="{JOB}"}})')
        assert wait_until(lambda: scraped("count_over_time(up[1m]) > 20"), 30)  # enough samples for every window
        failures = []
        for title, expr in queries():
            answer = prometheus.query(expr)
            if answer.get("status") != "success":
                failures.append(f"{title}: {expr}: {answer.get('error')}")
            elif not answer["data"]["result"]:
                failures.append(f"{title}: {expr}: no data")
        assert not failures, "\n".join(failures)
        rules = prometheus.api("rules")["data"]["groups"][0]["rules"]
        assert len(rules) == 7 and all(rule["health"] == "ok" for rule in rules), rules
