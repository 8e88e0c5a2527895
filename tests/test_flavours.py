"""Every kind of connection an application may hold (SQLAlchemy Session and Connection, psycopg Connection,
their asyncio counterparts, Django) on a real PostgreSQL: the event commits and rolls back with the
business data, bad input runs no SQL and leaves the transaction usable, and a real worker delivers
exactly what committed."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import outbox
from outbox.statements import INSERT_MANY, INSERT_ONE
from tests.conftest import url_string, wait_until
from tests.test_enqueue import statements

INSERT_ORDER = text("INSERT INTO orders (ref) VALUES (:ref)")
INSERT_ORDER_PSYCOPG = "INSERT INTO orders (ref) VALUES (%s)"


def purchase(distinct_id: str = "13793", **properties) -> dict:
    return {"event": "Purchase", "properties": {"distinct_id": distinct_id, "price": 500, **properties}}


class Flavour:
    """One kind of connection, driven from synchronous test code (asyncio ones through a runner)."""

    name = ""

    def open(self) -> contextlib.AbstractContextManager:  # yields the handle, in a fresh transaction
        raise NotImplementedError

    def order(self, handle, ref: str) -> None: ...
    def commit(self, handle) -> None: ...
    def rollback(self, handle) -> None: ...
    def recording(self, handle) -> contextlib.AbstractContextManager[list]: ...

    def enqueue(self, handle, event) -> str:
        return outbox.enqueue(handle, event)

    def enqueue_many(self, handle, events) -> list[str]:
        return outbox.enqueue_many(handle, events)

    def identify(self, handle, *args, **kwargs) -> str:
        return outbox.identify(handle, *args, **kwargs)


class AsyncFlavour(Flavour):
    def __init__(self, runner: asyncio.Runner) -> None:
        # In a copy of the caller's context, as an application's own task sees its request's (its active
        # span, say); the runner's own context would be another.
        self.run = lambda coroutine: runner.run(coroutine, context=contextvars.copy_context())

    def enqueue(self, handle, event) -> str:
        return self.run(outbox.enqueue_async(handle, event))

    def enqueue_many(self, handle, events) -> list[str]:
        return self.run(outbox.enqueue_many_async(handle, events))

    def identify(self, handle, *args, **kwargs) -> str:
        return self.run(outbox.identify_async(handle, *args, **kwargs))


@contextlib.contextmanager
def cursor_statements(conn) -> Iterator[list]:
    """Record what a psycopg connection executes: its execute() goes through cursor_factory."""
    seen: list[str] = []
    original = conn.cursor_factory

    class Recording(original):
        def execute(self, query, *args, **kwargs):
            seen.append(query)
            return super().execute(query, *args, **kwargs)

    conn.cursor_factory = Recording
    try:
        yield seen
    finally:
        conn.cursor_factory = original


class SessionFlavour(Flavour):
    name = "Session"

    def __init__(self, engine) -> None:
        self.engine = engine

    def open(self):
        return Session(self.engine)

    def order(self, handle, ref):
        handle.execute(INSERT_ORDER, {"ref": ref})

    def commit(self, handle):
        handle.commit()

    def rollback(self, handle):
        handle.rollback()

    def recording(self, handle):
        return statements(self.engine)


class ConnectionFlavour(SessionFlavour):
    name = "Connection"

    def open(self):
        return self.engine.connect()


class PsycopgFlavour(Flavour):
    name = "psycopg Connection"

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo

    @contextlib.contextmanager
    def open(self):
        with contextlib.closing(psycopg.connect(self.conninfo)) as conn:
            yield conn  # closing without commit discards the transaction

    def order(self, handle, ref):
        handle.execute(INSERT_ORDER_PSYCOPG, (ref,))

    def commit(self, handle):
        handle.commit()

    def rollback(self, handle):
        handle.rollback()

    def recording(self, handle):
        return cursor_statements(handle)


class AsyncSessionFlavour(AsyncFlavour):
    name = "AsyncSession"

    def __init__(self, runner, async_engine) -> None:
        super().__init__(runner)
        self.engine = async_engine

    @contextlib.contextmanager
    def open(self):
        session = AsyncSession(self.engine)
        try:
            yield session
        finally:
            self.run(session.close())

    def order(self, handle, ref):
        self.run(handle.execute(INSERT_ORDER, {"ref": ref}))

    def commit(self, handle):
        self.run(handle.commit())

    def rollback(self, handle):
        self.run(handle.rollback())

    def recording(self, handle):
        return statements(self.engine.sync_engine)


class AsyncConnectionFlavour(AsyncSessionFlavour):
    name = "AsyncConnection"

    @contextlib.contextmanager
    def open(self):
        conn = self.run(self.engine.connect().start())
        try:
            yield conn
        finally:
            self.run(conn.close())


class PsycopgAsyncFlavour(AsyncFlavour):
    name = "psycopg AsyncConnection"

    def __init__(self, runner, conninfo: str) -> None:
        super().__init__(runner)
        self.conninfo = conninfo

    @contextlib.contextmanager
    def open(self):
        conn = self.run(psycopg.AsyncConnection.connect(self.conninfo))
        try:
            yield conn
        finally:
            self.run(conn.close())

    def order(self, handle, ref):
        self.run(handle.execute(INSERT_ORDER_PSYCOPG, (ref,)))

    def commit(self, handle):
        self.run(handle.commit())

    def rollback(self, handle):
        self.run(handle.rollback())

    def recording(self, handle):
        return cursor_statements(handle)


class DjangoFlavour(Flavour):
    """Django's own connection inside transaction.atomic(): the recipe docs/enqueue.md documents."""

    name = "Django"

    @contextlib.contextmanager
    def open(self):
        from django.db import connection, transaction

        with transaction.atomic():
            yield connection.connection

    def order(self, handle, ref):
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(INSERT_ORDER_PSYCOPG, [ref])

    def commit(self, handle):
        pass  # leaving atomic() commits

    def rollback(self, handle):
        from django.db import transaction

        transaction.set_rollback(True)

    def recording(self, handle):
        return cursor_statements(handle)


