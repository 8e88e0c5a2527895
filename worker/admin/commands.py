"""Operators' commands on the outbox: find stuck and dead events, requeue them, purge old rows, print
the systemd unit; and `purge_delivered`, the retention step the worker runs off the hot path.

Every statement is named here with why it is shaped so; the views in migration 0002 and
docs/admin.sql answer the same questions for people at a psql prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from outbox.db import database_url, make_engine
from worker.devtools.embedded import database_flag

# -- statements ------------------------------------------------------------------------------------

# Stuck: in flight past the lease (its worker died or hung). Read from the claim's partial index;
# any worker claims these again by itself, so rows that stay here mean no worker is running.
LIST_STUCK = text(
    """
    SELECT id, insert_id, event_name, attempts, lease_owner, lease_until,
           extract(epoch FROM now() - lease_until)::float8 AS lease_expired_s, last_status, last_error
      FROM fp_outbox_events
     WHERE status = 'in_flight' AND lease_until < now()
     ORDER BY lease_until
     LIMIT :limit
    """
)

# The same rows, counted, for `requeue --stuck --dry-run` and the footer of `stuck`.
COUNT_STUCK = text("SELECT count(*) FROM fp_outbox_events WHERE status = 'in_flight' AND lease_until < now()")

# The filters of `dead` and `requeue --dead`: each is off when its parameter is null, so one statement
# serves every combination. strpos instead of LIKE, so '%' and '_' in --error match themselves.
_DEAD_FILTER = """
    status = 'dead'
    AND (CAST(:event AS text) IS NULL OR event_name = CAST(:event AS text))
    AND (CAST(:older_than_s AS float8) IS NULL
         OR dead_at < now() - make_interval(secs => CAST(:older_than_s AS float8)))
    AND (CAST(:error AS text) IS NULL
         OR strpos(lower(coalesce(last_error, '')), lower(CAST(:error AS text))) > 0)
"""

# Newest first: after a bad deploy the operator wants the latest reasons on top. The partial index
# on dead rows serves it without touching the delivered rows kept for retention.
LIST_DEAD = text(
    f"""
    SELECT id, insert_id, event_name, attempts, last_status, last_error, dead_at, created_at
      FROM fp_outbox_events
     WHERE {_DEAD_FILTER}
     ORDER BY dead_at DESC, id DESC
     LIMIT :limit
    """
)

COUNT_DEAD = text(f"SELECT count(*) FROM fp_outbox_events WHERE {_DEAD_FILTER}")

# Requeue: due now with a fresh attempt budget, the same payload (so the same $insert_id: a
# destination that already has it drops the copy). last_status/last_error stay as history until
# the next attempt overwrites them.
_REQUEUE_SET = """
       SET status = 'pending', attempts = 0, next_attempt_at = now(),
           lease_owner = NULL, lease_until = NULL, dead_at = NULL
