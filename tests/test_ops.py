"""The admin commands (stuck, dead, requeue, purge, status) against a real database, the retention
helper the worker calls, and the operator's whole round trip with a real worker and receiver."""

from __future__ import annotations

import io
import json
import re
from datetime import timedelta

import pytest
from sqlalchemy import text

import outbox
from tests.conftest import create_database, drop_database, status_of, url_string
from tests.storage import backdate_claim, claim_fresh, dead_letter, enqueue, far_slot, settle_fresh
from tests.test_admin_queries import ROWS, _retries, _rows, seed
from worker.admin import main
from worker.engine import DEFAULT_RETAIN_DELIVERED, parse_duration, parse_retention, purge_dead, purge_delivered
from worker.engine.retention import purge_claims


@pytest.fixture
def seeded(clean):
    seed(clean)
    return clean


@pytest.fixture
def aged(clean):
    """An empty outbox whose slot period has been in force for a month."""
    with clean.begin() as conn:
        conn.execute(text("UPDATE fp_outbox_slot_period SET since = now() - interval '30 days'"))
    return clean


@pytest.fixture
def fp(db_url, capsys, monkeypatch):
    """Run `fp-outbox ARGS` in process on this module's database: (exit code, stdout, stderr).
    stdin is not a terminal unless `tty_answer` is given."""
    def run(*args: str, tty_answer: str | None = None) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", _Terminal(tty_answer) if tty_answer is not None else io.StringIO(""))
        code = main([args[0], "--database-url", url_string(db_url), *args[1:]])
        out, err = capsys.readouterr()
        return code, out, err
    return run


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- durations -------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, seconds", [
    ("7d", 7 * 86400), ("12h", 43200), ("30m", 1800), ("90s", 90), ("2w", 14 * 86400), ("1.5h", 5400),
    (" 0s ", 0),
])
def test_durations(given, seconds):
    assert parse_duration(given) == timedelta(seconds=seconds)


@pytest.mark.parametrize("given", ["", "7", "d", "7x", "-1d", "7 days", "1h30m"])
def test_bad_durations_say_how_to_write_one(given):
    with pytest.raises(ValueError, match="e.g. 7d, 12h, 30m or 90s"):
        parse_duration(given)


def test_retention_is_a_duration_or_off():
    assert parse_retention("7d") == timedelta(days=7) == DEFAULT_RETAIN_DELIVERED
    assert parse_retention(" OFF ") is None
    with pytest.raises(ValueError, match="e.g. 7d"):
        parse_retention("never")


def test_a_bad_duration_flag_exits_2_naming_it(fp):
    with pytest.raises(SystemExit) as exited:
        fp("dead", "--older-than", "7 days")
    assert exited.value.code == 2


# -- stuck and dead --------------------------------------------------------------------------------

def test_stuck_lists_expired_leases_with_what_to_do(seeded, fp):
    code, out, _ = fp("stuck")
    assert code == 0
    assert "f-stuck" in out and "gone:2:b" in out and "f-live" not in out
    assert "1 stuck event\n" in out and "fp-outbox requeue --stuck" in out
    code, out, _ = fp("stuck", "--json")
    [row] = json.loads(out)
    assert (row["id"], row["insert_id"], row["attempts"]) == (4, "f-stuck", 3)


def test_stuck_with_nothing_stuck(clean, fp):
    assert fp("stuck") == (0, "no stuck events: nothing is in flight past its lease\n", "")


def test_dead_lists_newest_first_with_reasons(seeded, fp):
    code, out, _ = fp("dead")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["id", "dead", "at", "(UTC)", "event", "attempts", "http", "reason"]
    assert [line.split()[0] for line in lines[1:5]] == ["103", "101", "102", "104"] or \
        [line.split()[0] for line in lines[1:5]] == ["101", "103", "102", "104"]
    assert "HTTP 400: bad price" in out and "gave up after 25 attempts" in out and "4 dead events" in out


@pytest.mark.parametrize("filters, ids", [
    (["--event", "Purchase"], [101, 102, 104]),
    (["--error", "http 400"], [101, 102, 103]),
    (["--error", "NO EMAIL"], [103]),
    (["--older-than", "2d"], [102, 104]),
    (["--event", "Purchase", "--error", "HTTP 400", "--older-than", "2h"], [102]),
    (["--error", "100%"], []),
])
def test_dead_filters(seeded, fp, filters, ids):
    code, out, _ = fp("dead", "--json", *filters)
    assert code == 0 and sorted(row["id"] for row in json.loads(out)) == ids


