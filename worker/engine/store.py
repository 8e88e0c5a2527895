"""The worker's side of the database: claim, settle, release and the rate limiter, each statement a transaction
of its own in one round trip (worker.engine.roundtrip), with driver errors translated in one place into
DatabaseUnavailable or DatabaseRefused."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from worker.engine import figures, queries
from worker.engine.calls import Calls
from worker.engine.payload import event_body
from worker.engine.roundtrip import Ran, run_alone

log = logging.getLogger("fp_outbox.worker")


class DatabaseUnavailable(Exception):
    """The database could not be reached or dropped the connection; try again later."""


class DatabaseReadOnly(DatabaseUnavailable):
    """The database answers but accepts no writes: a primary demoted during a failover (its DNS name not yet
    moved), a standby, or default_transaction_read_only. A failover ends by itself, so the worker keeps
    reconnecting (on new connections) until a primary answers; the admin command exits 3 on it."""


class DatabaseRefused(Exception):
    """The database answers but refuses the worker, and retrying will not change that: a grant is missing, or
    the schema is; `exit_code` is the documented status for it (4 or 5)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# The exit statuses of the refusals, documented in docs/configuration.md and --help; the systemd units do not
# restart on them (RestartPreventExitStatus): restarting cannot fix them. A read-only database stops only the
# admin command (3): the worker waits for the failover to end.
EXIT_READ_ONLY, EXIT_NO_GRANT, EXIT_NO_SCHEMA = 3, 4, 5
READ_ONLY = ("the database is read-only ({reason}): a failover in progress (a demoted primary whose name has not "
             "moved yet), a standby, or default_transaction_read_only on for this role")
EXPIRED = "lease expired: its worker died, hung or lost the database before settling"
NO_TABLE = ("the outbox table fp_outbox_events does not exist in this database; run `fp-outbox migrate` "
            "(as the table's owner) first")

# SQLSTATE -> (exit code, the sentence's template); {reason} is the server's own first line, which
# names an object (a table, a function), never a value.
_REFUSALS = {
    "42501": (EXIT_NO_GRANT, "the database role lacks a grant the worker needs ({reason}); grant what "
                             "docs/operations.md lists under 'Database roles'"),
    **dict.fromkeys(("42P01", "42883", "42703", "3F000"), (
        EXIT_NO_SCHEMA, "the outbox schema is missing or out of date ({reason}); run `fp-outbox migrate`")),
}


def translate(exc: DBAPIError | psycopg.Error) -> Exception:
    """The project's exception for a driver error, SQLAlchemy's or psycopg's own (DatabaseUnavailable,
    DatabaseReadOnly, DatabaseRefused), or `exc` itself. Messages carry the server's first line only: never the
    statement or its parameters."""
    driver = getattr(exc, "orig", None) or exc
    if getattr(driver, "sqlstate", None) == "25006":  # read_only_sql_transaction
        return DatabaseReadOnly(READ_ONLY.format(reason=_describe(exc)))
    if (isinstance(exc, OperationalError | InterfaceError) or getattr(exc, "connection_invalidated", False)
            or isinstance(driver, psycopg.OperationalError | psycopg.InterfaceError)):
        return DatabaseUnavailable(_describe(exc))
    refusal = _REFUSALS.get(getattr(driver, "sqlstate", None) or "")
    if refusal:
        return DatabaseRefused(refusal[1].format(reason=_describe(exc)), refusal[0])
    return exc