"""

REQUEUE_DEAD = text(f"UPDATE fp_outbox_events {_REQUEUE_SET} WHERE {_DEAD_FILTER}")

# Only leases that have expired: a live worker's row is never taken from under it. Should a worker
# claim the row meanwhile, PostgreSQL re-checks the condition after the row lock and skips it.
REQUEUE_STUCK = text(
    f"UPDATE fp_outbox_events {_REQUEUE_SET} WHERE status = 'in_flight' AND lease_until < now()"
)

# By id, still only dead or stuck rows: requeueing a pending, delivered or live in-flight row would
# just send it again (or twice at once).
REQUEUE_IDS = text(
    f"""
    UPDATE fp_outbox_events {_REQUEUE_SET}
     WHERE id = ANY(CAST(:ids AS bigint[]))
       AND (status = 'dead' OR (status = 'in_flight' AND lease_until < now()))
 RETURNING id
    """
)

# What the given ids are now, so `requeue --id` can say why it skipped one.
DESCRIBE_IDS = text(
    """
    SELECT id, status, (status = 'dead' OR (status = 'in_flight' AND lease_until < now())) AS requeueable
      FROM fp_outbox_events
     WHERE id = ANY(CAST(:ids AS bigint[]))
    """
)

# Retention of delivered rows. There is no index on delivered_at (it would cost every delivery a
# write), so each batch walks the next `batch_size` rows in primary-key order, i.e. enqueue order,
# and deletes the old delivered ones among them. A row created after the cutoff cannot have been
# delivered before it, so the walk ends with a batch made only of such rows: the cost follows the
# rows deleted, not the size of the table (a whole batch, not the first young row, so that ids
# taken slightly out of created_at order by concurrent transactions are still reached).
# SKIP LOCKED lets two purges (two workers) run side by side.
PURGE_DELIVERED_BATCH = text(
    """
    WITH examined AS (
        SELECT id, created_at FROM fp_outbox_events
         WHERE id > :after
         ORDER BY id
         LIMIT :batch_size),
    doomed AS (
        SELECT e.id FROM fp_outbox_events AS e
         WHERE e.id IN (SELECT id FROM examined)
           AND e.status = 'delivered'
           AND e.delivered_at < now() - make_interval(secs => CAST(:older_than_s AS float8))
           FOR UPDATE SKIP LOCKED),
    deleted AS (
        DELETE FROM fp_outbox_events AS e USING doomed WHERE e.id = doomed.id RETURNING e.id)
    SELECT (SELECT count(*) FROM deleted) AS deleted,
           (SELECT max(id) FROM examined) AS last_id,
           coalesce((SELECT bool_and(created_at >= now() - make_interval(secs => CAST(:older_than_s AS float8)))
                       FROM examined), true) AS done
    """
)

# Dead rows have their own partial index on dead_at, so the oldest come straight from it.
PURGE_DEAD_BATCH = text(
    """
    WITH doomed AS (
        SELECT id FROM fp_outbox_events
         WHERE status = 'dead' AND dead_at < now() - make_interval(secs => CAST(:older_than_s AS float8))
         ORDER BY dead_at
         LIMIT :batch_size
           FOR UPDATE SKIP LOCKED),
    deleted AS (
        DELETE FROM fp_outbox_events AS e USING doomed WHERE e.id = doomed.id RETURNING e.id)
    SELECT count(*) AS deleted, max(id) AS last_id, count(*) < :batch_size AS done FROM deleted
    """
)

# For `purge --dry-run` only: counting old delivered rows reads the whole table once.
COUNT_PURGEABLE = text(
    """
    SELECT count(*) FILTER (WHERE status = 'delivered'
                              AND delivered_at < now() - make_interval(secs => CAST(:delivered_s AS float8)))
               AS delivered,
           count(*) FILTER (WHERE status = 'dead'
                              AND dead_at < now() - make_interval(secs => CAST(:dead_s AS float8)))
               AS dead
      FROM fp_outbox_events
     WHERE status IN ('delivered', 'dead')
    """
)

# `fp-outbox status`: what is wrong now (stuck, overdue) and the throughput over the last minute.
# The first two come from the claim's partial index; the delivered count reads the table.
ACTIVITY = text(
    """
    SELECT (SELECT count(*) FROM fp_outbox_events
             WHERE status = 'in_flight' AND lease_until < now()) AS stuck,
           (SELECT count(*) FROM fp_outbox_events
             WHERE status = 'pending' AND next_attempt_at < now() - interval '1 minute') AS overdue,
           (SELECT count(*) FROM fp_outbox_events
             WHERE status = 'delivered' AND delivered_at >= now() - interval '1 minute') AS delivered_last_minute,
           (SELECT count(*) FROM fp_outbox_events
             WHERE status = 'dead' AND dead_at >= now() - interval '1 minute') AS dead_last_minute
    """
)

# -- values ----------------------------------------------------------------------------------------

UNIT_NAMES = {False: "fp-outbox-worker.service", True: "fp-outbox-worker@.service"}
DEFAULT_EXEC_START = "/opt/fp-outbox/venv/bin/fp-outbox-worker"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_BATCH_SIZE = 100_000
#: How long the worker keeps delivered rows unless --retain-delivered / FP_OUTBOX_RETAIN_DELIVERED says otherwise.
DEFAULT_RETAIN_DELIVERED = timedelta(days=7)


class CommandError(Exception):
    """A command could not do its job; the message says why and what to do, exit_code is the status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def parse_duration(value: str) -> timedelta:
    """'7d', '12h', '30m', '90s' (or 'w' for weeks) as a timedelta; ValueError naming the format otherwise."""
    match = _DURATION.match(value or "")
    if not match:
        raise ValueError(f"{value!r} is not a duration: write a number and a unit, e.g. 7d, 12h, 30m or 90s")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_retention(value: str) -> timedelta | None:
    """The worker's --retain-delivered: a duration like 7d, or 'off' (None: the worker purges nothing)."""
    return None if value.strip().lower() == "off" else parse_duration(value)


