"""Upgrades that never stop the application. The previous release, installed from this repository's own history,
runs an application (enqueueing and committing all the time) and a worker while this release's `fp-outbox migrate`
moves its table to the new storage; then this release's workers take over. Nothing is lost, no commit waits
more than a few seconds, and the old worker keeps working or stops cleanly (exit 5, one sentence). And a worker
that meets a schema newer than it understands keeps working if the schema says it may, or stops with exit 5."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from sqlalchemy import text

from outbox.db import make_engine, upgrade
from outbox.schema import SCHEMA_REVISION
from tests.conftest import (
    TOKEN,
    create_database,
    drop_database,
    enqueue_events,
    status_of,
    url_string,
    wait_until,
)

# The releases before this one: each its tag, else the commit it was cut from (tags do not always reach a clone).
# 0.1.0 had the previous storage (0001-0003), 0.2.0 the insert-only one (0007), 0.3.0 its slot default (0008), 0.4.0
# the slot in one call and the idle flag (0009), 0.5.0 the legacy table dropped once empty (0010).
RELEASE_0_1 = ("v0.1.0", "af1df3d")
RELEASE_0_5 = ("v0.5.0", "4e3f849")
REPO = Path(__file__).resolve().parent.parent
MAX_COMMIT_WAIT = 3.0  # seconds: "no commit of the application waits more than a few seconds"


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result


def _previous_release(tmp: Path, release: tuple[str, str] = RELEASE_0_1) -> Path:
    """A previous release's source, from git, built into a wheel and installed into a fresh virtual
    environment whose dependencies are this test run's; returns that environment's python."""
    ref = next((r for r in release
                if subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "-q", f"{r}^{{commit}}"],
                                  capture_output=True).returncode == 0), None)
    if ref is None:
        pytest.fail(f"the release {' or '.join(release)} is not in this clone's history; "
                    "clone with history (not --depth 1)")
    source = tmp / "previous"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
          str(source)])
    [wheel] = (tmp / "dist").glob("fp_outbox-*.whl")
    venv = tmp / "previous-venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)])
    site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
                .stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv / "bin" / "python"


# The previous release's application: enqueue in a business transaction, commit, again, until told to stop;
# each committed insert_id and how long its commit took (enqueue and commit) go to a file, a line each.
APPLICATION = """
import json, sys, time
from pathlib import Path
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
import outbox
url, out, stop = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
engine = create_engine(url)
with out.open("a") as log:
    n = 0
    while not stop.exists():
        started = time.monotonic()
        with Session(engine) as session:
            insert_id = outbox.enqueue(session, {"event": "Order", "properties": {"distinct_id": f"u{n}"}})
            session.commit()
        log.write(json.dumps([insert_id, time.monotonic() - started]) + "\\n")
        log.flush()
        n += 1
        time.sleep(0.02)
