"""The operator's SQL, in one place: every statement `fp-outbox` runs on the queue's table (stuck, dead,
requeue, describe, count purgeable, activity) and every statement of docs/admin.sql, the same jobs for people
at a psql prompt, which is rendered from the recipes below (`python docs/render_admin_sql.py`; a test holds
the file to the rendering). Where a command and a recipe do the same thing they share their text. Each is
named, with why it is shaped so. The purge batches themselves are the engine's (worker.engine.queries),
since the worker runs them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import bindparam, text
from sqlalchemy.dialects import postgresql

# Stuck: in flight past the lease (its worker died or hung). Read from the claim's partial index;
# any worker claims these again by itself, so rows that stay here mean no worker is running.
STUCK = "status = 'in_flight' AND lease_until < now()"

LIST_STUCK = text(
    f"""
    SELECT id, insert_id, event_name, attempts, lease_owner, lease_until,
           extract(epoch FROM now() - lease_until)::float8 AS lease_expired_s, last_status, last_error
      FROM fp_outbox_events
     WHERE {STUCK}
     ORDER BY lease_until
     LIMIT :limit
    """
)

# The same rows, counted, for `requeue --stuck --dry-run` and the footer of `stuck`.
COUNT_STUCK = text(f"SELECT count(*) FROM fp_outbox_events WHERE {STUCK}")

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
REQUEUE_SET = """SET status = 'pending', attempts = 0, next_attempt_at = now(),
       lease_owner = NULL, lease_until = NULL, dead_at = NULL"""

REQUEUE_DEAD = text(f"UPDATE fp_outbox_events\n   {REQUEUE_SET}\n WHERE {_DEAD_FILTER}")

# Only leases that have expired: a live worker's row is never taken from under it. Should a worker
# claim the row meanwhile, PostgreSQL re-checks the condition after the row lock and skips it.
REQUEUE_STUCK = text(f"UPDATE fp_outbox_events\n   {REQUEUE_SET}\n WHERE {STUCK}")

# By id, still only dead or stuck rows: requeueing a pending, delivered or live in-flight row would
# just send it again (or twice at once).
REQUEUE_IDS = text(
    f"""
    UPDATE fp_outbox_events
       {REQUEUE_SET}
     WHERE id = ANY(CAST(:ids AS bigint[]))
       AND (status = 'dead' OR ({STUCK}))
 RETURNING id
    """
)

# What the given ids are now, so `requeue --id` can say why it skipped one.
DESCRIBE_IDS = text(
    f"""
    SELECT id, status, (status = 'dead' OR ({STUCK})) AS requeueable
      FROM fp_outbox_events
     WHERE id = ANY(CAST(:ids AS bigint[]))
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
    f"""
    SELECT (SELECT count(*) FROM fp_outbox_events
             WHERE {STUCK}) AS stuck,
           (SELECT count(*) FROM fp_outbox_events
             WHERE status = 'pending' AND next_attempt_at < now() - interval '1 minute') AS overdue,
           (SELECT count(*) FROM fp_outbox_events
             WHERE status = 'delivered' AND delivered_at >= now() - interval '1 minute') AS delivered_last_minute,
           (SELECT count(*) FROM fp_outbox_events
             WHERE status = 'dead' AND dead_at >= now() - interval '1 minute') AS dead_last_minute
    """
)


# -- docs/admin.sql: the same jobs for people at a psql prompt -------------------------------------------------

ADMIN_SQL_HEADER = """\
fp-outbox admin queries, for psql or any SQL client.

Plain SQL with example values: change the literals (event names, ages, ids, insert ids) and paste.
The views fp_outbox_stuck, fp_outbox_overdue, fp_outbox_dead and fp_outbox_lag come with
`fp-outbox migrate`. Statements that change rows say so in their first line; to look before you
commit, run them between BEGIN; and COMMIT; (or ROLLBACK;). The same jobs as commands:
`fp-outbox stuck | dead | requeue | purge` (see docs/operations.md).
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


RECIPES = [
    Recipe("lag", "How many events per status, and the age in seconds of the oldest of each (for pending: the lag).",
           "SELECT * FROM fp_outbox_lag"),
    Recipe("find_stuck", """\
