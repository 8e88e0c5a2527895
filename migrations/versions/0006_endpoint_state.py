"""The endpoint's state, shared by every worker of the database: whether Freshpaint is answering, and while it
is not, who probes it next and when (one probe at a time for all workers).

Expand-only: a new one-row table, which the previous release's workers never read (they keep sending during an
outage, as they always did); no lock on fp_outbox_events.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row, updated only when the state changes and once per probe (at most one every second, usually one
    # every 30 s): no churn to speak of. The claim statements read it to stop claiming during an outage.
    op.execute("""
        CREATE TABLE fp_outbox_endpoint (
            id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
            down_since timestamptz,            -- null while the endpoint answers
            probes integer NOT NULL DEFAULT 0, -- probes that failed in this outage: they space the next one out
            next_probe_at timestamptz,         -- no probe starts before this
            probe_owner text,                  -- the worker probing now, until probe_until (then anyone may)
            probe_until timestamptz,
            reason text,                       -- the failure that started the outage, then the last probe's
            changed_at timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute("INSERT INTO fp_outbox_endpoint (id) VALUES (1)")
    # The roles that may settle events (the workers': UPDATE on the events) may read and change the state, so that
    # workers keep running through the upgrade under the grants they had.
    op.execute("""
        DO $$
        DECLARE r record;
        BEGIN
            FOR r IN SELECT DISTINCT a.grantee FROM pg_class AS c, aclexplode(c.relacl) AS a
                      WHERE c.oid = 'fp_outbox_events'::regclass AND a.privilege_type = 'UPDATE'
                        AND a.grantee <> c.relowner LOOP
                EXECUTE format('GRANT SELECT, UPDATE ON fp_outbox_endpoint TO %s',
                               CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r.grantee)) END);
            END LOOP;
        END $$""")


def downgrade() -> None:
    op.execute("DROP TABLE fp_outbox_endpoint")
