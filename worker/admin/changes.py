"""The commands that change the database: `fp-outbox migrate`, `requeue` and `purge`, each with its flags.
requeue and purge ask first (worker.admin.confirm) and can only count (--dry-run)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import timedelta

from sqlalchemy import Engine

from outbox.db import database_url, upgrade
from worker.admin import output, queries
from worker.admin.arguments import (add_confirmation, add_database_flags, add_dead_filters, batch_size_arg,
                                    dead_params, duration_arg)
from worker.admin.confirm import confirm
from worker.admin.database import CommandError, connected, translated_errors
from worker.engine import (EXIT_NO_GRANT, KEPT, Purged, format_duration, logs, preview_truncate, purge_dead,
                           purge_delivered)


def add_migrate(commands) -> None:
    migrate = commands.add_parser("migrate", help="create or upgrade the outbox schema")
    add_database_flags(migrate)
    migrate.add_argument("--revision", default="head", help="target revision (default: head)")
    migrate.set_defaults(run=cmd_migrate)


def add_requeue(commands) -> None:
    requeue = commands.add_parser(
        "requeue", help="send dead or stuck events again (same $insert_id, attempts start over)",
        description="Make dead or stuck events due now, with attempts at 0 and the same payload.")
    add_database_flags(requeue)
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="ids", type=int, nargs="+", action="extend", metavar="ID",
                       help="these rows (dead, or in flight past their lease)")
    which.add_argument("--dead", action="store_true", help="dead events matching the filters below")
    which.add_argument("--stuck", action="store_true", help="events in flight past their lease")
    add_dead_filters(requeue, " (with --dead)")
    add_confirmation(requeue)
    requeue.set_defaults(run=cmd_requeue)


def add_purge(commands) -> None:
    purge = commands.add_parser(
        "purge", help="retire delivered events (whole partitions) and dead letters older than an age",
        description="Retire what was delivered before an age: every slot (a partition of the events) whose events are "
                    "all claimed and settled and past it is truncated, and the claims log and delivered retries past "
                    "it are deleted in short batches; and dead letters that died before their age. The events "
                    "themselves are never deleted row by row.")
    add_database_flags(purge)
    purge.add_argument("--delivered-older-than", type=duration_arg, metavar="DURATION",
                       help="retire delivered events (their partitions) and the claims log past this age, e.g. 7d")
    purge.add_argument("--dead-older-than", type=duration_arg, metavar="DURATION",
                       help="delete dead letters that died longer ago than this, e.g. 30d")
    purge.add_argument("--batch-size", type=batch_size_arg, default=5000,
                       help="rows per transaction (default 5000); smaller holds locks for less time")
    add_confirmation(purge)
    purge.set_defaults(run=cmd_purge)


def cmd_migrate(args: argparse.Namespace) -> int:
    from alembic.util import CommandError as RevisionError  # alembic's word for a revision it cannot reach

    url = database_url(args.database_url)
    try:
        with translated_errors():  # e.g. a role that cannot create tables: exit 4, naming the grant
            _check_owner(args)
            reached = upgrade(url, args.revision)
    except RevisionError as exc:
        raise CommandError(f"cannot migrate to --revision {args.revision} ({logs.first_line(exc)}); migrate only "
                           "upgrades, to a revision this package ships (head, the default)", 2) from None
    if args.revision.isalnum() and args.revision != "head" and not (reached or "").startswith(args.revision):
        raise CommandError(f"the schema is at {reached}, past --revision {args.revision}, and stays there: migrate "
                           "only upgrades", 2)
    print(f"fp-outbox: schema at {args.revision} on {url.render_as_string(hide_password=True)}")
    return 0


def _check_owner(args: argparse.Namespace) -> None:
    """migrate runs as the owner of the outbox's tables, even when the schema is already at head (where Alembic
    would have nothing to do and a worker's role, which may read the revision, would pass): exit 4 otherwise."""
    with connected(args) as engine, engine.connect() as conn:
        foreign = conn.execute(queries.NOT_OWNED_TABLE).first()
    if foreign is not None:
        raise CommandError(f"the database role {foreign.role} lacks a grant migrate needs: it does not own "
                           f"{foreign.relname} (owned by {foreign.owner}); run `fp-outbox migrate` as the role "
                           "that owns the outbox's tables (docs/operations.md: Database roles)", EXIT_NO_GRANT)


def cmd_requeue(args: argparse.Namespace) -> int:
    filters = [flag for flag, value in (("--event", args.event), ("--older-than", args.older_than),
                                        ("--error", args.error)) if value is not None]
    if filters and not args.dead:
        raise CommandError(f"{', '.join(filters)} filter dead events: use them with --dead, not with "
                           f"{'--id' if args.ids else '--stuck'}", 2)
    with connected(args) as engine:
        if args.ids:
            return _requeue_ids(engine, args)
        kind, what = ("dead event", _describe_filters(args)) if args.dead \
            else ("stuck event", " (in flight past their lease)")
        with engine.connect() as conn:
            count = conn.execute(queries.COUNT_DEAD, dead_params(args)).scalar_one() if args.dead \
                else conn.execute(queries.COUNT_STUCK).scalar_one()
        if args.dry_run or not count:
            print(f"{'would requeue' if count else 'nothing to requeue:'} {output.plural(count, kind)}{what}"
                  + (" (dry run: nothing changed)" if args.dry_run and count else ""))
            return 0
        confirm(f"Requeue {output.plural(count, kind)}{what}", "They are sent again with the same $insert_id.", args)
        with engine.begin() as conn:
            done = conn.execute(queries.REQUEUE_DEAD, dead_params(args)).rowcount if args.dead \
                else len(conn.execute(queries.REQUEUE_STUCK).all())
    print(f"requeued {output.plural(done, kind)}{what}: due now, attempts back to 0")
    return 0


