"""Every statement of the admin SQL in docs/operations.md runs against the real schema, so none goes stale."""

from __future__ import annotations

import re

from sqlalchemy import text

from tests.conftest import REPO, status_of


def _docs_admin_sql() -> list[str]:
    page = (REPO / "docs" / "operations.md").read_text()
    section = page.split("\n## Admin SQL\n", 1)[1]
    block = re.search(r"```sql\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.splitlines() if not line.strip().startswith("--")]
    return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]


def _seed(conn) -> None:
    conn.execute(text(
        "INSERT INTO fp_outbox_events (insert_id, event_name, payload, status, last_status, last_error, dead_at,"
        " delivered_at, lease_owner, lease_until, next_attempt_at) VALUES"
        " ('d1', 'E', '{}', 'dead', 400, 'HTTP 400: bad', now(), NULL, NULL, NULL, now()),"
        " ('ok', 'E', '{}', 'delivered', 200, NULL, NULL, now() - interval '8 days', NULL, NULL, now()),"
        " ('st', 'E', '{}', 'in_flight', NULL, NULL, NULL, NULL, 'gone:1:x', now() - interval '1 hour',"
        "  now() - interval '1 hour'),"
        " ('od', 'E', '{}', 'pending', 503, 'HTTP 503', NULL, NULL, NULL, NULL, now() - interval '1 hour')"))


def test_every_documented_statement_runs_and_does_what_it_says(clean):
    statements = _docs_admin_sql()
    assert len(statements) >= 6
    with clean.begin() as conn:
        _seed(conn)
        found = {}
        for stmt in statements:
            result = conn.execute(text(stmt))
            found[stmt.split()[0] + ":" + str(len(found))] = result.all() if result.returns_rows else result.rowcount
    counts, stuck, overdue, dead, requeued, purged = found.values()
    assert {row[0] for row in counts} == {"pending", "in_flight", "delivered", "dead"}
    assert [row.insert_id for row in stuck] == ["st"]
    assert [row.insert_id for row in overdue] == ["od"]
    assert [(row.insert_id, row.last_error) for row in dead] == [("d1", "HTTP 400: bad")]
    assert (requeued, purged) == (1, 1)
    assert status_of(clean) == {"pending": 2, "in_flight": 1}