Events in flight past their lease: their worker died or hangs. Any running worker claims them
again by itself; if rows stay here, no worker is running (or requeue them, below).""",
           "SELECT * FROM fp_outbox_stuck ORDER BY lease_until"),
    Recipe("find_overdue",
           "Pending events due more than a minute ago but not sent: workers stopped, missing or far behind.",
           "SELECT * FROM fp_outbox_overdue ORDER BY next_attempt_at LIMIT 100"),
    Recipe("inspect_event", """\
Everything about one event, by its $insert_id (what the destination and your logs show), with
the token taken out of the payload (payload is json, stored verbatim; the cast to jsonb lends it
jsonb's operators). insert_id has no index: this reads the table; by row id (WHERE id = 12345) it is instant.""", """\
SELECT id, status, event_name, attempts, created_at, next_attempt_at, lease_owner, lease_until,
       delivered_at, dead_at, last_status, last_error,
       payload::jsonb #- '{properties,token}' AS payload_without_token
  FROM fp_outbox_events
 WHERE insert_id = :insert_id""", {"insert_id": "6f1c2a9e-0b7d-4e0c-9a51-3d2f8c7b1e42"}),
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
CHANGES ROWS. After fixing the cause, send dead events again: due now, attempts from 0, the same
payload and so the same $insert_id (a destination that already has one drops the copy). Here:
'Purchase' events that died of a 400 in the last day.""", f"""\
UPDATE fp_outbox_events
   {REQUEUE_SET}
 WHERE status = 'dead' AND last_status = :status AND event_name = :event
   AND dead_at > now() - interval '1 day'""", {"status": 400, "event": "Purchase"}),
    Recipe("requeue_ids", "CHANGES ROWS. Send these dead events again, by row id (as `fp-outbox dead` lists them).",
           f"""\
UPDATE fp_outbox_events
   {REQUEUE_SET}
 WHERE id IN :ids AND status = 'dead'""", {"ids": [101, 102]}),
    # The command's own statement: what `fp-outbox requeue --stuck` runs, word for word.
    Recipe("requeue_stuck", """\
CHANGES ROWS. Make events stuck in flight past their lease due now, attempts from 0. Only expired
leases: a live worker's events are never taken from under it.""", REQUEUE_STUCK.text),
    Recipe("purge_delivered", """\
DELETES ROWS. Delivered events delivered more than 7 days ago, at most 5000 per run, so each run
is a short transaction that never holds many locks; repeat until it deletes 0 rows (in psql,
add \\watch 1 on the next line and press Ctrl-C at DELETE 0). On a big table prefer
`fp-outbox purge --delivered-older-than 7d`, which walks the primary key instead of scanning.""", """\
DELETE FROM fp_outbox_events
 WHERE id IN (SELECT id FROM fp_outbox_events
               WHERE status = 'delivered' AND delivered_at < now() - interval '7 days'
               LIMIT 5000
                 FOR UPDATE SKIP LOCKED)"""),
    Recipe("purge_dead", """\
DELETES ROWS. Dead events that died more than 30 days ago, at most 5000 per run; repeat until 0.
Requeue the ones you still want first.""", """\
DELETE FROM fp_outbox_events
 WHERE id IN (SELECT id FROM fp_outbox_events
               WHERE status = 'dead' AND dead_at < now() - interval '30 days'
               LIMIT 5000
                 FOR UPDATE SKIP LOCKED)"""),
]


def render_admin_sql() -> str:
    """docs/admin.sql as it must read: the header, then every recipe with its example values."""
    header = "\n".join(f"-- {line}".rstrip() for line in ADMIN_SQL_HEADER.splitlines())
    return "\n".join([header + "\n", *(recipe.rendered() for recipe in RECIPES)]).rstrip("\n") + "\n"