def psycopg_conninfo(url: URL) -> str:
    return url_string(url.set(drivername="postgresql"))


def configure_django(url: URL) -> None:
    import django
    from django.conf import settings

    if settings.configured:  # another module's database before: Django is set up once per process
        from django.db import connection

        connection.close()
        connection.settings_dict.update(NAME=url.database)
        return
    settings.configure(
        DATABASES={"default": {
            "ENGINE": "django.db.backends.postgresql", "NAME": url.database, "USER": url.username or "",
            "PASSWORD": url.password or "", "HOST": url.query.get("host") or url.host or "",
            "PORT": str(url.port or ""),
        }},
        INSTALLED_APPS=[], USE_TZ=True,
    )
    django.setup()


FLAVOURS = ["Session", "Connection", "psycopg Connection", "AsyncSession", "AsyncConnection",
            "psycopg AsyncConnection", "Django"]


@pytest.fixture(scope="module")
def flavours(engine, db_url) -> Iterator[dict[str, Flavour]]:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, ref text NOT NULL)"))
    configure_django(db_url)
    with asyncio.Runner() as runner:
        async_engine = create_async_engine(db_url)
        kinds = [SessionFlavour(engine), ConnectionFlavour(engine), PsycopgFlavour(psycopg_conninfo(db_url)),
                 AsyncSessionFlavour(runner, async_engine), AsyncConnectionFlavour(runner, async_engine),
                 PsycopgAsyncFlavour(runner, psycopg_conninfo(db_url)), DjangoFlavour()]
        yield {kind.name: kind for kind in kinds}
        runner.run(async_engine.dispose())
    from django.db import connection

    connection.close()


@pytest.fixture
def db(clean):
    with clean.begin() as conn:
        conn.execute(text("TRUNCATE orders"))
    return clean


@pytest.fixture(params=FLAVOURS)
def flavour(request, flavours, db) -> Flavour:
    return flavours[request.param]


