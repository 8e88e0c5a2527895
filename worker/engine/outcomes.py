"""Writing outcomes: one statement for the fresh claims' outcomes and one for the due claims', each touching only
what this worker still holds (worker.engine.queries SETTLE_*); and when the database refuses a statement for
what it carries (not a lost connection), row by row, dead-lettering with a reason it can store whatever it
refuses, so that nothing an endpoint answers can crash the worker or leave a claim to expire and be refused
again."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from worker.engine.policy import Dead, Delivered, Outcome, Retry, without_surrogates
from worker.engine.settings import Settings
from worker.engine.store import Claimed, DatabaseUnavailable, Settled, StatementRefused, Store

REPLACEMENT = "\ufffd"


def storable(text: str) -> str:
    """`text` as PostgreSQL can store it: NUL characters and lone surrogates (which UTF-8 cannot encode)
    replaced by U+FFFD."""
    return without_surrogates(text.replace("\x00", REPLACEMENT))


@dataclass
class Written:
    """What writing the outcomes did: rows settled, rows dead-lettered instead, rows nothing could be stored for."""

    held: int = 0
    dead_lettered: list[tuple[int, str]] = field(default_factory=list)  # (row id, why its outcome was refused)
    unstorable: list[tuple[int, str]] = field(default_factory=list)


class Unwritten(DatabaseUnavailable):
    """The database went away: `outcomes` are the ones not written, to settle again later."""

    def __init__(self, cause: DatabaseUnavailable, outcomes: list[tuple[Claimed, Outcome]]) -> None:
        super().__init__(str(cause))
        self.outcomes = outcomes


def settled(row: Claimed, outcome: Outcome, settings: Settings) -> Settled:
    """What settling writes for one outcome: exhausted retries become dead; a retry made while the endpoint was
    down (not `counted`) gives its attempt back and is due at once, so it never dies of an outage."""
    if isinstance(outcome, Delivered):
        return Settled(row, "delivered", outcome.status)
    if isinstance(outcome, Retry) and outcome.counted and settings.backoff.exhausted(row.attempts):
        outcome = Dead(f"gave up after {row.attempts} attempts: {outcome.reason}", outcome.status)
    if isinstance(outcome, Dead):
        return Settled(row, "dead", outcome.status, storable(outcome.reason))
    delay = settings.backoff.delay(row.attempts, outcome.retry_after) if outcome.counted else 0.0
    return Settled(row, "retry", outcome.status, storable(outcome.reason), delay, outcome.counted)


def write(store: Store, outcomes: list[tuple[Claimed, Outcome]], settings: Settings) -> tuple[list[Settled], Written]:
    """Settle every outcome; returns what was written and how. Raises Unwritten if the database goes away."""
    batch = [settled(row, outcome, settings) for row, outcome in outcomes]
    written = Written()
    try:
        try:
            written.held = store.settle(batch)
        except StatementRefused:  # something in it the database refuses: find which, one at a time
            for one in batch:
                _write_one(store, one, written)
    except DatabaseUnavailable as exc:
        raise Unwritten(exc, outcomes) from exc
    return batch, written


def _write_one(store: Store, one: Settled, written: Written) -> None:
    try:
        written.held += store.settle([one])
    except StatementRefused as exc:
        reason = (f"could not record the outcome ({one.kind}, HTTP {one.status or '-'}): "
                  f"{exc}").encode("ascii", "replace").decode("ascii")  # a reason any database can store
        try:
            written.held += store.settle([replace(one, kind="dead", error=reason[:500])])
            written.dead_lettered.append((one.row.id, str(exc)))
        except StatementRefused as again:  # not even that: its lease brings it back, and it is logged
            written.unstorable.append((one.row.id, str(again)))
