"""A database that answers but refuses the worker: a missing grant, no outbox table. Each gets one sentence
naming the cause and its own exit code (the systemd units do not restart on them), and nothing the worker
prints carries a statement's parameters, the token or a traceback. A read-only database is a failover in
progress: the worker says so once and waits it out."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from tests.conftest import TOKEN, _admin, create_database, drop_database, status_of, wait_until
from worker.admin import main as admin_main

EXIT_READ_ONLY, EXIT_NO_GRANT, EXIT_NO_SCHEMA = 3, 4, 5


@pytest.fixture
def role(server_url, db_url) -> Iterator[str]:
    """A login role of this test's own on the test server (roles are cluster-wide: a unique name)."""
    name = f"fpo_role_{uuid.uuid4().hex[:10]}"
    admin = _admin(server_url)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{name}" LOGIN'))
    yield name
    with admin.connect() as conn:
        conn.execute(text(f'DROP OWNED BY "{name}"'))  # its grants, in the database where it has them
    with _admin(db_url).connect() as conn:
        conn.execute(text(f'DROP OWNED BY "{name}"'))
    with admin.connect() as conn:
        conn.execute(text(f'DROP ROLE "{name}"'))


def _with_events(engine, count: int = 3) -> None:
    with Session(engine) as session:
        outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": str(i)}} for i in range(count)])
        session.commit()


def _clean_refusal(output: str, sentence: str) -> None:
    assert sentence in output, output
    for leak in (TOKEN, "[parameters", "parameters:", "Traceback", "[SQL"):
        assert leak not in output, f"{leak!r} in the output:\n{output}"
    errors = [line for line in output.splitlines() if "level=error" in line]
    assert len(errors) == 1, output


def _terminate_sessions_of(engine, role: str) -> None:
    """End the role's open sessions, so its next connections take the role's new defaults."""
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :role"),
                     {"role": role})


def _lines(output: str, phrase: str) -> list[str]:
    return [line for line in output.splitlines() if phrase in line]


