"""The legacy mover: a database at revision 0006 holding rows of every status, upgraded to the insert-only storage,
keeps them in fp_outbox_events_legacy; the workers' retention moves them, a batch per transaction: pending rows and
expired leases become events again (same id, insert_id, payload, created_at, trace context) that the fresh path
claims; dead rows become dead letters; delivered rows go once past retention; a live lease waits for its expiry.
Meanwhile the figures and the per-event view count them, and 'legacy table empty' is said once, at the end."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text

from outbox.db import make_engine, upgrade
from outbox.schema import SCHEMA_REVISION
from tests.conftest import create_database, drop_database
from tests.storage import claim_fresh, states
from worker.engine import status_counts
from worker.engine.retention import Retention, purge_delivered

# (insert_id, status, attempts, next_attempt_at from now, lease_until from now, delivered ago, dead ago, trace)
OLD_ROWS = [
    ("p-new", "pending", 0, "0 seconds", None, None, None, '{"traceparent": "00-ab-cd-01"}'),
    ("p-retry", "pending", 3, "1 hour", None, None, None, None),
    ("f-expired", "in_flight", 1, "-5 minutes", "-5 minutes", None, None, None),
    ("f-live", "in_flight", 1, "1 hour", "1 hour", None, None, None),
    ("ok-old", "delivered", 1, "0 seconds", None, "8 days", None, None),
    ("ok-new", "delivered", 1, "0 seconds", None, "1 hour", None, None),
    ("d-400", "dead", 1, "0 seconds", None, None, "2 days", None),
]


@pytest.fixture
def upgraded(server_url):
    """A database migrated to 0006, given the previous release's rows, then upgraded to head: (engine, ids)."""
    url = create_database(server_url)
    upgrade(url, "0006")
    engine = make_engine(url)
    ids = {}
    with engine.begin() as conn:
        for insert_id, status, attempts, next_at, lease, delivered, dead, trace in OLD_ROWS:
            ids[insert_id] = conn.execute(text(
                "INSERT INTO fp_outbox_events (insert_id, event_name, payload, status, attempts, next_attempt_at,"
                " lease_owner, lease_until, last_status, last_error, created_at, delivered_at, dead_at, trace_context)"
                " VALUES (:i, 'Purchase', CAST(:payload AS json), :status, :attempts,"
                " now() + CAST(:next_at AS interval),"
                " CASE WHEN CAST(:lease AS interval) IS NULL THEN NULL ELSE 'old-host:9:zz' END,"
                " now() + CAST(:lease AS interval),"
                " CASE WHEN CAST(:status AS text) = 'dead' THEN 400 END,"
                " CASE WHEN CAST(:status AS text) = 'dead' THEN 'HTTP 400: bad price' END,"
                " now() - interval '9 days', now() - CAST(:delivered AS interval), now() - CAST(:dead AS interval),"
                " :trace) RETURNING id"),
                {"i": insert_id, "payload": json.dumps({"event": "Purchase", "properties": {
                    "distinct_id": "u", "$insert_id": insert_id}}),
                 "status": status, "attempts": attempts, "next_at": next_at, "lease": lease, "delivered": delivered,
                 "dead": dead, "trace": trace}).scalar_one()
    upgrade(url)
    yield engine, ids
    engine.dispose()
    drop_database(server_url, url)


