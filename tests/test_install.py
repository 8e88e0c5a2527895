"""A built wheel, installed into a fresh virtual environment, migrates a database from outside the repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import text

from outbox.db import alembic_config, make_engine
from tests.conftest import REPO, create_database, drop_database, url_string


def _run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result


def test_migrate_from_an_installed_wheel_outside_the_repository(tmp_path, server_url):
    source = tmp_path / "src"  # build from a copy, so the checkout gets no build/ or egg-info
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".pytest_cache"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "dist"), str(source)], cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("fp_outbox-*.whl")

    venv = tmp_path / "fresh"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    _run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    # The dependencies come from this test run's environment (no network needed), the package
    # itself only from the wheel: the fresh site-packages comes first on sys.path.
    fresh_site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           cwd=tmp_path).stdout.strip())
    (fresh_site / "zz_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(venv / "bin" / "python"), "-c", "import outbox.db as d; print(d.MIGRATIONS_DIR)"], cwd=elsewhere)
    assert where.stdout.strip().startswith(str(fresh_site)), where.stdout

    url = create_database(server_url)
    try:
        _run([str(venv / "bin" / "fp-outbox"), "migrate"], cwd=elsewhere,
             env={"PATH": "/usr/bin:/bin", "FP_OUTBOX_DATABASE_URL": url_string(url)})
        status = _run([str(venv / "bin" / "fp-outbox"), "status", "--json", "--database-url", url_string(url)],
                      cwd=elsewhere)
        assert '"pending": 0' in status.stdout
        engine = make_engine(url)
        with engine.connect() as conn:
            head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
            assert conn.execute(text("SELECT version_num FROM fp_outbox_alembic_version")).scalar() == head
        engine.dispose()
    finally:
        drop_database(server_url, url)


def test_the_version_the_worker_sends_is_the_installed_release():
    """outbox.__version__ names the release in the worker's User-Agent (`fp-outbox/<version>`) and its traces: it is
    the version pyproject.toml gives the distribution, not one left behind by an earlier release."""
    from importlib.metadata import version

    import outbox

    assert outbox.__version__ == version("fp-outbox")
