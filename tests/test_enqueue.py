"""enqueue, enqueue_many and identify against a real PostgreSQL: the row lives and dies with the caller's
transaction, nothing is committed for them, and invalid input never reaches the database."""

from __future__ import annotations

import contextlib
import re
import time
import uuid

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import text
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import outbox
from outbox.validation import prepare
from outbox.wake import WAKE_SQL

INSERT_ORDER = text("INSERT INTO orders (ref) VALUES (:ref)")


def purchase(distinct_id: str = "13793", **properties) -> dict:
    return {"event": "Purchase", "properties": {"distinct_id": distinct_id, "price": 500, **properties}}


@pytest.fixture(scope="module")
def orders_table(engine):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, ref text NOT NULL)"))
    return "orders"


@pytest.fixture
def db(clean, orders_table):
    """The engine, with an empty outbox and an empty business table."""
    with clean.begin() as conn:
        conn.execute(text("TRUNCATE orders"))
    return clean


@contextlib.contextmanager
def statements(engine, with_parameters: bool = False):
    """Record every statement sent to the server while the block runs (with its parameters, if asked), but
    the workers' wake-ups: those run after a commit, on a pooled connection of their own, whenever due."""
    seen: list = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if statement != WAKE_SQL:
            seen.append((statement, parameters) if with_parameters else statement)

    sa_event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa_event.remove(engine, "before_cursor_execute", record)


def outbox_rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(
            "SELECT insert_id, event_name, payload, status, attempts FROM fp_outbox_event_states ORDER BY id")).mappings()]


