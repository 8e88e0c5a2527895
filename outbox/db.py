"""Database URLs and engines for the worker and the admin command, and the schema upgrade."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from outbox.schema import VERSION_TABLE

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
if not MIGRATIONS_DIR.is_dir():  # running from a checkout without an install: migrations/ at the top
    MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class ConfigError(Exception):
    """A setting that is missing or wrong; the message says which and what to do."""


def database_url(flag: str | None = None, environ: dict[str, str] | None = None) -> URL:
    """The database URL from the flag, else FP_OUTBOX_DATABASE_URL, else DATABASE_URL."""
    env = os.environ if environ is None else environ
    raw = flag or env.get("FP_OUTBOX_DATABASE_URL") or env.get("DATABASE_URL")
    if not raw:
        raise ConfigError(
            "no database URL: pass --database-url or set FP_OUTBOX_DATABASE_URL (or DATABASE_URL), "
            "e.g. postgresql://user@127.0.0.1:5432/app"
        )
    return normalise_url(raw)


def normalise_url(raw: str) -> URL:
    """Parse a SQLAlchemy URL; plain postgresql:// (or postgres://) means the psycopg 3 driver."""
    try:
        url = make_url(raw.replace("postgres://", "postgresql://", 1) if raw.startswith("postgres://") else raw)
    except ArgumentError:
        raise ConfigError(
            "the database URL is not a valid SQLAlchemy URL; expected postgresql://user@host:port/dbname"
        ) from None
    if url.get_backend_name() != "postgresql":
        raise ConfigError(
            f"fp-outbox needs PostgreSQL, but the database URL is for {url.get_backend_name()!r}; "
            "use a postgresql:// URL"
        )
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url


# Every connection of the worker and of the admin command. No server-side prepared statements
# (psycopg prepares a statement after 5 runs by default, and under PgBouncer's transaction pooling
# the next run lands on a server connection that never saw it) and no session state at all: no
# session-level SET, and no `options` startup parameter, which PgBouncer refuses. libpq's TCP
# settings (ignored on Unix sockets, fine through PgBouncer): keepalives find a dead peer behind an
# idle connection within 15 + 3 x 5 = 30 s, and tcp_user_timeout drops one whose sent data stays
# unacknowledged for 30 s, instead of the kernel's ~15 minutes of retransmissions. A call that hangs
# on a link that acknowledges and then drops everything is the worker's own deadline's to catch
# (worker.engine.timeouts).
CONNECT_ARGS = {
    "connect_timeout": 10, "application_name": "fp-outbox", "prepare_threshold": None,
    "keepalives": 1, "keepalives_idle": 15, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def make_engine(url: URL, **kwargs) -> Engine:
    """An engine that checks connections before use, so a restarted server costs one retry, not a crash;
    its connections work through PgBouncer in transaction pooling (CONNECT_ARGS)."""
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("hide_parameters", True)  # an error's text never carries a statement's values
    kwargs["connect_args"] = {**CONNECT_ARGS, **kwargs.get("connect_args", {})}
    return create_engine(url, **kwargs)


def alembic_config(url: URL):
    """Alembic configuration for the outbox's own history, from the installed package."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("version_table", VERSION_TABLE)
    config.attributes["database_url"] = url
    return config


def upgrade(url: URL, revision: str = "head") -> str | None:
    """Create or upgrade the outbox schema to `revision`; returns the revision the database is at after it
    (an upgrade to a revision the schema is already past changes nothing)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    command.upgrade(alembic_config(url), revision)
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            # From 0010 on: the previous storage's table goes at the first migrate after the workers emptied it.
            if conn.execute(text("SELECT to_regprocedure('fp_outbox_drop_legacy_if_empty()') IS NOT NULL")).scalar():
                conn.execute(text("SELECT fp_outbox_drop_legacy_if_empty()"))
            return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    finally:
        engine.dispose()
