"""`fp-outbox`: the operator's command. migrate and requeue/purge (worker.admin.changes), status, stuck and
dead (worker.admin.report), show (worker.admin.show), systemd-unit (worker.admin.units); and the development
tools' sink and demo, whose modules are loaded by name from worker.devtools, so that the operator's command never
imports them."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator

from outbox.db import ConfigError
from worker.admin import changes, report, show, units
from worker.admin.database import CommandError

# The development tools' commands: the module (loaded by name, only for that command) and the help line.
DEVTOOLS = {
    "sink": ("worker.devtools.sink_cli", "a local /track receiver for development"),
    "demo": ("worker.devtools.demo", "the whole job on an embedded database, with a verdict"),
}


def main(argv: list[str] | None = None) -> int:
    """Run one `fp-outbox` command; its exit status (2: a wrong flag; 3, 4, 5: as the worker's, the database refused)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        with _embedded_if_asked(args):
            return args.run(args)
    except ConfigError as exc:
        print(f"fp-outbox {args.command}: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"fp-outbox {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp-outbox", description="Administer an fp-outbox database.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    changes.add_migrate(commands)
    report.add_status(commands)
    report.add_stuck(commands)
    report.add_dead(commands)
    changes.add_requeue(commands)
    changes.add_purge(commands)
    show.add_show(commands)
    units.add_systemd_unit(commands)
    for name, (module, help_text) in DEVTOOLS.items():
        tool = commands.add_parser(name, help=help_text)
        tool.set_defaults(run=_lazy(module))
        if name in argv:  # only that command's own flags need its module; the list of commands needs none
            importlib.import_module(module).add_arguments(tool)
    return parser


def _lazy(module: str):
    """Import development tools only when their command runs."""
    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module).run(args)
    return run


@contextlib.contextmanager
def _embedded_if_asked(args: argparse.Namespace) -> Iterator[None]:
    """With --embedded, run the command against the embedded PostgreSQL (a development tool, loaded only then)."""
    if not getattr(args, "embedded", False):
        yield
        return
    from worker.devtools.embedded import database_flag

    with database_flag(args, migrate=args.command != "migrate") as url:
        args.database_url = url
        yield
