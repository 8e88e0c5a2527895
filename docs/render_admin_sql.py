"""Write docs/admin.sql from the recipes in worker/admin/queries.py, where the operator's SQL lives:
`python docs/render_admin_sql.py`. tests/test_admin_queries.py fails while the two differ."""

from pathlib import Path

from worker.admin.queries import render_admin_sql

if __name__ == "__main__":
    target = Path(__file__).resolve().parent / "admin.sql"
    target.write_text(render_admin_sql())
    print(f"wrote {target}")
