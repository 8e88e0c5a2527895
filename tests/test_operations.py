"""The worker as a service: sd_notify datagrams, the Prometheus endpoint, retention (whole partitions, never a
DELETE on the events), structured logs."""

from __future__ import annotations

import json
import signal
import socket
import time

import requests
from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from tests.conftest import TOKEN, status_of, wait_until
from tests.storage import dead_letter

FAST = ["--connect-timeout", "0.5", "--read-timeout", "1", "--poll-interval", "0.2"]


def _enqueue(engine, count: int, name: str = "E") -> list[str]:
    with Session(engine) as session:
        ids = outbox.enqueue_many(session, [{"event": name, "properties": {"distinct_id": f"u{i}"}} for i in range(count)])
        session.commit()
    return ids


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ready_watchdog_and_stopping_reach_the_notify_socket(clean, db_url, sink, workers, tmp_path):
    path = str(tmp_path / "notify.sock")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # plays systemd's part
    manager.bind(path)
    manager.settimeout(10)
    worker = workers(db_url, sink.url, *FAST, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    messages = []

    def receive_until(wanted: str) -> None:
        deadline = time.monotonic() + 20
        while wanted not in messages and time.monotonic() < deadline:
            messages.append(manager.recv(4096).decode())

    receive_until("READY=1")
    receive_until("WATCHDOG=1")
    worker.signal(signal.SIGTERM)
    receive_until("STOPPING=1")
    assert worker.wait(30) == 0, worker.output()
    manager.close()
    assert messages.index("READY=1") < messages.index("STOPPING=1")
    assert messages.count("WATCHDOG=1") >= 1


def test_metrics_endpoint_counts_deliveries_and_dead_letters(clean, db_url, sink, workers):
    _enqueue(clean, 20)
    _enqueue(clean, 3, name="Rejected")
    sink.set_faults(reject_events={"Rejected": 400})
    port = _free_port()
    worker = workers(db_url, sink.url, *FAST, "--metrics-port", str(port))
    assert wait_until(lambda: status_of(clean) == {"delivered": 20, "dead": 3}, 30), worker.output()

    def scrape() -> str:
        try:
            return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except requests.ConnectionError:
            return ""

    assert wait_until(lambda: "fp_outbox_delivered_total 20.0" in scrape(), 20), scrape()
    body = scrape()
    assert 'fp_outbox_dead_total{reason="http_4xx"} 3.0' in body
    assert "fp_outbox_send_seconds_count 23.0" in body
    assert "fp_outbox_in_flight" in body and "fp_outbox_queue_depth" in body
    assert TOKEN not in body
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0


def test_worker_retires_delivered_events_past_retention(clean, db_url, sink, workers):
    _enqueue(clean, 30)
    dead_letter(clean, 900001, dead_ago="1 day")  # dead letters have a retention of their own (30 days by default)
    dead_letter(clean, 900002, dead_ago="40 days")
    worker = workers(db_url, sink.url, *FAST, "--retain-delivered", "2s")
    assert wait_until(lambda: status_of(clean).get("delivered") == 30, 30), worker.output()
    # The slot period follows the retention (10 s at least): the events' partition goes once its period is over
    # and it is not the current slot, all its events claimed and settled.
    assert wait_until(lambda: status_of(clean) == {"dead": 1}, 60), worker.output()
    assert "retention: slot period set" in worker.output()
    assert wait_until(lambda: "retention: slot truncated" in worker.output(), 10)  # logged once the run is over
    assert wait_until(lambda: "purged old rows" in worker.output(), 10)
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    with clean.connect() as conn:
        changed = conn.execute(text("SELECT coalesce(sum(n_tup_del + n_tup_upd), 0) FROM pg_stat_user_tables"
                                    " WHERE relname LIKE 'fp_outbox_events_s%'")).scalar_one()
    assert changed == 0  # delivered and retired without one UPDATE or DELETE of an event: by TRUNCATE
    with clean.begin() as conn:  # the period back to the default, for the tests after this one
        conn.execute(text("SELECT fp_outbox_set_slot_period(7 * 86400)"))


def test_json_logs_name_events_but_never_the_token_or_payload(clean, db_url, sink, workers):
    _enqueue(clean, 2, name="Rejected")
    sink.set_faults(reject_events={"Rejected": 400})
    worker = workers(db_url, sink.url, *FAST, "--drain", "--log-format", "json")
    assert worker.wait(30) == 0, worker.output()
    lines = [json.loads(line) for line in worker.output().splitlines() if line.strip()]
    dead = [line for line in lines if line["msg"] == "event dead"]
    assert len(dead) == 2 and all(isinstance(line["id"], int) and line["status"] == 400 for line in dead)
    assert TOKEN not in worker.output() and "distinct_id" not in worker.output()
