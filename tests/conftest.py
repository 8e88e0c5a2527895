"""Shared fixtures: a real PostgreSQL (FP_OUTBOX_TEST_DATABASE_URL, else an embedded server), a fresh
database per test module cloned from a migrated template, a real /track receiver, worker processes."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from outbox.db import make_engine, normalise_url, upgrade

TOKEN = "tok-3f9a1c0d-test-environment-id"
REPO = Path(__file__).resolve().parent.parent
_names = itertools.count()


@pytest.fixture(scope="session")
def server_url(tmp_path_factory) -> Iterator[URL]:
    """A URL on the server tests use, with rights to create databases."""
    given = os.environ.get("FP_OUTBOX_TEST_DATABASE_URL")
    if given:
        yield normalise_url(given)
        return
    import pgserver  # the embedded server: PostgreSQL binaries from a wheel, no system install

    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    yield normalise_url(server.get_uri())
    server.cleanup()


def _admin(server_url: URL) -> Engine:
    return create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)


@pytest.fixture(scope="session")
def template_db(server_url: URL) -> Iterator[str]:
    name = f"fpo_template_{os.getpid()}"
    admin = _admin(server_url)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    upgrade(server_url.set(database=name))
    yield name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def create_database(server_url: URL, template: str | None = None) -> URL:
    """A new, uniquely named database on the test server (from `template` when given)."""
    name = f"fpo_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = _admin(server_url)
    with admin.connect() as conn:
        clause = f' TEMPLATE "{template}"' if template else ""
        conn.execute(text(f'CREATE DATABASE "{name}"{clause}'))
    admin.dispose()
    return server_url.set(database=name)


def drop_database(server_url: URL, url: URL) -> None:
    admin = _admin(server_url)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def db_url(server_url: URL, template_db: str) -> Iterator[URL]:
    """A migrated database of this module's own."""
    url = create_database(server_url, template_db)
    yield url
    drop_database(server_url, url)


@pytest.fixture(scope="module")
def engine(db_url: URL) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def empty_outbox(engine: Engine) -> None:
    """No events, no claims, retries or dead letters; the shared rate schedule and the endpoint's state reset.
    A worker of an earlier test that was killed may still have a backend in the middle of a claim, holding some
    of the partitions' locks: it is ended first, or the truncate could deadlock with it."""
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                          " AND pid <> pg_backend_pid() AND application_name LIKE 'fp-outbox-worker%'"))
        conn.execute(text("TRUNCATE fp_outbox_events, fp_outbox_claims, fp_outbox_retries, fp_outbox_dead_letters"))
        if conn.execute(text("SELECT to_regclass('fp_outbox_events_legacy')")).scalar():
            conn.execute(text("TRUNCATE fp_outbox_events_legacy"))
        conn.execute(text("SELECT setval('fp_outbox_rate_limit_seq', 0)"))  # the shared rate schedule, reset
        conn.execute(text("UPDATE fp_outbox_endpoint SET down_since = NULL, probes = 0, next_probe_at = NULL,"
                          " probe_owner = NULL, probe_until = NULL, reason = NULL"))


@pytest.fixture
def clean(engine: Engine) -> Engine:
    """An empty outbox for this test."""
    empty_outbox(engine)
    return engine


@pytest.fixture
def sink() -> Iterator:
    """The receiver, its random faults (error_rate, reset_rate) drawn from a seeded generator."""
    from worker.devtools.sink import Sink

    with Sink(burst_limit=None, seed=20261204) as receiver:
        yield receiver


def url_string(url: URL) -> str:
    return url.render_as_string(hide_password=False)


class WorkerProcess:
    """A real `fp-outbox-worker` process; its output goes to a file so it can never block on a pipe."""

    def __init__(self, db_url: URL, endpoint: str, *args: str, log_dir: Path, token: str | None = TOKEN,
                 env: dict[str, str] | None = None, nice: int = 0) -> None:
        self.log_path = log_dir / f"worker-{next(_names)}.log"
        cmd = [sys.executable, "-m", "worker", "--database-url", url_string(db_url), "--endpoint", endpoint, *args]
        if token:
            cmd += ["--token", token]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FP_OUTBOX_")}
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.flush()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator:
    """A factory of worker processes; any still running at the end of the test are killed."""
    started: list[WorkerProcess] = []

    def start(db_url: URL, endpoint: str, *args: str, **kwargs) -> WorkerProcess:
        process = WorkerProcess(db_url, endpoint, *args, log_dir=tmp_path, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; every wait in the suite is bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def enqueue_events(engine: Engine, count: int) -> list[str]:
    """`count` events "E" (distinct ids u0, u1, ...) enqueued and committed in one transaction; their $insert_ids."""
    from sqlalchemy.orm import Session

    import outbox

    with Session(engine) as session:
        ids = outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": f"u{i}"}}
                                            for i in range(count)])
        session.commit()
    return ids


def status_of(engine: Engine) -> dict[str, int]:
    """How many events are in each state (the view fp_outbox_event_states: one row per event)."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT status, count(*) FROM fp_outbox_event_states GROUP BY status")).all()
    return {status: count for status, count in rows}