def _requeue_ids(engine: Engine, args: argparse.Namespace) -> int:
    ids = sorted(set(args.ids))
    with engine.connect() as conn:
        wanted = sorted(conn.execute(queries.REQUEUEABLE_IDS, {"ids": ids}).scalars())
        others = [i for i in ids if i not in wanted]
        found = dict(conn.execute(queries.DESCRIBE_IDS, {"ids": others}).all()) if others else {}
    for id_ in others:
        why = {None: "no such event", "in_flight": "in flight under a live lease"}.get(found.get(id_), found.get(id_))
        print(f"id {id_}: {why}, skipped" + (" (only dead events and stuck ones are requeued)" if id_ in found else ""),
              file=sys.stderr)
    if args.dry_run or not wanted:
        print(f"{'would requeue' if wanted else 'nothing to requeue:'} {len(wanted):,} of {len(ids):,} events"
              + (" (dry run: nothing changed)" if args.dry_run and wanted else ""))
        return 0 if wanted or args.dry_run else 1
    confirm(f"Requeue {output.plural(len(wanted), 'event')}", "They are sent again with the same $insert_id.", args)
    with engine.begin() as conn:
        done = conn.execute(queries.REQUEUE_DEAD_IDS, {"ids": wanted}).rowcount
        done += len(conn.execute(queries.REQUEUE_STUCK_IDS, {"ids": wanted}).all())
    print(f"requeued {done:,} of {len(ids):,} events: due now, attempts back to 0")
    return 0


def _describe_filters(args: argparse.Namespace) -> str:
    parts = []
    if args.event is not None:
        parts.append(f"named {args.event!r}")
    if args.older_than is not None:
        parts.append(f"dead for over {format_duration(args.older_than)}")
    if args.error is not None:
        parts.append(f"with {args.error!r} in the error")
    return (" " + ", ".join(parts)) if parts else ""


def cmd_purge(args: argparse.Namespace) -> int:
    delivered, dead = args.delivered_older_than, args.dead_older_than
    if delivered is None and dead is None:
        raise CommandError("say what to purge: --delivered-older-than 7d, --dead-older-than 30d, or both", 2)
    what = " and ".join(
        f"{kind} events older than {format_duration(age)}"
        for kind, age in (("delivered", delivered), ("dead", dead)) if age is not None)
    with connected(args) as engine:
        if args.dry_run:
            _print_purged(_purgeable(engine, delivered, dead), "would retire", " (dry run: nothing changed)")
            return 0
        confirm(f"Retire {what}, {args.batch_size:,} rows per transaction", "", args)
        unbounded = sys.maxsize  # the command runs to the end; each batch is still its own transaction
        purged = purge_delivered(engine, delivered, args.batch_size, unbounded) if delivered is not None else Purged()
        gone_dead = 0 if dead is None else purge_dead(engine, dead, args.batch_size, unbounded)
    _print_purged(replace(purged, dead=gone_dead), "retired", "")
    return 0


def _purgeable(engine: Engine, delivered: timedelta | None, dead: timedelta | None) -> Purged:
    """What a purge would retire now: the slots' own answers (run and rolled back), and the rows counted."""
    truncated, kept = preview_truncate(engine, delivered) if delivered is not None else ({}, {})
    seconds = {"delivered_s": None if delivered is None else delivered.total_seconds(),
               "dead_s": None if dead is None else dead.total_seconds()}
    with engine.connect() as conn:
        counts = conn.execute(queries.COUNT_PURGEABLE, seconds).one()
        legacy = conn.execute(queries.COUNT_PURGEABLE_LEGACY, seconds).scalar_one() \
            if delivered is not None and conn.execute(queries.LEGACY_PRESENT).scalar_one() else 0
    return Purged(truncated, kept, counts.claims, counts.retries, legacy, counts.dead)


def _print_purged(purged: Purged, verb: str, note: str) -> None:
    """One line of what went (slots with their events, as the statistics count them, then rows), then one line per
    slot old enough that stays, with why."""
    slots = ", ".join(f"fp_outbox_events_s{slot:02d}" for slot in sorted(purged.truncated)) or "none"
    rows = [output.plural(purged.claims, "claims log row"), output.plural(purged.retries, "delivered retries row"),
            output.plural(purged.dead, "dead letter")]
    if purged.legacy:
        rows.insert(2, output.plural(purged.legacy, "delivered row") + " of the previous release")
    print(f"{verb} {output.plural(len(purged.truncated), 'slot')} of delivered events ({slots}: about "
          f"{sum(purged.truncated.values()):,} events), {', '.join(rows[:-1])} and {rows[-1]}{note}")
    for slot, why in sorted(purged.kept.items()):
        print(f"kept fp_outbox_events_s{slot:02d}, old enough but {why}: {KEPT[why]}")
