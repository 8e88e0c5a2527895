"""Settling survives whatever the outcome carries and whatever the database refuses: a reason holding a NUL or a
lone surrogate is stored cleaned, and a statement refused for any other reason (not a lost connection)
settles the rest of the batch, dead-letters what cannot be stored with a reason that can, logs once, and
never takes the worker down or leaves the batch in flight."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from tests.conftest import TOKEN, status_of
from tests.inprocess import drain, settings
from worker.engine import Dead, Delivered, Retry, Worker
from worker.engine.outcomes import storable


def _enqueue(engine, names: list[str]) -> list[str]:
    with Session(engine) as session:
        ids = outbox.enqueue_many(session, [{"event": name, "properties": {"distinct_id": "u"}} for name in names])
        session.commit()
    return ids


def _rows(engine) -> dict[str, tuple]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT event_name, status, last_status, last_error FROM fp_outbox_event_states")).all()
    return {row.event_name: tuple(row)[1:] for row in rows}


@pytest.mark.parametrize("raw, stored", [
    ("plain", "plain"), ("a\x00b", "a\ufffdb"), ("a\ud800b", "a\ufffdb"), ("\udfff\x00", "\ufffd\ufffd"),
    ("é €", "é €"), ("😀", "😀"),
])
def test_what_postgresql_cannot_store_is_replaced(raw, stored):
    assert storable(raw) == stored


def test_a_400_whose_body_holds_a_nul_byte_is_dead_and_the_worker_goes_on(clean, db_url, sink, workers):
    _enqueue(clean, ["Bad", "Good"])
    sink.answer_next(400, body="field\x00price is wrong")  # the first request: one at a time, in id order
    worker = workers(db_url, sink.url, "--drain", "--connect-timeout", "0.5", "--read-timeout", "1",
                     "--poll-interval", "0.2", "--concurrency", "1")
    assert worker.wait(60) == 0, worker.output()
    rows = _rows(clean)
    assert rows["Bad"][:2] == ("dead", 400) and "price is wrong" in rows["Bad"][2]
    assert rows["Good"][:1] == ("delivered",)
    assert TOKEN not in worker.output()


class Answers:
    """Stands in for HTTP: the outcome for each event name."""

    def __init__(self, outcomes: dict) -> None:
        self._outcomes = outcomes

    def send(self, row, *_):
        import json

        return self._outcomes.get(json.loads(row.payload)["event"], Delivered(200))


def test_a_reason_with_a_lone_surrogate_is_stored_cleaned(clean, db_url):
    _enqueue(clean, ["Odd", "Fine"])
    worker = Worker(settings(db_url, "http://127.0.0.1:9/track", "--drain"),
                    sender=Answers({"Odd": Dead("HTTP 400: caf\udce9 \x00", 400)}))
    drain(worker)
    # A delivered event keeps no answer of its own (its claim's row in the log counts it); a dead one its reason.
    assert _rows(clean) == {"Odd": ("dead", 400, "HTTP 400: caf\ufffd \ufffd"), "Fine": ("delivered", None, None)}


@pytest.fixture
def refuses_poison(clean):
    """A trigger of the application's, say, that refuses to record a retry of the event named Poison."""
    with clean.begin() as conn:
        conn.execute(text("""
            CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'the application refuses this row'; END $$"""))
        conn.execute(text("""
            CREATE TRIGGER refuse_poison BEFORE INSERT ON fp_outbox_retries FOR EACH ROW
            WHEN (NEW.event_name = 'Poison') EXECUTE FUNCTION refuse_poison()"""))
    yield clean
    with clean.begin() as conn:
        conn.execute(text("DROP TRIGGER refuse_poison ON fp_outbox_retries"))
        conn.execute(text("DROP FUNCTION refuse_poison()"))


def test_a_refused_settle_settles_the_rest_and_dead_letters_what_cannot_be_stored(refuses_poison, db_url, caplog):
    _enqueue(refuses_poison, ["E"] * 10 + ["Poison"] + ["E"] * 10)
    worker = Worker(settings(db_url, "http://127.0.0.1:9/track", "--drain", "--max-attempts", "5"),
                    sender=Answers({"Poison": Retry("HTTP 503: try later", 503)}))
    with caplog.at_level(logging.WARNING, logger="fp_outbox.worker"):
        drain(worker)
    assert status_of(refuses_poison) == {"delivered": 20, "dead": 1}
    [poison] = [row for name, row in _rows(refuses_poison).items() if name == "Poison"]
    assert poison[0] == "dead" and "could not record" in poison[2] and "refuses this row" in poison[2]
    assert len([r for r in caplog.records if "could not record" in r.getMessage()]) == 1  # logged once
