"""The operator's SQL, in one place: every statement `fp-outbox` runs (stuck, dead, requeue, describe, count
purgeable, activity, show) and every statement of docs/admin.sql, the same jobs for people at a psql prompt, which
is rendered from the recipes below (`python docs/render_admin_sql.py`; a test holds the file to the rendering).
Where a command and a recipe do the same thing they share their text. Each is named, with why it is shaped so.
The purges themselves are the engine's (worker.engine.retention), since the worker runs them too.

The storage (migration 0007, docs/internals.md): events are insert-only, in partitions by slot; what became of
them is beside them, in the claims log (fp_outbox_claims), the retries (fp_outbox_retries) and the dead letters
(fp_outbox_dead_letters). The views (fp_outbox_stuck, _overdue, _dead, _lag, _event_states) read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import bindparam, text
from sqlalchemy.dialects import postgresql

# Stuck: in flight past the lease (its worker died or hung): the events of unsettled claims past their lease and
# the retries leased past theirs, from the claims' and the retries' indexes (the view, migration 0007). Any worker
# takes these back by itself (its recovery), so rows that stay here mean no worker is running.
LIST_STUCK = text(
    """
    SELECT id, insert_id, event_name, attempts, lease_owner, lease_until, lease_expired_s, last_status, last_error
      FROM fp_outbox_stuck
     ORDER BY lease_until, id
     LIMIT :limit
    """
)

# The same rows, counted, for `requeue --stuck --dry-run` and the footer of `stuck`.
# An outbox table (in the search path's first schema) that the current role neither owns nor is a member of its
# owner: migrate cannot alter it.
NOT_OWNED_TABLE = text("""\
SELECT current_user AS role, c.relname, pg_get_userbyid(c.relowner) AS owner
  FROM pg_class c
 WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p', 'v', 'S')
   AND c.relname LIKE 'fp\\_outbox\\_%' AND NOT pg_has_role(current_user, c.relowner, 'USAGE')
 ORDER BY c.relname LIMIT 1""")

COUNT_STUCK = text("SELECT count(*) FROM fp_outbox_stuck")

# The filters of `dead` and `requeue --dead`, on the dead letters: each is off when its parameter is null, so one
# statement serves every combination. strpos instead of LIKE, so '%' and '_' in --error match themselves.
_DEAD_FILTER = """(CAST(:event AS text) IS NULL OR event_name = CAST(:event AS text))
       AND (CAST(:older_than_s AS float8) IS NULL
            OR dead_at < now() - make_interval(secs => CAST(:older_than_s AS float8)))
       AND (CAST(:error AS text) IS NULL
            OR strpos(lower(coalesce(last_error, '')), lower(CAST(:error AS text))) > 0)"""

# Newest first: after a bad deploy the operator wants the latest reasons on top (the dead letters' dead_at index).
LIST_DEAD = text(
    f"""
    SELECT id, insert_id, event_name, attempts, last_status, last_error, dead_at, created_at
      FROM fp_outbox_dead_letters
     WHERE {_DEAD_FILTER}
     ORDER BY dead_at DESC, id DESC
     LIMIT :limit
    """
)

COUNT_DEAD = text(f"SELECT count(*) FROM fp_outbox_dead_letters WHERE {_DEAD_FILTER}")

# Requeue a dead letter: it becomes a retry due now, attempts from 0, with its payload (so the same $insert_id: a
# destination that already has it drops the copy); its last answer stays as history until the next attempt. The
# due path claims it. A retries row of the same id (none, by the storage contract) is reset rather than lost.
_REQUEUE_DEAD = """WITH requeued AS (
    DELETE FROM fp_outbox_dead_letters
     WHERE {where}
 RETURNING id, insert_id, event_name, payload, created_at, trace_context, last_status, last_error)
INSERT INTO fp_outbox_retries (id, insert_id, event_name, payload, created_at, trace_context, attempts,
                               next_attempt_at, last_status, last_error)
