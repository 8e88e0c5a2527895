"""A real PgBouncer for the tests, in transaction pooling mode in front of the test PostgreSQL.

Started as the `postgres` OS user when the tests run as root (PgBouncer refuses to run as root), on a free
port, with trust authentication and nothing else changed from PgBouncer's defaults that matters to a client:
no `max_prepared_statements`, no `ignore_startup_parameters`. Without the `pgbouncer` binary the tests that
need it skip, saying so; with FP_OUTBOX_REQUIRE_PGBOUNCER=1 (set by .ci/run) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import URL

from tests.conftest import free_port

REQUIRED = os.environ.get("FP_OUTBOX_REQUIRE_PGBOUNCER") == "1"


def binary() -> str | None:
    """The pgbouncer executable (Debian installs it in /usr/sbin, which a user's PATH may lack)."""
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer") if os.access(path, os.X_OK)), None)


def unavailable(reason: str) -> None:
    """Skip the test, or fail it where PgBouncer must be there (CI)."""
    if REQUIRED:
        pytest.fail(f"{reason}, and FP_OUTBOX_REQUIRE_PGBOUNCER=1 says it must run here", pytrace=False)
    pytest.skip(reason)


def _server_address(server_url: URL) -> tuple[str, int]:
    host = server_url.host or server_url.query.get("host") or "/var/run/postgresql"
    return (host if isinstance(host, str) else host[0]), server_url.port or 5432


def _config(folder: Path, server_url: URL, port: int) -> Path:
    host, server_port = _server_address(server_url)
    users = {server_url.username or "postgres"}
    (folder / "users.txt").write_text("".join(f'"{user}" ""\n' for user in sorted(users)))
    ini = folder / "pgbouncer.ini"
    ini.write_text(f"""[databases]
* = host={host} port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/users.txt
pool_mode = transaction
; several worker processes and an application at once, each with a small pool of its own
max_client_conn = 1000
logfile = {folder}/pgbouncer.log
pidfile = {folder}/pgbouncer.pid
""")
    return ini


def _as_postgres(folder: Path) -> list[str]:
    """runuser into `postgres` when we are root; the folder becomes theirs so PgBouncer can write its log."""
    if os.geteuid() != 0:
        return []
    shutil.chown(folder, "postgres")
    for path in folder.iterdir():
        shutil.chown(path, "postgres")
    return ["runuser", "-u", "postgres", "--"]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@contextmanager
def running(server_url: URL) -> Iterator[URL]:
    """Start PgBouncer in front of the server at `server_url`; yields that URL pointed at PgBouncer."""
    executable = binary()
    if executable is None:
        unavailable("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    folder = Path(tempfile.mkdtemp(prefix="fpo-pgbouncer-"))
    folder.chmod(0o755)
    port = free_port()
    ini = _config(folder, server_url, port)
    proc = subprocess.Popen([*_as_postgres(folder), executable, str(ini)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        if not _wait_for_port(port, proc, 10):
            log = (folder / "pgbouncer.log")
            unavailable(f"pgbouncer did not start: {log.read_text()[-500:] if log.exists() else 'no log'}")
        bounced = server_url.set(host="127.0.0.1", port=port, query={})
        _check_reaches_server(bounced)
        yield bounced
    finally:
        _stop(proc, folder)
        shutil.rmtree(folder, ignore_errors=True)


def _check_reaches_server(url: URL) -> None:
    """PgBouncer runs as `postgres`, which cannot reach a server listening only on a socket in a folder
    private to another user (the embedded server the suite starts when FP_OUTBOX_TEST_DATABASE_URL is unset)."""
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(dsn, connect_timeout=5, prepare_threshold=None) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        unavailable(f"PgBouncer cannot reach the test server ({str(exc).strip().splitlines()[-1]}); "
                    "point FP_OUTBOX_TEST_DATABASE_URL at a PostgreSQL on TCP")


def _stop(proc: subprocess.Popen, folder: Path) -> None:
    pidfile = folder / "pgbouncer.pid"
    if pidfile.exists():  # runuser does not pass signals on to PgBouncer: signal PgBouncer itself
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGINT)
        except (ValueError, ProcessLookupError):
            pass
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)