def format_duration(delta: timedelta) -> str:
    """The largest whole unit up to days: 7d, 36h, 90s; for messages."""
    seconds = delta.total_seconds()
    for unit in ("d", "h", "m"):
        if seconds and seconds % _UNIT_SECONDS[unit] == 0:
            return f"{int(seconds // _UNIT_SECONDS[unit])}{unit}"
    return f"{seconds:g}s"


# -- retention -------------------------------------------------------------------------------------

def purge_delivered(engine: Engine, older_than: timedelta, batch_size: int = 5000, max_batches: int = 20) -> int:
    """Delete delivered rows delivered more than `older_than` ago; returns how many.

    At most `max_batches` short transactions, each looking at the next `batch_size` rows in enqueue
    (id) order, until a batch holds only rows enqueued after the cutoff; so a call's cost is bounded
    and follows the old rows, not the table. Call it again later for the rest.
    """
    return _purge(engine, PURGE_DELIVERED_BATCH, older_than, batch_size, max_batches)


def purge_dead(engine: Engine, older_than: timedelta, batch_size: int = 5000, max_batches: int = 20) -> int:
    """Delete dead rows that died more than `older_than` ago, in at most `max_batches` transactions."""
    return _purge(engine, PURGE_DEAD_BATCH, older_than, batch_size, max_batches)


def _purge(engine: Engine, statement, older_than: timedelta, batch_size: int, max_batches: int) -> int:
    if batch_size < 1 or max_batches < 1:
        raise ValueError(f"batch_size and max_batches must be at least 1, got {batch_size} and {max_batches}")
    total, after = 0, 0
    params = {"older_than_s": older_than.total_seconds(), "batch_size": batch_size}
    for _ in range(max_batches):
        with engine.begin() as conn:  # one short transaction per batch: row locks on this batch only
            row = conn.execute(statement, {**params, "after": after}).one()
        total += row.deleted
        if row.done:
            break
        after = row.last_id
    return total


def activity(engine: Engine) -> dict[str, int]:
    """stuck, overdue, delivered_last_minute and dead_last_minute, database-wide."""
    with engine.connect() as conn:
        return {key: int(value) for key, value in conn.execute(ACTIVITY).mappings().one().items()}


# -- the commands ----------------------------------------------------------------------------------