SELECT id, insert_id, event_name, payload, created_at, trace_context, 0, now(), last_status, last_error
  FROM requeued
    ON CONFLICT (id) DO UPDATE
   SET attempts = 0, next_attempt_at = now(), lease_owner = NULL, lease_until = NULL, delivered_at = NULL,
       last_status = excluded.last_status, last_error = excluded.last_error"""

REQUEUE_DEAD = text(_REQUEUE_DEAD.format(where=_DEAD_FILTER))
REQUEUE_DEAD_IDS = text(_REQUEUE_DEAD.format(where="id = ANY(CAST(:ids AS bigint[]))"))

# Requeue what is stuck, only past its lease (a live worker's event is never taken from under it): the events of
# fresh claims past their lease become retries due now (as the workers' own recovery does, but with attempts from
# 0), and the claims log records it (done, with the reason) so their claim no longer holds them; retries leased
# past theirs are due now. SKIP LOCKED: a claim its worker is settling right now is left to it.
REQUEUED = "lease expired, requeued by the operator"
_REQUEUE_STUCK = f"""WITH taken AS (
    SELECT c.id AS claim_id, u.id, u.txid
      FROM fp_outbox_claims AS c, unnest(c.ids, c.txids) AS u(id, txid)
     WHERE c.settled_at IS NULL AND c.kind = 'fresh' AND c.lease_until < now() AND u.id <> ALL (c.done){{events}}
       FOR UPDATE OF c SKIP LOCKED),
logged AS (
    UPDATE fp_outbox_claims AS c
       SET done = c.done || t.ids, failed_ids = c.failed_ids || t.ids,
           failed_statuses = c.failed_statuses || array_fill(NULL::smallint, ARRAY[cardinality(t.ids)]),
           failed_errors = c.failed_errors || array_fill('{REQUEUED}'::text, ARRAY[cardinality(t.ids)]),
           settled_at = CASE WHEN cardinality(c.done) + cardinality(t.ids) >= cardinality(c.ids) THEN now() END,
           expired = cardinality(c.done) + cardinality(t.ids) >= cardinality(c.ids)
      FROM (SELECT claim_id, array_agg(id) AS ids FROM taken GROUP BY claim_id) AS t
     WHERE c.id = t.claim_id),
from_claims AS (
    INSERT INTO fp_outbox_retries (id, insert_id, event_name, payload, created_at, trace_context, attempts,
                                   next_attempt_at, last_error)
    SELECT e.id, e.insert_id, e.event_name, e.payload, e.created_at, e.trace_context, 0, now(), '{REQUEUED}'
      FROM taken AS t JOIN fp_outbox_events AS e ON e.txid = t.txid AND e.id = t.id
        ON CONFLICT (id) DO NOTHING
 RETURNING id),
from_retries AS (
    UPDATE fp_outbox_retries
       SET attempts = 0, next_attempt_at = now(), lease_owner = NULL, lease_until = NULL
     WHERE lease_owner IS NOT NULL AND lease_until < now() AND delivered_at IS NULL{{retries}}
 RETURNING id)
