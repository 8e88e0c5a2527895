"""enqueue's insert computes its slot in one call of a PL/pgSQL function, a change of period takes no lock, and the
applications' wake-ups notify only while a worker idles.

- 0008 made the slot default the expression itself, ((floor(extract(epoch FROM now()) / period))::bigint % 16)
  ::smallint: seven functions, each looked up, checked and set up at every plan of enqueue's INSERT, which is
  planned at each execution when unprepared (psycopg's first five executions on a connection, always behind
  PgBouncer). Backend CPU per unprepared insert (bench/concurrency.py statement_cpu): plain table 76.8 µs, 0008's
  default 99.5 µs, a constant slot 90.4 µs, one call of a PL/pgSQL function 90.9 µs. fp_outbox_slot() becomes that
  function (its body compiled once per session) and the default calls it, as the partitions' defaults already do.
  Prepared, the call costs about 3.5 µs more than the expression (52.5 against 49.0 µs); unprepared it saves 9.
- Setting the period (fp_outbox_apply_slot_period, run by fp_outbox_set_slot_period) now only replaces
  fp_outbox_slot(): no ALTER TABLE, so no lock on the events' table, and a business transaction that enqueued and
  stays open no longer holds the period back. Retention's arithmetic is unchanged: truncation locks the partition
  and checks that every event in it was claimed and settled, whatever the period its rows were written under.
- The wake-up an application sends after its commit (outbox.wake) was a NOTIFY each time: a transaction with its own
  xid, commit record and flush, and a signal to every listening worker, at most one per 25 ms per application
  process (320 a second for 8 processes), whether or not any worker was waiting. At 32 connections it cost the
  application 0.064 of its commit rate (bench concurrency: 0.853x against 0.917x without). A worker about to idle
  now says so first (fp_outbox_listening: "I listen until then", in a sequence, which is written in place and
  outside transactions), then claims once more, then waits; the application's wake-up is fp_outbox_wake(), which
  notifies only while that moment lies ahead, and otherwise is a read of one row. Busy workers claim again on
  their own and need no wake-up. Both functions are SECURITY DEFINER, so neither role needs a grant on the sequence.

Expand-only for the previous releases (0007, 0008): their workers call the database's own fp_outbox_set_slot_period,
unchanged, and read fp_outbox_slot() as before. ALTER COLUMN SET DEFAULT takes the events' table lock for a moment:
taken under lock_timeout 2 s with retries, so enqueue waits 2 s at most behind a try.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

LOCK_TRIES, LOCK_TIMEOUT = 30, "2s"  # as 0007 and 0008: at most 2 s of enqueues queued behind each try

# fp_outbox_slot() for a period: PL/pgSQL, so a call is compiled once per session and never inlined into a plan.
# Not SECURITY DEFINER: only the owner may (the migration, and fp_outbox_set_slot_period, which runs as the owner).
APPLY_PERIOD = """
CREATE OR REPLACE FUNCTION fp_outbox_apply_slot_period(p_period_s float8) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
BEGIN
    EXECUTE format('CREATE OR REPLACE FUNCTION fp_outbox_slot() RETURNS smallint LANGUAGE plpgsql STABLE'
                   ' PARALLEL SAFE AS %L', format('BEGIN RETURN %s; END', fp_outbox_slot_expression(p_period_s)));
END $fn$"""

# 0008's, for the downgrade: the default is the expression, fp_outbox_slot() the same in SQL.
APPLY_PERIOD_0008 = """
CREATE OR REPLACE FUNCTION fp_outbox_apply_slot_period(p_period_s float8) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
BEGIN
    EXECUTE format('ALTER TABLE ONLY fp_outbox_events ALTER COLUMN slot SET DEFAULT %s',
                   fp_outbox_slot_expression(p_period_s));
    EXECUTE format('CREATE OR REPLACE FUNCTION fp_outbox_slot() RETURNS smallint LANGUAGE sql STABLE PARALLEL SAFE'
                   ' AS %L', 'SELECT ' || fp_outbox_slot_expression(p_period_s));
END $fn$"""

# Replaces fp_outbox_slot() for the period in force, then, for the upgrade, makes the default call it; as 0008's.
LOCKED_STEP = {
    "upgrade": "PERFORM fp_outbox_apply_slot_period((SELECT period_s FROM fp_outbox_slot_period FOR UPDATE));"
               " ALTER TABLE ONLY fp_outbox_events ALTER COLUMN slot SET DEFAULT fp_outbox_slot();",
    "downgrade": "PERFORM fp_outbox_apply_slot_period((SELECT period_s FROM fp_outbox_slot_period FOR UPDATE));",
}


def _with_lock_retries(step: str) -> str:
    return f"""
DO $$
BEGIN
    FOR attempt IN 1..{LOCK_TRIES} LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '{LOCK_TIMEOUT}', true);
            {step}
            PERFORM set_config('lock_timeout', '0', true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_sleep(0.5);  -- a business transaction holds it: enqueues wait behind us only while we wait
        END;
    END LOOP;
    RAISE EXCEPTION 'fp-outbox migrate: fp_outbox_events stayed locked by other transactions for % tries of %; '
                    'run it again (a long transaction that enqueued is holding it)', {LOCK_TRIES}, '{LOCK_TIMEOUT}';
END $$"""


# Until when (epoch milliseconds, the database's clock) some worker idles listening for wake-ups: the latest any
# worker announced. Only ever raised, under an advisory lock, so two workers going idle at once keep the later.
LISTENING = [
    "CREATE SEQUENCE fp_outbox_listening_seq MINVALUE 0 START 0",
    """
    CREATE FUNCTION fp_outbox_listening(p_seconds float8) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $fn$
    BEGIN
        PERFORM pg_advisory_xact_lock(hashtext('fp_outbox_listening_seq'));
        PERFORM setval('fp_outbox_listening_seq',
                       greatest(s.last_value, (extract(epoch FROM clock_timestamp()) * 1000 + p_seconds * 1000)::bigint))
          FROM fp_outbox_listening_seq AS s;
    END $fn$""",
    """
    CREATE FUNCTION fp_outbox_wake() RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $fn$
        SELECT pg_notify('fp_outbox', '') FROM fp_outbox_listening_seq AS s
         WHERE s.last_value > extract(epoch FROM clock_timestamp()) * 1000
    $fn$""",
]


def upgrade() -> None:
    for statement in LISTENING:
        op.execute(statement)
    op.execute(APPLY_PERIOD)
    op.execute(_with_lock_retries(LOCKED_STEP["upgrade"]))
    op.execute("UPDATE fp_outbox_schema_compat SET revision = '0009'")  # 0007's and 0008's workers work with it


def downgrade() -> None:
    op.execute("UPDATE fp_outbox_schema_compat SET revision = '0008'")
    op.execute(APPLY_PERIOD_0008)
    op.execute(_with_lock_retries(LOCKED_STEP["downgrade"]))
    op.execute("DROP FUNCTION fp_outbox_wake()")
    op.execute("DROP FUNCTION fp_outbox_listening(float8)")
    op.execute("DROP SEQUENCE fp_outbox_listening_seq")