class StatementRefused(Exception):
    """The database (or the driver) refused a statement for what it carried or did, on a live connection: a
    value it cannot store, a constraint or trigger of the application's. Trying it again as is won't help."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """One claimed event: its id, the attempt this claim counted, the payload text as stored and the insert_id
    column, from which body() builds what is sent; the claim it came with (claim_id; `txid` for a fresh claim, its
    primary key with the id; None for a retry), and when it was enqueued (epoch seconds)."""

    id: int
    attempts: int
    payload: str
    insert_id: str
    claim_id: int = 0
    txid: str | None = None
    created_at: float | None = None
    trace_context: str | None = None

    @property
    def fresh(self) -> bool:
        """From the events (the fresh path), not from the retries (the due path)."""
        return self.txid is not None

    def body(self, token: str | None) -> bytes:
        """The bytes to POST, with `token` filled in where the event has none (worker.engine.payload.event_body);
        raises Unsendable (NoToken, MalformedPayload) with the reason to record."""
        return event_body(self.payload, self.insert_id, token)


@dataclass(frozen=True, slots=True)
class Settled:
    """One outcome as settling writes it: `kind` delivered, retry or dead, the HTTP status (None if no answer),
    the reason, and for a retry its delay in seconds and whether the attempt counts."""

    row: Claimed
    kind: str
    status: int | None
    error: str | None = None
    delay: float = 0.0
    counted: bool = True


@dataclass(frozen=True, slots=True)
class Grant:
    """A slice of the shared rate budget: `count` requests that may start at `starts_at` (epoch seconds on the
    database's clock), which was `wait_s` seconds after the grant."""

    count: int
    starts_at: float
    wait_s: float

    @classmethod
    def none(cls) -> Grant:
        """Nothing granted (nothing claimed), nothing to wait for."""
        return cls(0, 0.0, 0.0)


class Store:
    """Named operations of the queue cycle for one worker (its lease owner id)."""

    def __init__(self, engine: Engine, owner: str, lease_seconds: float, calls: Calls | None = None) -> None:
        self.engine = engine
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.endpoint_down = False  # as the last claim read it (fp_outbox_endpoint)
        self.calls = calls or Calls()  # times every call, traces claims and settles

    def claim_fresh(self, limit: int, rate: float, *, probe: bool = False) -> tuple[list[Claimed], Grant]:
        """Claim up to `limit` events past the shared position (the fresh path) with their share of the rate
        budget, in one statement. While the endpoint is down it claims nothing, unless `probe` (this worker holds
        the probe lease)."""
        rows = self._claim(queries.CLAIM_FRESH, {"limit": limit, "rate": rate}, probe)
        return _claimed(rows), _grant_of(rows)

    def claim_due(self, limit: int, rate: float, *, probe: bool = False) -> tuple[list[Claimed], Grant]:
        """Claim up to `limit` retries whose time came (failed attempts, expired leases, released and requeued
        events), oldest due first."""
        rows = self._claim(queries.CLAIM_DUE, {"limit": limit, "rate": rate}, probe)
        return _claimed(rows), _grant_of(rows)

    def recover_expired(self, limit: int) -> tuple[int, int]:
        """Settle up to `limit` claims whose lease expired, their unfinished events made retries due now;
        returns (claims, events)."""
        row = self._run(queries.RECOVER_EXPIRED, {"limit": limit, "reason": EXPIRED}).rows[0]
        return int(row.claims), int(row.events)

    def _claim(self, statement, params: dict, probe: bool) -> list:
        rows = self._run(statement, {"owner": self.owner, "lease_s": self.lease_seconds, "probe": probe,
                                     **params}).rows
        self.endpoint_down = bool(rows[0].endpoint_down)
        return rows

    # -- the endpoint's shared state (worker.engine.endpoint) ---------------------------------------------
    def declare_endpoint_down(self, reason: str, first_probe_s: float) -> bool:
        """Mark the endpoint down for every worker; True if this call did (it was up)."""
        return bool(self._run(queries.ENDPOINT_DOWN, {"reason": reason, "first_probe_s": first_probe_s}).rows)

    def take_probe(self, base_s: float, cap_s: float) -> int | None:
        """The probe lease, if a probe is due and nobody else holds it (the next is due base_s doubling per failed
        probe, at most cap_s, from now): the probes failed so far, else None."""
        rows = self._run(queries.TAKE_PROBE, {"owner": self.owner, "lease_s": self.lease_seconds, "base_s": base_s,
                                              "cap_s": cap_s}).rows
        return rows[0].probes if rows else None

    def probe_done(self, failed: bool, retry_in_s: float = 0.0, reason: str | None = None) -> None:
        """Give the probe lease back: it failed, or found nothing to send (then try again `retry_in_s` from now)."""
        self._run(queries.PROBE_DONE, {"owner": self.owner, "failed": failed, "retry_in_s": retry_in_s,
                                       "reason": reason})

    def declare_endpoint_up(self) -> tuple[float | None, int]:
        """The outage is over: (how long it lasted, None if it was already over; rows made due at once)."""
        row = self._run(queries.ENDPOINT_UP, {}).rows[0]
        return row.down_s, int(row.made_due)

    def settle(self, outcomes: list[Settled]) -> int:
        """Write outcomes of this worker's claims (fresh and due ones, one statement each); returns how many it still
        held. Raises StatementRefused when the database refuses a statement for what it carries."""
        held = 0
        fresh = [o for o in outcomes if o.row.fresh]
        fresh_statement = (queries.SETTLE_FRESH_DELIVERED if all(o.kind == "delivered" for o in fresh)
                           else queries.SETTLE_FRESH)
        due = [o for o in outcomes if not o.row.fresh]
        for statement, group in ((fresh_statement, fresh), (queries.SETTLE_DUE, due)):
            if group:
                held += self._settle(statement, group)
        return held

    def _settle(self, statement, group: list[Settled]) -> int:
        params = {"owner": self.owner, "claim_ids": [o.row.claim_id for o in group], "ids": [o.row.id for o in group],
                  "txids": [o.row.txid for o in group], "attempts": [o.row.attempts for o in group],
                  "kinds": [o.kind for o in group], "statuses": [o.status for o in group],
                  "errors": [o.error for o in group], "delays": [o.delay for o in group],
                  "counted": [o.counted for o in group]}
        try:
            return int(self._run(statement, params).rows[0].held)
        except (psycopg.Error, UnicodeError) as exc:  # a lost connection is DatabaseUnavailable, raised as such
            raise StatementRefused(_describe(exc)) from exc

    def anything_unfinished(self) -> bool:
        """Whether any event waits (past the position, or a retry) or is in flight (an unsettled claim)."""
        return bool(self._run(queries.ANY_UNFINISHED, {}).rows[0].unfinished)

    def acquire_permits(self, count: int, rate: float) -> Grant:
        """Reserve `count` requests of the shared budget (re-sends); wait its wait_s before sending."""
        row = self._run(queries.ACQUIRE_PERMITS, {"span_s": count / rate}).rows[0]
        return Grant(count, row.starts_at, row.wait_s)

    def reset_permits(self, max_ahead: float) -> float | None:
        """Put the shared schedule back to now if it is more than `max_ahead` seconds ahead of the database's
        clock; returns how far ahead it was when it did so, else None."""
        return self._run(queries.RESET_PERMITS, {"max_ahead_s": max_ahead}).rows[0].ahead_s

    def pause_all(self, seconds: float) -> tuple[float, float]:
        """No worker may start a request for `seconds` (a 429); returns (set_at, until), epoch seconds."""
        row = self._run(queries.PAUSE_ALL, {"pause_s": seconds}).rows[0]
        return row.set_at, row.until

    def _run(self, statement, params: dict) -> Ran:
        """One statement, a transaction of its own in one round trip; driver errors translated (translate)."""
        try:
            with self.calls.timed(statement) as call:
                return call.returned(run_alone(self.engine, statement, params))
        except psycopg.Error as exc:
            translated = translate(exc)
            if translated is exc:
                raise
            raise translated from exc


def _claimed(rows: list) -> list[Claimed]:
    return [Claimed(row.id, row.attempts, row.payload, row.insert_id, row.claim_id, row.txid, row.created_at,
                    row.trace_context) for row in rows if row.id is not None]


def _grant_of(rows: list) -> Grant:
    first = rows[0]
    return Grant.none() if first.id is None else Grant(len(rows), first.starts_at, first.wait_s)


def status_counts(engine: Engine) -> dict[str, float | int | None]:
    """pending, in_flight, delivered, dead and oldest_pending_age_s, database-wide (worker.engine.figures: delivered
    is what the claims log records, kept for --retain-delivered)."""
    with engine.connect() as conn:
        return figures.status_counts(conn)


def endpoint_state(engine: Engine) -> dict[str, float | int | str | None]:
    """The endpoint's state as the workers share it: endpoint ("up"/"down"), endpoint_down_s, endpoint_probes,
    endpoint_next_probe_in_s, endpoint_reason."""
    with engine.connect() as conn:
        row = conn.execute(queries.ENDPOINT_STATE).mappings().first()
    if row is None:
        return {"endpoint": None}
    return {"endpoint": "down" if row["down"] else "up", "endpoint_down_s": row["down_s"],
            "endpoint_probes": row["probes"], "endpoint_next_probe_in_s": row["next_probe_in_s"],
            "endpoint_reason": row["reason"]}


def database_state(engine: Engine) -> dict[str, str]:
    """database: "read-write", or "read-only" (a standby, or a failover in progress: the worker waits)."""
    with engine.connect() as conn:
        return {"database": conn.execute(queries.DATABASE_STATE).scalar_one()}


def oldest_transaction(engine: Engine) -> dict[str, float | int | str | None]:
    """oldest_transaction_age_s, _pid and _state: the oldest open transaction holding this database's vacuum
    horizon back (all None when there is none)."""
    with engine.connect() as conn:
        row = conn.execute(queries.OLDEST_TRANSACTION).mappings().first()
    keys = ("oldest_transaction_age_s", "oldest_transaction_pid", "oldest_transaction_state")
    return dict(row) if row else dict.fromkeys(keys)


def queue_figures(engine: Engine) -> dict[str, float | int | None]:
    """pending, in_flight, dead and oldest_pending_age_s from the indexes alone (no scan of the delivered events):
    cheap enough to read every second."""
    with engine.connect() as conn:
        return figures.queue_depth(conn)


def workers_connected(engine: Engine) -> int:
    """How many worker processes are connected to this database, on every host (pg_stat_activity)."""
    with engine.connect() as conn:
        return int(conn.execute(queries.WORKERS_CONNECTED).scalar_one())


def _describe(exc: Exception) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
