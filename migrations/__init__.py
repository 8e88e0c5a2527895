"""fp-outbox's Alembic history, installed as the package `outbox.migrations`."""
