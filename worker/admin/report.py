"""The commands that only read: `fp-outbox status`, `stuck` and `dead`, each with its flags."""

from __future__ import annotations

import argparse
import json
import shutil

from sqlalchemy import Engine

from worker.admin import output, queries
from worker.admin.arguments import add_database_flags, add_dead_filters, add_limit_and_json, dead_params
from worker.admin.database import CommandError, connected
from worker.engine import database_state, endpoint_state, oldest_transaction, status_counts, workers_connected


def add_status(commands) -> None:
    status = commands.add_parser("status", help="counts per status and the lag")
    add_database_flags(status)
    status.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    status.add_argument("--watch", action="store_true",
                        help="a live view refreshed every second (rates, lag, states, workers, horizon); q quits")
    status.set_defaults(run=cmd_status)


def add_stuck(commands) -> None:
    stuck = commands.add_parser("stuck", help="events in flight past their lease (their worker died)")
    add_database_flags(stuck)
    add_limit_and_json(stuck)
    stuck.set_defaults(run=cmd_stuck)


def add_dead(commands) -> None:
    dead = commands.add_parser("dead", help="dead events with their reasons, newest first")
    add_database_flags(dead)
    add_dead_filters(dead)
    add_limit_and_json(dead)
    dead.set_defaults(run=cmd_dead)


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        if args.json:
            raise CommandError("--watch draws a live view and --json prints one object: use one of them", 2)
        from worker.admin.watch import watch

        with connected(args) as engine:
            return watch(engine)
    with connected(args) as engine:
        counts = figures(engine)
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
    rows.append(("workers connected", f"{counts['workers_connected']:,}"))
    rows.append(("oldest transaction holding back vacuum", holding(counts)))
    rows.append(("endpoint", endpoint_line(counts)))
    rows.append(("database", counts["database"]))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value:>12}")
    return 0


def figures(engine: Engine) -> dict:
    """Everything `status` shows, database-wide: the counts (delivered ones read the table), the last minute's
    activity, the workers connected, the oldest transaction holding the vacuum horizon back, the endpoint's state
    (up, or down in an outage) and the database's (read-write, or read-only during a failover)."""
    return {**status_counts(engine), **activity(engine), "workers_connected": workers_connected(engine),
            **oldest_transaction(engine), **endpoint_state(engine), **database_state(engine)}


def holding(counts: dict) -> str:
    """The oldest open transaction holding the vacuum horizon back: its age, pid and state, or '-'."""
    age = counts["oldest_transaction_age_s"]
    if age is None:
        return "-"
    who = f"pid {counts['oldest_transaction_pid']}" if counts["oldest_transaction_pid"] else "no pid"
    return f"{age:,.1f} s ({who}, {counts['oldest_transaction_state'] or 'state hidden'})"


def endpoint_line(counts: dict) -> str:
    """up, or down: for how long, the probes that failed and when the next one may start."""
    if counts["endpoint"] != "down":
        return counts["endpoint"] or "-"
    next_in = max(0.0, counts["endpoint_next_probe_in_s"] or 0.0)
    return (f"down {counts['endpoint_down_s']:,.1f} s ({counts['endpoint_probes']} probes failed, "
            f"next in {next_in:,.1f} s)")


def activity(engine: Engine) -> dict[str, int]:
    """stuck, overdue, delivered_last_minute and dead_last_minute, database-wide."""
    with engine.connect() as conn:
        return {key: int(value) for key, value in conn.execute(queries.ACTIVITY).mappings().one().items()}


def cmd_stuck(args: argparse.Namespace) -> int:
    with connected(args) as engine, engine.connect() as conn:
        rows = conn.execute(queries.LIST_STUCK, {"limit": args.limit}).mappings().all()
        total = conn.execute(queries.COUNT_STUCK).scalar_one() if len(rows) == args.limit else len(rows)
    if args.json:
        print(json.dumps([output.jsonable(row) for row in rows]))
        return 0
    if not rows:
        print("no stuck events: nothing is in flight past its lease")
        return 0
    output.print_table(["id", "insert_id", "event", "attempts", "lease owner", "lease expired"],
                       [[r["id"], r["insert_id"], r["event_name"], r["attempts"], r["lease_owner"] or "-",
                         f"{output.age(r['lease_expired_s'])} ago"] for r in rows])
    output.footer(len(rows), total, "stuck event")
    print("Any running worker claims these again by itself; if they stay, check that workers are running "
          "(systemctl status 'fp-outbox-worker*'), or send them now with `fp-outbox requeue --stuck`.")
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    params = {**dead_params(args), "limit": args.limit}
    with connected(args) as engine, engine.connect() as conn:
        rows = conn.execute(queries.LIST_DEAD, params).mappings().all()
        total = conn.execute(queries.COUNT_DEAD, params).scalar_one() if len(rows) == args.limit else len(rows)
    if args.json:
        print(json.dumps([output.jsonable(row) for row in rows]))
        return 0
    if not rows:
        print("no dead events" + (" match these filters" if any(dead_params(args).values()) else ""))
        return 0
    width = shutil.get_terminal_size((120, 24)).columns
    output.print_table(["id", "dead at (UTC)", "event", "attempts", "http", "reason"],
                       [[r["id"], output.utc(r["dead_at"]), r["event_name"], r["attempts"],
                         "-" if r["last_status"] is None else r["last_status"], r["last_error"] or "-"] for r in rows],
                       width=width)
    output.footer(len(rows), total, "dead event")
    print("After fixing the cause: fp-outbox requeue --dead [the same filters] --dry-run, then without --dry-run.")
    return 0