def test_dead_json_has_the_reasons_and_limit_says_how_many_more(seeded, fp):
    _, out, _ = fp("dead", "--json", "--event", "Signup")
    [row] = json.loads(out)
    assert {k: row[k] for k in ("id", "insert_id", "event_name", "attempts", "last_status", "last_error")} == {
        "id": 103, "insert_id": "d-400-signup", "event_name": "Signup", "attempts": 1, "last_status": 400,
        "last_error": "HTTP 400: no email"}
    assert row["dead_at"].endswith("+00:00")
    _, out, _ = fp("dead", "--limit", "2")
    assert "showing 2 of 4 dead events (--limit N for more)" in out


def test_dead_with_no_match(seeded, fp):
    assert fp("dead", "--event", "Nothing") == (0, "no dead events match these filters\n", "")


# -- requeue ---------------------------------------------------------------------------------------

def test_requeue_dead_by_filter_keeps_the_payload(seeded, fp):
    with seeded.connect() as conn:
        before = {r.id: r.payload for r in conn.execute(text("SELECT id, payload::text FROM fp_outbox_dead_letters"))}
    code, out, _ = fp("requeue", "--dead", "--error", "HTTP 400", "--event", "Purchase", "--yes")
    assert code == 0 and "requeued 2 dead events named 'Purchase', with 'HTTP 400' in the error" in out
    with seeded.connect() as conn:
        after, retries = _rows(conn), {r.id: r for r in conn.execute(text(
            "SELECT id, payload::text, next_attempt_at <= now() AS due FROM fp_outbox_retries"))}
    for id_ in (101, 102):
        assert (after[id_]["status"], after[id_]["attempts"], after[id_]["dead_at"]) == ("pending", 0, None)
        assert retries[id_].payload == before[id_] and retries[id_].due
    assert {id_: after[id_]["status"] for id_ in (103, 104)} == {103: "dead", 104: "dead"}


def test_requeue_dry_run_counts_and_changes_nothing(seeded, fp):
    code, out, _ = fp("requeue", "--dead", "--dry-run")
    assert (code, out) == (0, "would requeue 4 dead events (dry run: nothing changed)\n")
    assert status_of(seeded)["dead"] == 4


def test_requeue_without_a_terminal_refuses_unless_yes(seeded, fp):
    code, out, err = fp("requeue", "--dead")
    assert code == 2 and out == ""
    assert "Requeue 4 dead events" in err and "pass --yes" in err and "nothing was changed" in err
    assert status_of(seeded)["dead"] == 4


def test_requeue_asks_on_a_terminal(seeded, fp):
    code, _, err = fp("requeue", "--dead", "--older-than", "30d", tty_answer="n\n")
    assert code == 1 and "[y/N]" in err and "cancelled" in err and status_of(seeded)["dead"] == 4
    code, out, _ = fp("requeue", "--dead", "--older-than", "30d", tty_answer="y\n")
    assert code == 0 and "requeued 1 dead event dead for over 30d" in out and status_of(seeded)["dead"] == 3


def test_requeue_stuck_takes_only_expired_leases(seeded, fp):
    code, out, _ = fp("requeue", "--stuck", "--yes")
    assert code == 0 and "requeued 1 stuck event (in flight past their lease)" in out
    with seeded.connect() as conn:
        rows = _rows(conn)
    assert (rows[4]["status"], rows[4]["lease_owner"], rows[4]["attempts"]) == ("pending", None, 0)
    assert (rows[3]["status"], rows[3]["lease_owner"]) == ("in_flight", "live:1:a")