def _legacy(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT insert_id, status FROM fp_outbox_events_legacy")).all())


def test_the_upgrade_keeps_the_old_rows_counted_and_visible_until_moved(upgraded):
    engine, ids = upgraded
    assert _legacy(engine) == {row[0]: row[1] for row in OLD_ROWS}
    counts = status_counts(engine)
    assert {k: counts[k] for k in ("pending", "in_flight", "delivered", "dead")} == \
        {"pending": 2, "in_flight": 2, "delivered": 2, "dead": 1}
    assert counts["oldest_pending_age_s"] > 9 * 86400 - 60
    assert states(engine)[ids["f-live"]] == "in_flight"
    with engine.connect() as conn:
        assert [r.insert_id for r in conn.execute(text("SELECT insert_id FROM fp_outbox_stuck"))] == ["f-expired"]


def test_the_mover_moves_every_status_as_the_contract_says(upgraded, caplog):
    engine, ids = upgraded
    caplog.set_level(logging.INFO, logger="fp_outbox.worker")
    Retention(engine, timedelta(days=7), timedelta(days=30), batch_size=1).run()  # a row per transaction
    assert _legacy(engine) == {"f-live": "in_flight", "ok-new": "delivered"}  # a live lease, a recent delivery
    with engine.connect() as conn:
        events = {r.insert_id: r for r in conn.execute(text(
            "SELECT id, insert_id, event_name, payload::text AS payload, created_at, trace_context,"
            " now() - created_at > interval '9 days' - interval '1 minute' AS kept_created_at FROM fp_outbox_events"))}
        [dead] = conn.execute(text("SELECT * FROM fp_outbox_dead_letters")).mappings().all()
    assert set(events) == {"p-new", "p-retry", "f-expired"}
    assert all(events[i].id == ids[i] and events[i].kept_created_at and f'"$insert_id": "{i}"' in events[i].payload
               for i in events)
    assert events["p-new"].trace_context == '{"traceparent": "00-ab-cd-01"}'
    assert (dead["id"], dead["insert_id"], dead["last_status"], dead["last_error"]) == \
        (ids["d-400"], "d-400", 400, "HTTP 400: bad price")
    _, claimed = claim_fresh(engine)  # the fresh path takes them as any event
    assert sorted(claimed) == sorted(ids[i] for i in events)
    assert any(r.getMessage().startswith("moved the previous release's rows") and r.fields["events"] == 3
               and r.fields["dead_letters"] == 1 and r.fields["delivered_deleted"] == 1 for r in caplog.records)


def test_a_live_lease_waits_for_its_expiry_and_the_end_is_said_once(upgraded, caplog):
    engine, ids = upgraded
    retention = Retention(engine, timedelta(days=7), None)
    retention.run()
    with engine.begin() as conn:  # the old worker never came back; time passes
        conn.execute(text("UPDATE fp_outbox_events_legacy SET lease_until = now() - interval '1 second',"
                          " delivered_at = delivered_at - interval '7 days'"))
    caplog.set_level(logging.INFO, logger="fp_outbox.worker")
    retention.run()
    assert _legacy(engine) == {}
    assert states(engine)[ids["f-live"]] == "pending"
    for _ in range(3):
        retention.run()
    assert [r.getMessage() for r in caplog.records].count(
        "legacy table empty: fp_outbox_events_legacy holds no rows of the previous release any more "
        "(`fp-outbox migrate` drops it, from 0.5.0 on)") == 1


def test_migrate_drops_the_legacy_table_once_the_workers_emptied_it_and_the_views_keep_their_grants(upgraded):
    """0010 contracts 0007's expand: `migrate` on a legacy table that still holds rows keeps it (the upgrade above
    did); once the workers moved and purged every row, the next `migrate` drops it, and the operator's views, whose
    legacy branches it takes out, answer as before and keep the grants they had."""
    engine, ids = upgraded
    role = f"fpo_view_reader_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        assert conn.execute(text("SELECT to_regclass('fp_outbox_events_legacy') IS NOT NULL")).scalar_one()
        conn.execute(text(f"CREATE ROLE {role}"))
        conn.execute(text(f"GRANT SELECT ON fp_outbox_lag, fp_outbox_event_states TO {role}"))
    try:
        retention = Retention(engine, timedelta(days=7), None)
        retention.run()
        with engine.begin() as conn:  # the old worker never came back; time passes
            conn.execute(text("UPDATE fp_outbox_events_legacy SET lease_until = now() - interval '1 second',"
                              " delivered_at = delivered_at - interval '7 days'"))
        retention.run()
        before = states(engine)
        assert upgrade(engine.url) == SCHEMA_REVISION
        with engine.connect() as conn:
            assert conn.execute(text("SELECT to_regclass('fp_outbox_events_legacy') IS NULL")).scalar_one()
            for view in ("fp_outbox_lag", "fp_outbox_event_states"):
                assert conn.execute(text("SELECT has_table_privilege(:r, :v, 'SELECT')"),
                                    {"r": role, "v": view}).scalar_one(), view
            assert "legacy" not in conn.execute(text("SELECT string_agg(pg_get_viewdef(c.oid), '') FROM pg_class c"
                                                     " WHERE c.relkind = 'v' AND c.relname LIKE 'fp_outbox_%'")
                                                ).scalar_one()
        assert states(engine) == before and before[ids["p-new"]] == "pending"
        assert status_counts(engine)["pending"] >= 1
        assert upgrade(engine.url) == SCHEMA_REVISION  # and again: nothing left to do
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))


def test_with_retention_off_the_delivered_rows_wait_for_a_purge(upgraded):
    engine, _ = upgraded
    retention = Retention(engine, None, None)
    retention.run()
    assert _legacy(engine) == {"f-live": "in_flight", "ok-old": "delivered", "ok-new": "delivered"}
    assert not retention.finished  # the live lease is still to move
    assert purge_delivered(engine, timedelta(days=7)).legacy == 1
    assert _legacy(engine) == {"f-live": "in_flight", "ok-new": "delivered"}
