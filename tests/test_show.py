"""`fp-outbox show`: one event's history by $insert_id (or the last events of a distinct_id), as lines and as JSON:
enqueued when, each claim that held it (when, by whom, its answer: delivered, failed with the status and reason, a
lease that expired), its retry, and its end (delivered, dead and why, still pending or in flight). The event table
is read newest partition first; the claims log from the event's enqueue on, through its BRIN index."""

from __future__ import annotations

import io
import json
import re
from datetime import timedelta

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import text

from tests.conftest import TOKEN, url_string
from tests.storage import (backdate_claim, claim_due, claim_fresh, dead_letter, enqueue, far_slot, recover_expired,
                           settle_due, settle_fresh)
from worker.admin import main, queries
from worker.admin.history import find


@pytest.fixture
def show(db_url, capsys, monkeypatch):
    """Run `fp-outbox show ARGS` in process: (exit code, stdout, stderr)."""
    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(""))
        code = main(["show", "--database-url", url_string(db_url), *args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def _json(show, *args: str) -> list[dict]:
    code, out, err = show(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_delivered_at_the_first_attempt(clean, show):
    [id_] = enqueue(clean, insert_ids=["ord-1"], name="Purchase", distinct_id="13793")
    claim_id, _ = claim_fresh(clean, owner="host-a:12:ab")
    settle_fresh(clean, claim_id, delivered=[id_])
    code, out, _ = show("ord-1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"event {id_}  Purchase  $insert_id ord-1  distinct_id 13793")
    assert lines[1].endswith("  enqueued")
    assert lines[2].endswith(f"  claim {claim_id} (fresh, by host-a:12:ab): delivered")
    assert lines[3] == "  now: delivered"
    [story] = _json(show, "ord-1")
    assert (story["state"], story["kept_in"], [c["answer"] for c in story["claims"]]) == ("delivered", "events",
                                                                                       ["delivered"])
    assert story["payload"]["properties"] == {"distinct_id": "13793", "$insert_id": "ord-1"}  # no token


def test_a_retry_then_a_delivery(clean, show):
    [id_] = enqueue(clean, insert_ids=["ord-2"])
    fresh, _ = claim_fresh(clean)
    settle_fresh(clean, fresh, retry=[id_], status=503, error="HTTP 503: busy")
    due = claim_due(clean, [id_], owner="host-b:7:cd")
    settle_due(clean, due, delivered=[id_])
    [story] = _json(show, "ord-2")
    assert [(c["claim_id"], c["kind"], c["answer"], c["http_status"], c["reason"]) for c in story["claims"]] == [
        (fresh, "fresh", "failed", 503, "HTTP 503: busy"), (due, "due", "delivered", None, None)]
    assert story["state"] == "delivered" and story["retry"]["delivered_at"] is not None
    out = show("ord-2")[1]
    assert f"claim {fresh} (fresh, by " in out and "failed: HTTP 503: busy\n" in out
    assert f"claim {due} (due, by host-b:7:cd): delivered" in out


def test_a_lease_that_expired_then_dead_with_why(clean, show):
    [id_] = enqueue(clean, insert_ids=["ord-3"])
    fresh, _ = claim_fresh(clean, owner="gone:1:zz")
    recover_expired(clean, fresh)
    due = claim_due(clean, [id_])
    settle_due(clean, due, dead=[id_], status=400, error="HTTP 400: bad price")
    [story] = _json(show, "ord-3")
    assert [c["answer"] for c in story["claims"]] == ["lease expired", "failed"]
    assert (story["state"], story["kept_in"], story["dead"]["last_error"]) == ("dead", "dead letters",
                                                                             "HTTP 400: bad price")
    last = show("ord-3")[1].rstrip().splitlines()[-1]
    assert last.startswith("  now: dead since ") and last.endswith("after 2 attempts: HTTP 400: bad price")


def test_pending_in_flight_and_waiting_for_a_retry(clean, show):
    [flying, waiting] = enqueue(clean, 2, insert_ids=["fly", "wait"])
    claim_id, _ = claim_fresh(clean, owner="live:3:ef")
    settle_fresh(clean, claim_id, retry=[waiting], retry_in="1 hour")
    enqueue(clean, insert_ids=["new"])
    assert show("new")[1].rstrip().splitlines()[-1] == \
        "  now: pending: not claimed yet (the workers take events in commit order)"
    out = show("fly")[1]
    assert "(fresh, by live:3:ef): in flight, lease until " in out and "  now: in flight" in out
    assert _json(show, "fly")[0]["state"] == "in_flight"
    out = show("wait")[1]
    assert "  retry: 1 attempts counted, next at " in out and "  now: pending, next attempt at " in out


def test_the_last_events_of_a_distinct_id_newest_first(clean, show):
    for slot_back, name in ((3, "Old"), (1, "Middle"), (0, "New")):
        enqueue(clean, 2, name=name, slot=far_slot(clean, -slot_back), distinct_id="u-42")
    enqueue(clean, 3, name="Other", distinct_id="u-7")
    stories = _json(show, "--distinct-id", "u-42", "--last", "3")
    assert [s["event_name"] for s in stories] == ["New", "New", "Middle"]
    assert all(s["distinct_id"] == "u-42" for s in stories)
    assert len(_json(show, "--distinct-id", "u-42")) == 6


def test_the_newest_partitions_are_read_first_and_the_search_stops_at_the_event(clean):
    enqueue(clean, insert_ids=["recent"])
    enqueue(clean, insert_ids=["older"], slot=far_slot(clean, -3))
    reads = []

    def count(conn, cursor, statement, *args):
        reads.append(statement)
    with clean.connect() as conn:
        sa_event.listen(conn, "before_cursor_execute", count)
        assert [row.insert_id for row, _ in find(conn, insert_id="recent")] == ["recent"]
        partitions_for_recent = sum("WHERE slot =" in s for s in reads)
        reads.clear()
        assert [row.insert_id for row, _ in find(conn, insert_id="older")] == ["older"]
        partitions_for_older = sum("WHERE slot =" in s for s in reads)
    assert (partitions_for_recent, partitions_for_older) == (1, 4)


def test_a_dead_letter_whose_partition_is_gone(clean, show):
    dead_letter(clean, 777, insert_id="long-dead", name="Purchase", dead_ago="20 days", created_ago="21 days")
    [story] = _json(show, "long-dead")
    assert (story["id"], story["state"], story["claims"]) == (777, "dead", [])
    assert "(its claims are no longer in the log: kept for --retain-delivered)" in show("long-dead")[1]


def test_claims_past_the_first_span_are_found_by_widening_it(clean, show):
    [id_] = enqueue(clean, insert_ids=["late"], created_ago="3 days")
    claim_id, _ = claim_fresh(clean)
    settle_fresh(clean, claim_id, delivered=[id_])
    backdate_claim(clean, claim_id, "1 day")  # claimed two days after it was enqueued (an outage, say)
    assert [c["claim_id"] for c in _json(show, "late")[0]["claims"]] == [claim_id]


def test_nothing_found_and_a_wrong_call(clean, show):
    code, out, err = show("no-such-id")
    assert (code, out) == (1, "") and "no event with $insert_id no-such-id" in err
    assert show()[0] == 2 and show("x", "--distinct-id", "y")[0] == 2
    assert TOKEN not in err


def test_the_claims_of_a_span_come_from_the_brin_index(clean):
    with clean.begin() as conn:  # a day of claims, one a second, in time order as workers write them
        conn.execute(text(
            "INSERT INTO fp_outbox_claims (kind, owner, claimed_at, lease_until, ids, done, delivered, settled_at)"
            " SELECT 'fresh', 'w', now() - make_interval(secs => 86400 - g), now(), ARRAY[g::bigint],"
            " ARRAY[g::bigint], 1, now() FROM generate_series(1, 86400) AS g"))
        conn.execute(text("ANALYZE fp_outbox_claims"))
        conn.execute(text("SELECT brin_summarize_new_values('fp_outbox_claims_claimed_at_idx')"))
        since = conn.execute(text("SELECT now() - interval '80000 seconds'")).scalar_one()
        plan = "\n".join(conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + queries.EVENT_CLAIMS.text), {
            "id": 6400, "since": since, "until": since + timedelta(minutes=1)}).scalars())
    assert "Bitmap Index Scan on fp_outbox_claims_claimed_at_idx" in plan, plan
    assert int(re.search(r"Rows Removed by Index Recheck: (\d+)", plan).group(1)) < 2000, plan  # not the whole day
