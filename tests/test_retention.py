"""Retention on the insert-only storage: a slot's partition is truncated once every event in it is claimed and
settled and its newest is past --retain-delivered; an unclaimed event, an unsettled claim or a transaction still
writing it keeps it (never blocking an enqueue longer than the lock timeout); dead letters and retries never hold
it; the claims log is purged in id order past retention, never its latest fresh claim (the position); dead letters
have a retention of their own; and nothing ever deletes from the event table."""

from __future__ import annotations

import logging
import re
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import text

from tests.conftest import REPO
from tests.storage import (backdate_claim, claim_due, claim_fresh, dead_letter, enqueue, far_slot, settle_due,
                           settle_fresh, states)
from outbox.schema import SLOTS
from worker.engine.retention import RETENTION_EVERY, Retention, purge_dead

HOUR = timedelta(hours=1)


@pytest.fixture
def aged(clean):
    """An empty outbox whose slot period has been in force for a month (as on a server that has run for a while)."""
    with clean.begin() as conn:
        conn.execute(text("UPDATE fp_outbox_slot_period SET since = now() - interval '30 days'"))
    return clean


def _delivered(engine, count: int, slot: int, ago: str = "2 hours") -> list[int]:
    ids = enqueue(engine, count, slot=slot, created_ago=ago)
    claim_id, claimed = claim_fresh(engine)
    assert sorted(claimed) == sorted(ids)
    settle_fresh(engine, claim_id, delivered=ids)
    backdate_claim(engine, claim_id, ago)
    return ids


def _partition_rows(engine, slot: int) -> int:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM fp_outbox_events_s{slot:02d}")).scalar_one()


def test_a_slot_of_old_claimed_and_settled_events_is_truncated(aged):
    slot = far_slot(aged)
    ids = _delivered(aged, 5, slot)
    run = Retention(aged, HOUR, None).run()
    assert set(run.truncated) == {slot} and run.kept == {}
    assert _partition_rows(aged, slot) == 0 and not set(ids) & set(states(aged))


def test_a_slot_with_an_unclaimed_event_is_kept_and_said_so_once(aged, caplog):
    slot = far_slot(aged)
    _delivered(aged, 3, slot)
    enqueue(aged, 1, slot=slot)  # committed after the claim: past the position
    caplog.set_level(logging.INFO, logger="fp_outbox.worker")
    run = Retention(aged, HOUR, None).run()
    assert run.truncated == {} and run.kept == {slot: "unclaimed"}
    assert _partition_rows(aged, slot) == 4
    kept = [r.fields for r in caplog.records if "kept past retention" in r.getMessage()]
    assert len(kept) == 1 and kept[0][f"fp_outbox_events_s{slot:02d}"].startswith("unclaimed: ")


def test_a_slot_listed_by_an_unsettled_claim_is_kept(aged):
    slot = far_slot(aged)
    ids = enqueue(aged, 4, slot=slot)
    claim_id, _ = claim_fresh(aged)
    settle_fresh(aged, claim_id, delivered=ids[:3])  # one event still in flight
    assert Retention(aged, HOUR, None).run().kept == {slot: "unsettled"}
    settle_fresh(aged, claim_id, delivered=ids[3:])
    assert set(Retention(aged, HOUR, None).run().truncated) == {slot}


def test_a_slot_still_written_by_an_open_transaction_is_busy_and_never_blocks_an_enqueue_for_long(aged):
    slot = far_slot(aged)
    _delivered(aged, 2, slot)
    writer = aged.connect()
    writer.begin()  # a transaction that began in that slot's period and is still enqueueing
    writer.execute(text("INSERT INTO fp_outbox_events (insert_id, event_name, payload, slot)"
                        " VALUES ('late', 'E', '{}', :slot)"), {"slot": slot})
    outcome, enqueued_in = {}, {}
    run = threading.Thread(target=lambda: outcome.update(run=Retention(aged, HOUR, None).run()))
    try:
        run.start()
        time.sleep(0.05)  # the truncate is queued for the partition's lock by now, or about to be
        started = time.monotonic()
        enqueue(aged, 1, slot=slot)  # another enqueue into the same partition queues behind it, briefly
        enqueued_in["s"] = time.monotonic() - started
        run.join(30)
    finally:
        writer.rollback()
        writer.close()
    assert not run.is_alive() and outcome["run"].kept == {slot: "busy"}
    assert enqueued_in["s"] < 1.0, f"an enqueue waited {enqueued_in['s']:.2f} s behind retention"
    assert _partition_rows(aged, slot) == 3


