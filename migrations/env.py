"""Alembic environment for fp-outbox's own history, kept in its own version table."""

from __future__ import annotations


from alembic import context
from sqlalchemy import pool

from outbox.db import ConfigError, database_url, make_engine
from outbox.schema import VERSION_TABLE, compared_by_alembic, metadata

config = context.config
url = config.attributes.get("database_url")
if url is None:
    try:
        url = database_url()
    except ConfigError as exc:
        raise SystemExit(f"fp-outbox migrations: {exc}") from None

# Only the outbox's own tables are compared and touched, so an application's objects in the
# same database never show up in this history (and the application's history should likewise
# exclude the fp_outbox_* tables; see the README).
def _ours(obj, name, type_, reflected, compare_to) -> bool:
    return type_ != "table" or compared_by_alembic(name)


def run_migrations_offline() -> None:
    context.configure(
        url=url, target_metadata=metadata, version_table=VERSION_TABLE,
        literal_binds=True, include_object=_ours,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=metadata, version_table=VERSION_TABLE,
            include_object=_ours,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