def rows(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT insert_id FROM fp_outbox_events ORDER BY id")).scalars())


def orders(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT ref FROM orders ORDER BY id")).scalars())


# ---------------------------------------------------------------- the scenarios, once for every flavour

def commit_some(flavour: Flavour, ref: str = "committed") -> list[str]:
    """An order and four events (enqueue, enqueue_many of two, identify), committed together."""
    with flavour.open() as handle:
        flavour.order(handle, ref)
        ids = [flavour.enqueue(handle, purchase(flavour=flavour.name)),
               *flavour.enqueue_many(handle, [purchase("a"), purchase("b")]),
               flavour.identify(handle, "u-1", {"plan": "pro"}, device_id="d-1")]
        flavour.commit(handle)
    return ids


def roll_back_some(flavour: Flavour) -> None:
    with flavour.open() as handle:
        flavour.order(handle, "rolled back")
        flavour.enqueue(handle, purchase(outcome="rolled back"))
        flavour.enqueue_many(handle, [purchase(outcome="rolled back")])
        flavour.rollback(handle)


class Boom(Exception):
    pass


def fail_inside(flavour: Flavour) -> None:
    with pytest.raises(Boom):
        with flavour.open() as handle:
            flavour.order(handle, "failed")
            flavour.enqueue(handle, purchase(outcome="failed"))
            raise Boom("the business code failed after enqueueing")


def test_commit_writes_the_events_with_the_business_data(flavour, db):
    ids = commit_some(flavour)
    assert rows(db) == ids and len(set(ids)) == 4
    assert orders(db) == ["committed"]


def test_rollback_writes_nothing(flavour, db):
    roll_back_some(flavour)
    assert rows(db) == [] and orders(db) == []


def test_an_exception_inside_the_transaction_writes_nothing(flavour, db):
    fail_inside(flavour)
    assert rows(db) == [] and orders(db) == []


BAD_CALLS = [
    ("enqueue", ({"properties": {"distinct_id": "u"}},), "'event'"),
    ("enqueue", (purchase(note="a\x00b"),), "properties.note"),
    ("enqueue", (purchase(note="\ud800"),), "properties.note"),
    ("enqueue_many", ([purchase(), purchase(price=float("nan"))],), "events[1]: 'properties.price'"),
    ("identify", ("u-1", ["plan"]), "user_props"),
]


def test_bad_input_runs_no_sql_and_leaves_the_transaction_usable(flavour, db):
    cyclic = purchase()
    cyclic["properties"]["self"] = cyclic["properties"]
    calls = [*BAD_CALLS, ("enqueue", (cyclic,), "properties.self")]
    with flavour.open() as handle:
        flavour.order(handle, "before")
        for method, args, fragment in calls:
            with flavour.recording(handle) as seen:
                with pytest.raises(outbox.InvalidEvent, match=re.escape(fragment)):
                    getattr(flavour, method)(handle, *args)
            assert seen == [], (method, fragment)
        flavour.order(handle, "after")
        with flavour.recording(handle) as seen:
            insert_id = flavour.enqueue(handle, purchase())
        assert len(seen) == 1  # the recorder sees what enqueue runs: one statement
        flavour.commit(handle)
    assert orders(db) == ["before", "after"]
    assert rows(db) == [insert_id]


def test_a_real_worker_delivers_exactly_what_committed_on_every_flavour(flavours, db, db_url, sink, workers):
    committed = {}
    for flavour in flavours.values():
        committed.update(dict.fromkeys(commit_some(flavour, ref=flavour.name), flavour.name))
        roll_back_some(flavour)
        fail_inside(flavour)
    assert orders(db) == FLAVOURS  # nothing but the committed business data either
    worker = workers(db_url, sink.url, "--drain", "--poll-interval", "0.2")
    assert worker.wait(60) == 0, worker.output()
    arrived = {r.insert_id: r for r in sink.accepted()}
    assert set(arrived) == set(committed), {committed.get(i, "rolled back") for i in set(arrived) ^ set(committed)}
    assert {r.event for r in arrived.values()} == {"Purchase", "$identify"}
    assert all("outcome" not in r.body["properties"] for r in arrived.values())


# ---------------------------------------------------------------- asyncio: many tasks at once

async def _concurrent_tasks(kind: str, db_url: URL, tasks: int) -> list[str]:
    if kind == "psycopg AsyncConnection":
        async def one(n: int) -> str:
            async with await psycopg.AsyncConnection.connect(psycopg_conninfo(db_url)) as conn:
                return await outbox.enqueue_async(conn, purchase(f"user-{n}", n=n))  # commits on exit
        return list(await asyncio.gather(*(one(n) for n in range(tasks))))
    async_engine = create_async_engine(db_url, pool_size=5, max_overflow=0)

    async def one_sqlalchemy(n: int) -> str:
        if kind == "AsyncSession":
            async with AsyncSession(async_engine) as session, session.begin():
                return await outbox.enqueue_async(session, purchase(f"user-{n}", n=n))
        async with async_engine.begin() as conn:
            return await outbox.enqueue_async(conn, purchase(f"user-{n}", n=n))

    try:
        return list(await asyncio.gather(*(one_sqlalchemy(n) for n in range(tasks))))
    finally:
        await async_engine.dispose()


@pytest.mark.parametrize("kind", ["AsyncSession", "AsyncConnection", "psycopg AsyncConnection"])
def test_many_concurrent_tasks_each_get_their_own_row(kind, db, db_url):
    tasks = 40
    ids = asyncio.run(_concurrent_tasks(kind, db_url, tasks))
    assert len(set(ids)) == tasks
    with db.connect() as conn:
        stored = dict(conn.execute(text(
            "SELECT insert_id, (payload -> 'properties' ->> 'n')::int FROM fp_outbox_events")).all())
    assert stored == {insert_id: n for n, insert_id in enumerate(ids)}


# ---------------------------------------------------------------- the handle itself

def test_each_flavour_refuses_the_others_handles_by_name(flavours, db):
    sync_session, async_session = flavours["Session"], flavours["AsyncSession"]
    with sync_session.open() as handle:
        with pytest.raises(TypeError, match=r"AsyncSession or AsyncConnection.*outbox\.enqueue\("):
            async_session.enqueue(handle, purchase())
    with async_session.open() as handle:
        with pytest.raises(TypeError, match=r"Session or Connection.*await outbox\.enqueue_async\("):
            sync_session.enqueue(handle, purchase())
    with pytest.raises(TypeError, match="got NoneType"):
        async_session.run(outbox.enqueue_many_async(None, []))
    assert rows(db) == []


def test_a_psycopg_connection_in_autocommit_outside_a_transaction_is_refused(db, db_url):
    with psycopg.connect(psycopg_conninfo(db_url), autocommit=True) as conn:
        with pytest.raises(ValueError, match=r"autocommit.*conn\.transaction\(\)"):
            outbox.enqueue(conn, purchase())
        with conn.transaction():
            insert_id = outbox.enqueue(conn, purchase())
    assert rows(db) == [insert_id]


def test_django_wakes_the_workers_from_on_commit(flavours, db, db_url):
    from django.db import connection, transaction

    from tests.test_wake import Listener

    listener = Listener(db_url)
    try:
        with transaction.atomic():
            outbox.enqueue(connection.connection, purchase(via="Django"))
            transaction.on_commit(lambda: outbox.wake_workers(connection.connection))
            time.sleep(0.1)
            assert listener.arrivals == []  # nothing before the commit
        assert wait_until(lambda: len(listener.arrivals) == 1, 5)
    finally:
        listener.close()


def test_django_outside_atomic_is_refused(flavours, db):
    from django.db import connection

    connection.ensure_connection()
    with pytest.raises(ValueError, match=r"transaction\.atomic\(\)"):
        outbox.enqueue(connection.connection, purchase())
    assert rows(db) == []


# ---------------------------------------------------------------- one validation, one SQL text

@pytest.mark.parametrize("statement", [INSERT_ONE, INSERT_MANY], ids=["one", "many"])
def test_the_psycopg_spelling_is_the_sqlalchemy_text_with_psycopg_placeholders(statement):
    names = sorted(statement.sqlalchemy._bindparams)
    assert sorted(re.findall(r"%\((\w+)\)s", statement.psycopg)) == names
    assert re.sub(r"%\((\w+)\)s", r":\1", statement.psycopg) == statement.sqlalchemy.text


def test_import_outbox_loads_no_http_retry_or_asyncio_machinery():
    heavy = ["requests", "tenacity", "greenlet", "sqlalchemy.ext.asyncio", "worker"]
    code = f"import sys, outbox; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