def test_dead_letters_and_retries_never_hold_a_slot(aged):
    slot = far_slot(aged)
    ids = enqueue(aged, 3, slot=slot, created_ago="3 hours")
    claim_id, _ = claim_fresh(aged)
    settle_fresh(aged, claim_id, delivered=ids[:1], dead=ids[1:2], status=400, error="HTTP 400: bad")
    settle_fresh(aged, claim_id, retry=ids[2:])
    backdate_claim(aged, claim_id, "2 hours")
    run = Retention(aged, HOUR, timedelta(days=30)).run()
    assert set(run.truncated) == {slot} and run.dead == 0
    assert states(aged) == {ids[1]: "dead", ids[2]: "pending"}  # their copies live on


def test_the_current_and_young_slots_are_left_alone_silently(aged, caplog):
    _delivered(aged, 2, far_slot(aged, 15))  # the slot just before: its period ended less than a period ago
    enqueue(aged, 2)  # the current slot
    caplog.set_level(logging.INFO, logger="fp_outbox.worker")
    run = Retention(aged, timedelta(hours=13), None).run()  # the default period is 12 h
    assert run.truncated == {} and run.kept == {}
    assert not [r for r in caplog.records if "kept past retention" in r.getMessage()]


def _settled_claims(engine, count: int, slot: int) -> list[int]:
    """`count` fresh claims of two events each in `slot`, each settled delivered; their ids."""
    claims = []
    for _ in range(count):
        ids = enqueue(engine, 2, slot=slot)
        claim_id, _ = claim_fresh(engine)
        settle_fresh(engine, claim_id, delivered=ids)
        claims.append(claim_id)
    return claims


def test_old_claims_rows_go_in_id_ordered_batches_but_never_the_latest_fresh_one(aged):
    slot = far_slot(aged)
    claims = _settled_claims(aged, 7, slot)
    retry = enqueue(aged, 1, slot=slot)
    fresh_id, _ = claim_fresh(aged)
    settle_fresh(aged, fresh_id, retry=retry)
    due_id = claim_due(aged, retry)
    settle_due(aged, due_id, delivered=retry)
    for claim_id in [*claims, fresh_id, due_id]:
        backdate_claim(aged, claim_id, "2 hours")
    with aged.begin() as conn:
        conn.execute(text("UPDATE fp_outbox_retries SET delivered_at = now() - interval '2 hours'"))
    young_id, _ = claim_fresh(aged)  # nothing to claim: no row; the latest fresh claim is still fresh_id
    assert young_id is None
    run = Retention(aged, HOUR, None, batch_size=3).run()
    assert run.claims == 8 and run.retries == 1  # and the delivered retries row, kept for its history
    with aged.connect() as conn:
        left = conn.execute(text("SELECT id, kind FROM fp_outbox_claims")).all()
    assert [tuple(row) for row in left] == [(fresh_id, "fresh")]  # the position stays


@pytest.mark.parametrize("first_id", [30_000, 2_147_480_000])
def test_the_claims_log_is_purged_whatever_its_ids(aged, first_id):
    """psycopg sends a Python int as the smallest integer type that holds it: from claim id 27,768 on, the walk's
    `from_id + batch_size` (smallint + smallint) overflowed, every purge failed, and the claims log grew without end
    (bench churn: 220,000 rows, 120 MB, for a five-minute retention). Near 2**31 the same with integers."""
    with aged.begin() as conn:
        conn.execute(text(f"ALTER TABLE fp_outbox_claims ALTER COLUMN id RESTART WITH {first_id}"))
    try:
        claims = _settled_claims(aged, 3, far_slot(aged))
        for claim_id in claims:
            backdate_claim(aged, claim_id, "2 hours")
        assert min(claims) >= first_id
        assert Retention(aged, HOUR, None).run().claims == 2  # all but the latest fresh claim (the position)
    finally:
        with aged.begin() as conn:
            conn.execute(text("ALTER TABLE fp_outbox_claims ALTER COLUMN id RESTART WITH 1"))


