"""The admin views (migration 0002) and every statement of docs/admin.sql, run against seeded rows of
every kind, each checked to do what its comment says; a statement added without a check fails here."""

from __future__ import annotations

import json
import re

import pytest
from sqlalchemy import text

from tests.conftest import REPO
from worker.admin.queries import render_admin_sql

ADMIN_SQL = REPO / "docs" / "admin.sql"
INSERT_ID = "6f1c2a9e-0b7d-4e0c-9a51-3d2f8c7b1e42"  # the example in inspect_event

# (id, insert_id, event, status, attempts, created ago, next_attempt_at from now, lease_until from now,
#  lease_owner, last_status, last_error, delivered ago, dead ago): one row of every situation.
ROWS = [
    (1, "p-new", "Signup", "pending", 0, "1 second", "0 seconds", None, None, None, None, None, None),
    (2, "p-over", "Signup", "pending", 2, "2 hours", "-1 hour", None, None, 503, "HTTP 503: busy", None, None),
    (3, "f-live", "Signup", "in_flight", 1, "10 seconds", "1 minute", "1 minute", "live:1:a", None, None, None, None),
    (4, "f-stuck", "Signup", "in_flight", 3, "1 hour", "-10 minutes", "-10 minutes", "gone:2:b", 503, "HTTP 503",
     None, None),
    (5, INSERT_ID, "Purchase", "delivered", 1, "1 day", "0 seconds", None, None, 200, None, "1 day", None),
    (6, "ok-old", "Purchase", "delivered", 1, "8 days", "0 seconds", None, None, 200, None, "8 days", None),
    (101, "d-400", "Purchase", "dead", 1, "2 hours", "0 seconds", None, None, 400, "HTTP 400: bad price", None,
     "1 hour"),
    (102, "d-400-b", "Purchase", "dead", 1, "3 days", "0 seconds", None, None, 400, "HTTP 400: bad price", None,
     "3 days"),
    (103, "d-400-signup", "Signup", "dead", 1, "2 hours", "0 seconds", None, None, 400, "HTTP 400: no email",
     None, "1 hour"),
    (104, "d-exhausted", "Purchase", "dead", 25, "41 days", "0 seconds", None, None, 503,
     "gave up after 25 attempts: HTTP 503", None, "40 days"),
]


def _seed(conn) -> None:
    for (id_, insert_id, name, status, attempts, created, next_at, lease, owner, last_status, last_error,
         delivered, dead) in ROWS:
        payload = {"event": name, "properties": {"distinct_id": "u1", "token": "secret-token", "$insert_id": insert_id}}
        conn.execute(text(
            "INSERT INTO fp_outbox_events (id, insert_id, event_name, payload, status, attempts, created_at,"
            " next_attempt_at, lease_until, lease_owner, last_status, last_error, delivered_at, dead_at)"
            " VALUES (:id, :insert_id, :name, CAST(:payload AS jsonb), :status, :attempts,"
            " now() - CAST(:created AS interval), now() + CAST(:next_at AS interval),"
            " now() + CAST(:lease AS interval), :owner, :last_status, :last_error,"
            " now() - CAST(:delivered AS interval), now() - CAST(:dead AS interval))"),
            {"id": id_, "insert_id": insert_id, "name": name, "payload": json.dumps(payload), "status": status,
             "attempts": attempts, "created": created, "next_at": next_at, "lease": lease, "owner": owner,
             "last_status": last_status, "last_error": last_error, "delivered": delivered, "dead": dead})
    # Rows inserted later get ids after these, as enqueue's would.
    conn.execute(text("SELECT setval(pg_get_serial_sequence('fp_outbox_events', 'id'),"
                      " (SELECT max(id) FROM fp_outbox_events))"))


def _rows(conn) -> dict[int, dict]:
    return {r["id"]: dict(r) for r in conn.execute(text("SELECT * FROM fp_outbox_events")).mappings()}


@pytest.fixture
def seeded(clean):
    with clean.begin() as conn:
        _seed(conn)
    return clean


# -- the views -------------------------------------------------------------------------------------

def test_stuck_view_lists_only_expired_leases(seeded):
    with seeded.connect() as conn:
        rows = conn.execute(text("SELECT * FROM fp_outbox_stuck")).mappings().all()
    assert [(r["id"], r["lease_owner"], r["attempts"]) for r in rows] == [(4, "gone:2:b", 3)]
    assert 590 < rows[0]["lease_expired_s"] < 700


def test_overdue_view_lists_pending_due_over_a_minute_ago(seeded):
    with seeded.connect() as conn:
        rows = conn.execute(text("SELECT * FROM fp_outbox_overdue")).mappings().all()
    assert [(r["id"], r["last_error"]) for r in rows] == [(2, "HTTP 503: busy")]
    assert 3500 < rows[0]["overdue_s"] < 3700


def test_dead_view_has_the_reasons(seeded):
    with seeded.connect() as conn:
        rows = conn.execute(text("SELECT * FROM fp_outbox_dead ORDER BY id")).mappings().all()
    assert [r["id"] for r in rows] == [101, 102, 103, 104]
    assert {"last_status", "last_error", "attempts", "dead_at", "event_name", "insert_id"} <= set(rows[0])
    assert (rows[0]["last_status"], rows[0]["last_error"], rows[0]["event_name"], rows[0]["insert_id"]) == \
        (400, "HTTP 400: bad price", "Purchase", "d-400")


def test_lag_view_has_every_status_with_count_and_oldest_age(seeded):
    with seeded.connect() as conn:
        rows = conn.execute(text("SELECT * FROM fp_outbox_lag")).all()
    assert [(r.status, r.count) for r in rows] == [("pending", 2), ("in_flight", 2), ("delivered", 2), ("dead", 4)]
    ages = {r.status: r.oldest_age_s for r in rows}
    assert 7100 < ages["pending"] < 7300 and 41 * 86400 - 100 < ages["dead"] < 41 * 86400 + 100