def test_requeue_stuck_takes_the_events_of_a_claim_whose_worker_died_and_the_log_says_so(clean, fp):
    ids = enqueue(clean, 3, insert_ids=["s1", "s2", "s3"])
    claim_id, _ = claim_fresh(clean, owner="gone:9:zz")
    settle_fresh(clean, claim_id, delivered=ids[:1])
    with clean.begin() as conn:
        conn.execute(text("UPDATE fp_outbox_claims SET lease_until = now() - interval '1 minute' WHERE id = :id"),
                     {"id": claim_id})
    code, out, _ = fp("requeue", "--id", str(ids[1]), "--yes")  # one of them first
    assert code == 0 and "requeued 1 of 1 events" in out
    code, out, _ = fp("requeue", "--stuck", "--yes")  # then the rest
    assert code == 0 and "requeued 1 stuck event" in out
    with clean.connect() as conn:
        rows, retries = _rows(conn), _retries(conn)
        claim = conn.execute(text("SELECT * FROM fp_outbox_claims WHERE id = :id"), {"id": claim_id}).mappings().one()
    assert {i: rows[i]["status"] for i in ids} == {ids[0]: "delivered", ids[1]: "pending", ids[2]: "pending"}
    assert all(retries[i]["attempts"] == 0 and retries[i]["body"]["properties"]["$insert_id"] == f"s{n + 2}"
               for n, i in enumerate(ids[1:]))
    assert sorted(claim["done"]) == sorted(ids) and claim["settled_at"] is not None and claim["expired"]
    assert claim["failed_ids"] == [ids[1], ids[2]] and claim["delivered"] == 1
    assert set(claim["failed_errors"]) == {"lease expired, requeued by the operator"}
    assert fp("stuck")[1] == "no stuck events: nothing is in flight past its lease\n"


def test_requeue_by_id_says_why_it_skips(seeded, fp):
    code, out, err = fp("requeue", "--id", "101", "3", "--id", "6", "999", "4", "--yes")
    assert code == 0 and "requeued 2 of 5 events" in out
    assert "id 999: no such event" in err and "id 6: delivered, skipped" in err
    assert "id 3: in flight under a live lease, skipped" in err
    with seeded.connect() as conn:
        rows = _rows(conn)
    assert (rows[101]["status"], rows[4]["status"], rows[3]["status"], rows[6]["status"]) == \
        ("pending", "pending", "in_flight", "delivered")


def test_requeue_by_id_of_nothing_requeueable_fails(seeded, fp):
    code, out, _ = fp("requeue", "--id", "6", "--yes")
    assert code == 1 and "nothing to requeue: 0 of 1 events" in out


def test_requeue_needs_exactly_one_selection(fp):
    for args in ([], ["--dead", "--stuck"]):
        with pytest.raises(SystemExit) as exited:
            fp("requeue", *args)
        assert exited.value.code == 2


def test_requeue_filters_belong_to_dead(seeded, fp):
    code, _, err = fp("requeue", "--stuck", "--event", "Purchase", "--yes")
    assert code == 2 and "--event filter dead events: use them with --dead" in err


# -- purge -----------------------------------------------------------------------------------------

PURGED = re.compile(r"(would retire|retired) (\d+) slots? of delivered events \(([^:]*): about [\d,]+ events\), "
                    r"(\d+) claims log rows?, (\d+) delivered retries rows? and (\d+) dead letters?(.*)")


def _purged(out: str) -> tuple:
    """(slots, partitions, claims, retries, dead letters, note) from purge's first line."""
    match = PURGED.match(out.splitlines()[0])
    assert match, out
    verb, slots, partitions, claims, retries, dead, note = match.groups()
    return int(slots), partitions, int(claims), int(retries), int(dead), note


def _delivered(engine, count: int, slot: int, ago: str) -> list[int]:
    """`count` events in `slot`, claimed and delivered `ago` (one claim)."""
    ids = enqueue(engine, count, slot=slot, created_ago=ago)
    claim_id, _ = claim_fresh(engine)
    settle_fresh(engine, claim_id, delivered=ids)
    backdate_claim(engine, claim_id, ago)
    return ids


def test_purge_retires_old_delivered_slots_and_dead_letters(aged, fp):
    for n in range(30):  # dead 49 .. 20 days ago
        dead_letter(aged, 5000 + n, dead_ago=f"{49 - n} days")
    _delivered(aged, 25, far_slot(aged, 1), "10 days")  # the oldest slot: past 7 days
    _delivered(aged, 5, far_slot(aged, 14), "1 day")
    code, out, _ = fp("purge", "--delivered-older-than", "7d", "--dead-older-than", "30d", "--batch-size", "4",
                      "--yes")
    assert code == 0 and _purged(out) == (1, f"fp_outbox_events_s{far_slot(aged, 1):02d}", 1, 0, 20, "")
    assert status_of(aged) == {"delivered": 5, "dead": 10}


