"""A database that answers but refuses the worker: read-only, a missing grant, no outbox table. Each gets
one sentence naming the cause and its own exit code (the systemd units do not restart on them), and
nothing the worker prints carries a statement's parameters, the token or a traceback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from tests.conftest import TOKEN, _admin, create_database, drop_database, status_of
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


def test_a_read_only_database_exits_3_with_one_sentence(clean, db_url, role, sink, workers):
    _with_events(clean)
    with clean.begin() as conn:
        conn.execute(text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'))
        conn.execute(text(f'ALTER ROLE "{role}" SET default_transaction_read_only = on'))
    worker = workers(db_url.set(username=role), sink.url, "--startup-timeout", "5")
    assert worker.wait(30) == EXIT_READ_ONLY, worker.output()
    _clean_refusal(worker.output(), "the database is read-only")
    assert status_of(clean) == {"pending": 3} and sink.received() == []


def test_a_missing_grant_exits_4_with_one_sentence(clean, db_url, role, sink, workers):
    _with_events(clean)
    worker = workers(db_url.set(username=role), sink.url, "--startup-timeout", "5")
    assert worker.wait(30) == EXIT_NO_GRANT, worker.output()
    _clean_refusal(worker.output(), "lacks a grant the worker needs")
    assert "permission denied for table fp_outbox_events" in worker.output()
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
    """Whatever the error: here a trigger (an application's, say) that fails every claim."""
    _with_events(clean)
    with clean.begin() as conn:
        conn.execute(text("CREATE FUNCTION fpo_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                          "$$ BEGIN RAISE EXCEPTION 'audit trigger says no'; END $$"))
        conn.execute(text("CREATE TRIGGER fpo_refuse BEFORE UPDATE ON fp_outbox_events "
                          "FOR EACH ROW EXECUTE FUNCTION fpo_refuse()"))
    try:
        worker = workers(db_url, sink.url, "--startup-timeout", "5")
        assert worker.wait(30) == 1, worker.output()
        _clean_refusal(worker.output(), "audit trigger says no")
    finally:
        with clean.begin() as conn:
            conn.execute(text("DROP TRIGGER fpo_refuse ON fp_outbox_events"))
            conn.execute(text("DROP FUNCTION fpo_refuse()"))
    assert status_of(clean) == {"pending": 3}


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