def test_lag_view_shows_zero_for_an_empty_outbox(clean):
    with clean.connect() as conn:
        rows = conn.execute(text("SELECT status, count, oldest_age_s FROM fp_outbox_lag")).all()
    assert [tuple(r) for r in rows] == [(s, 0, None) for s in ("pending", "in_flight", "delivered", "dead")]


# -- docs/admin.sql --------------------------------------------------------------------------------

def admin_statements() -> dict[str, tuple[str, str]]:
    """name -> (comment, statement) for every `-- name:` block of docs/admin.sql."""
    blocks = re.split(r"^-- name: *(\w+) *\n", ADMIN_SQL.read_text(), flags=re.M)[1:]
    found = {}
    for name, body in zip(blocks[::2], blocks[1::2]):
        comment = " ".join(line[2:].strip() for line in body.splitlines() if line.startswith("--"))
        sql = "\n".join(line for line in body.splitlines() if line.strip() and not line.startswith("--")).strip()
        assert name not in found, f"docs/admin.sql: {name} appears twice"
        assert comment, f"docs/admin.sql: {name} has no comment saying what it is for"
        assert sql.endswith(";") and sql.count(";") == 1, f"docs/admin.sql: {name} must be one statement"
        found[name] = (comment, sql.rstrip(";"))
    return found


def _run(engine, name: str):
    _comment, sql = admin_statements()[name]
    with engine.begin() as conn:
        result = conn.execute(text(sql))
        return result.mappings().all() if result.returns_rows else result.rowcount


def check_lag(engine):
    rows = _run(engine, "lag")
    assert {r["status"]: r["count"] for r in rows} == {"pending": 2, "in_flight": 2, "delivered": 2, "dead": 4}


def check_find_stuck(engine):
    assert [r["insert_id"] for r in _run(engine, "find_stuck")] == ["f-stuck"]


def check_find_overdue(engine):
    assert [r["insert_id"] for r in _run(engine, "find_overdue")] == ["p-over"]


def check_inspect_event(engine):
    [row] = _run(engine, "inspect_event")
    assert (row["id"], row["status"]) == (5, "delivered")
    assert row["payload_without_token"]["properties"] == {"distinct_id": "u1", "$insert_id": INSERT_ID}


def check_dead_by_reason(engine):
    rows = _run(engine, "dead_by_reason")
    assert [(r["last_status"], r["reason"], r["events"]) for r in rows][0] == (400, "HTTP 400: bad price", 2)
    assert sorted((r["reason"], r["events"]) for r in rows[1:]) == [
        ("HTTP 400: no email", 1), ("gave up after 25 attempts: HTTP 503", 1)]


def check_list_dead(engine):
    assert [r["id"] for r in _run(engine, "list_dead")] == [101, 102]  # newest first


def check_requeue_dead(engine):
    assert _run(engine, "requeue_dead") == 1  # the Purchase 400 of the last day, not the one 3 days ago
    _assert_requeued(engine, [101], untouched=[102, 103, 104])


def check_requeue_ids(engine):
    assert _run(engine, "requeue_ids") == 2
    _assert_requeued(engine, [101, 102], untouched=[103, 104])


def check_requeue_stuck(engine):
    assert _run(engine, "requeue_stuck") == 1
    _assert_requeued(engine, [4], untouched=[3])


def check_purge_delivered(engine):
    assert _run(engine, "purge_delivered") == 1
    assert _run(engine, "purge_delivered") == 0  # repeated until 0
    with engine.connect() as conn:
        assert 6 not in _rows(conn) and 5 in _rows(conn)


def check_purge_dead(engine):
    assert _run(engine, "purge_dead") == 1
    with engine.connect() as conn:
        assert set(_rows(conn)) == {1, 2, 3, 4, 5, 6, 101, 102, 103}


def _assert_requeued(engine, ids, untouched):
    with engine.connect() as conn:
        rows = _rows(conn)
    before = {row[0]: row for row in ROWS}
    for id_ in ids:
        row = rows[id_]
        assert (row["status"], row["attempts"], row["dead_at"], row["lease_owner"], row["lease_until"]) == \
            ("pending", 0, None, None, None)
        assert row["payload"]["properties"]["$insert_id"] == before[id_][1]  # the same $insert_id
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM fp_outbox_events WHERE id = ANY(:ids)"
                                 " AND next_attempt_at <= now()"), {"ids": ids}).scalar() == len(ids)
    for id_ in untouched:
        assert rows[id_]["status"] == before[id_][3]


CHECKS = {name.removeprefix("check_"): fn for name, fn in globals().items() if name.startswith("check_")}


def test_every_statement_has_a_check_and_every_check_a_statement():
    assert set(admin_statements()) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_admin_statement_does_what_its_comment_says(seeded, name):
    CHECKS[name](seeded)


def test_statements_that_change_rows_say_so_first():
    for name, (comment, sql) in admin_statements().items():
        changes = sql.split(None, 1)[0].upper() in ("UPDATE", "DELETE", "INSERT")
        assert changes == comment.startswith(("CHANGES ROWS", "DELETES ROWS")), name


def test_docs_admin_sql_is_rendered_from_the_operators_statements():
    """docs/admin.sql is generated from worker/admin/queries.py, which the commands' statements share."""
    assert ADMIN_SQL.read_text() == render_admin_sql(), \
        "docs/admin.sql differs from worker/admin/queries.py: change the recipe there, then python docs/render_admin_sql.py"