def test_purge_dry_run_and_confirmation(seeded, fp):
    code, out, _ = fp("purge", "--delivered-older-than", "7d", "--dry-run")
    assert code == 0 and _purged(out) == (1, f"fp_outbox_events_s{far_slot(seeded, 1):02d}", 1, 0, 0,
                                          " (dry run: nothing changed)")
    code, _, err = fp("purge", "--delivered-older-than", "7d")
    assert code == 2 and "Retire delivered events older than 7d" in err and "pass --yes" in err
    assert len(_all(seeded)) == len(ROWS)


def test_purge_says_which_slot_old_enough_stays_and_why(aged, fp):
    slot = far_slot(aged, 1)
    _delivered(aged, 2, slot, "10 days")
    enqueue(aged, 1, slot=slot)  # an event of that slot the workers have not claimed
    code, out, _ = fp("purge", "--delivered-older-than", "7d", "--yes")
    assert code == 0 and _purged(out)[0] == 0
    assert f"kept fp_outbox_events_s{slot:02d}, old enough but unclaimed: events in it not claimed yet" in out
    assert status_of(aged) == {"delivered": 2, "pending": 1}


def test_the_current_slot_is_never_truncated_even_by_a_purge_of_everything(aged, fp):
    _delivered(aged, 3, far_slot(aged, 0), "1 second")
    code, out, _ = fp("purge", "--delivered-older-than", "0s", "--yes")
    assert code == 0 and _purged(out)[:3] == (0, "none", 0)  # the latest fresh claim holds the position
    assert status_of(aged) == {"delivered": 3}


def test_purge_needs_something_to_purge(fp):
    code, _, err = fp("purge", "--yes")
    assert code == 2 and "--delivered-older-than 7d" in err
    with pytest.raises(SystemExit):
        fp("purge", "--delivered-older-than", "7d", "--batch-size", "0")


def _claims(engine, count: int, ago: str) -> None:
    for _ in range(count):
        ids = enqueue(engine, 1)
        claim_id, _ = claim_fresh(engine)
        settle_fresh(engine, claim_id, delivered=ids)
        backdate_claim(engine, claim_id, ago)


def test_purge_of_the_claims_log_is_bounded_per_call(aged):
    _claims(aged, 10, "8 days")
    _claims(aged, 1, "1 hour")  # the latest fresh claim
    assert purge_delivered(aged, timedelta(days=7), batch_size=3, max_batches=2).claims == 6
    assert purge_delivered(aged, timedelta(days=7), batch_size=3, max_batches=2).claims == 4
    assert purge_delivered(aged, timedelta(days=7), batch_size=3, max_batches=2).claims == 0


def test_purge_stops_walking_the_claims_log_at_claims_younger_than_the_cutoff(aged):
    _claims(aged, 4, "8 days")
    _claims(aged, 30, "1 hour")
    batches = []
    original = aged.begin

    def counting_begin():
        batches.append(1)
        return original()
    aged.begin = counting_begin
    try:
        assert purge_claims(aged, timedelta(days=7), batch_size=3) == 4
    finally:
        del aged.begin
    assert len(batches) == 2  # not 12: the walk ends with the first batch holding a young claim


def test_purge_dead_is_bounded_and_uses_dead_at(clean):
    for n in range(1, 11):  # dead 0.5 .. 9.5 days ago
        dead_letter(clean, 6000 + n, dead_ago=f"{n * 24 - 12} hours")
    assert purge_dead(clean, timedelta(days=5), batch_size=2, max_batches=2) == 4
    assert purge_dead(clean, timedelta(days=5), batch_size=2, max_batches=10) == 1
    assert status_of(clean) == {"dead": 5}


def _all(engine):
    with engine.connect() as conn:
        return _rows(conn)


# -- status ----------------------------------------------------------------------------------------

