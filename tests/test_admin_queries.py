"""The admin views (migration 0007) and every statement of docs/admin.sql, run against seeded rows of every kind,
built as the storage contract says the engine writes them (tests.storage), each checked to do what its comment
says; a statement added without a check fails here."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import text

from tests.conftest import REPO
from tests.storage import (backdate_claim, claim_due, claim_fresh, dead_letter, delivered_in_bulk, enqueue,
                           entries_read, expire_lease, far_slot, settle_fresh)
from worker.admin.queries import render_admin_sql

ADMIN_SQL = REPO / "docs" / "admin.sql"
INSERT_ID = "6f1c2a9e-0b7d-4e0c-9a51-3d2f8c7b1e42"  # the example in event_state and inspect_event

# (id, insert_id, event, status, attempts, last_status, last_error): one event of every situation, as seed() makes
# them: 1 past the position; 2 a retry due an hour ago; 3 in a live fresh claim; 4 a retry whose due claim's
# lease ran out 10 minutes ago (its worker died); 5 and 6 delivered a day and 8 days ago (6 alone in the oldest
# slot); 101-104 dead letters.
ROWS = [
    (1, "p-new", "Signup", "pending", 0, None, None),
    (2, "p-over", "Signup", "pending", 2, 503, "HTTP 503: busy"),
    (3, "f-live", "Signup", "in_flight", 1, None, None),
    (4, "f-stuck", "Signup", "in_flight", 3, 503, "HTTP 503"),
    (5, INSERT_ID, "Purchase", "delivered", 1, None, None),
    (6, "ok-old", "Purchase", "delivered", 1, None, None),
    (101, "d-400", "Purchase", "dead", 1, 400, "HTTP 400: bad price"),
    (102, "d-400-b", "Purchase", "dead", 1, 400, "HTTP 400: bad price"),
    (103, "d-400-signup", "Signup", "dead", 1, 400, "HTTP 400: no email"),
    (104, "d-exhausted", "Purchase", "dead", 25, 503, "gave up after 25 attempts: HTTP 503"),
]
DEAD_AGO = {101: ("1 hour", "2 hours"), 102: ("3 days", "3 days"), 103: ("1 hour", "2 hours"),
            104: ("40 days", "41 days")}


def seed(engine) -> None:
    """ROWS, written as the engine would have: enqueued, claimed, settled, timed into the past."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE fp_outbox_slot_period SET since = now() - interval '30 days'"))
    _delivered_alone(engine, 6, "ok-old", far_slot(engine, 1), "8 days")  # the oldest slot: past 7 days
    _delivered_alone(engine, 5, INSERT_ID, far_slot(engine, 14), "1 day")
    enqueue(engine, name="Signup", insert_ids=["p-over"], ids=[2], created_ago="2 hours")
    enqueue(engine, name="Signup", insert_ids=["f-stuck"], ids=[4], created_ago="1 hour")
    claim_id, _ = claim_fresh(engine, owner="gone:2:b")
    settle_fresh(engine, claim_id, retry=[2, 4], error="HTTP 503: busy")
    backdate_claim(engine, claim_id, "2 hours")
    claim_due(engine, [4], owner="gone:2:b")
    expire_lease(engine, [4], "10 minutes")
    with engine.begin() as conn:
        conn.execute(text("UPDATE fp_outbox_retries SET attempts = 2, next_attempt_at = now() - interval '1 hour'"
                          " WHERE id = 2"))
        conn.execute(text("UPDATE fp_outbox_retries SET attempts = 3, last_error = 'HTTP 503' WHERE id = 4"))
    enqueue(engine, name="Signup", insert_ids=["f-live"], ids=[3], created_ago="10 seconds")
    claim_fresh(engine, owner="live:1:a")
    enqueue(engine, name="Signup", insert_ids=["p-new"], ids=[1], created_ago="1 second")
    for id_, insert_id, name, _, attempts, status, error in ROWS[6:]:
        dead_ago, created_ago = DEAD_AGO[id_]
        dead_letter(engine, id_, name=name, insert_id=insert_id, attempts=attempts, status=status, error=error,
                    dead_ago=dead_ago, created_ago=created_ago)
    with engine.begin() as conn:  # events enqueued later get ids after these, as enqueue's would
        conn.execute(text("SELECT setval(pg_get_serial_sequence('fp_outbox_events', 'id'), 1000)"))


def _delivered_alone(engine, id_: int, insert_id: str, slot: int, ago: str) -> None:
    enqueue(engine, name="Purchase", insert_ids=[insert_id], ids=[id_], slot=slot, created_ago=ago)
    claim_id, _ = claim_fresh(engine, owner="old:1:c")
    settle_fresh(engine, claim_id, delivered=[id_])
    backdate_claim(engine, claim_id, ago)


def _rows(conn) -> dict[int, dict]:
    """Every event's state, by id (the view fp_outbox_event_states)."""
    return {r["id"]: dict(r) for r in conn.execute(text("SELECT * FROM fp_outbox_event_states")).mappings()}


def _retries(conn) -> dict[int, dict]:
    return {r["id"]: dict(r) for r in conn.execute(text(
        "SELECT *, payload::jsonb AS body FROM fp_outbox_retries")).mappings()}


@pytest.fixture
def seeded(clean):
    seed(clean)
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