SELECT id FROM from_claims UNION ALL SELECT id FROM from_retries"""

REQUEUE_STUCK = text(_REQUEUE_STUCK.format(events="", retries=""))
REQUEUE_STUCK_IDS = text(_REQUEUE_STUCK.format(events="\n       AND u.id = ANY(CAST(:ids AS bigint[]))",
                                               retries=" AND id = ANY(CAST(:ids AS bigint[]))"))

# `requeue --id`: which of the ids are dead letters or stuck (the small tables and indexes only) ...
REQUEUEABLE_IDS = text(
    """
    SELECT id FROM fp_outbox_dead_letters WHERE id = ANY(CAST(:ids AS bigint[]))
    UNION
    SELECT id FROM fp_outbox_stuck WHERE id = ANY(CAST(:ids AS bigint[]))
    """
)

# ... and what the others are, so it can say why it skips them: from every event's state, which reads the event
# table (no index on id alone there), so only for ids that are neither dead nor stuck.
DESCRIBE_IDS = text(
    """
    SELECT DISTINCT ON (id) id, status FROM fp_outbox_event_states
     WHERE id = ANY(CAST(:ids AS bigint[]))
     ORDER BY id, status = 'delivered'
    """
)

# For `purge --dry-run`: the claims log rows, delivered retries and dead letters a purge would delete (the slots
# it would truncate: worker.engine.preview_truncate). The claims from their BRIN index on claimed_at.
COUNT_PURGEABLE = text(
    """
    SELECT (SELECT count(*) FROM fp_outbox_claims
             WHERE claimed_at < now() - make_interval(secs => CAST(:delivered_s AS float8))
               AND settled_at < now() - make_interval(secs => CAST(:delivered_s AS float8))
               AND id <> (SELECT coalesce(max(id), 0) FROM fp_outbox_claims WHERE kind = 'fresh')) AS claims,
           (SELECT count(*) FROM fp_outbox_retries
             WHERE next_attempt_at = 'infinity'
               AND delivered_at < now() - make_interval(secs => CAST(:delivered_s AS float8))) AS retries,
           (SELECT count(*) FROM fp_outbox_dead_letters
             WHERE dead_at < now() - make_interval(secs => CAST(:dead_s AS float8))) AS dead
    """
)

# The previous release's delivered rows a purge would delete, while its table is there (reads it).
COUNT_PURGEABLE_LEGACY = text(
    """
    SELECT count(*) FROM fp_outbox_events_legacy
     WHERE status = 'delivered' AND delivered_at < now() - make_interval(secs => CAST(:delivered_s AS float8))
    """
)
LEGACY_PRESENT = text("SELECT to_regclass('fp_outbox_events_legacy') IS NOT NULL")

# `fp-outbox status`: what is wrong now (stuck, overdue, from the views' indexes) and the throughput over the last
# minute: the deliveries of the claims taken in it (the claims' BRIN index on claimed_at) and the dead letters.
ACTIVITY = text(
    """
    SELECT (SELECT count(*) FROM fp_outbox_stuck) AS stuck,
           (SELECT count(*) FROM fp_outbox_overdue) AS overdue,
           (SELECT coalesce(sum(delivered), 0) FROM fp_outbox_claims
             WHERE claimed_at >= now() - interval '1 minute') AS delivered_last_minute,
           (SELECT count(*) FROM fp_outbox_dead_letters
             WHERE dead_at >= now() - interval '1 minute') AS dead_last_minute
    """
)


# -- fp-outbox show: one event's history ----------------------------------------------------------------------
# An event is found by its $insert_id or its distinct_id, which have no index (the events' only index is their
# primary key, by design: enqueue pays for nothing else): the dead letters and the retries first (small tables,
# each with a copy of the payload), then the event table one partition at a time, the current slot's first and
# back from there, so a recent event costs the newest partitions only; then the previous release's table.

CURRENT_SLOT = text("SELECT fp_outbox_slot() AS slot")

_FOUND = """id, txid, insert_id, event_name, payload::jsonb #- '{properties,token}' AS payload, created_at"""

FIND_COPIES = text(
    f"""
    SELECT {_FOUND.replace("txid", "NULL::text AS txid")}, 'dead letters' AS kept_in FROM fp_outbox_dead_letters
     WHERE insert_id = CAST(:insert_id AS text)
        OR payload -> 'properties' ->> 'distinct_id' = CAST(:distinct_id AS text)
    UNION ALL
    SELECT {_FOUND.replace("txid", "NULL::text AS txid")}, 'retries' FROM fp_outbox_retries
     WHERE insert_id = CAST(:insert_id AS text)
        OR payload -> 'properties' ->> 'distinct_id' = CAST(:distinct_id AS text)
     ORDER BY id DESC
     LIMIT :limit
    """
)

# One partition (the slot is a constant of the plan: the others are pruned), newest first.
FIND_IN_SLOT = text(
    f"""
    SELECT {_FOUND.replace("txid", "txid::text AS txid")} FROM fp_outbox_events
     WHERE slot = :slot
       AND (insert_id = CAST(:insert_id AS text)
            OR payload -> 'properties' ->> 'distinct_id' = CAST(:distinct_id AS text))
     ORDER BY id DESC
     LIMIT :limit
    """
)

