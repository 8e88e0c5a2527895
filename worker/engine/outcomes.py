"""Writing outcomes to the table: one statement per kind (delivered, retry later, dead), each touching only
rows this worker still holds; and when the database refuses a statement for what it carries (not a lost
connection), row by row, dead-lettering with a reason it can store whatever it refuses, so that nothing an
endpoint answers can crash the worker or leave a batch in flight to be re-claimed and refused again."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.engine.policy import Dead, Delivered, Outcome, Retry, without_surrogates
from worker.engine.settings import Settings
from worker.engine.store import Claimed, DatabaseUnavailable, StatementRefused, Store

REPLACEMENT = "\ufffd"


def storable(text: str) -> str:
    """`text` as PostgreSQL can store it: NUL characters and lone surrogates (which UTF-8 cannot encode)
    replaced by U+FFFD."""
    return without_surrogates(text.replace("\x00", REPLACEMENT))


@dataclass
class Batch:
    """The outcomes of one kind, as one statement settles them."""

    kind: str  # "delivered", "retry" or "dead"
    rows: list[Claimed] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)  # retry only: seconds until the next attempt


@dataclass
class Written:
    """What writing the outcomes did: rows settled, rows dead-lettered instead, rows nothing could be stored for."""

    held: int = 0
    dead_lettered: list[tuple[int, str]] = field(default_factory=list)  # (row id, why its outcome was refused)
    unstorable: list[tuple[int, str]] = field(default_factory=list)


class Unwritten(DatabaseUnavailable):
    """The database went away part-way: `done` batches were written (`written` says how), `outcomes` are the
    ones not yet written, to settle again later."""

    def __init__(self, cause: DatabaseUnavailable, done: list[Batch], written: Written,
                 outcomes: list[tuple[Claimed, Outcome]]) -> None:
        super().__init__(str(cause))
        self.done, self.written, self.outcomes = done, written, outcomes


def split_outcomes(outcomes: list[tuple[Claimed, Outcome]], settings: Settings) -> list[Batch]:
    """Sort outcomes into the three settle statements; exhausted retries become dead. A retry made while the
    endpoint was down (not `counted`) gives its attempt back and is due at once: it never dies of an outage."""
    delivered, retry, dead = Batch("delivered"), Batch("retry"), Batch("dead")
    for row, outcome in outcomes:
        if isinstance(outcome, Retry) and outcome.counted and settings.backoff.exhausted(row.attempts):
            outcome = Dead(f"gave up after {row.attempts} attempts: {outcome.reason}", outcome.status)
        batch = delivered if isinstance(outcome, Delivered) else retry if isinstance(outcome, Retry) else dead
        batch.rows.append(row)
        batch.outcomes.append(outcome)
        if batch is retry:
            retry.delays.append(settings.backoff.delay(row.attempts, outcome.retry_after) if outcome.counted else 0.0)
    return [delivered, retry, dead]


def write(store: Store, batches: list[Batch]) -> Written:
    """Settle every batch; raises Unwritten (with what is left) if the database goes away part-way."""
    written = Written()
    for index, batch in enumerate(batches):
        try:
            _write_batch(store, batch, written)
        except DatabaseUnavailable as exc:
            left = [(row, outcome) for later in batches[index:] for row, outcome in zip(later.rows, later.outcomes)]
            raise Unwritten(exc, batches[:index], written, left) from exc
    return written


def _write_batch(store: Store, batch: Batch, written: Written) -> None:
    try:
        written.held += _settle(store, batch)
        return
    except StatementRefused:
        pass  # something in it the database refuses: find which rows, one at a time
    for single in _singles(batch):
        try:
            written.held += _settle(store, single)
        except StatementRefused as exc:
            _dead_letter(store, single, str(exc), written)


def _dead_letter(store: Store, single: Batch, error: str, written: Written) -> None:
    row, outcome = single.rows[0], single.outcomes[0]
    reason = (f"could not record the outcome ({single.kind}, HTTP {outcome.status or '-'}): "
              f"{error}").encode("ascii", "replace").decode("ascii")  # a reason any database can store
    try:
        written.held += store.mark_dead([row], [outcome.status], [reason[:500]])
        written.dead_lettered.append((row.id, error))
    except StatementRefused as exc:  # not even that: its lease brings it back, and it is logged
        written.unstorable.append((row.id, str(exc)))


def _singles(batch: Batch) -> list[Batch]:
    return [Batch(batch.kind, [row], [outcome], batch.delays[i:i + 1])
            for i, (row, outcome) in enumerate(zip(batch.rows, batch.outcomes))]


def _settle(store: Store, batch: Batch) -> int:
    statuses = [outcome.status for outcome in batch.outcomes]
    if batch.kind == "delivered":
        return store.mark_delivered(batch.rows, statuses)
    reasons = [storable(outcome.reason) for outcome in batch.outcomes]
    if batch.kind == "retry":
        return store.schedule_retry(batch.rows, batch.delays, statuses, reasons, [o.counted for o in batch.outcomes])
    return store.mark_dead(batch.rows, statuses, reasons)
