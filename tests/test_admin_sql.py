"""Every statement of the admin SQL in docs/operations.md runs against the real schema, on rows of every kind built
as the storage contract says (tests.storage), and does what its comment says, so none goes stale."""

from __future__ import annotations

import re

from sqlalchemy import text

from tests.conftest import REPO, status_of
from tests.storage import (backdate_claim, claim_due, claim_fresh, dead_letter, enqueue, expire_lease, far_slot,
                           settle_fresh)

INSERT_ID = "6f1c2a9e-0b7d-4e0c-9a51-3d2f8c7b1e42"


def _docs_admin_sql() -> list[str]:
    page = (REPO / "docs" / "operations.md").read_text()
    section = page.split("\n## Admin SQL\n", 1)[1]
    block = re.search(r"```sql\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.splitlines() if not line.strip().startswith("--")]
    return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]


def _seed(engine) -> None:
    """d1 dead of a 400; ok delivered 8 days ago, alone in the oldest slot; st in flight past its lease (its
    worker died); od a retry due an hour ago."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE fp_outbox_slot_period SET since = now() - interval '30 days'"))
    dead_letter(engine, 900, insert_id="d1", error="HTTP 400: bad")
    [ok] = enqueue(engine, insert_ids=["ok"], slot=far_slot(engine, 1), created_ago="8 days")
    claim_id, _ = claim_fresh(engine)
    settle_fresh(engine, claim_id, delivered=[ok])
    backdate_claim(engine, claim_id, "8 days")
    [od, st] = enqueue(engine, 2, insert_ids=["od", INSERT_ID])
    claim_id, _ = claim_fresh(engine, owner="gone:1:x")
    settle_fresh(engine, claim_id, retry=[od, st], error="HTTP 503")
    claim_due(engine, [st], owner="gone:1:x")
    expire_lease(engine, [st], "1 hour")
    with engine.begin() as conn:
        conn.execute(text("UPDATE fp_outbox_retries SET next_attempt_at = now() - interval '1 hour' WHERE id = :id"),
                     {"id": od})


def test_every_documented_statement_runs_and_does_what_it_says(clean):
    statements = _docs_admin_sql()
    assert len(statements) >= 7
    _seed(clean)
    with clean.begin() as conn:
        found = []
        for stmt in statements:
            result = conn.execute(text(stmt))
            found.append(result.all() if result.returns_rows else result.rowcount)
    counts, stuck, overdue, dead, state, requeued, truncated = found
    assert {row.status: row.count for row in counts} == {"pending": 1, "in_flight": 1, "delivered": 1, "dead": 1}
    assert [row.insert_id for row in stuck] == [INSERT_ID]
    assert [row.insert_id for row in overdue] == ["od"]
    assert [(row.insert_id, row.last_error) for row in dead] == [("d1", "HTTP 400: bad")]
    assert [row.status for row in state] == ["in_flight"]
    assert requeued == 1
    assert [row.slot for row in truncated if row.outcome == "truncated"] == [far_slot(clean, 1)]
    assert status_of(clean) == {"pending": 2, "in_flight": 1}