FIND_IN_LEGACY = text(
    f"""
    SELECT {_FOUND.replace("txid", "NULL::text AS txid")}, status, attempts, next_attempt_at, lease_owner, lease_until,
           last_status, last_error, delivered_at, dead_at
      FROM fp_outbox_events_legacy
     WHERE insert_id = CAST(:insert_id AS text)
        OR payload -> 'properties' ->> 'distinct_id' = CAST(:distinct_id AS text)
     ORDER BY id DESC
     LIMIT :limit
    """
)

# The claims that held one event, in a span of time from its enqueue on: the claims' BRIN index on claimed_at reads
# the block ranges of that span only (show widens the span until the event's end, doubling it each time). Each
# with its answer for this event: failed (the HTTP status and reason), done and not failed (delivered), not done
# in a claim whose lease expired, or still in flight.
EVENT_CLAIMS = text(
    """
    SELECT id AS claim_id, kind, owner, claimed_at, lease_until, settled_at, expired,
           CAST(:id AS bigint) = ANY (done) AS done,
           array_position(failed_ids, CAST(:id AS bigint)) IS NOT NULL AS failed,
           failed_statuses[array_position(failed_ids, CAST(:id AS bigint))] AS http_status,
           failed_errors[array_position(failed_ids, CAST(:id AS bigint))] AS reason
      FROM fp_outbox_claims
     WHERE claimed_at >= :since AND claimed_at < :until AND ids @> ARRAY[CAST(:id AS bigint)]
     ORDER BY id
    """
)

# Its retry (due path) and its dead letter, by primary key; and whether the fresh path's position has passed it.
# A delivered retry waits at next_attempt_at 'infinity' (out of every due claim's way), which is no time to show.
EVENT_RETRY = text(
    """
    SELECT attempts, CASE WHEN delivered_at IS NULL THEN next_attempt_at END AS next_attempt_at, lease_owner,
           lease_until, last_status, last_error, delivered_at
      FROM fp_outbox_retries WHERE id = :id
    """
)
EVENT_DEAD = text("SELECT attempts, last_status, last_error, dead_at FROM fp_outbox_dead_letters WHERE id = :id")
CLAIMED_BY_POSITION = text(
    """
    SELECT pg_visible_in_snapshot(CAST(:txid AS xid8), win_lo)
           OR (pg_visible_in_snapshot(CAST(:txid AS xid8), win_hi)
               AND (CAST(:txid AS xid8), CAST(:id AS bigint)) <= (key_txid, key_id)) AS claimed
      FROM fp_outbox_claims WHERE kind = 'fresh' ORDER BY id DESC LIMIT 1
    """
)
DATABASE_NOW = text("SELECT now() AS now")


# -- docs/admin.sql: the same jobs for people at a psql prompt -------------------------------------------------

ADMIN_SQL_HEADER = """\
fp-outbox admin queries, for psql or any SQL client.

Plain SQL with example values: change the literals (event names, ages, ids, insert ids) and paste.
The views fp_outbox_stuck, fp_outbox_overdue, fp_outbox_dead, fp_outbox_lag and fp_outbox_event_states
(every event's state, one row each) come with `fp-outbox migrate`. The events are insert-only: what
became of them is in the claims log (fp_outbox_claims), the retries and the dead letters beside them
(docs/internals.md). Statements that change rows say so in their first line; to look before you commit,
run them between BEGIN; and COMMIT; (or ROLLBACK;). The same jobs as commands:
`fp-outbox status | stuck | dead | requeue | purge | show` (see docs/operations.md).
tests/test_admin_queries.py runs every statement here against seeded rows, so none goes stale.
Rendered from worker/admin/queries.py (python docs/render_admin_sql.py): change them there."""


