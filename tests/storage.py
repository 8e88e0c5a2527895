"""States of the outbox built with SQL, as the storage contract says the engine writes them (docs/internals.md,
'The schema'), for tests that need a state without running a worker: events enqueued (in the slot wanted), fresh
claims taken by fp_outbox_claim_fresh, settles written to the claims log with their retries and dead letters, due
claims of the retries, and times moved into the past."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from sqlalchemy import Engine, text

OWNER = "test-host:1:a1"


def enqueue(engine: Engine, count: int = 1, *, name: str = "E", slot: int | None = None,
            created_ago: str | None = None, insert_ids: Sequence[str] | None = None, ids: Sequence[int] | None = None,
            distinct_id: str = "u1") -> list[int]:
    """`count` events committed in one transaction, as enqueue writes them (explicit slot, created_at or ids
    when given); returns their ids."""
    insert_ids = list(insert_ids or [f"{name}-{n}-{_serial()}" for n in range(count)])
    rows = []
    with engine.begin() as conn:
        for n, insert_id in enumerate(insert_ids):
            payload = {"event": name, "properties": {"distinct_id": distinct_id, "token": "secret-token",
                                                     "$insert_id": insert_id}}
            rows.append(conn.execute(text(
                "INSERT INTO fp_outbox_events (id, insert_id, event_name, payload, slot, created_at)"
                " VALUES (coalesce(:id, nextval(pg_get_serial_sequence('fp_outbox_events', 'id'))), :insert_id,"
                " :name, CAST(:payload AS json), coalesce(:slot, fp_outbox_slot()),"
                " now() - coalesce(CAST(:created_ago AS interval), interval '0')) RETURNING id"),
                {"id": ids[n] if ids else None, "insert_id": insert_id, "name": name, "payload": json.dumps(payload),
                 "slot": slot, "created_ago": created_ago}).scalar_one())
    return rows


def current_slot(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT fp_outbox_slot()")).scalar_one()


def far_slot(engine: Engine, offset: int = 8) -> int:
    """A slot `offset` periods away from the current one: never current during a test, whatever the clock does."""
    return (current_slot(engine) + offset) % 16


def claim_fresh(engine: Engine, owner: str = OWNER, lease_s: float = 60.0,
                limit: int = 1000) -> tuple[int | None, list[int]]:
    """One fresh claim, as a worker's: (its claims row id, the event ids), (None, []) when nothing was past the
    position."""
    with engine.begin() as conn:
        rows = conn.execute(text("SELECT claim_id, id FROM fp_outbox_claim_fresh(:owner, :lease_s, :limit, false)"),
                            {"owner": owner, "lease_s": lease_s, "limit": limit}).all()
    return (rows[0].claim_id if rows else None), [row.id for row in rows]


def settle_fresh(engine: Engine, claim_id: int, *, delivered: Iterable[int] = (), retry: Iterable[int] = (),
                 dead: Iterable[int] = (), status: int | None = 503, error: str = "HTTP 503: busy",
                 retry_in: str = "0 seconds", counted: bool = True) -> None:
    """A settle of a fresh claim: the log's row (done, delivered, each failure's answer, settled once all are done),
    a retries row per retried event and a dead letter per dead one, copied from the events."""
    delivered, retry, dead = list(delivered), list(retry), list(dead)
    with engine.begin() as conn:
        _log(conn, claim_id, delivered, retry + dead, status, error)
        conn.execute(text(
            "INSERT INTO fp_outbox_retries (id, insert_id, event_name, payload, created_at, trace_context, attempts,"
            " next_attempt_at, last_status, last_error)"
            " SELECT e.id, e.insert_id, e.event_name, e.payload, e.created_at, e.trace_context, :attempts,"
            " now() + CAST(:retry_in AS interval), :status, :error"
            " FROM fp_outbox_events AS e WHERE e.id = ANY(:ids)"),
            {"ids": retry, "attempts": 1 if counted else 0, "retry_in": retry_in, "status": status, "error": error})
        conn.execute(text(
            "INSERT INTO fp_outbox_dead_letters (id, insert_id, event_name, payload, created_at, trace_context,"
            " attempts, last_status, last_error)"
            " SELECT e.id, e.insert_id, e.event_name, e.payload, e.created_at, e.trace_context, 1, :status, :error"
            " FROM fp_outbox_events AS e WHERE e.id = ANY(:ids)"), {"ids": dead, "status": status, "error": error})


def claim_due(engine: Engine, ids: Iterable[int], owner: str = OWNER, lease_s: float = 60.0) -> int:
    """A due claim of these retries rows: each leased (attempts + 1, next_attempt_at = lease_until), one log row."""
    ids = list(ids)
    with engine.begin() as conn:
        conn.execute(text(
            "UPDATE fp_outbox_retries SET attempts = attempts + 1, lease_owner = :owner,"
            " lease_until = now() + make_interval(secs => :lease_s),"
            " next_attempt_at = now() + make_interval(secs => :lease_s)"
            " WHERE id = ANY(:ids)"), {"ids": ids, "owner": owner, "lease_s": lease_s})
        return conn.execute(text(
            "INSERT INTO fp_outbox_claims (kind, owner, lease_until, ids)"
            " VALUES ('due', :owner, now() + make_interval(secs => :lease_s), :ids) RETURNING id"),
            {"ids": sorted(ids), "owner": owner, "lease_s": lease_s}).scalar_one()


def settle_due(engine: Engine, claim_id: int, *, delivered: Iterable[int] = (), retry: Iterable[int] = (),
               dead: Iterable[int] = (), status: int | None = 503, error: str = "HTTP 503: busy",
               retry_in: str = "30 seconds") -> None:
    """A settle of a due claim: the log's row; delivered retries rows kept with delivered_at (next_attempt_at
    'infinity'), retried ones back to waiting, dead ones moved to the dead letters."""
    delivered, retry, dead = list(delivered), list(retry), list(dead)
    with engine.begin() as conn:
        _log(conn, claim_id, delivered, retry + dead, status, error)
        conn.execute(text(
            "UPDATE fp_outbox_retries SET delivered_at = now(), lease_owner = NULL, lease_until = NULL,"
            " next_attempt_at = 'infinity', last_status = 200, last_error = NULL WHERE id = ANY(:ids)"),
            {"ids": delivered})
        conn.execute(text(
            "UPDATE fp_outbox_retries SET lease_owner = NULL, lease_until = NULL,"
            " next_attempt_at = now() + CAST(:retry_in AS interval), last_status = :status, last_error = :error"
            " WHERE id = ANY(:ids)"), {"ids": retry, "retry_in": retry_in, "status": status, "error": error})
        conn.execute(text(
            "WITH gone AS (DELETE FROM fp_outbox_retries WHERE id = ANY(:ids) RETURNING *)"
            " INSERT INTO fp_outbox_dead_letters (id, insert_id, event_name, payload, created_at, trace_context,"
            " attempts, last_status, last_error)"
            " SELECT id, insert_id, event_name, payload, created_at, trace_context, attempts, :status, :error"
            " FROM gone"),
            {"ids": dead, "status": status, "error": error})


def _log(conn, claim_id: int, delivered: list[int], failed: list[int], status: int | None, error: str) -> None:
    conn.execute(text(
        "UPDATE fp_outbox_claims SET done = done || CAST(:ids AS bigint[]), delivered = delivered + :n_delivered,"
        " failed_ids = failed_ids || CAST(:failed AS bigint[]),"
        " failed_statuses = failed_statuses || CAST(:statuses AS smallint[]),"
        " failed_errors = failed_errors || CAST(:errors AS text[]),"
        " settled_at = CASE WHEN cardinality(done) + cardinality(CAST(:ids AS bigint[])) >= cardinality(ids)"
        "                   THEN now() END"
        " WHERE id = :claim_id"),
        {"claim_id": claim_id, "ids": delivered + failed, "n_delivered": len(delivered), "failed": failed,
         "statuses": [status] * len(failed), "errors": [error] * len(failed)})


def backdate_claim(engine: Engine, claim_id: int, ago: str, *, lease_ago: str | None = None) -> None:
    """Move a claim into the past: claimed (and settled, if it is) `ago`; its lease ran out `lease_ago` ago
    (default: a minute after it was claimed)."""
    with engine.begin() as conn:
        conn.execute(text(
            "UPDATE fp_outbox_claims SET claimed_at = now() - CAST(:ago AS interval),"
            " settled_at = CASE WHEN settled_at IS NOT NULL THEN now() - CAST(:ago AS interval) END,"
            " lease_until = now()"
            "   - coalesce(CAST(:lease_ago AS interval), CAST(:ago AS interval) - interval '1 minute')"
            " WHERE id = :claim_id"), {"claim_id": claim_id, "ago": ago, "lease_ago": lease_ago})


def expire_lease(engine: Engine, ids: Iterable[int], ago: str = "10 minutes") -> None:
    """The leases of these retries rows (and of any due claim of them) ran out `ago` ago: their worker died."""
    ids = list(ids)
    with engine.begin() as conn:
        conn.execute(text(
            "UPDATE fp_outbox_retries SET lease_until = now() - CAST(:ago AS interval),"
            " next_attempt_at = now() - CAST(:ago AS interval) WHERE id = ANY(:ids) AND lease_owner IS NOT NULL"),
            {"ids": ids, "ago": ago})
        conn.execute(text(
            "UPDATE fp_outbox_claims SET lease_until = now() - CAST(:ago AS interval)"
            " WHERE settled_at IS NULL AND ids && CAST(:ids AS bigint[])"), {"ids": ids, "ago": ago})


def recover_expired(engine: Engine, claim_id: int, error: str = "lease expired (the worker died)") -> None:
    """The due path's recovery of a fresh claim whose lease ran out: settled as expired, its events not done become
    retries due now, the claim counted as an attempt."""
    with engine.begin() as conn:
        conn.execute(text(
            "WITH c AS (UPDATE fp_outbox_claims SET settled_at = now(), expired = true,"
            " lease_until = least(lease_until, now()) WHERE id = :claim_id RETURNING ids, done)"
            " INSERT INTO fp_outbox_retries (id, insert_id, event_name, payload, created_at, trace_context, attempts,"
            " next_attempt_at, last_error)"
            " SELECT e.id, e.insert_id, e.event_name, e.payload, e.created_at, e.trace_context, 1, now(), :error"
            " FROM c, fp_outbox_events AS e WHERE e.id = ANY (c.ids) AND e.id <> ALL (c.done)"),
            {"claim_id": claim_id, "error": error})


def dead_letter(engine: Engine, id_: int, *, name: str = "E", insert_id: str | None = None, attempts: int = 1,
                status: int | None = 400, error: str = "HTTP 400: bad", dead_ago: str = "0 seconds",
                created_ago: str | None = None) -> None:
    """A dead letter whose event's partition is gone already (the common case for an old one)."""
    insert_id = insert_id or f"dead-{id_}"
    payload = {"event": name, "properties": {"distinct_id": "u1", "token": "secret-token", "$insert_id": insert_id}}
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO fp_outbox_dead_letters (id, insert_id, event_name, payload, created_at, attempts,"
            " last_status, last_error, dead_at) VALUES (:id, :insert_id, :name, CAST(:payload AS json),"
            " now() - CAST(:created_ago AS interval), :attempts, :status, :error,"
            " now() - CAST(:dead_ago AS interval))"),
            {"id": id_, "insert_id": insert_id, "name": name, "payload": json.dumps(payload), "attempts": attempts,
             "status": status, "error": error, "dead_ago": dead_ago, "created_ago": created_ago or dead_ago})


