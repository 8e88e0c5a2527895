"""enqueue's insert computes its slot without a function call, and the worker's tables are vacuumed as they churn.

- The slot default of fp_outbox_events was fp_outbox_slot(), a SQL function: inlined into every INSERT's plan, and
  for an INSERT planned at each execution (the extended protocol unprepared: psycopg's first five executions on a
  connection, always behind PgBouncer) looking it up, parsing and rewriting its body cost about as much backend CPU
  as the rest of the row (bench/concurrency.py --anatomy). The default is now the expression itself, with the period
  written in; fp_outbox_set_slot_period sets it (under a short lock_timeout: a transaction writing events holds the
  table, and then the period stays until the next try) and keeps fp_outbox_slot() equal to it for its readers.
- fp_outbox_claims (a row per claim, rewritten as it settles, deleted by retention) and fp_outbox_retries churn at
  the delivery rate: with autovacuum's default 20 % of the table before a visit, a five-minute retention's claims
  log carried 50,000 dead rows and the tables grew for half an hour (bench churn). They are visited after 1 % and
  500 rows instead.

Expand-only for the previous release (0007): its workers call the database's own fp_outbox_set_slot_period, which
this migration replaces, and read nothing else changed. ALTER COLUMN SET DEFAULT takes the events' table lock for a
moment: taken under lock_timeout 2 s with retries, so enqueue waits 2 s at most behind a try; the storage
parameters take a lock that writes do not wait for.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SLOTS = 16
LOCK_TRIES, LOCK_TIMEOUT = 30, "2s"  # as 0007: at most 2 s of enqueues queued behind each try for the table's lock
SET_PERIOD_LOCK_TIMEOUT = "500ms"  # a worker changing the period: enqueues wait this long at most, then it gives up
VACUUMED = ("fp_outbox_claims", "fp_outbox_retries")
VACUUM_OPTIONS = "autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 500"

# The slot of a transaction begun now, for a period: the expression both the column default and fp_outbox_slot()
# are, written once (in the database, so the period's setter and this migration spell it alike).
SLOT_EXPRESSION = f"""
CREATE FUNCTION fp_outbox_slot_expression(p_period_s float8) RETURNS text LANGUAGE sql IMMUTABLE AS
$$ SELECT format('((floor(extract(epoch FROM now()) / %s))::bigint %% {SLOTS})::smallint', p_period_s) $$"""

# Sets the default and the function to a period, in the caller's transaction; the caller holds the period's row.
# Not SECURITY DEFINER: only the owner may (the migration, and fp_outbox_set_slot_period, which runs as the owner).
APPLY_PERIOD = """
CREATE FUNCTION fp_outbox_apply_slot_period(p_period_s float8) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
BEGIN
    -- ONLY: the partitioned table's default is the one an insert through it uses; its partitions' stay
    -- fp_outbox_slot(), equal to it, and are not locked
    EXECUTE format('ALTER TABLE ONLY fp_outbox_events ALTER COLUMN slot SET DEFAULT %s',
                   fp_outbox_slot_expression(p_period_s));
    EXECUTE format('CREATE OR REPLACE FUNCTION fp_outbox_slot() RETURNS smallint LANGUAGE sql STABLE PARALLEL SAFE'
                   ' AS %L', 'SELECT ' || fp_outbox_slot_expression(p_period_s));
END $fn$"""

# 0007's setter with the default set too. A transaction writing events holds the table: the period stays as it
# is for now (returned), and the worker's next retention run tries again.
SET_PERIOD = f"""
CREATE OR REPLACE FUNCTION fp_outbox_set_slot_period(p_retain_s float8) RETURNS float8
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT SET lock_timeout = '{SET_PERIOD_LOCK_TIMEOUT}' AS $fn$
DECLARE
    v_want float8 := greatest(10.0, p_retain_s / {SLOTS - 2}, (p_retain_s + 120.0) / {SLOTS - 1});
    v_have float8;
BEGIN
    SELECT period_s INTO v_have FROM fp_outbox_slot_period FOR UPDATE;
    IF v_have BETWEEN v_want AND 2 * v_want THEN
        RETURN v_have;  -- close enough: a new period mixes events of two periods in a slot for a round
    END IF;
    BEGIN
        PERFORM fp_outbox_apply_slot_period(v_want);
    EXCEPTION WHEN lock_not_available THEN
        RETURN v_have;
    END;
    UPDATE fp_outbox_slot_period SET period_s = v_want, since = now();
    RETURN v_want;
END $fn$"""

APPLY_CURRENT_PERIOD = f"""
DO $$
BEGIN
    FOR attempt IN 1..{LOCK_TRIES} LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '{LOCK_TIMEOUT}', true);
            PERFORM fp_outbox_apply_slot_period((SELECT period_s FROM fp_outbox_slot_period FOR UPDATE));
            PERFORM set_config('lock_timeout', '0', true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_sleep(0.5);  -- a business transaction holds it: enqueues wait behind us only while we wait
        END;
    END LOOP;
    RAISE EXCEPTION 'fp-outbox migrate: fp_outbox_events stayed locked by other transactions for % tries of %; '
                    'run it again (a long transaction that enqueued is holding it)', {LOCK_TRIES}, '{LOCK_TIMEOUT}';
END $$"""

# 0007's setter, for the downgrade.
OLD_SET_PERIOD = f"""
CREATE OR REPLACE FUNCTION fp_outbox_set_slot_period(p_retain_s float8) RETURNS float8
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $fn$
DECLARE
    v_want float8 := greatest(10.0, p_retain_s / {SLOTS - 2}, (p_retain_s + 120.0) / {SLOTS - 1});
    v_have float8;
BEGIN
    SELECT period_s INTO v_have FROM fp_outbox_slot_period FOR UPDATE;
    IF v_have BETWEEN v_want AND 2 * v_want THEN
        RETURN v_have;
    END IF;
    EXECUTE format($f$CREATE OR REPLACE FUNCTION fp_outbox_slot() RETURNS smallint LANGUAGE sql STABLE
        PARALLEL SAFE AS 'SELECT ((floor(extract(epoch FROM now()) / %s))::bigint %% {SLOTS})::smallint'$f$,
        v_want);
    UPDATE fp_outbox_slot_period SET period_s = v_want, since = now();
    RETURN v_want;
END $fn$"""


def upgrade() -> None:
    op.execute(SLOT_EXPRESSION)
    op.execute(APPLY_PERIOD)
    op.execute(SET_PERIOD)
    op.execute(APPLY_CURRENT_PERIOD)
    for table in VACUUMED:
        op.execute(f"ALTER TABLE {table} SET ({VACUUM_OPTIONS})")
    op.execute("UPDATE fp_outbox_schema_compat SET revision = '0008'")  # 0007's workers work with it unchanged


def downgrade() -> None:
    op.execute("UPDATE fp_outbox_schema_compat SET revision = '0007'")
    for table in VACUUMED:
        op.execute(f"ALTER TABLE {table} RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold)")
    op.execute("ALTER TABLE ONLY fp_outbox_events ALTER COLUMN slot SET DEFAULT fp_outbox_slot()")
    op.execute(OLD_SET_PERIOD)
    op.execute("DROP FUNCTION fp_outbox_apply_slot_period(float8)")
    op.execute("DROP FUNCTION fp_outbox_slot_expression(float8)")