"""


class Process:
    def __init__(self, cmd: list[str], log: Path, env: dict | None = None) -> None:
        self.log = log
        self._file = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._file, stderr=subprocess.STDOUT, cwd=log.parent, env=env)

    def output(self) -> str:
        self._file.flush()
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._file.close()


def _worker(python: Path, url, endpoint: str, log: Path, *flags: str) -> Process:
    return Process([str(python), "-m", "worker", "--database-url", url_string(url), "--endpoint", endpoint,
                    "--token", TOKEN, "--poll-interval", "0.2", *flags], log)


def test_the_previous_release_keeps_enqueueing_through_migrate_and_nothing_is_lost(tmp_path, server_url, sink):
    old_python = _previous_release(tmp_path)
    url = create_database(server_url)
    processes: list[Process] = []
    try:
        _run([str(old_python.parent / "fp-outbox"), "migrate", "--database-url", url_string(url)], cwd=tmp_path)
        committed, stop = tmp_path / "committed.jsonl", tmp_path / "stop"
        app = Process([str(old_python), "-c", APPLICATION, url_string(url), str(committed), str(stop)],
                      tmp_path / "app.log")
        sink.set_faults(latency=0.1)  # the old worker keeps up with half of it: a backlog, and events in flight
        # A short lease (from the send budget): the rows it holds when it stops are moved once their lease is out.
        old_worker = _worker(old_python, url, sink.url, tmp_path / "old-worker.log", "--concurrency", "2",
                             "--read-timeout", "2", "--inline-attempts", "1")
        processes += [app, old_worker]
        assert sink.wait_for(lambda s: len(s.accepted()) >= 50, 60), (app.output(), old_worker.output())
        upgrade(url)  # this release's migrate, while both run
        with make_engine(url).connect() as conn:  # what it left in the old table: the new workers must move it
            left = conn.execute(text("SELECT count(*) FROM fp_outbox_events_legacy WHERE status <> 'delivered'"))
            assert left.scalar() > 10
        sink.set_faults(latency=0.0)
        migrated = _count(committed)
        new_workers = [_worker(Path(sys.executable), url, sink.url, tmp_path / f"new-worker-{n}.log")
                       for n in range(2)]
        processes += new_workers
        assert wait_until(lambda: _count(committed) >= migrated + 100, 60), app.output()  # still enqueueing
        stop.touch()
        assert app.proc.wait(30) == 0, app.output()
        ids, waits = _read(committed)
        assert sink.wait_for(lambda s: set(ids) <= {r.insert_id for r in s.accepted()}, 120), \
            (len(set(ids) - {r.insert_id for r in sink.accepted()}), new_workers[0].output())
        assert max(waits) < MAX_COMMIT_WAIT, max(waits)
        _stopped_cleanly_or_running(old_worker)
        engine = make_engine(url)
        with engine.connect() as conn:  # rows the old worker held when it stopped are moved once their lease is out
            lease_left = conn.execute(text("SELECT coalesce(extract(epoch FROM max(lease_until) - now()), 0)"
                                           " FROM fp_outbox_events_legacy WHERE status = 'in_flight'")).scalar()
        assert wait_until(lambda: set(status_of(engine)) <= {"delivered"}, max(float(lease_left), 0.0) + 20), \
            (status_of(engine), new_workers[0].output())
        engine.dispose()
    finally:
        for process in processes:
            process.close()
        drop_database(server_url, url)


def test_the_last_release_keeps_enqueueing_and_delivering_through_this_migrate(tmp_path, server_url, sink):
    """The last release, 0.5.0 (schema 0010), to this one: its application and its worker (retention on, which sets
    the slot period through the database's own function; idle, it says so and waits for wake-ups) keep running
    through `migrate` and after it, beside this release's workers; nothing lost, no commit waits more than a few
    seconds, the old worker never stops."""
    old_python = _previous_release(tmp_path, RELEASE_0_5)
    url = create_database(server_url)
    processes: list[Process] = []
    try:
        _run([str(old_python.parent / "fp-outbox"), "migrate", "--database-url", url_string(url)], cwd=tmp_path)
        committed, stop = tmp_path / "committed.jsonl", tmp_path / "stop"
        app = Process([str(old_python), "-c", APPLICATION, url_string(url), str(committed), str(stop)],
                      tmp_path / "app.log")
        old_worker = _worker(old_python, url, sink.url, tmp_path / "old-worker.log", "--retain-delivered", "1h")
        processes += [app, old_worker]
        assert sink.wait_for(lambda s: len(s.accepted()) >= 20, 60), (app.output(), old_worker.output())
        assert upgrade(url) == SCHEMA_REVISION  # this release's migrate, while both run
        migrated = _count(committed)
        assert wait_until(lambda: _count(committed) >= migrated + 50, 60), app.output()  # still enqueueing
        after = _read(committed)[0][migrated:]
        assert sink.wait_for(lambda s: set(after) <= {r.insert_id for r in s.accepted()}, 60), old_worker.output()
        assert old_worker.proc.poll() is None, old_worker.output()  # the old worker delivered them: still running
        new_worker = _worker(Path(sys.executable), url, sink.url, tmp_path / "new-worker.log", "--retain-delivered",
                             "1h")
        processes.append(new_worker)
        assert wait_until(lambda: _count(committed) >= migrated + 100, 60), app.output()
        stop.touch()
        assert app.proc.wait(30) == 0, app.output()
        ids, waits = _read(committed)
        assert sink.wait_for(lambda s: set(ids) <= {r.insert_id for r in s.accepted()}, 60), \
            (len(set(ids) - {r.insert_id for r in sink.accepted()}), new_worker.output())
        assert max(waits) < MAX_COMMIT_WAIT, max(waits)
        assert old_worker.proc.poll() is None, old_worker.output()
        assert "Traceback" not in old_worker.output() + new_worker.output()
    finally:
        for process in processes:
            process.close()
        drop_database(server_url, url)


def _count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _read(path: Path) -> tuple[list[str], list[float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [row[0] for row in rows], [row[1] for row in rows]


def _stopped_cleanly_or_running(worker: Process) -> None:
    """The previous release's worker either still delivers, or exited 5 with one sentence and no traceback."""
    code = worker.proc.poll()
    if code is None:
        return
    output = worker.output()
    assert code == 5, output
    assert "Traceback" not in output and TOKEN not in output and "[parameters" not in output, output
    assert len([line for line in output.splitlines() if "level=error" in line]) == 1, output


def _with_schema(engine, revision: str, oldest_worker_revision: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE fp_outbox_alembic_version SET version_num = :r"), {"r": revision})
        conn.execute(text("UPDATE fp_outbox_schema_compat SET revision = :r, oldest_worker_revision = :o"),
                     {"r": revision, "o": oldest_worker_revision})


@pytest.fixture
def schema_restored(clean):
    """The module's database, its schema marked as another revision by the test, marked back afterwards."""
    with clean.connect() as conn:
        revision, oldest = conn.execute(text("SELECT revision, oldest_worker_revision FROM fp_outbox_schema_compat")).one()
    yield clean
    _with_schema(clean, revision, oldest)


def test_a_newer_schema_that_stays_compatible_keeps_the_worker_delivering(schema_restored, db_url, sink, workers):
    _with_schema(schema_restored, "0099", SCHEMA_REVISION)
    ids = enqueue_events(schema_restored, 5)
    worker = workers(db_url, sink.url, "--poll-interval", "0.2")
    assert sink.wait_for(lambda s: set(ids) <= {r.insert_id for r in s.accepted()}, 30), worker.output()
    assert "newer than this worker knows, and stays compatible" in worker.output()


def test_a_newer_schema_that_no_longer_works_with_the_worker_stops_it_with_exit_5(schema_restored, db_url, sink,
                                                                                     workers):
    _with_schema(schema_restored, "0099", "0099")
    worker = workers(db_url, sink.url)
    assert worker.wait(30) == 5, worker.output()
    output = worker.output()
    assert f"newer than this worker understands ({SCHEMA_REVISION})" in output and "upgrade fp-outbox" in output
    assert "Traceback" not in output and len([line for line in output.splitlines() if "level=error" in line]) == 1


def test_an_older_schema_asks_for_migrate_with_exit_5(server_url, sink, workers):
    url = create_database(server_url)
    try:
        upgrade(url, "0006")
        worker = workers(url, sink.url)
        assert worker.wait(30) == 5, worker.output()
        assert "run `fp-outbox migrate`" in worker.output() and "Traceback" not in worker.output()
    finally:
        drop_database(server_url, url)