def order_refs(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT ref FROM orders ORDER BY id")).scalars())


# ---------------------------------------------------------------- commit and rollback

def test_commit_writes_a_pending_row_carrying_the_insert_id(db):
    with Session(db) as session:
        insert_id = outbox.enqueue(session, purchase(plan="pro"))
        session.commit()
    [row] = outbox_rows(db)
    assert row["insert_id"] == insert_id
    assert row["event_name"] == "Purchase"
    assert row["status"] == "pending"
    assert row["attempts"] == 0
    props = row["payload"]["properties"]
    assert props["$insert_id"] == insert_id
    assert props["distinct_id"] == "13793" and props["price"] == 500 and props["plan"] == "pro"
    assert isinstance(props["time"], float)
    assert row["payload"]["event"] == "Purchase"


def test_given_insert_id_and_time_are_stored(db):
    with Session(db) as session:
        insert_id = outbox.enqueue(session, purchase(**{"$insert_id": "order-1", "time": 1_700_000_000}))
        session.commit()
    assert insert_id == "order-1"
    [row] = outbox_rows(db)
    assert row["insert_id"] == "order-1"
    assert row["payload"]["properties"]["time"] == 1_700_000_000


def test_rollback_leaves_no_row(db):
    with Session(db) as session:
        outbox.enqueue(session, purchase())
        session.rollback()
    assert outbox_rows(db) == []


def test_with_a_connection(db):
    with db.connect() as conn:
        with conn.begin():
            conn.execute(INSERT_ORDER, {"ref": "A-1"})
            insert_id = outbox.enqueue(conn, purchase())
        with conn.begin() as tx:
            conn.execute(INSERT_ORDER, {"ref": "A-2"})
            outbox.enqueue(conn, purchase())
            tx.rollback()
    assert [r["insert_id"] for r in outbox_rows(db)] == [insert_id]
    assert order_refs(db) == ["A-1"]


def test_with_a_scoped_session(db):
    factory = scoped_session(sessionmaker(db))
    try:
        insert_id = outbox.enqueue(factory, purchase())
        factory.commit()
    finally:
        factory.remove()
    assert [r["insert_id"] for r in outbox_rows(db)] == [insert_id]


def test_enqueue_never_commits(db):
    with db.connect() as conn:
        outbox.enqueue(conn, purchase())  # autobegun; closing without commit rolls back
        assert outbox_rows(db) == []  # not visible to anyone else before the caller commits
    assert outbox_rows(db) == []
    with Session(db) as session:
        outbox.enqueue_many(session, [purchase(), purchase()])
        outbox.identify(session, "u1", {"plan": "pro"})
    assert outbox_rows(db) == []


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_business_rows_and_events_are_both_or_neither(db, outcome):
    with Session(db) as session:
        session.execute(INSERT_ORDER, {"ref": "O-1"})
        outbox.enqueue(session, purchase())
        session.execute(INSERT_ORDER, {"ref": "O-2"})
        outbox.enqueue_many(session, [purchase("a"), purchase("b")])
        getattr(session, outcome)()
    expected_events, expected_orders = (3, ["O-1", "O-2"]) if outcome == "commit" else (0, [])
    assert len(outbox_rows(db)) == expected_events
    assert order_refs(db) == expected_orders


def test_enqueue_issues_one_statement(db):
    with db.connect() as conn:
        conn.execute(text("SELECT 1"))
        with statements(db) as seen:
            outbox.enqueue(conn, purchase())
        conn.commit()
    assert len(seen) == 1


# ---------------------------------------------------------------- invalid input

def self_referencing() -> dict:
    evt = purchase()
    evt["properties"]["self"] = evt["properties"]
    return evt


def deeply_nested(depth: int = 100_000) -> dict:
    value: list = []
    for _ in range(depth):
        value = [value]
    return purchase(deep=value)


INVALID = [
    ("not a mapping", ["Purchase"], "mapping"),
    ("event missing", {"properties": {"distinct_id": "u"}}, "'event'"),
    ("properties not a mapping", {"event": "Purchase", "properties": "x"}, "'properties'"),
    ("distinct_id empty", purchase(""), "distinct_id"),
    ("time in milliseconds", purchase(time=1_700_000_000_000), "time"),
    ("time NaN", purchase(time=float("nan")), "time"),
    ("insert_id empty", purchase(**{"$insert_id": ""}), "$insert_id"),
    ("a set", purchase(tags={"a"}), "properties.tags"),
    ("too large", purchase(blob="x" * outbox.MAX_EVENT_BYTES), str(outbox.MAX_EVENT_BYTES)),
    ("NUL in a value", purchase(note="a\x00b"), "properties.note"),
    ("NUL in a key", purchase(**{"a\x00b": 1}), "properties['a\\x00b']"),
    ("lone surrogate", purchase(note="\ud800"), "properties.note"),
    ("self-referencing", self_referencing(), "properties.self"),
    ("absurdly deep", deeply_nested(), "properties.deep"),
]


@pytest.mark.parametrize("bad, fragment", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
@pytest.mark.parametrize("kind", ["session", "connection"])
def test_invalid_event_runs_no_sql_and_leaves_the_transaction_usable(db, bad, fragment, kind):
    with contextlib.ExitStack() as stack:
        if kind == "session":
            handle = stack.enter_context(Session(db))
        else:
            handle = stack.enter_context(db.connect())
            handle.begin()
        handle.execute(INSERT_ORDER, {"ref": "before"})
        with statements(db) as seen:
            with pytest.raises(outbox.InvalidEvent, match=re.escape(fragment)):
                outbox.enqueue(handle, bad)
        assert seen == []
        handle.execute(INSERT_ORDER, {"ref": "after"})
        insert_id = outbox.enqueue(handle, purchase())
        handle.commit()
    assert order_refs(db) == ["before", "after"]
    assert [r["insert_id"] for r in outbox_rows(db)] == [insert_id]


# ---------------------------------------------------------------- what is stored

FIXED = purchase(city="Zürich", note="€" * 10, **{"$insert_id": "fixed-1", "time": 1_700_000_000})


def test_the_payload_inserted_is_the_text_validation_measured(db):
    with statements(db, with_parameters=True) as sent, Session(db) as session:
        outbox.enqueue(session, FIXED)
        session.commit()
        time.sleep(0.1)  # the commit's wake-up goes meanwhile, on the waker's thread: it must not count
    [(_, parameters)] = sent
    assert parameters["payload"] == prepare(FIXED)[2]


def test_the_stored_text_is_the_validated_text(db):
    with Session(db) as session:
        outbox.enqueue(session, FIXED)
        session.commit()
    with db.connect() as conn:
        stored = conn.execute(text("SELECT payload::text FROM fp_outbox_events")).scalar_one()
    assert stored == prepare(FIXED)[2]


@pytest.mark.parametrize("bad_user_props", [None, ["plan", "pro"], "plan=pro"], ids=["None", "list", "str"])
def test_identify_refuses_non_mapping_user_props_without_sql(db, bad_user_props):
    with Session(db) as session:
        session.execute(text("SELECT 1"))
        with statements(db) as seen:
            with pytest.raises(outbox.InvalidEvent, match="user_props"):
                outbox.identify(session, "u1", bad_user_props)
        assert seen == []


@pytest.mark.parametrize("args, kwargs, fragment", [
    (("", {"plan": "pro"}), {}, "distinct_id"),
    ((None, {"plan": "pro"}), {}, "distinct_id"),
    (("u1", {"plan": "pro"}), {"device_id": ""}, "device_id"),
    (("u1", {"plan": "pro"}), {"time": 1_700_000_000_000}, "time"),
    (("u1", {"plan": {"a", "b"}}), {}, "$user_props.plan"),
], ids=["empty distinct_id", "None distinct_id", "empty device_id", "time in ms", "a set in user_props"])
def test_identify_refuses_bad_arguments_without_sql(db, args, kwargs, fragment):
    with Session(db) as session:
        session.execute(text("SELECT 1"))
        with statements(db) as seen:
            with pytest.raises(outbox.InvalidEvent, match=re.escape(fragment)):
                outbox.identify(session, *args, **kwargs)
        assert seen == []


@pytest.mark.parametrize("not_a_session", ["engine", None, "a string", object()],
                         ids=["Engine", "None", "str", "object"])
def test_something_other_than_session_or_connection_is_a_type_error(db, not_a_session):
    handle = db if not_a_session == "engine" else not_a_session
    with statements(db) as seen:
        with pytest.raises(TypeError, match="Session or Connection"):
            outbox.enqueue(handle, purchase())
        with pytest.raises(TypeError):
            outbox.enqueue_many(handle, [purchase()])
        with pytest.raises(TypeError):
            outbox.enqueue_many(handle, [])
        with pytest.raises(TypeError):
            outbox.identify(handle, "u1", {"plan": "pro"})
    assert seen == []
    assert outbox_rows(db) == []


# ---------------------------------------------------------------- enqueue_many

def test_enqueue_many_writes_all_rows_in_one_statement_in_order(db):
    events = [purchase(f"user-{n}", n=n) for n in range(5)]
    events[3]["properties"]["$insert_id"] = "given-3"
    with Session(db) as session:
        session.execute(text("SELECT 1"))
        with statements(db) as seen:
            insert_ids = outbox.enqueue_many(session, events)
        session.commit()
    assert len(seen) == 1
    assert len(insert_ids) == 5 and len(set(insert_ids)) == 5
    assert insert_ids[3] == "given-3"
    rows = outbox_rows(db)
    assert [r["insert_id"] for r in rows] == insert_ids
    assert [r["payload"]["properties"]["n"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["payload"]["properties"]["$insert_id"] == r["insert_id"] for r in rows)
    assert {r["status"] for r in rows} == {"pending"} and {r["attempts"] for r in rows} == {0}


def test_enqueue_many_accepts_a_generator(db):
    with Session(db) as session:
        insert_ids = outbox.enqueue_many(session, (purchase(str(n)) for n in range(3)))
        session.commit()
    assert [r["insert_id"] for r in outbox_rows(db)] == insert_ids


def test_enqueue_many_with_one_bad_event_writes_nothing_and_names_its_index(db):
    events = [purchase("a"), purchase("b"), purchase(""), purchase("d")]
    with Session(db) as session:
        session.execute(INSERT_ORDER, {"ref": "kept"})
        with statements(db) as seen:
            with pytest.raises(outbox.InvalidEvent) as caught:
                outbox.enqueue_many(session, events)
        assert seen == []
        session.commit()  # the transaction is still usable
    message = str(caught.value)
    assert "events[2]" in message and "distinct_id" in message
    assert outbox_rows(db) == []
    assert order_refs(db) == ["kept"]


def test_enqueue_many_of_nothing_returns_empty_and_runs_nothing(db):
    with Session(db) as session:
        with statements(db) as seen:
            assert outbox.enqueue_many(session, []) == []
            assert outbox.enqueue_many(session, iter(())) == []
        session.commit()
    assert seen == []
    assert outbox_rows(db) == []


def test_enqueue_many_with_a_connection(db):
    with db.connect() as conn:
        with conn.begin():
            conn.execute(INSERT_ORDER, {"ref": "M-1"})
            insert_ids = outbox.enqueue_many(conn, [purchase("a"), purchase("b")])
    assert [r["insert_id"] for r in outbox_rows(db)] == insert_ids
    assert order_refs(db) == ["M-1"]


# ---------------------------------------------------------------- identify

def test_identify_writes_the_identify_event(db):
    with Session(db) as session:
        insert_id = outbox.identify(session, "u-42", {"plan": "pro", "seats": 3}, device_id="dev-9",
                                    time=1_700_000_000.5)
        session.commit()
    [row] = outbox_rows(db)
    assert row["insert_id"] == insert_id
    assert row["event_name"] == "$identify"
    assert row["payload"]["event"] == "$identify"
    props = row["payload"]["properties"]
    assert props["distinct_id"] == "u-42"
    assert props["$user_props"] == {"plan": "pro", "seats": 3}
    assert props["$device_id"] == "dev-9"
    assert props["time"] == 1_700_000_000.5
    assert props["$insert_id"] == insert_id
    assert str(uuid.UUID(insert_id)) == insert_id


def test_identify_without_device_id_or_time(db):
    with db.connect() as conn:
        with conn.begin():
            outbox.identify(conn, "u-7", {})
    [row] = outbox_rows(db)
    props = row["payload"]["properties"]
    assert props["distinct_id"] == "u-7"
    assert props["$user_props"] == {}
    assert "$device_id" not in props
    assert isinstance(props["time"], float)


def test_identify_does_not_mutate_user_props(db):
    user_props = {"plan": "pro"}
    with Session(db) as session:
        outbox.identify(session, "u-1", user_props)
        session.rollback()
    assert user_props == {"plan": "pro"}
