"""A PostgreSQL that fp-outbox starts and stops itself (the `pgserver` wheel), for development and the demo.

Never a silent fallback: it is used only with `--embedded` or by `fp-outbox demo`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import URL

from outbox.db import ConfigError, normalise_url, upgrade


def default_data_dir() -> Path:
    """Where `--embedded` keeps its data: FP_OUTBOX_EMBEDDED_DIR, else ~/.local/share/fp-outbox/pgdata."""
    configured = os.environ.get("FP_OUTBOX_EMBEDDED_DIR")
    return Path(configured) if configured else Path.home() / ".local" / "share" / "fp-outbox" / "pgdata"


@contextlib.contextmanager
def embedded_database(data_dir: Path | None = None, *, delete: bool = False, migrate: bool = True) -> Iterator[URL]:
    """Start (or join) the embedded server on `data_dir`, migrate it (unless not to), yield its URL, stop it after.

    Several processes may share one data folder; the server stops when the last of them leaves.
    With `delete`, the folder is removed too.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
            import pgserver
    except ImportError:
        raise ConfigError(
            "the embedded PostgreSQL needs the 'embedded' extra: pip install 'fp-outbox[embedded]'"
        ) from None
    folder = data_dir or default_data_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(folder, cleanup_mode="delete" if delete else "stop")
    try:
        url = normalise_url(server.get_uri())
        if migrate:
            upgrade(url)
        yield url
    finally:
        server.cleanup()


@contextlib.contextmanager
def database_flag(args, migrate: bool = True) -> Iterator[str | None]:
    """The --database-url to use: as given, or the embedded server's while it runs (with --embedded), migrated
    to head unless not to (`fp-outbox migrate` migrates it itself, to the revision asked)."""
    if not getattr(args, "embedded", False):
        yield args.database_url
        return
    if args.database_url:
        raise ConfigError("--embedded and --database-url exclude each other; pass one of them")
    with embedded_database(migrate=migrate) as url:
        yield url.render_as_string(hide_password=False)