def add_commands(commands, database_flag_for: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register stuck, dead, requeue, purge and systemd-unit on `fp-outbox`'s subparsers."""
    stuck = commands.add_parser("stuck", help="events in flight past their lease (their worker died)")
    database_flag_for(stuck)
    _limit_and_json(stuck)
    stuck.set_defaults(run=cmd_stuck)

    dead = commands.add_parser("dead", help="dead events with their reasons, newest first")
    database_flag_for(dead)
    _dead_filters(dead)
    _limit_and_json(dead)
    dead.set_defaults(run=cmd_dead)

    requeue = commands.add_parser(
        "requeue", help="send dead or stuck events again (same $insert_id, attempts start over)",
        description="Make dead or stuck events due now, with attempts at 0 and the same payload.")
    database_flag_for(requeue)
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="ids", type=int, nargs="+", action="extend", metavar="ID",
                       help="these rows (dead, or in flight past their lease)")
    which.add_argument("--dead", action="store_true", help="dead events matching the filters below")
    which.add_argument("--stuck", action="store_true", help="events in flight past their lease")
    _dead_filters(requeue, " (with --dead)")
    _confirmation(requeue)
    requeue.set_defaults(run=cmd_requeue)

    purge = commands.add_parser(
        "purge", help="delete delivered (and dead) events older than an age, in short batches")
    database_flag_for(purge)
    purge.add_argument("--delivered-older-than", type=_duration_arg, metavar="DURATION",
                       help="delete delivered events delivered longer ago than this, e.g. 7d")
    purge.add_argument("--dead-older-than", type=_duration_arg, metavar="DURATION",
                       help="delete dead events that died longer ago than this, e.g. 30d")
    purge.add_argument("--batch-size", type=_batch_size_arg, default=5000,
                       help="rows per transaction (default 5000); smaller holds locks for less time")
    _confirmation(purge)
    purge.set_defaults(run=cmd_purge)

    unit = commands.add_parser("systemd-unit", help="print the systemd unit for the worker")
    unit.add_argument("--instance", action="store_true",
                      help="the template fp-outbox-worker@.service, for several workers on one host")
    unit.add_argument("--exec-start", metavar="PATH",
                      help=f"absolute path of fp-outbox-worker (default {DEFAULT_EXEC_START})")
    unit.set_defaults(run=cmd_systemd_unit)


def _limit_and_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=_positive_int_arg, default=50, help="show at most N rows (default 50)")
    parser.add_argument("--json", action="store_true", help="a JSON array instead of a table")


def _dead_filters(parser: argparse.ArgumentParser, suffix: str = "") -> None:
    parser.add_argument("--event", metavar="NAME", help=f"only events with this name{suffix}")
    parser.add_argument("--older-than", type=_duration_arg, metavar="DURATION",
                        help=f"only events dead for longer than this, e.g. 12h{suffix}")
    parser.add_argument("--error", metavar="SUBSTRING",
                        help=f"only events whose last error contains this (any case), e.g. 'HTTP 400'{suffix}")


