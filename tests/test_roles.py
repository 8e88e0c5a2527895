"""Least privilege: `enqueue` and a worker run under exactly the grants docs/operations.md gives (its SQL is
read from that page's 'Database roles'), and the application's role can add events but not read, change or
delete any."""

from __future__ import annotations

import re
import signal
import urllib.request
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

import outbox
from tests.conftest import REPO, _admin, free_port, status_of, url_string, wait_until
from worker.admin import main as admin_main


def _documented_grants() -> str:
    page = (REPO / "docs" / "operations.md").read_text()
    return re.search(r"<!-- roles-sql -->\n```sql\n(.*?)```", page, re.S).group(1)


@pytest.fixture(scope="module")
def roles(server_url, db_url, engine) -> Iterator[tuple[str, str]]:
    """The application's role and the worker's, unique on the cluster, granted what docs/operations.md says."""
    app, worker = (f"fpo_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("app", "worker"))
    admin = _admin(server_url)
    with admin.connect() as conn:
        for role in (app, worker):
            conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    grants = _documented_grants().replace("fp_outbox_worker", f'"{worker}"').replace(" TO app;", f' TO "{app}";')
    with engine.begin() as conn:  # as the tables' owner
        conn.exec_driver_sql(grants)
    yield app, worker
    with _admin(db_url).connect() as conn:
        for role in (app, worker):
            conn.execute(text(f'DROP OWNED BY "{role}"'))
    with admin.connect() as conn:
        for role in (app, worker):
            conn.execute(text(f'DROP ROLE "{role}"'))


def test_enqueue_and_a_worker_run_under_exactly_the_documented_grants(clean, db_url, roles, sink, workers):
    app, worker_role = roles
    app_engine = create_engine(db_url.set(username=app))
    committed = []
    try:
        for turn in range(6):
            with Session(app_engine) as session:
                ids = outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": str(turn)}}] * 2)
                session.commit() if turn % 3 else session.rollback()
            committed += ids if turn % 3 else []
        with psycopg.connect(url_string(db_url.set(username=app)).replace("+psycopg", "")) as conn:
            committed.append(outbox.enqueue(conn, {"event": "E", "properties": {"distinct_id": "p"}}))
            conn.commit()
            outbox.wake_workers(conn)
    finally:
        app_engine.dispose()
    sink.answer_next(429, retry_after="1")  # the 429 pauses everyone: the limiter's other statement
    port = free_port()
    proc = workers(db_url.set(username=worker_role), sink.url, "--poll-interval", "0.2", "--retain-delivered", "1s",
                   "--metrics-port", str(port), "--retry-base", "0.2")
    assert wait_until(lambda: {r.insert_id for r in sink.accepted()} >= set(committed), 30), proc.output()
    assert wait_until(lambda: status_of(clean) == {}, 30), proc.output()  # retention deleted them
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'fp_outbox_queue_depth{status="pending"}' in scrape  # the gauges were read from the database
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.output()
    assert "level=warning" not in proc.output().replace('msg="retry scheduled"', ""), proc.output()
    worker_url = url_string(db_url.set(username=worker_role))
    for command in (["status"], ["stuck"], ["dead"], ["requeue", "--stuck", "--yes"],
                    ["purge", "--dead-older-than", "30d", "--yes"]):
        assert admin_main([*command, "--database-url", worker_url]) == 0, command


@pytest.mark.parametrize("statement", [
    "SELECT payload FROM fp_outbox_events",
    "SELECT count(*) FROM fp_outbox_events",
    "UPDATE fp_outbox_events SET payload = '{}'",
    "DELETE FROM fp_outbox_events",
    "INSERT INTO fp_outbox_events (insert_id, event_name, payload, slot) VALUES ('x', 'E', '{}', 3)",
    "INSERT INTO fp_outbox_events (insert_id, event_name, payload, created_at) VALUES ('x', 'E', '{}', now())",
    "INSERT INTO fp_outbox_claims (kind, owner, lease_until, ids) VALUES ('fresh', 'x', now(), '{1}')",
    "INSERT INTO fp_outbox_retries (id, insert_id, event_name, payload, created_at) VALUES (1, 'x', 'E', '{}', now())",
    "SELECT * FROM fp_outbox_dead",
    "SELECT * FROM fp_outbox_event_states",
    "DELETE FROM fp_outbox_dead_letters",
    "TRUNCATE fp_outbox_events",
])
def test_the_applications_role_cannot_read_or_change_events(db_url, roles, statement):
    app, _ = roles
    app_engine = create_engine(db_url.set(username=app))
    try:
        with pytest.raises(ProgrammingError, match="permission denied"), app_engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        app_engine.dispose()


def test_migrate_needs_the_owner_and_says_which_grant_is_missing(db_url, roles, capsys):
    _, worker_role = roles
    assert admin_main(["migrate", "--database-url", url_string(db_url.set(username=worker_role))]) == 4
    err = capsys.readouterr().err
    assert "lacks a grant" in err and "Traceback" not in err