@dataclass(frozen=True)
class Recipe:
    """One statement of docs/admin.sql: what it is for (the comment above it), its SQL, and the example values
    its :parameters are shown with."""

    name: str
    why: str
    sql: str
    examples: dict[str, object] = field(default_factory=dict)

    def rendered(self) -> str:
        """The statement as docs/admin.sql shows it: the comment, then the SQL with its examples filled in."""
        params = [bindparam(key, value, expanding=isinstance(value, list)) for key, value in self.examples.items()]
        compiled = text(self.sql).bindparams(*params).compile(
            dialect=postgresql.psycopg.dialect(), compile_kwargs={"literal_binds": True})
        comment = "\n".join(f"-- {line}" for line in self.why.splitlines())
        return f"-- name: {self.name}\n{comment}\n{compiled};\n"


_ANSWER = """CASE WHEN array_position(c.failed_ids, e.id) IS NOT NULL THEN 'failed'
            WHEN e.id = ANY (c.done) THEN 'delivered'
            WHEN c.expired THEN 'lease expired'
            WHEN c.lease_until < now() THEN 'in flight, past its lease'
            ELSE 'in flight' END"""

RECIPES = [
    Recipe("lag", """\
How many events per status, and the age in seconds of the oldest of each (for pending: the lag).
Delivered counts the deliveries the claims log records (kept for --retain-delivered).""",
           "SELECT * FROM fp_outbox_lag"),
    Recipe("find_stuck", """\
Events in flight past their lease: their worker died or hangs. Any running worker takes them
back by itself; if rows stay here, no worker is running (or requeue them, below).""",
           "SELECT * FROM fp_outbox_stuck ORDER BY lease_until"),
    Recipe("find_overdue",
           "Pending events due more than a minute ago but not sent: workers stopped, missing or far behind.",
           "SELECT * FROM fp_outbox_overdue ORDER BY next_attempt_at LIMIT 100"),
    Recipe("event_state", """\
An event's state, one query away, by its $insert_id (what the destination and your logs show):
pending, in_flight, delivered or dead, with its attempts, lease, last answer and when it died.
insert_id has no index (the events' only index is their primary key): this reads the event table;
`fp-outbox show` reads it newest partition first and tells the whole history.""",
           "SELECT * FROM fp_outbox_event_states WHERE insert_id = :insert_id",
           {"insert_id": "6f1c2a9e-0b7d-4e0c-9a51-3d2f8c7b1e42"}),
    Recipe("inspect_event", """\
The payload of one event, by its $insert_id, with the token taken out (payload is json, stored
verbatim; the cast to jsonb lends it jsonb's operators), wherever it is kept: the events, and the
copies a retry or a dead letter holds.""", """\
SELECT 'events' AS kept_in, id, created_at, payload::jsonb #- '{properties,token}' AS payload_without_token
  FROM fp_outbox_events WHERE insert_id = :insert_id
UNION ALL
SELECT 'retries', id, created_at, payload::jsonb #- '{properties,token}'
  FROM fp_outbox_retries WHERE insert_id = :insert_id
UNION ALL
SELECT 'dead letters', id, created_at, payload::jsonb #- '{properties,token}'
  FROM fp_outbox_dead_letters WHERE insert_id = :insert_id""", {"insert_id": "6f1c2a9e-0b7d-4e0c-9a51-3d2f8c7b1e42"}),
    Recipe("event_claims", """\
Each claim that held one event, by its row id (event_state shows it): when, by which worker, and
its answer (delivered; failed, with the HTTP status and reason; lease expired; in flight). Reach
back to the event's created_at: the claims' BRIN index on claimed_at reads only the log from then on.""", f"""\
SELECT c.id AS claim_id, c.kind, c.owner, c.claimed_at, c.lease_until, c.settled_at,
       {_ANSWER} AS answer,
       c.failed_statuses[array_position(c.failed_ids, e.id)] AS http_status,
       c.failed_errors[array_position(c.failed_ids, e.id)] AS reason
  FROM (SELECT CAST(:id AS bigint) AS id) AS e
  JOIN fp_outbox_claims AS c ON c.ids @> ARRAY[e.id]
 WHERE c.claimed_at >= now() - interval '2 days'
 ORDER BY c.id""", {"id": 5}),
    Recipe("dead_by_reason", """\
Dead events grouped by reason (HTTP status and the start of the error), most frequent first:
what went wrong, how often, and since when.""", """\
SELECT last_status, left(last_error, 120) AS reason, count(*) AS events,
       min(dead_at) AS first_dead_at, max(dead_at) AS last_dead_at
  FROM fp_outbox_dead
 GROUP BY last_status, left(last_error, 120)
 ORDER BY events DESC"""),
    Recipe("list_dead", "The dead events of one reason and event name, newest first.", """\
SELECT * FROM fp_outbox_dead
 WHERE last_status = :status AND event_name = :event
 ORDER BY dead_at DESC
 LIMIT 100""", {"status": 400, "event": "Purchase"}),
    Recipe("requeue_dead", """\
CHANGES ROWS. After fixing the cause, send dead events again: each dead letter becomes a retry due
now, attempts from 0, with the same payload and so the same $insert_id (a destination that
already has one drops the copy). Here: 'Purchase' events that died of a 400 in the last day.""",
           _REQUEUE_DEAD.format(where="last_status = :status AND event_name = :event\n"
                                      "       AND dead_at > now() - interval '1 day'"),
           {"status": 400, "event": "Purchase"}),
    Recipe("requeue_ids", "CHANGES ROWS. Send these dead events again, by row id (as `fp-outbox dead` lists them).",
           _REQUEUE_DEAD.format(where="id IN :ids"), {"ids": [101, 102]}),
    # The command's own statement: what `fp-outbox requeue --stuck` runs, word for word.
    Recipe("requeue_stuck", """\
CHANGES ROWS. Make events stuck in flight past their lease due now, attempts from 0. Only expired
leases: a live worker's events are never taken from under it; the claims log records the requeue.""",
           REQUEUE_STUCK.text),
    Recipe("purge_delivered", """\
DELETES ROWS (by TRUNCATE). Retire delivered events by whole partitions: each slot whose events
are all claimed and settled and whose newest is more than 7 days old is truncated; the outcome
says 'truncated' or why not (current, young, empty; unclaimed, unsettled, busy: kept). A slot
still written by a transaction is skipped after 200 ms, never waited for. No DELETE on the events.""",
           "SELECT slot, fp_outbox_truncate_slot(slot, 7 * 86400) AS outcome FROM generate_series(0, 15) AS slot"),
    Recipe("purge_claims", """\
DELETES ROWS. The claims log past retention: claims settled more than 7 days ago, at most 5000 per
run (repeat until 0; in psql add \\watch 1 on the next line), never the latest fresh claim (it holds
the workers' shared position). On a big log prefer `fp-outbox purge --delivered-older-than 7d`.""", """\
DELETE FROM fp_outbox_claims
 WHERE id IN (SELECT id FROM fp_outbox_claims
               WHERE claimed_at < now() - interval '7 days' AND settled_at < now() - interval '7 days'
                 AND id <> (SELECT max(id) FROM fp_outbox_claims WHERE kind = 'fresh')
               LIMIT 5000
                 FOR UPDATE SKIP LOCKED)"""),
    Recipe("purge_dead", """\
DELETES ROWS. Dead letters that died more than 30 days ago, at most 5000 per run; repeat until 0.
Requeue the ones you still want first.""", """\
DELETE FROM fp_outbox_dead_letters
 WHERE id IN (SELECT id FROM fp_outbox_dead_letters
               WHERE dead_at < now() - interval '30 days'
               LIMIT 5000
                 FOR UPDATE SKIP LOCKED)"""),
]


def render_admin_sql() -> str:
    """docs/admin.sql as it must read: the header, then every recipe with its example values."""
    header = "\n".join(f"-- {line}".rstrip() for line in ADMIN_SQL_HEADER.splitlines())
    return "\n".join([header + "\n", *(recipe.rendered() for recipe in RECIPES)]).rstrip("\n") + "\n"