def test_a_database_made_read_only_and_back_is_waited_out_not_an_exit(clean, db_url, role, sink, workers):
    """A failover: the primary turns read-only (here the worker's role, as a demoted primary is for everyone)
    and later a primary answers again. The worker says so once, keeps reconnecting (new connections, so a
    moved DNS name would be followed), never exits, and delivers what waited once writes are accepted."""
    with clean.begin() as conn:
        conn.execute(text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'))
        conn.execute(text(f'GRANT SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO "{role}"'))
    worker = workers(db_url.set(username=role), sink.url, "--startup-timeout", "5", "--poll-interval", "0.2")
    _with_events(clean, 2)
    assert wait_until(lambda: status_of(clean) == {"delivered": 2}, 30), worker.output()
    with clean.begin() as conn:
        conn.execute(text(f'ALTER ROLE "{role}" SET default_transaction_read_only = on'))
    _terminate_sessions_of(clean, role)
    _with_events(clean, 3)
    assert wait_until(lambda: _lines(worker.output(), "the database is read-only"), 30), worker.output()
    time.sleep(3)  # several reconnections while read-only: still one line, still running, nothing sent
    assert worker.proc.poll() is None, worker.output()
    assert len(sink.accepted()) == 2 and status_of(clean) == {"delivered": 2, "pending": 3}
    with clean.begin() as conn:
        conn.execute(text(f'ALTER ROLE "{role}" RESET default_transaction_read_only'))
    assert sink.wait_for(lambda s: len(s.accepted()) == 5, 40), worker.output()
    output = worker.output()
    assert len(_lines(output, "the database is read-only")) == 1, output
    assert len(_lines(output, "the database accepts writes again")) == 1, output
    assert "level=error" not in output and TOKEN not in output and "Traceback" not in output, output


def test_an_idle_worker_sees_a_read_only_database_take_writes_again_without_waiting_for_an_event(
        clean, db_url, role, sink, workers):
    """The read-only line and gauge clear only when a write succeeds (a claim that finds nothing succeeds on a
    read-only database too). If the events that showed the read-only state went another way (here removed, as
    another worker on the new primary would have delivered them), the outbox idles: the idle worker's word that it
    waits (fp_outbox_listening) is a write, and its success says the database takes writes again."""
    with clean.begin() as conn:
        conn.execute(text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'))
        conn.execute(text(f'GRANT SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO "{role}"'))
    worker = workers(db_url.set(username=role), sink.url, "--startup-timeout", "5", "--poll-interval", "0.2")
    with clean.begin() as conn:
        conn.execute(text(f'ALTER ROLE "{role}" SET default_transaction_read_only = on'))
    _terminate_sessions_of(clean, role)
    _with_events(clean, 1)
    assert wait_until(lambda: _lines(worker.output(), "the database is read-only"), 30), worker.output()
    with clean.begin() as conn:
        conn.execute(text("TRUNCATE fp_outbox_events"))
        conn.execute(text(f'ALTER ROLE "{role}" RESET default_transaction_read_only'))
    _terminate_sessions_of(clean, role)
    assert wait_until(lambda: _lines(worker.output(), "the database accepts writes again"), 20), worker.output()
    assert len(sink.accepted()) == 0 and worker.proc.poll() is None, worker.output()


def test_the_admin_command_stops_on_a_read_only_database_with_exit_3(clean, db_url, role, capsys):
    from tests.conftest import url_string

    with clean.begin() as conn:
        conn.execute(text(f'GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA public TO "{role}"'))
        conn.execute(text(f'ALTER ROLE "{role}" SET default_transaction_read_only = on'))
        conn.execute(text("INSERT INTO fp_outbox_dead_letters (id, insert_id, event_name, payload, created_at, attempts)"
                          " VALUES (1, 'd1', 'E', '{}', now(), 1)"))
    url = url_string(db_url.set(username=role))
    assert admin_main(["status", "--json", "--database-url", url]) == 0  # reading is fine: it says so
    assert json.loads(capsys.readouterr().out)["database"] == "read-only"
    assert admin_main(["requeue", "--dead", "--yes", "--database-url", url]) == EXIT_READ_ONLY
    err = capsys.readouterr().err
    assert "the database is read-only" in err and "primary" in err and "Traceback" not in err, err


def test_a_missing_grant_exits_4_with_one_sentence(clean, db_url, role, sink, workers):
    _with_events(clean)
    worker = workers(db_url.set(username=role), sink.url, "--startup-timeout", "5")
    assert worker.wait(30) == EXIT_NO_GRANT, worker.output()
    _clean_refusal(worker.output(), "lacks a grant the worker needs")
    assert "permission denied for table fp_outbox_" in worker.output()
    assert status_of(clean) == {"pending": 3}


def test_a_database_without_the_table_exits_5_with_one_sentence(server_url, sink, workers):
    url = create_database(server_url)
    try:
        worker = workers(url, sink.url, "--startup-timeout", "5")
        assert worker.wait(30) == EXIT_NO_SCHEMA, worker.output()
        _clean_refusal(worker.output(), "run `fp-outbox migrate`")
    finally:
        drop_database(server_url, url)


def test_the_admin_command_names_the_same_refusals(clean, db_url, role, capsys):
    from tests.conftest import url_string

    assert admin_main(["status", "--database-url", url_string(db_url.set(username=role))]) == EXIT_NO_GRANT
    err = capsys.readouterr().err
    assert "lacks a grant" in err and "[parameters" not in err and "Traceback" not in err


def test_any_other_database_error_is_one_line_without_parameters(clean, db_url, sink, workers):
    """Whatever the error: here a trigger (an application's, say) that fails every claim. The worker keeps
    trying with a growing backoff (a restart would not help either), one line per failure, no parameters."""
    _with_events(clean)
    with clean.begin() as conn:
        conn.execute(text("CREATE FUNCTION fpo_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                          "$$ BEGIN RAISE EXCEPTION 'audit trigger says no'; END $$"))
        conn.execute(text("CREATE TRIGGER fpo_refuse BEFORE INSERT ON fp_outbox_claims "
                          "FOR EACH ROW EXECUTE FUNCTION fpo_refuse()"))
    try:
        worker = workers(db_url, sink.url, "--startup-timeout", "5")
        assert wait_until(lambda: _lines(worker.output(), "audit trigger says no"), 30), worker.output()
        time.sleep(2)  # claims keep failing meanwhile (backing off): still running
        assert worker.proc.poll() is None, worker.output()
        output = worker.output()
        for leak in (TOKEN, "[parameters", "parameters:", "Traceback", "[SQL", "UPDATE"):
            assert leak not in output, f"{leak!r} in the output:\n{output}"
    finally:
        with clean.begin() as conn:
            conn.execute(text("DROP TRIGGER fpo_refuse ON fp_outbox_claims"))
            conn.execute(text("DROP FUNCTION fpo_refuse()"))
    assert sink.wait_for(lambda s: len(s.accepted()) == 3, 60), worker.output()  # and it recovers by itself


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_an_exception_a_library_logs_is_one_line_without_its_statement(log_format, capsys, monkeypatch):
    """SQLAlchemy's pool logs a failed reset with its traceback; the worker's log keeps one line of it."""
    import logging

    from sqlalchemy.exc import OperationalError

    from worker.engine import logs

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # configure() replaces them: put them back
    monkeypatch.setattr(root, "level", root.level)
    logs.configure(log_format)
    try:
        raise OperationalError("UPDATE fp_outbox_events SET x = %(token)s", {"token": TOKEN}, Exception("gone"))
    except OperationalError:
        logging.getLogger("sqlalchemy.pool.impl.QueuePool").exception("Exception during reset or similar")
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "OperationalError" in err and "gone" in err
    assert TOKEN not in err and "Traceback" not in err and "UPDATE" not in err