def test_status_adds_stuck_overdue_and_throughput(seeded, fp):
    ids = enqueue(seeded, 30)
    claim_id, claimed = claim_fresh(seeded)  # takes p-new too, which stays in flight
    settle_fresh(seeded, claim_id, delivered=ids)
    assert sorted(claimed) == [1, *ids]
    code, out, _ = fp("status", "--json")
    counts = json.loads(out)
    assert code == 0
    assert {k: counts[k] for k in ("pending", "in_flight", "delivered", "dead")} == \
        {"pending": 1, "in_flight": 3, "delivered": 32, "dead": 4}
    assert isinstance(counts["oldest_pending_age_s"], float)
    assert {k: counts[k] for k in ("stuck", "overdue", "delivered_last_minute", "dead_last_minute")} == \
        {"stuck": 1, "overdue": 1, "delivered_last_minute": 30, "dead_last_minute": 0}
    code, out, _ = fp("status")
    assert "oldest pending age" in out and "throughput" in out and "0.5 /s" in out and "stuck" in out


# -- errors ----------------------------------------------------------------------------------------

def test_unreachable_database_says_what_to_check(capsys):
    code = main(["dead", "--database-url", "postgresql://nobody@127.0.0.1:1/none"])
    err = capsys.readouterr().err
    assert code == 1 and "could not use the database" in err and "--database-url" in err


def test_missing_schema_says_to_migrate(server_url, capsys):
    url = create_database(server_url)
    try:
        code = main(["stuck", "--database-url", url_string(url)])
    finally:
        drop_database(server_url, url)
    assert code == 5 and "run `fp-outbox migrate`" in capsys.readouterr().err



@pytest.mark.parametrize("revision, named", [("nosuch", "nosuch"), ("0002", "0002")],
                         ids=["unknown revision", "older than the schema"])
def test_a_revision_migrate_cannot_reach_is_one_sentence_and_changes_nothing(db_url, capsys, revision, named):
    code = main(["migrate", "--database-url", url_string(db_url), "--revision", revision])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "--revision" in err and "Traceback" not in err, err
    assert main(["status", "--json", "--database-url", url_string(db_url)]) == 0  # the schema is as it was


def test_migrate_embedded_migrates_once_to_the_revision_asked(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pgserver")
    monkeypatch.setenv("FP_OUTBOX_EMBEDDED_DIR", str(tmp_path / "pgdata"))
    code = main(["migrate", "--embedded", "--revision", "0002"])
    out, err = capsys.readouterr()
    assert code == 0 and "schema at 0002" in out, err

# -- the operator's round trip ---------------------------------------------------------------------

def test_dead_after_a_400_then_requeued_and_delivered_with_the_same_insert_id(clean, db_url, sink, workers, fp):
    sink.set_faults(reject_events={"Purchase": 400})
    with clean.begin() as conn:
        ids = [outbox.enqueue(conn, {"event": "Purchase", "properties": {"distinct_id": str(i)}}) for i in range(3)]
        outbox.enqueue(conn, {"event": "Signup", "properties": {"distinct_id": "9"}})
    assert workers(db_url, sink.url, "--drain").wait(60) == 0
    assert status_of(clean) == {"dead": 3, "delivered": 1}
    code, out, _ = fp("dead", "--event", "Purchase")
    assert code == 0 and out.count("HTTP 400") == 3 and "rejected by the sink" in out

    sink.set_faults(reject_events=None)  # the receiver is fixed
    assert fp("requeue", "--dead", "--event", "Purchase", "--yes")[0] == 0
    assert workers(db_url, sink.url, "--drain").wait(60) == 0
    assert status_of(clean) == {"delivered": 4}
    delivered = [r.insert_id for r in sink.accepted() if r.event == "Purchase"]
    assert sorted(delivered) == sorted(ids)  # the same $insert_id as the rejected sends

    with clean.begin() as conn:  # a week later, as it were: their slot's period is long over, and so are the claims
        conn.execute(text("UPDATE fp_outbox_slot_period SET since = now() - interval '30 days'"))
        conn.execute(text("UPDATE fp_outbox_events SET slot = :slot"), {"slot": far_slot(clean, 1)})
        conn.execute(text("UPDATE fp_outbox_claims SET claimed_at = claimed_at - interval '8 days',"
                          " settled_at = settled_at - interval '8 days',"
                          " lease_until = lease_until - interval '8 days'"))
        conn.execute(text("UPDATE fp_outbox_retries SET delivered_at = delivered_at - interval '8 days'"))
    code, out, _ = fp("purge", "--delivered-older-than", "7d", "--yes")
    slots, _, _, retries, dead, _ = _purged(out)
    assert (code, slots, retries, dead) == (0, 1, 3, 0)
    assert status_of(clean) == {}
