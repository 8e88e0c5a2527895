"""`fp-outbox`: the admin command (migrate, status; stuck, dead, requeue, purge and systemd-unit from
worker.admin.commands) and the development tools (sink, demo)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from outbox.db import ConfigError, database_url, upgrade
from worker.admin import commands as ops
from worker.engine import queries
from worker.devtools.embedded import database_flag


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"fp-outbox {args.command}: {exc}", file=sys.stderr)
        return 2
    except ops.CommandError as exc:
        print(f"fp-outbox {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp-outbox", description="Administer an fp-outbox database.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="create or upgrade the outbox schema")
    _database_flag(migrate)
    migrate.add_argument("--revision", default="head", help="target revision (default: head)")
    migrate.set_defaults(run=cmd_migrate)

    status = commands.add_parser("status", help="counts per status and the lag")
    _database_flag(status)
    status.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    status.set_defaults(run=cmd_status)

    ops.add_commands(commands, _database_flag)

    sink = commands.add_parser("sink", help="a local /track receiver for development")
    sink.set_defaults(run=_lazy("worker.devtools.sink"))
    _arguments_from(sink, "worker.devtools.sink")

    demo = commands.add_parser("demo", help="the whole job on an embedded database, with a verdict")
    demo.set_defaults(run=_lazy("worker.devtools.demo"))
    _arguments_from(demo, "worker.devtools.demo")
    return parser


def _lazy(module: str):
    """Import development tools only when their command runs."""
    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module).run(args)
    return run


def _arguments_from(parser: argparse.ArgumentParser, module: str) -> None:
    importlib.import_module(module).add_arguments(parser)


def _database_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="SQLAlchemy URL (env FP_OUTBOX_DATABASE_URL, else DATABASE_URL)")
    parser.add_argument("--embedded", action="store_true",
                        help="use fp-outbox's own embedded PostgreSQL (development; needs the 'embedded' extra)")


def cmd_migrate(args: argparse.Namespace) -> int:
    with database_flag(args) as flag:
        url = database_url(flag)
        upgrade(url, args.revision)
    print(f"fp-outbox: schema at {args.revision} on {url.render_as_string(hide_password=True)}")
    return 0


def status_counts(engine) -> dict[str, float | int | None]:
    """pending, in_flight, delivered, dead and oldest_pending_age_s, read in one statement."""
    with engine.connect() as conn:
        row = conn.execute(queries.STATUS_COUNTS).mappings().one()
    return {key: (int(value) if key != "oldest_pending_age_s" and value is not None else value)
            for key, value in row.items()}


def cmd_status(args: argparse.Namespace) -> int:
    with ops.connected(args) as engine:
        counts = {**status_counts(engine), **ops.activity(engine)}
    if args.json:
        print(json.dumps(counts))
        return 0
    age = counts["oldest_pending_age_s"]
    rows = [(key, f"{counts[key]:,}") for key in ("pending", "in_flight", "delivered", "dead")]
    rows.append(("oldest pending age", "-" if age is None else f"{age:,.1f} s"))
    rows.append(("stuck (lease expired)", f"{counts['stuck']:,}"))
    rows.append(("overdue (due > 1 min ago)", f"{counts['overdue']:,}"))
    rows.append(("delivered last minute", f"{counts['delivered_last_minute']:,}"))
    rows.append(("throughput", f"{counts['delivered_last_minute'] / 60:,.1f} /s"))
    rows.append(("dead last minute", f"{counts['dead_last_minute']:,}"))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value:>12}")
    return 0
