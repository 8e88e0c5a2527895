"""The worker's retention on a real table: it walks the primary key from where its last run stopped, so no
mass of rows it must keep (old dead rows, old pending ones) can stall it; dead rows have a retention of
their own; a run goes on while its batches are productive, so it keeps pace with heavy delivery."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text

from tests.conftest import status_of
from worker.engine.retention import Retention


def _rows(engine, count: int, status: str, age: str, created_age: str | None = None) -> None:
    """`count` rows of `status` that reached it `age` ago, enqueued `created_age` (default: `age`) ago."""
    column = {"delivered": "delivered_at", "dead": "dead_at"}.get(status)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO fp_outbox_events (insert_id, event_name, payload, status, created_at"
            + (f", {column}" if column else "") + ")"
            " SELECT 'r' || g, 'E', '{}', :status, now() - CAST(:created AS interval)"
            + (", now() - CAST(:age AS interval)" if column else "") + " FROM generate_series(1, :n) g"),
            {"n": count, "status": status, "age": age, "created": created_age or age})


def test_old_dead_rows_in_front_never_stall_the_delivered_ones_behind_them(clean):
    """The issue's case: 100,000 old dead rows (kept: dead retention is 30 days) in front of 1,000 old
    delivered ones. Starting at id 0 and looking at 100,000 rows a run, three runs deleted nothing."""
    _rows(clean, 100_000, "dead", "10 days")
    _rows(clean, 1_000, "delivered", "8 days")
    retention = Retention(clean, timedelta(days=7), timedelta(days=30))
    purged = [retention.run() for _ in range(3)]
    assert sum(delivered for delivered, _ in purged) == 1_000
    assert purged[0][0] + purged[1][0] == 1_000  # by the second run at the latest
    assert status_of(clean) == {"dead": 100_000}


def test_dead_rows_have_a_retention_of_their_own(clean):
    _rows(clean, 30, "dead", "40 days")
    _rows(clean, 20, "dead", "10 days")
    _rows(clean, 10, "delivered", "40 days")
    assert Retention(clean, timedelta(days=7), timedelta(days=30)).run() == (10, 30)
    assert status_of(clean) == {"dead": 20}
    assert Retention(clean, timedelta(days=7), None).run() == (0, 0)  # --retain-dead off keeps them


def test_each_run_starts_where_the_last_one_may_find_something_new(clean):
    _rows(clean, 5, "delivered", "8 days")
    _rows(clean, 1, "pending", "20 days")  # an old event still being retried: it must be looked at again
    _rows(clean, 50, "dead", "1 day")
    _rows(clean, 40, "delivered", "1 day")
    retention = Retention(clean, timedelta(days=7), timedelta(days=30), batch_size=10)
    assert retention.run() == (5, 0)
    with clean.begin() as conn:  # a week later, as it were: the pending one was delivered, the young ones aged
        conn.execute(text("UPDATE fp_outbox_events SET status = 'delivered', delivered_at = now() - interval '1 day'"
                          " WHERE status = 'pending'"))
        conn.execute(text("UPDATE fp_outbox_events SET created_at = created_at - interval '7 days',"
                          " delivered_at = delivered_at - interval '7 days', dead_at = dead_at - interval '7 days'"))
    assert retention.run() == (41, 0)
    assert status_of(clean) == {"dead": 50}


def test_a_run_goes_on_while_its_batches_delete_and_stops_after_a_few_that_do_not(clean):
    _rows(clean, 300, "delivered", "8 days")
    _rows(clean, 300, "dead", "1 day", created_age="9 days")
    _rows(clean, 100, "delivered", "8 days")
    retention = Retention(clean, timedelta(days=7), timedelta(days=30), batch_size=10, idle_batches=5)
    assert retention.run() == (300, 0)  # 30 productive batches, then 5 that delete nothing
    assert retention.run() == (0, 0)  # five more
    runs = [retention.run() for _ in range(20)]
    assert sum(delivered for delivered, _ in runs) == 100  # it gets there; it never stalls