def _confirmation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="only count; change nothing")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _duration_arg(value: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int_arg(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def _batch_size_arg(value: str) -> int:
    size = _positive_int_arg(value)
    if size > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(
            f"{size} rows per transaction is more than {MAX_BATCH_SIZE:,}; a smaller batch locks for less time")
    return size


@contextlib.contextmanager
def connected(args: argparse.Namespace) -> Iterator[Engine]:
    """An engine on the database the worker would use; driver errors become CommandError here, once."""
    with database_flag(args) as flag:
        engine = make_engine(database_url(flag))
        try:
            yield engine
        except DBAPIError as exc:
            raise _translate(exc) from None
        finally:
            engine.dispose()


def _translate(exc: DBAPIError) -> CommandError:
    if isinstance(exc.orig, psycopg.errors.UndefinedTable):
        return CommandError("the outbox table does not exist in this database: run `fp-outbox migrate` first", 2)
    lines = str(exc.orig).strip().splitlines()
    reason = lines[0] if lines else exc.orig.__class__.__name__
    if isinstance(exc.orig, psycopg.OperationalError):
        return CommandError(f"could not use the database ({reason}); check --database-url (or "
                            "FP_OUTBOX_DATABASE_URL) and that PostgreSQL is running, then try again")
    return CommandError(f"the database refused the statement ({reason}); is the schema current? "
                        "run `fp-outbox migrate`")


def cmd_stuck(args: argparse.Namespace) -> int:
    with connected(args) as engine, engine.connect() as conn:
        rows = conn.execute(LIST_STUCK, {"limit": args.limit}).mappings().all()
        total = conn.execute(COUNT_STUCK).scalar_one() if len(rows) == args.limit else len(rows)
    if args.json:
        print(json.dumps([_jsonable(row) for row in rows]))
        return 0
    if not rows:
        print("no stuck events: nothing is in flight past its lease")
        return 0
    _print_table(["id", "insert_id", "event", "attempts", "lease owner", "lease expired"],
                 [[r["id"], r["insert_id"], r["event_name"], r["attempts"], r["lease_owner"] or "-",
                   f"{_age(r['lease_expired_s'])} ago"] for r in rows])
    _footer(len(rows), total, "stuck event")
    print("Any running worker claims these again by itself; if they stay, check that workers are running "
          "(systemctl status 'fp-outbox-worker*'), or send them now with `fp-outbox requeue --stuck`.")
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    params = {**_dead_params(args), "limit": args.limit}
    with connected(args) as engine, engine.connect() as conn:
        rows = conn.execute(LIST_DEAD, params).mappings().all()
        total = conn.execute(COUNT_DEAD, params).scalar_one() if len(rows) == args.limit else len(rows)
    if args.json:
        print(json.dumps([_jsonable(row) for row in rows]))
        return 0
    if not rows:
        print("no dead events" + (" match these filters" if any(_dead_params(args).values()) else ""))
        return 0
    width = shutil.get_terminal_size((120, 24)).columns
    _print_table(["id", "dead at (UTC)", "event", "attempts", "http", "reason"],
                 [[r["id"], _utc(r["dead_at"]), r["event_name"], r["attempts"],
                   "-" if r["last_status"] is None else r["last_status"], r["last_error"] or "-"] for r in rows],
                 width=width)
    _footer(len(rows), total, "dead event")
    print("After fixing the cause: fp-outbox requeue --dead [the same filters] --dry-run, then without --dry-run.")
    return 0


def _dead_params(args: argparse.Namespace) -> dict[str, Any]:
    older = getattr(args, "older_than", None)
    return {"event": getattr(args, "event", None), "error": getattr(args, "error", None),
            "older_than_s": None if older is None else older.total_seconds()}


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
            count = conn.execute(COUNT_DEAD, _dead_params(args)).scalar_one() if args.dead \
                else conn.execute(COUNT_STUCK).scalar_one()
        if args.dry_run or not count:
            print(f"{'would requeue' if count else 'nothing to requeue:'} {_n(count, kind)}{what}"
                  + (" (dry run: nothing changed)" if args.dry_run and count else ""))
            return 0
        _confirm(f"Requeue {_n(count, kind)}{what}", "They are sent again with the same $insert_id.", args)
        with engine.begin() as conn:
            done = conn.execute(REQUEUE_DEAD, _dead_params(args)).rowcount if args.dead \
                else conn.execute(REQUEUE_STUCK).rowcount
    print(f"requeued {_n(done, kind)}{what}: due now, attempts back to 0")
    return 0


def _requeue_ids(engine: Engine, args: argparse.Namespace) -> int:
    ids = sorted(set(args.ids))
    with engine.connect() as conn:
        found = {row.id: row for row in conn.execute(DESCRIBE_IDS, {"ids": ids})}
    for missing in (i for i in ids if i not in found):
        print(f"id {missing}: no such event, skipped", file=sys.stderr)
    for row in found.values():
        if not row.requeueable:
            why = "in flight under a live lease" if row.status == "in_flight" else row.status
            print(f"id {row.id}: {why}, skipped (only dead events and stuck ones are requeued)", file=sys.stderr)
    wanted = [row.id for row in found.values() if row.requeueable]
    if args.dry_run or not wanted:
        print(f"{'would requeue' if wanted else 'nothing to requeue:'} {len(wanted):,} of {len(ids):,} events"
              + (" (dry run: nothing changed)" if args.dry_run and wanted else ""))
        return 0 if wanted or args.dry_run else 1
    _confirm(f"Requeue {_n(len(wanted), 'event')}", "They are sent again with the same $insert_id.", args)
    with engine.begin() as conn:
        done = len(conn.execute(REQUEUE_IDS, {"ids": wanted}).all())
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
            with engine.connect() as conn:
                counts = conn.execute(COUNT_PURGEABLE, {
                    "delivered_s": None if delivered is None else delivered.total_seconds(),
                    "dead_s": None if dead is None else dead.total_seconds()}).one()
            print(f"would delete {counts.delivered if delivered is not None else 0:,} delivered and "
                  f"{counts.dead if dead is not None else 0:,} dead events (dry run: nothing changed)")
            return 0
        _confirm(f"Delete {what}, {args.batch_size:,} rows per transaction", "", args)
        unbounded = sys.maxsize  # the command runs to the end; each batch is still its own transaction
        gone_delivered = 0 if delivered is None else purge_delivered(engine, delivered, args.batch_size, unbounded)
        gone_dead = 0 if dead is None else purge_dead(engine, dead, args.batch_size, unbounded)
    print(f"purged {gone_delivered:,} delivered and {gone_dead:,} dead events")
    return 0


def _confirm(action: str, note: str, args: argparse.Namespace) -> None:
    """Go ahead with --yes, or on a 'y' typed at a terminal; otherwise stop with what to do."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CommandError(f"{action}: no terminal to confirm on, so nothing was changed; "
                           "pass --yes to go ahead (or --dry-run to only count)", 2)
    print(f"{action}? {note} [y/N] ".replace("  ", " "), end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise CommandError("cancelled; nothing was changed", 1)


# -- systemd ---------------------------------------------------------------------------------------

def unit_text(instance: bool = False, exec_start: str | None = None) -> str:
    """The shipped unit file (or the @ template), with ExecStart pointed at `exec_start` if given."""
    unit = resources.files("worker.admin").joinpath("systemd", UNIT_NAMES[instance]).read_text()
    if exec_start is None:
        return unit
    if not exec_start.startswith("/") or any(c.isspace() for c in exec_start):
        raise CommandError(f"--exec-start must be an absolute path without spaces (systemd needs one), got "
                           f"{exec_start!r}; e.g. --exec-start \"$(command -v fp-outbox-worker)\"", 2)
    return unit.replace(f"ExecStart={DEFAULT_EXEC_START}", f"ExecStart={exec_start}")


def cmd_systemd_unit(args: argparse.Namespace) -> int:
    sys.stdout.write(unit_text(args.instance, args.exec_start))
    if args.exec_start and not Path(args.exec_start).exists():
        print(f"note: {args.exec_start} does not exist on this machine", file=sys.stderr)
    return 0


# -- output ----------------------------------------------------------------------------------------

def _print_table(headers: list[str], rows: list[list[Any]], width: int | None = None) -> None:
    """Columns sized to their content; the last one cut to fit `width` (the terminal)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    if width is not None:
        widths[-1] = max(20, min(widths[-1], width - sum(w + 2 for w in widths[:-1])))
    numeric = [all(_is_number(row[i]) for row in cells) for i in range(len(headers))]
    for row in [headers, *cells]:
        out = []
        for i, cell in enumerate(row):
            if i == len(row) - 1 and len(cell) > widths[i]:
                cell = cell[: widths[i] - 1] + "…"
            out.append(cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i]))
        print("  ".join(out).rstrip())


def _is_number(cell: str) -> bool:
    return cell.lstrip("-").isdigit() or cell == "-"


def _footer(shown: int, total: int, noun: str) -> None:
    print(_n(total, noun) if shown == total else f"showing {shown:,} of {_n(total, noun)} (--limit N for more)")


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _utc(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _jsonable(row) -> dict[str, Any]:
    return {key: value.isoformat() if isinstance(value, datetime) else value for key, value in row.items()}