def test_a_fresh_claim_past_its_lease_is_stuck_with_its_events(seeded):
    with seeded.begin() as conn:
        conn.execute(text("UPDATE fp_outbox_claims SET lease_until = now() - interval '5 minutes'"
                          " WHERE owner = 'live:1:a'"))
    with seeded.connect() as conn:
        rows = conn.execute(text("SELECT * FROM fp_outbox_stuck ORDER BY id")).mappings().all()
    assert [(r["id"], r["insert_id"], r["lease_owner"]) for r in rows] == [(3, "f-live", "live:1:a"),
                                                                         (4, "f-stuck", "gone:2:b")]


def test_the_views_and_the_figures_agree_with_every_events_state(seeded):
    from worker.engine import queue_figures, status_counts

    with seeded.connect() as conn:
        by_state = dict(conn.execute(text("SELECT status, count(*) FROM fp_outbox_event_states GROUP BY status")).all())
        lag = {r.status: r.count for r in conn.execute(text("SELECT * FROM fp_outbox_lag"))}
        stuck = conn.execute(text("SELECT count(*) FROM fp_outbox_event_states"
                                  " WHERE status = 'in_flight' AND lease_until < now()")).scalar_one()
        assert stuck == conn.execute(text("SELECT count(*) FROM fp_outbox_stuck")).scalar_one()
    counts = status_counts(seeded)
    assert by_state == lag == {k: counts[k] for k in ("pending", "in_flight", "delivered", "dead")}
    depth = queue_figures(seeded)
    assert {k: depth[k] for k in ("pending", "in_flight", "dead")} == {"pending": 2, "in_flight": 2, "dead": 4}
    assert 7100 < depth["oldest_pending_age_s"] < 7300


def test_the_views_read_what_waits_not_the_delivered_events(clean):
    """The operator's first questions stay cheap on a table holding a week of deliveries: the views read the events
    past the position, the open claims and the retries, never the delivered events (20,000 here, made once for the
    three views: it is most of this test's time)."""
    delivered_in_bulk(clean)
    enqueue(clean, 3, created_ago="2 minutes")
    for view, expected in {"fp_outbox_stuck": 0, "fp_outbox_overdue": 3, "fp_outbox_lag": 4}.items():
        with clean.connect() as conn:
            rows, read = entries_read(conn, text(f"SELECT * FROM {view}"), "fp_outbox_events_s%")
        assert len(rows) == expected, (view, rows)
        assert read < 100, (view, read)


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


def check_event_state(engine):
    [row] = _run(engine, "event_state")
    assert (row["id"], row["status"], row["event_name"]) == (5, "delivered", "Purchase")


def check_inspect_event(engine):
    [row] = _run(engine, "inspect_event")
    assert (row["kept_in"], row["id"]) == ("events", 5)
    assert row["payload_without_token"]["properties"] == {"distinct_id": "u1", "$insert_id": INSERT_ID}


def check_event_claims(engine):
    [row] = _run(engine, "event_claims")
    assert (row["kind"], row["owner"], row["answer"], row["http_status"]) == ("fresh", "old:1:c", "delivered", None)


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
    assert [r["id"] for r in _run(engine, "requeue_stuck")] == [4]
    _assert_requeued(engine, [4], untouched=[3])


def check_purge_delivered(engine):
    outcomes = {r["slot"]: r["outcome"] for r in _run(engine, "purge_delivered")}
    assert outcomes[far_slot(engine, 1)] == "truncated" and outcomes[far_slot(engine, 14)] == "young"
    assert outcomes[far_slot(engine, 0)] == "current"
    assert set(outcomes.values()) <= {"truncated", "young", "current", "empty"}
    with engine.connect() as conn:
        assert 6 not in _rows(conn) and 5 in _rows(conn)
    assert "truncated" not in {r["outcome"] for r in _run(engine, "purge_delivered")}  # once


def check_purge_claims(engine):
    assert _run(engine, "purge_claims") == 1  # the claim of 6, 8 days ago
    assert _run(engine, "purge_claims") == 0  # repeated until 0


def check_purge_dead(engine):
    assert _run(engine, "purge_dead") == 1
    with engine.connect() as conn:
        assert set(_rows(conn)) == {1, 2, 3, 4, 5, 6, 101, 102, 103}


def _assert_requeued(engine, ids, untouched):
    with engine.connect() as conn:
        rows, retries = _rows(conn), _retries(conn)
    before = {row[0]: row for row in ROWS}
    for id_ in ids:
        row = rows[id_]
        assert (row["status"], row["attempts"], row["dead_at"], row["lease_owner"], row["lease_until"]) == \
            ("pending", 0, None, None, None)
        assert retries[id_]["body"]["properties"]["$insert_id"] == before[id_][1]  # the same $insert_id
        due = retries[id_]["next_attempt_at"]
        assert due <= due.now(due.tzinfo)
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
        changes = bool(re.search(r"\b(UPDATE|DELETE|INSERT|TRUNCATE)\b|fp_outbox_truncate_slot", sql, re.I))
        assert changes == comment.startswith(("CHANGES ROWS", "DELETES ROWS")), name


def test_docs_admin_sql_is_rendered_from_the_operators_statements():
    """docs/admin.sql is generated from worker/admin/queries.py, which the commands' statements share."""
    assert ADMIN_SQL.read_text() == render_admin_sql(), \
        "docs/admin.sql differs from worker/admin/queries.py: change the recipe there, then python docs/render_admin_sql.py"