def test_claims_past_retention_stay_while_unsettled(aged):
    ids = enqueue(aged, 2, slot=far_slot(aged))
    claim_id, _ = claim_fresh(aged)
    settle_fresh(aged, claim_id, delivered=ids[:1])
    later = enqueue(aged, 1)
    latest, _ = claim_fresh(aged)
    settle_fresh(aged, latest, delivered=later)
    backdate_claim(aged, claim_id, "2 hours")
    backdate_claim(aged, latest, "2 hours")
    assert Retention(aged, HOUR, None).run().claims == 0


def test_dead_letters_have_a_retention_of_their_own(aged):
    for n in range(30):
        dead_letter(aged, 1000 + n, dead_ago="40 days")
    for n in range(20):
        dead_letter(aged, 2000 + n, dead_ago="10 days")
    assert Retention(aged, timedelta(days=7), timedelta(days=30), batch_size=7).run().dead == 30
    assert Retention(aged, timedelta(days=7), None).run().dead == 0  # --retain-dead off keeps them
    assert list(states(aged).values()) == ["dead"] * 20
    assert purge_dead(aged, timedelta(days=5), batch_size=3, max_batches=2) == 6  # bounded per call


def test_with_retention_delivered_off_nothing_of_the_delivered_goes(aged):
    slot = far_slot(aged)
    _delivered(aged, 2, slot)
    assert Retention(aged, None, None).run().truncated == {}
    assert _partition_rows(aged, slot) == 2


def test_the_start_sets_the_slot_period_from_the_retention(aged):
    retention = Retention(aged, timedelta(days=1), None)
    assert retention.begin() == pytest.approx(86400 / 14)
    with aged.connect() as conn:
        period = conn.execute(text("SELECT period_s FROM fp_outbox_slot_period")).scalar_one()
    assert period == pytest.approx(86400 / 14)
    assert Retention(aged, None, None).begin() is None  # off: the period is left as it is
    with aged.begin() as conn:  # put the default back for the other tests of this module
        conn.execute(text("SELECT fp_outbox_set_slot_period(7 * 86400)"))


@pytest.mark.parametrize("retain_s", [2, 30, 60, 300, 900, 3600, 86400, 7 * 86400])
def test_a_slot_past_retention_has_two_retention_runs_before_it_comes_round(aged, retain_s):
    """Once a slot's newest event is past --retain-delivered, the slot must be truncated before it is written again
    (SLOTS periods after its own began): with a window shorter than retention's interval, a run misses it, the slot
    takes a second period's events and waits a whole round more (bench churn grew past its plateau so)."""
    with aged.begin() as conn:
        period = conn.execute(text("SELECT fp_outbox_set_slot_period(:r)"), {"r": retain_s}).scalar_one()
        conn.execute(text("SELECT fp_outbox_set_slot_period(7 * 86400)"))
    every = min(RETENTION_EVERY, max(1.0, retain_s / 2))  # as start_retention runs it
    assert (SLOTS - 1) * period - retain_s >= 2 * every, period


def test_nothing_in_the_engine_deletes_from_the_event_table():
    """Retention truncates whole partitions; a DELETE would leave dead tuples behind (the issue's churn)."""
    engine_sql = "\n".join(path.read_text() for path in (REPO / "worker" / "engine").glob("*.py"))
    assert not re.search(r"DELETE\s+FROM\s+fp_outbox_events\b(?!_)", engine_sql, re.I)
    assert not re.search(r"UPDATE\s+fp_outbox_events\b(?!_)", engine_sql, re.I)


def _slot_default(engine) -> str:
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef AS d JOIN pg_attribute AS a"
            " ON a.attrelid = d.adrelid AND a.attnum = d.adnum"
            " WHERE d.adrelid = 'fp_outbox_events'::regclass AND a.attname = 'slot'")).scalar_one()


