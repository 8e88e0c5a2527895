"""One event's history, for `fp-outbox show`: where it is found (worker.admin.queries, 'fp-outbox show'), the claims
that held it with each one's answer, its retry and its dead letter, and its state now. Read-only."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from outbox.schema import SLOTS
from worker.admin import queries

FIRST_SPAN = timedelta(minutes=1)  # the claims are read from the enqueue on, a span at a time, doubling


@dataclass(frozen=True)
class Attempt:
    """One claim that held the event, and its answer: delivered, failed (http_status, reason), lease expired, in
    flight (or in flight past its lease: stuck)."""

    claim_id: int
    kind: str
    owner: str
    claimed_at: datetime
    lease_until: datetime
    settled_at: datetime | None
    answer: str
    http_status: int | None
    reason: str | None


@dataclass(frozen=True)
class History:
    """An event from its enqueue to now: kept_in says where it was found (events, retries, dead letters, legacy)."""

    id: int
    insert_id: str
    event_name: str
    distinct_id: str | None
    enqueued_at: datetime
    kept_in: str
    payload: dict[str, Any]
    attempts: tuple[Attempt, ...]
    retry: dict[str, Any] | None
    dead: dict[str, Any] | None
    legacy: dict[str, Any] | None
    state: str


def find(conn: Connection, *, insert_id: str | None = None, distinct_id: str | None = None,
         last: int = 1) -> list[Any]:
    """The events with this $insert_id (those of the newest partition that has any) or the `last` ones of this
    distinct_id, newest first: from the dead letters and retries, then the partitions newest first, then the
    previous release's table."""
    params = {"insert_id": insert_id, "distinct_id": distinct_id, "limit": last if distinct_id else 1000}
    found = {row.id: (row, row.kept_in) for row in conn.execute(queries.FIND_COPIES, params)}
    if insert_id is None or not found:
        for slot in _newest_first(conn):
            rows = conn.execute(queries.FIND_IN_SLOT, {**params, "slot": slot}).all()
            found.update((row.id, (row, "events")) for row in rows if row.id not in found)
            if (insert_id is not None and rows) or len(found) >= params["limit"]:
                break
    if len(found) < params["limit"] and conn.execute(queries.LEGACY_PRESENT).scalar_one():
        found.update((row.id, (row, "legacy")) for row in conn.execute(queries.FIND_IN_LEGACY, params))
    return [found[id_] for id_ in sorted(found, reverse=True)][:params["limit"]]


def _newest_first(conn: Connection) -> Iterator[int]:
    current = conn.execute(queries.CURRENT_SLOT).scalar_one()
    return ((current - back) % SLOTS for back in range(SLOTS))


def history(conn: Connection, row: Any, kept_in: str) -> History:
    """The whole story of one found event."""
    now = conn.execute(queries.DATABASE_NOW).scalar_one()
    retry = conn.execute(queries.EVENT_RETRY, {"id": row.id}).mappings().first()
    dead = conn.execute(queries.EVENT_DEAD, {"id": row.id}).mappings().first()
    legacy = dict(row._mapping) if kept_in == "legacy" else None
    until = (dead and dead["dead_at"]) or (retry and retry["delivered_at"]) or now
    attempts = tuple(_attempts(conn, row.id, row.created_at, until + timedelta(seconds=1), now))
    state = _state(conn, row, attempts, retry, dead, legacy)
    return History(row.id, row.insert_id, row.event_name, (row.payload.get("properties") or {}).get("distinct_id"),
                   row.created_at, kept_in, row.payload, attempts, dict(retry) if retry else None,
                   dict(dead) if dead else None, legacy, state)


def _attempts(conn: Connection, event_id: int, since: datetime, until: datetime, now: datetime) -> Iterator[Attempt]:
    """The claims that held it, read a span of the log at a time from its enqueue on, until its delivery or `until`."""
    start, span = since, FIRST_SPAN
    while start < until:
        end = min(start + span, until)
        for row in conn.execute(queries.EVENT_CLAIMS, {"id": event_id, "since": start, "until": end}):
            attempt = Attempt(row.claim_id, row.kind, row.owner, row.claimed_at, row.lease_until, row.settled_at,
                              _answer(row, now), row.http_status, row.reason)
            yield attempt
            if attempt.answer == "delivered":
                return
        start, span = end, span * 2


def _answer(claim: Any, now: datetime) -> str:
    if claim.failed:
        return "failed"
    if claim.done:
        return "delivered"
    if claim.expired:
        return "lease expired"
    return "in flight, past its lease" if claim.lease_until < now else "in flight"


def _state(conn: Connection, row: Any, attempts: tuple[Attempt, ...], retry, dead, legacy) -> str:
    if dead:
        return "dead"
    if retry:
        return "delivered" if retry["delivered_at"] else "in_flight" if retry["lease_owner"] else "pending"
    if legacy:
        return legacy["status"]
    if any(a.answer.startswith("in flight") for a in attempts):
        return "in_flight"
    claimed = conn.execute(queries.CLAIMED_BY_POSITION, {"txid": row.txid, "id": row.id}).scalar()
    return "delivered" if claimed else "pending"