def delivered_in_bulk(engine: Engine, batches: int = 4, size: int = 5000) -> None:
    """`batches` transactions of `size` events each, claimed and delivered (a big table of delivered events), then
    ANALYZE, so that the planner knows it."""
    for _ in range(batches):
        ids = enqueue(engine, size)
        settle_fresh(engine, claim_fresh(engine, limit=size)[0], delivered=ids)
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))


def entries_read(conn, statement, relations: str = "fp_outbox_%") -> tuple[list, int]:
    """Run `statement` (then roll back): its rows, and the rows and index entries it read from the relations named
    like `relations` (a count of what it visited, which no machine load can change)."""
    count = text("SELECT sum(pg_stat_get_xact_tuples_returned(c.oid)) FROM pg_class AS c"
                 " WHERE c.relname LIKE :like AND c.relkind IN ('r', 'i')")
    before = conn.execute(count, {"like": relations}).scalar()
    rows = conn.execute(statement).all()
    read = conn.execute(count, {"like": relations}).scalar() - before
    conn.rollback()
    return rows, int(read)


def states(engine: Engine) -> dict[int, str]:
    """id -> status, from the view of every event's state."""
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT id, status FROM fp_outbox_event_states")).all())


def set_slot_period(engine: Engine, period_s: float, since_ago: str = "30 days") -> None:
    """The slot period as a worker would set it, with `since` moved into the past (as if set long ago)."""
    with engine.begin() as conn:
        conn.execute(text("SELECT fp_outbox_set_slot_period(:retain_s)"), {"retain_s": period_s * 14 if period_s >= 120 else max(0.0, period_s * 15 - 120)})
        conn.execute(text("UPDATE fp_outbox_slot_period SET since = now() - CAST(:ago AS interval)"),
                     {"ago": since_ago})


_counter = [0]


def _serial() -> int:
    _counter[0] += 1
    return _counter[0]