def _inserted_slot_and_function(engine) -> tuple[int, int, int]:
    """An event's slot as enqueue's insert gives it, fp_outbox_slot() and the slot by the period in force, all in the
    same transaction (rolled back), so the same instant."""
    with engine.connect() as conn:
        row = conn.execute(text(
            "INSERT INTO fp_outbox_events (insert_id, event_name, payload) VALUES ('slot-probe', 'x', '{}')"
            " RETURNING slot, fp_outbox_slot() AS function, (SELECT ((floor(extract(epoch FROM now()) / period_s))"
            "::bigint % 16)::smallint FROM fp_outbox_slot_period) AS by_period")).one()
        conn.rollback()
    return row.slot, row.function, row.by_period


def _slot_default_language(engine) -> str | None:
    """The language of fp_outbox_slot() when the slot default is that one call, else None."""
    if _slot_default(engine) != "fp_outbox_slot()":
        return None
    with engine.connect() as conn:
        return conn.execute(text("SELECT l.lanname FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang"
                                 " WHERE p.oid = 'fp_outbox_slot()'::regprocedure")).scalar_one()


@pytest.mark.parametrize("retain_s", [60, 86400])
def test_enqueues_insert_computes_its_slot_in_one_call_planned_once_per_session(aged, retain_s):
    """enqueue's INSERT is planned at each execution when unprepared (psycopg's first five on a connection, always
    behind PgBouncer), and every function in its defaults is looked up and set up at each plan: 0007's SQL function
    was parsed and inlined each time (about as much backend CPU as the rest of the row), 0008's expression of seven
    functions still cost 9 µs a row more than one call (bench/concurrency.py statement_cpu). The default is one call of
    a PL/pgSQL function, compiled once per session, and stays equal to fp_outbox_slot() and to the period in force
    through a change of period."""
    try:
        with aged.begin() as conn:
            period = conn.execute(text("SELECT fp_outbox_set_slot_period(:r)"), {"r": retain_s}).scalar_one()
        assert period == pytest.approx(max(10.0, retain_s / 14, (retain_s + 120) / 15))
        assert _slot_default_language(aged) == "plpgsql", _slot_default(aged)
        slot, function, by_period = _inserted_slot_and_function(aged)
        assert slot == function == by_period
    finally:
        with aged.begin() as conn:
            conn.execute(text("SELECT fp_outbox_set_slot_period(7 * 86400)"))


def test_a_period_change_takes_effect_at_once_beside_an_enqueuing_transaction(aged):
    """Changing the period replaces a function and takes no lock on the events' table: a business transaction that
    enqueued and stays open neither delays it (0008 took the table's lock, and kept the old period while such a
    transaction was open) nor is delayed by it, and the next insert, on another connection, uses the new period."""
    holder = aged.connect()
    try:
        holder.execute(text("INSERT INTO fp_outbox_events (insert_id, event_name, payload) VALUES ('held', 'x', '{}')"))
        started = time.monotonic()
        retention = Retention(aged, timedelta(seconds=60), None)
        assert retention.begin() == pytest.approx(12) and time.monotonic() - started < 0.4
        with aged.connect() as conn:
            assert conn.execute(text("SELECT period_s FROM fp_outbox_slot_period")).scalar_one() == pytest.approx(12)
        assert len(set(_inserted_slot_and_function(aged))) == 1
        holder.execute(text("INSERT INTO fp_outbox_events (insert_id, event_name, payload) VALUES ('held2', 'x', '{}')"))
    finally:
        holder.rollback()
        holder.close()
        with aged.begin() as conn:
            conn.execute(text("SELECT fp_outbox_set_slot_period(7 * 86400)"))


def test_the_claims_log_and_the_retries_are_vacuumed_as_they_churn(aged):
    """Both are written at the delivery rate (a claim's row rewritten as it settles, then deleted by retention; a
    retry per failed attempt): autovacuum's default visit after 20 % of the table let a five-minute retention's
    claims log carry 50,000 dead rows and grow for half an hour (bench churn)."""
    with aged.connect() as conn:
        options = dict(conn.execute(text(
            "SELECT c.relname, c.reloptions FROM pg_class AS c"
            " WHERE c.relname IN ('fp_outbox_claims', 'fp_outbox_retries')")).all())
    for table in ("fp_outbox_claims", "fp_outbox_retries"):
        assert "autovacuum_vacuum_scale_factor=0.01" in (options[table] or []), (table, options[table])
