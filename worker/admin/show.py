"""`fp-outbox show INSERT_ID` and `fp-outbox show --distinct-id ID [--last N]`: one event's history (enqueued when,
each claim that held it and its answer, its retry, its end), as lines or JSON (worker.admin.history reads it)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from worker.admin.arguments import add_database_flags, positive_int_arg
from worker.admin.database import CommandError, connected
from worker.admin.history import Attempt, History, find, history


def add_show(commands) -> None:
    show = commands.add_parser(
        "show", help="one event's history: enqueued, each attempt and its answer, its end",
        description="Find an event by its $insert_id (or the last events of a distinct_id) and tell its history: "
                    "when it was enqueued, each claim that held it (when, which worker, the answer), its retry and "
                    "its end (delivered, dead and why, or still pending). The event table has no index on either "
                    "(enqueue pays for none): it is read newest partition first (docs/operations.md).")
    add_database_flags(show)
    show.add_argument("insert_id", nargs="?", metavar="INSERT_ID", help="the event's $insert_id")
    show.add_argument("--distinct-id", metavar="ID", help="the last events of this distinct_id instead")
    show.add_argument("--last", type=positive_int_arg, default=10, metavar="N",
                      help="with --distinct-id: how many of its events, newest first (default 10)")
    show.add_argument("--json", action="store_true", help="a JSON array of histories instead of lines")
    show.set_defaults(run=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    if (args.insert_id is None) == (args.distinct_id is None):
        raise CommandError("say which event: fp-outbox show INSERT_ID, or fp-outbox show --distinct-id ID", 2)
    with connected(args) as engine, engine.connect() as conn:
        found = find(conn, insert_id=args.insert_id, distinct_id=args.distinct_id, last=args.last)
        stories = [history(conn, row, kept_in) for row, kept_in in found]
    if args.json:
        print(json.dumps([_jsonable(story) for story in stories]))
    for story in [] if args.json else stories:
        print("\n".join(lines(story)) + "\n")
    if not stories:
        which = f"$insert_id {args.insert_id}" if args.insert_id else f"distinct_id {args.distinct_id}"
        print(f"no event with {which}: never enqueued (or rolled back), or already retired (delivered events are "
              "kept for --retain-delivered, dead letters for --retain-dead)", file=sys.stderr)
        return 1
    return 0


def lines(story: History) -> list[str]:
    """The history as a reader wants it: the event, then one line per happening with its time, then now."""
    out = [f"event {story.id}  {story.event_name}  $insert_id {story.insert_id}  distinct_id "
           f"{story.distinct_id or '-'}  (found in the {story.kept_in})",
           f"  {_when(story.enqueued_at)}  enqueued"]
    out += [f"  {_when(a.claimed_at)}  claim {a.claim_id} ({a.kind}, by {a.owner}): {_said(a)}" for a in story.attempts]
    if story.retry and not story.retry["delivered_at"]:
        retry = story.retry
        out.append(f"  retry: {retry['attempts']} attempts counted, next at {_when(retry['next_attempt_at'])}"
                   + (f", last answer {_answer(retry)}" if retry["last_error"] else ""))
    if not story.attempts and story.state in ("delivered", "dead") and story.kept_in != "legacy":
        out.append("  (its claims are no longer in the log: kept for --retain-delivered)")
    out.append(f"  now: {_now(story)}")
    return out


def _said(attempt: Attempt) -> str:
    if attempt.answer == "failed":
        return f"failed: {_reason(attempt.reason, attempt.http_status)}"
    if attempt.answer.startswith("in flight"):
        return f"{attempt.answer}, lease until {_when(attempt.lease_until)}"
    return attempt.answer


def _now(story: History) -> str:
    if story.state == "dead":
        dead = story.dead or story.legacy
        return f"dead since {_when(dead['dead_at'])} after {dead['attempts']} attempts: {_answer(dead)}"
    if story.state == "pending":
        if story.retry or story.legacy:
            return f"pending, next attempt at {_when((story.retry or story.legacy)['next_attempt_at'])}"
        return "pending: not claimed yet (the workers take events in commit order)"
    if story.state == "in_flight" and (story.retry or story.legacy):
        held = story.retry or story.legacy
        return f"in flight, held by {held['lease_owner']} until {_when(held['lease_until'])}"
    return story.state.replace("_", " ")


def _answer(row: dict[str, Any]) -> str:
    return _reason(row["last_error"], row["last_status"])


def _reason(reason: str | None, status: int | None) -> str:
    """The recorded reason, with the HTTP status unless the reason already starts with it."""
    said = reason or "-"
    return said if status is None or said.startswith(f"HTTP {status}") else f"{said} (HTTP {status})"


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _jsonable(story: History) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    fields = asdict(story)
    return {**plain({key: value for key, value in fields.items() if key != "attempts"}),
            "claims": [plain(attempt) for attempt in fields["attempts"]]}
